"""Fault injection for resilience tests and drills (`--inject-fault`): fail a worker once, on purpose.

Spec: "epoch=E,step=S,rank=R,mode=exit|raise" (1-based epoch, 0-based step). The fault fires at most
once per run: a marker under <storage>/faults/ records that it happened, so the retried or resumed
run goes on. `exit` kills the worker process (os._exit, like an OOM kill or a lost node); `raise`
fails the training function with an exception.
"""

from __future__ import annotations

import os

from platebench.datasets.storage import StorageOptions, filesystem, join

from ..errors import HarnessError


def parse(spec: str | None) -> dict | None:
    if not spec:
        return None
    out = {"epoch": 1, "step": 0, "rank": 0, "mode": "exit"}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in out:
            raise HarnessError(f"--inject-fault: unknown key {key!r} (epoch, step, rank, mode)")
        out[key] = value if key == "mode" else int(value)
    if out["mode"] not in ("exit", "raise"):
        raise HarnessError(f"--inject-fault: mode must be exit or raise, got {out['mode']!r}")
    return out


def maybe_fail(fault: dict | None, storage: str, options: StorageOptions, run_id: str, epoch: int, step: int,
               rank: int) -> None:
    if not fault or (fault["epoch"], fault["step"], fault["rank"]) != (epoch + 1, step, rank):
        return
    fs, root = filesystem(storage, options)
    marker = join(root, "faults", f"{run_id}-e{epoch + 1}-s{step}-r{rank}")
    if fs.exists(marker):
        return
    fs.makedirs(join(root, "faults"), exist_ok=True)
    fs.pipe_file(marker, b"fired")
    if fault["mode"] == "exit":
        os._exit(1)
    raise RuntimeError(f"INJECTED FAULT at epoch {epoch + 1} step {step} rank {rank}")
