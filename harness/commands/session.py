"""What `platebench run`, `bench` and `sweep` share: launch flags, Ray, storage, MLflow, progress output
(a helper of those commands, not a command itself)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from platebench.datasets.storage import StorageOptions, absolute

from .. import ray_local
from ..errors import HarnessError
from ..train import faults, storage_lock, tracking
from ..train.runner import Launch, check_storage_writable
from .flags import (
    add_cache_mb_flag,
    add_cpus_per_worker_flag,
    add_gpu_flag,
    add_mlflow_flags,
    add_out_flag,
    add_ray_flags,
    add_workers_flag,
    non_negative_int,
)


def add_launch_flags(p) -> None:
    g = p.add_argument_group("execution")
    add_out_flag(g)
    g.add_argument("--storage", help="where records, checkpoints and done markers go (dir or s3://; default --out)")
    add_workers_flag(g)
    add_gpu_flag(g)
    add_cpus_per_worker_flag(g)
    add_cache_mb_flag(g)
    g.add_argument("--placement-strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_SPREAD"],
                   help="how a run's workers are placed on nodes (STRICT_SPREAD: one per node)")
    g.add_argument("--max-failures", type=non_negative_int, default=2,
                   help="worker failures a run survives (FailureConfig)")
    add_ray_flags(g)
    add_mlflow_flags(g)
    g.add_argument("--inject-fault", metavar="SPEC", type=fault_spec,
                   help="resilience drill: kill a worker once, e.g. epoch=2,step=3,rank=0,mode=exit or "
                        "phase=sweeps,mode=exit (phases: train, tests, sweeps, representation)")


def fault_spec(text: str) -> str:
    """--inject-fault's value, checked while the flags are parsed (before the lock, --out or Ray)."""
    import argparse

    try:
        faults.parse(text)
    except HarnessError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--inject-fault: ")) from None
    return text


def local_cpus(args) -> int:
    """Logical CPUs of a local Ray: every concurrent run's workers plus one spare, because Ray Data read
    tasks need CPU beside the Train workers or the stream waits forever."""
    if args.num_cpus:
        return args.num_cpus
    workers = max(1, getattr(args, "workers", None) or 1)
    busy = max_concurrent(args) * workers * getattr(args, "cpus_per_worker", 1.0)
    return int(max(os.cpu_count() or 2, -(-busy // 1))) + 1


def start_ray(args) -> None:
    ray_local.init(address=args.address, num_cpus=None if args.address else local_cpus(args))


def storage_of(args) -> str:
    """Where the command's records, checkpoints and done markers go: --storage, else --out."""
    return absolute(args.storage) if args.storage else str(Path(args.out).resolve())


def storage_locked(args):
    """The storage lock (harness/train/storage_lock.py) for a `with` block around everything a command writes
    there: taken before Ray starts, released however the block ends."""
    # The command's name only: its full command line may carry credentials (an MLflow URI's password).
    return storage_lock.held(storage_of(args), StorageOptions.from_env(), f"platebench {args.command}")


def launch_from_args(args, mlflow: tracking.MlflowTarget | None) -> Launch:
    storage = storage_of(args)
    launch = Launch(storage=storage, options=StorageOptions.from_env(), workers=args.workers, use_gpu=args.gpu,
                    cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures, mlflow=mlflow,
                    fault=args.inject_fault, placement_strategy=args.placement_strategy,
                    cache_mb=args.cache_mb)
    check_storage_writable(launch)
    return launch


def max_concurrent(args) -> int:
    if getattr(args, "max_concurrent", None):
        return args.max_concurrent
    if args.address:
        return 64  # a cluster: Ray queues what does not fit
    return max(1, (os.cpu_count() or 2) // max(1, args.workers))


def tracking_uri_for_workers(args, uri: str) -> str:
    """`uri` as Train workers and Tune trials on every node reach it (tracking.worker_tracking_uri). Joining a
    cluster (--address) starts Ray here, before the target goes into the Launch, to count its nodes."""
    ray = sys.modules.get("ray")
    joined = bool(getattr(args, "address", None))
    if not joined and not (ray and ray.is_initialized()):
        return tracking.worker_tracking_uri(uri, None, 1)  # the local Ray to come: one node, on loopback
    start_ray(args)
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    here = ray.get_runtime_context().get_node_id()
    driver = next((n["NodeManagerAddress"] for n in alive if n["NodeID"] == here), None)
    return tracking.worker_tracking_uri(uri, driver or ray.util.get_node_ip_address(), len(alive), cluster=joined)


def open_tracking(args, experiment: str, parent_name: str, params: dict,
                  reuse_parent: bool = False) -> tracking.MlflowTarget | None:
    if args.no_mlflow:
        return None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    given = args.mlflow_uri or tracking.default_uri(args.out)
    uri = tracking_uri_for_workers(args, given)
    try:
        exp = tracking.open_experiment(uri, experiment)
    except HarnessError as exc:
        if uri == given:
            raise
        raise HarnessError(f"{exc}; {uri} stands for {given} so that workers on other nodes reach it: serve MLflow "
                           f"on the head's address (mlflow server --host 0.0.0.0 --app-name basic-auth)") from None
    parent = tracking.start_parent(uri, exp, parent_name, params, reuse=reuse_parent)
    return tracking.MlflowTarget(tracking_uri=uri, experiment_id=exp, parent_run_id=parent)


class Progress:
    """Runs done/total, what each lane is doing, elapsed and ETA, on stderr while runs go on."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream
        self.start = time.time()
        self.done = 0
        self.lanes: dict[str, dict] = {}
        self._last = 0.0

    def event(self, kind: str, spec, result) -> None:
        if kind in ("finished", "failed", "skipped"):
            self.done += 1
            tag = {"finished": "done", "failed": "FAILED", "skipped": "already done"}[kind]
            extra = f": {result['error']}" if kind == "failed" else ""
            self._line(f"[{self.done}/{self.total}] {spec.method} seed {spec.seed} {tag}{extra}", force=True)
        elif kind == "tick":
            self.lanes = result or {}
            self._line(self._status())

    def _status(self) -> str:
        elapsed = time.time() - self.start
        eta = ""
        if self.done:
            eta = f", ETA {max(0.0, elapsed / self.done * (self.total - self.done)) / 60:.1f} min"
        lanes = "; ".join(f"{p['label']} epoch {p['epoch']}/{p['epochs']} {p['phase']}" for p in self.lanes.values())
        return f"[{self.done}/{self.total} runs, {elapsed / 60:.1f} min{eta}] {lanes}"

    def _line(self, text: str, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < 15:
            return
        self._last = now
        print(text, file=self.stream or sys.stderr, flush=True)
