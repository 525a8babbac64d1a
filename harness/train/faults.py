"""Fault injection for resilience tests and drills (`--inject-fault`): fail a worker once, on purpose.

Spec: "phase=P,epoch=E,step=S,rank=R,mode=exit|raise". `phase` is where the fault fires: `train` (default:
at 1-based epoch E, 0-based step S), or one of a run's evaluations after training, `tests`, `sweeps` (the TTA
sweeps) or `representation`, where it fires the first time that phase starts on rank R (E and S do not
apply). The fault fires at most once per run: a marker under <storage>/faults/ records that it happened, so
the retried or resumed run goes on. `exit` kills the worker process (os._exit, like an OOM kill or a lost
node); `raise` fails the training function with an exception.
"""

from __future__ import annotations

import os

from platebench.datasets.storage import StorageOptions, filesystem, join

from ..errors import HarnessError

PHASES = ("train", "tests", "sweeps", "representation")
MODES = ("exit", "raise")


def parse(spec: str | None) -> dict | None:
    if not spec:
        return None
    out = {"phase": "train", "epoch": 1, "step": 0, "rank": 0, "mode": "exit"}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in out:
            raise HarnessError(f"--inject-fault: unknown key {key!r} ({', '.join(out)})")
        if key in ("phase", "mode"):
            out[key] = value
        else:
            try:
                out[key] = int(value)
            except ValueError:
                raise HarnessError(f"--inject-fault: {key} needs an integer, got {value!r}") from None
    if out["phase"] not in PHASES:
        raise HarnessError(f"--inject-fault: phase must be one of {', '.join(PHASES)}, got {out['phase']!r}")
    if out["mode"] not in MODES:
        raise HarnessError(f"--inject-fault: mode must be exit or raise, got {out['mode']!r}")
    return out


def maybe_fail(fault: dict | None, storage: str, options: StorageOptions, run_id: str, epoch: int, step: int,
               rank: int, phase: str = "train") -> None:
    """Fire `fault` if this is its place: training step `step` of 0-based `epoch`, or the start of `phase`."""
    if not fault or fault["phase"] != phase or fault["rank"] != rank:
        return
    if phase == "train" and (fault["epoch"], fault["step"]) != (epoch + 1, step):
        return
    fs, root = filesystem(storage, options)
    where = f"e{epoch + 1}-s{step}" if phase == "train" else phase
    marker = join(root, "faults", f"{run_id}-{where}-r{rank}")
    if fs.exists(marker):
        return
    fs.makedirs(join(root, "faults"), exist_ok=True)
    fs.pipe_file(marker, b"fired")
    if fault["mode"] == "exit":
        os._exit(1)
    raise RuntimeError(f"INJECTED FAULT in {phase} at epoch {epoch + 1} step {step} rank {rank}")
