"""One writing command per storage root: a second `run` or `bench` on a locked root is refused with one line naming the
holder before Ray starts; the lock goes when its command ends (an error, SIGTERM included); a lock left by a process
of this host that is gone is taken over with a warning; an exclusive create on S3 too (conditional PUT)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from platebench.harness import ray_local
from platebench.harness.cli import main
from platebench.harness.errors import HarnessError
from platebench.harness.train import storage_lock

pytestmark = pytest.mark.faults


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started on a locked storage root")

    monkeypatch.setattr(ray_local, "init", refuse)


def _command(name: str, data: str, out) -> list[str]:
    common = ["--data", data, "--split-scheme", "new_batches", "--epochs", "1", "--hparams", "batch_size=4",
              "--out", str(out), "--no-mlflow"]
    if name == "run":
        return ["run", "--method", "erm", "--seeds", "0", *common]
    return ["bench", "--methods", "erm", "--seeds", "0", "--baseline", "erm", *common]


@pytest.mark.parametrize("name", ["run", "bench"])
def test_a_second_command_on_a_locked_root_is_refused_naming_the_holder(tiny_dataset, tmp_path, capsys, no_ray, name):
    out = tmp_path / "out"
    lock = storage_lock.acquire(str(out), None, "platebench bench")
    try:
        assert main(_command(name, tiny_dataset, out)) == 2
        err = capsys.readouterr().err
        holder = json.loads((out / "lock.json").read_text())
        assert err == (f"platebench {name}: error: {out} is in use by `platebench bench` (pid {os.getpid()} on host "
                       f"{socket.gethostname()}, since {holder['started']}); wait until it ends, or delete "
                       f"{out}/lock.json if that command is gone\n")
        assert holder["token"] == lock.holder["token"]  # the refused command left the holder's lock alone
        assert not (out / "records").exists() and not (out / "runs").exists()
    finally:
        lock.release()
    assert not (out / "lock.json").exists()


def test_the_lock_is_released_when_the_command_fails(tiny_dataset, tmp_path, capsys, no_ray):
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs").write_text("")  # a file where the runs folder goes: the write probe fails after the lock is taken
    assert main([*_command("run", tiny_dataset, out)]) == 2
    assert f"storage {out} is not writable" in capsys.readouterr().err
    assert not (out / "lock.json").exists()
    storage_lock.acquire(str(out), None, "next").release()  # free again


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its pid names no process
    return proc.pid


def test_a_stale_lock_of_this_host_is_taken_over_with_a_warning(tmp_path, capsys):
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "command": "platebench bench",
             "started": "2020-01-01T00:00:00", "token": "old"}
    (tmp_path / "lock.json").write_text(json.dumps(stale))
    lock = storage_lock.acquire(str(tmp_path), None, "platebench run")
    err = capsys.readouterr().err
    assert err == (f"warning: taking over the storage lock of `platebench bench` (pid {stale['pid']} on host "
                   f"{stale['host']}, since 2020-01-01T00:00:00): that process is gone ({tmp_path}/lock.json)\n")
    assert json.loads((tmp_path / "lock.json").read_text())["token"] == lock.holder["token"]
    lock.release()
    assert not (tmp_path / "lock.json").exists()


def test_the_holder_deletes_what_a_writer_killed_between_write_and_rename_left(tmp_path, capsys):
    run = tmp_path / "records" / "erm-s0-abc"
    run.mkdir(parents=True)
    (run / "epoch-00001.parquet").write_bytes(b"finished")
    (run / "notes.tmp-draft").write_bytes(b"a user's file")  # not a temporary name of ours
    # A writer SIGKILLed after writing epoch 2's temporary file, before renaming it.
    killed = textwrap.dedent(f"""
        import os, signal
        from platebench.datasets.storage import filesystem, put_atomic
        fs, root = filesystem({str(run)!r})
        fs.mv = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        put_atomic(fs, root + "/epoch-00002.parquet", b"epoch 2")
    """)
    assert subprocess.run([sys.executable, "-c", killed]).returncode == -signal.SIGKILL
    left = [p.name for p in run.iterdir() if p.name.startswith("epoch-00002.parquet.tmp-")]
    assert len(left) == 1
    with storage_lock.held(str(tmp_path), None, "platebench bench"):
        assert sorted(p.name for p in run.iterdir()) == ["epoch-00001.parquet", "notes.tmp-draft"]
    assert capsys.readouterr().err == ("warning: removed 1 temporary file(s) of writes a killed command never "
                                       f"finished, e.g. {run / left[0]}\n")


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    other = {"host": "another-host.invalid", "pid": _dead_pid(), "command": "platebench sweep",
             "started": "2020-01-01T00:00:00", "token": "theirs"}
    (tmp_path / "lock.json").write_text(json.dumps(other))
    with pytest.raises(HarnessError, match=r"is in use by `platebench sweep` \(pid \d+ on host another-host.invalid"):
        storage_lock.acquire(str(tmp_path), None, "platebench run")
    assert json.loads((tmp_path / "lock.json").read_text()) == other
    (tmp_path / "lock.json").write_text("{half a file")
    with pytest.raises(HarnessError, match="in use by an unknown command \\(unreadable lock file"):
        storage_lock.acquire(str(tmp_path), None, "platebench run")


@pytest.mark.slow  # a subprocess: out of the unit tier
def test_sigterm_releases_the_lock(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from platebench.harness.train import storage_lock
        lock = storage_lock.acquire({str(tmp_path)!r}, None, "platebench bench")
        print("locked", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert (tmp_path / "lock.json").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert not (tmp_path / "lock.json").exists()


def test_the_lock_on_s3_is_an_exclusive_create(s3_server):
    s3_server.create_bucket("locks")
    url, options = "s3://locks/bench", s3_server.options()
    first = storage_lock.acquire(url, options, "platebench bench")
    with pytest.raises(HarnessError, match=r"^s3://locks/bench is in use by `platebench bench` \(pid "):
        storage_lock.acquire(url, options, "platebench run")
    first.release()
    storage_lock.acquire(url, options, "platebench run").release()
