"""Scoped teardown of a Ray started by a subprocess: kill what lives under its RAY_TMPDIR (never `ray stop`)."""

import os
import signal
from pathlib import Path


def pids_using_tmpdir(tmpdir: str) -> list[int]:
    needle = f"RAY_TMPDIR={tmpdir}".encode()
    out = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in env.read_bytes().split(b"\0"):
                out.append(int(env.parent.name))
        except OSError:
            continue
    return [p for p in out if p != os.getpid()]


def kill_ray_under(tmpdir: str) -> int:
    pids = pids_using_tmpdir(tmpdir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)
