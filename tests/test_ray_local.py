"""A Ray that platebench starts listens on loopback only and keeps its files in our temp folder.

Reads /proc directly (psutil is not a dependency): listening sockets of this process's descendants.
"""

import ipaddress
import os
from pathlib import Path


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
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
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
