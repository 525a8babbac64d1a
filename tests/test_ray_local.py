"""A Ray that platebench starts listens on loopback only and keeps its files in our temp folder; so do the Train
workers of a run (gloo and torch's rendezvous store).

Reads /proc directly (psutil is not a dependency): listening sockets of a process's descendants.
"""

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray_procs import kill_ray_under
from shard_fixtures import build_tiny_dataset


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


def _socket_inodes(pid: int) -> set[str]:
    """The socket inodes `pid` holds open; none once the process has ended (listed, then gone before this read)."""
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _listening() -> dict[str, str]:
    """inode -> local IP of every listening TCP socket on the host (IPv4-mapped IPv6 as IPv4)."""
    out = {}
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A":  # LISTEN
                continue
            hex_ip = cols[1].split(":")[0]
            raw = bytes.fromhex(hex_ip)
            # /proc stores addresses as little-endian 32-bit words
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(packed)
            out[cols[9]] = getattr(ip, "ipv4_mapped", None) or ip
    return out


def test_local_ray_listens_on_loopback_only(ray_session):
    pids = _descendants(os.getpid())
    listening = _listening()
    mine = [(pid, listening[i]) for pid in pids for i in _socket_inodes(pid) if i in listening]
    assert len(mine) >= 3, "expected the Ray servers (gcs, raylet, workers) among this process's descendants"
    bad = [(pid, str(ip)) for pid, ip in mine if not ip.is_loopback]
    assert not bad, f"Ray sockets listening beyond loopback: {bad}"


def test_ray_temp_files_live_under_the_chosen_folder(ray_session):
    from platebench.harness.ray_local import default_tmpdir

    session_dir = ray_session._private.worker._global_node.get_session_dir_path()
    assert os.path.realpath(session_dir).startswith(os.path.realpath(default_tmpdir()))


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@pytest.mark.ray  # a `platebench run` subprocess starts its own Ray
@pytest.mark.slow
def test_train_workers_listen_on_loopback_only_while_a_run_trains(tmp_path):
    """A 2-worker `platebench run`: every socket its process tree listens on while it trains (Ray, the Train
    workers' gloo pairs and torch rendezvous store) is bound to 127.0.0.1 / ::1."""
    data = build_tiny_dataset(tmp_path / "ds", images_per_plate=32)
    ray_tmp = tempfile.mkdtemp(prefix="pbl", dir="/tmp")  # short: Ray puts unix sockets under it
    from platebench.harness.ray_local import RAY_ENV

    # as from a plain shell: without the settings conftest put in this process's environment
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV}
    env.update(RAY_TMPDIR=ray_tmp, PLATEBENCH_RAY_TMPDIR=ray_tmp)
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "platebench.harness.cli", "run", "--data", data, "--split-scheme", "new_batches",
           "--method", "erm", "--epochs", "3", "--hparams", "batch_size=4", "--workers", "2", "--num-cpus", "4",
           "--out", str(tmp_path / "out"), "--no-mlflow"]
    seen: dict[tuple[int, str], tuple[str, str]] = {}  # (pid, socket inode) -> (local IP, title when first seen)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline:
                listening = _listening()
                for pid in _descendants(proc.pid):
                    for inode in _socket_inodes(pid):
                        if inode in listening:
                            seen.setdefault((pid, inode), (str(listening[inode]), _title(pid)))
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
            kill_ray_under(ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, f"run failed (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
    # opened after the process became a Train worker: gloo's and the rendezvous store's, not the Ray worker's own
    opened_by_workers = [ip for ip, title in seen.values() if "RayTrainWorker" in title]
    assert opened_by_workers, f"no socket opened by a Train worker seen: {sorted({t[:40] for _, t in seen.values()})}"
    bad = [(pid, ip, title[:60]) for (pid, _), (ip, title) in seen.items() if not ipaddress.ip_address(ip).is_loopback]
    assert not bad, f"sockets listening beyond loopback: {bad}"
