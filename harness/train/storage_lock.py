"""One writing command at a time on a storage root: `platebench run`, `bench` and `sweep` hold `<storage>/lock.json`
(harness/results/layout.py) while they train and write records, so two commands on one root never train the same
trainings side by side (each would report success for work the other overwrote).

The lock file names its holder (host, pid, command, start time), and a second command is refused with one line
naming it, before Ray starts. It is taken by an exclusive create: on a local disk a hard link of a complete file
(atomic, and it fails when the name exists: a reader never sees half a file); on S3 a conditional PUT
(`If-None-Match: *`); on another fsspec store, which offers neither, a check then a write (a race window of one
round trip, documented in docs/concepts.md). Once held, the temporary files that a holder killed outright left
between a write and its rename (records, run files, checkpoints) are deleted: no writer can be at work there. It is
released when the command ends: normally, on an error, on Ctrl-C
and on SIGTERM (try/finally, atexit, and a SIGTERM handler that exits through them). A holder killed outright
(SIGKILL, a lost machine) leaves its lock behind: one of this host whose pid is gone is taken over with a warning
line; one of another host is refused, naming the file to delete once that command is known to be gone (its pid
cannot be checked from here). Taking over re-reads the lock and deletes it only if unchanged, then creates its own
exclusively: two commands taking over the same stale lock in the same instant could both pass the re-read (a window
of milliseconds between the re-read and the delete).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager

from platebench.datasets.errors import StorageError
from platebench.datasets.storage import StorageOptions, filesystem, is_local, join, with_retries

from ..errors import HarnessError
from ..results.layout import RECORDS_DIR, RUNS_DIR, SWEEPS_DIR, TRAININGS_DIR, lock_file

# What only the lock's holder writes, and the temporary name datasets/storage.put_all_atomic writes before its
# rename (<target>.tmp-<8 hex digits>; tests/faults/test_storage_lock.py kills a real write to keep the two in step).
LOCKED_DIRS = (RECORDS_DIR, RUNS_DIR, TRAININGS_DIR, SWEEPS_DIR)
INTERRUPTED_WRITE = re.compile(r"\.tmp-[0-9a-f]{8}$")


class StorageLock:
    """A held storage lock; `release()` (idempotent) removes the file if it is still this holder's."""

    def __init__(self, url: str, fs, path: str, holder: dict):
        self.url, self.fs, self.path, self.holder = url, fs, path, holder
        self.released = False
        self.previous_sigterm = None

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        atexit.unregister(self.release)
        if self.previous_sigterm is not None and signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
            signal.signal(signal.SIGTERM, self.previous_sigterm)
        try:
            current = with_retries(lambda: _read(self.fs, self.path), f"reading {self.url}")
            if current is not None and current.get("token") == self.holder["token"]:
                with_retries(lambda: self.fs.rm_file(self.path), f"removing {self.url}")
        except StorageError as exc:  # never hides the error the command ends with
            print(f"warning: the storage lock stays behind ({exc}); delete {self.url} before the next command",
                  file=sys.stderr, flush=True)


def acquire(storage: str, options: StorageOptions | None, command: str, stream=None) -> StorageLock:
    """Take the lock of `storage` for `command` (a one-line description, e.g. the command line), or raise a
    HarnessError naming its holder. A stale lock of this host (its pid gone) is taken over with a warning line."""
    fs, root = filesystem(storage, options)
    path, url = lock_file(root), lock_file(storage)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex}
    data = json.dumps(holder, indent=1).encode()
    for _ in range(3):
        if with_retries(lambda: _create(fs, path, data), f"writing {url}"):
            lock = StorageLock(url, fs, path, holder)
            atexit.register(lock.release)
            _release_on_sigterm(lock)
            return lock
        other = with_retries(lambda: _read(fs, path), f"reading {url}")
        if other is None:  # released in between: try again
            continue
        if not _stale(other):
            raise HarnessError(f"{storage} is in use by {describe(other)}; wait until it ends, or delete {url} if "
                               "that command is gone")
        print(f"warning: taking over the storage lock of {describe(other)}: that process is gone ({url})",
              file=stream or sys.stderr, flush=True)
        with_retries(lambda seen=other: _remove_if_unchanged(fs, path, seen), f"removing {url}")
    raise HarnessError(f"{storage}: could not take the storage lock {url} (other commands keep taking it)")


@contextmanager
def held(storage: str, options: StorageOptions | None, command: str, stream=None):
    """The lock of `storage` for the duration of a `with` block."""
    lock = acquire(storage, options, command, stream)
    try:
        _remove_interrupted_writes(lock, stream)
        yield lock
    finally:
        lock.release()


def _remove_interrupted_writes(lock: StorageLock, stream) -> None:
    """Delete the temporary files a writer killed between its write and its rename left in the holder's folders
    (on a local disk; object storage writes in one PUT). Safe only now: no other writer can be at work there."""
    if not is_local(lock.fs):
        return
    root = lock.path.rsplit("/", 1)[0]
    removed = [os.path.join(d, name) for folder in LOCKED_DIRS for d, _, names in os.walk(join(root, folder))
               for name in names if INTERRUPTED_WRITE.search(name)]
    for path in removed:
        os.unlink(path)
    if removed:
        print(f"warning: removed {len(removed)} temporary file(s) of writes a killed command never finished, e.g. "
              f"{removed[0]}", file=stream or sys.stderr, flush=True)


def describe(holder: dict) -> str:
    """The holder as one phrase: its command, pid, host and start time."""
    if "unreadable" in holder:
        return f"an unknown command (unreadable lock file: {holder['unreadable']})"
    return (f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')})")


def _create(fs, path: str, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists (False then)."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, path)  # atomic, and refused when the name exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if {"s3", "s3a"} & set(protocols):
        try:
            fs.pipe_file(path, data, mode="create")  # If-None-Match: *
            return True
        except FileExistsError:
            return False
    if fs.exists(path):  # no conditional write on this store: check, then write
        return False
    fs.pipe_file(path, data)
    return True


def _read(fs, path: str) -> dict | None:
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError as exc:
        return {"unreadable": str(exc)}
    return holder if isinstance(holder, dict) else {"unreadable": "not a JSON object"}


def _remove_if_unchanged(fs, path: str, seen: dict) -> None:
    if _read(fs, path) == seen:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def _stale(holder: dict) -> bool:
    """The holder ran on this host and its process is gone."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    try:  # Linux: a zombie (ended, not yet reaped by its parent) is gone too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # through every finally and atexit: the lock is released


def _release_on_sigterm(lock: StorageLock) -> None:
    """SIGTERM's default ends the process without finally blocks or atexit; exit through them instead (main thread
    only, and only where nobody else handles SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        lock.previous_sigterm = signal.SIG_DFL
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
