"""Launch runs on Ray Train: one `TorchTrainer` per (method, seed), several at once as Ray tasks.

A run's Ray Train name is its run id, so starting the same command again finds the run's snapshot in
storage and resumes from its latest checkpoint (Train V2 restores by name); a run whose `done.json`
exists is not trained again. Workers that die are replaced by `FailureConfig(max_failures)` and
resume from the last checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from platebench.datasets.storage import STORAGE_ERRORS, StorageOptions, describe_error, filesystem, join

from .errors import HarnessError
from .runspec import RunSpec
from .tracking import MlflowTarget, git_commit

RUNS_DIR = "runs"


@dataclass(frozen=True)
class Launch:
    """How runs are executed (not part of a run's identity)."""

    storage: str
    options: StorageOptions = field(default_factory=StorageOptions.from_env)
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    read_cpus: float = 0.25
    mlflow: MlflowTarget | None = None
    fault: str | None = None  # fault injection for resilience tests (harness/faults.py)
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_SPREAD (one worker per node)
    cache_mb: int = 512  # per worker: parts kept in memory across epochs (harness/stream.py PartCache)


def done_path(storage: str, run_id: str) -> str:
    return join(storage, RUNS_DIR, run_id, "done.json")


def read_done(launch: Launch, run_id: str) -> dict | None:
    fs, _ = filesystem(launch.storage, launch.options)
    _, path = filesystem(done_path(launch.storage, run_id), launch.options)
    try:
        return json.loads(fs.cat_file(path)) if fs.exists(path) else None
    except STORAGE_ERRORS as exc:
        raise describe_error(exc, f"reading {done_path(launch.storage, run_id)}") from exc


def check_storage_writable(launch: Launch) -> None:
    """Probe the storage URL before any training: a clear error beats a failure after an hour."""
    fs, root = filesystem(launch.storage, launch.options)
    probe = join(root, RUNS_DIR, ".write-probe")
    try:
        fs.makedirs(join(root, RUNS_DIR), exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except STORAGE_ERRORS as exc:
        raise describe_error(exc, f"storage {launch.storage} is not writable") from exc


def make_trainer(spec: RunSpec, launch: Launch, callbacks: list | None = None):
    import ray.train
    from platebench.datasets.storage import pyarrow_filesystem
    from ray.train.torch import TorchConfig, TorchTrainer

    from .train_loop import train_worker

    fs, path = pyarrow_filesystem(join(launch.storage, "ray"), launch.options)
    resources = {"CPU": launch.cpus_per_worker, **({"GPU": 1} if launch.use_gpu else {})}
    config = {"spec": spec.to_dict(), "storage": launch.storage, "storage_options": asdict(launch.options),
              "mlflow": asdict(launch.mlflow) if launch.mlflow else None, "git_commit": git_commit(),
              "workers": launch.workers, "read_cpus": launch.read_cpus, "fault": launch.fault,
              "cache_mb": launch.cache_mb}
    return TorchTrainer(
        train_worker,
        train_loop_config=config,
        # Per-rank BatchNorm (no SyncBatchNorm): each rank's statistics stay plate-pure.
        torch_config=TorchConfig(backend="nccl" if launch.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=launch.workers, use_gpu=launch.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=launch.placement_strategy),
        run_config=ray.train.RunConfig(
            name=spec.run_id, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=launch.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks),
    )


def fit_run(spec: RunSpec, launch: Launch, callbacks: list | None = None) -> dict:
    """Train one run to completion (resuming if it was interrupted) and write its done marker."""
    existing = read_done(launch, spec.run_id)
    if existing is not None:
        return {**existing, "skipped": True}
    t0 = time.time()
    result = make_trainer(spec, launch, callbacks).fit()
    metrics = dict(result.metrics or {})
    fs, _ = filesystem(launch.storage, launch.options)
    _, path = filesystem(done_path(launch.storage, spec.run_id), launch.options)
    side = {}
    for name in ("placement", "mlflow_gaps", "timings"):  # written by rank 0 beside done.json
        side_path = path.replace("done.json", f"{name}.json")
        if fs.exists(side_path):
            side[name] = json.loads(fs.cat_file(side_path))
    summary = {"run_id": spec.run_id, "method": spec.method, "seed": spec.seed, "spec": spec.to_dict(),
               "seconds": time.time() - t0, "final_metrics": metrics, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
               **side}
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(summary, indent=1, default=list).encode())
    fs.pipe_file(path.replace("done.json", "spec.json"), json.dumps(spec.to_dict(), indent=1, default=list).encode())
    return {**summary, "skipped": False}


def run_many(specs: Sequence[RunSpec], launch: Launch, max_concurrent: int,
             on_event: Callable[[str, RunSpec, dict | None], None] | None = None) -> list[dict]:
    """Fit runs as Ray tasks, at most `max_concurrent` at once. Failed runs are reported, not fatal to others."""
    import ray

    remote_fit = ray.remote(num_cpus=0, max_retries=0)(fit_run)
    pending = list(specs)
    running: dict = {}
    results: list[dict] = []
    while pending or running:
        while pending and len(running) < max(1, max_concurrent):
            spec = pending.pop(0)
            if read_done(launch, spec.run_id) is not None:
                results.append({**read_done(launch, spec.run_id), "skipped": True})
                if on_event:
                    on_event("skipped", spec, results[-1])
                continue
            running[remote_fit.remote(spec, launch)] = spec
            if on_event:
                on_event("started", spec, None)
        if not running:
            break
        ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
        if on_event:
            on_event("tick", None, None)
        for ref in ready:
            spec = running.pop(ref)
            try:
                res = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - reported per run; the others go on
                res = {"run_id": spec.run_id, "method": spec.method, "seed": spec.seed, "error": _short(exc)}
            results.append(res)
            if on_event:
                on_event("failed" if "error" in res else "finished", spec, res)
    return results


def _short(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Error:", "Exception:"):
        lines = [ln for ln in text.splitlines() if marker in ln and "Traceback" not in ln]
        if lines:
            return lines[-1].strip()[:500]
    return (text.splitlines() or [type(exc).__name__])[0][:500]


def require_runs_ok(results: list[dict]) -> None:
    failed = [r for r in results if "error" in r]
    if failed:
        lines = "; ".join(f"{r['run_id']}: {r['error']}" for r in failed)
        raise HarnessError(f"{len(failed)} run(s) failed: {lines}")
