"""Launch runs on Ray Train in lanes: each lane is one `TorchTrainer` whose workers train job after job.

A job is one training and the runs that share it (harness/train/jobs.py). Lanes pull jobs from a queue actor, so
a lane pays Ray Train's start-up (controller and worker processes, imports, process group) and the
stream's warm-up (the dataset's parts in memory) once, not once per run. Each training keeps its own
checkpoints in storage (harness/train/checkpointing.py): a worker that dies is replaced by
`FailureConfig(max_failures)`, asks the queue again and resumes its job from the last checkpoint; the same
command run again after the driver died finds every finished run's done marker (harness/results/layout.py)
and resumes the others.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from platebench.datasets.storage import STORAGE_ERRORS, StorageOptions, describe_error, filesystem, join

from ..data.stream import StreamConfig
from ..errors import HarnessError
from ..results.layout import lanes_dir, read_done, runs_dir
from .jobs import JobQueue, plan_jobs
from .runspec import RunSpec
from .tracking import MlflowTarget


@dataclass(frozen=True)
class Launch:
    """How runs are executed (not part of a run's identity)."""

    storage: str
    options: StorageOptions = field(default_factory=StorageOptions.from_env)
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    read_cpus: float = StreamConfig.read_cpus  # per Ray Data read task
    mlflow: MlflowTarget | None = None
    fault: str | None = None  # fault injection for resilience tests (harness/train/faults.py)
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_SPREAD (one worker per node)
    cache_mb: int = 512  # per worker: parts kept in memory across epochs and jobs (harness/data/stream.py PartCache)


def check_storage_writable(launch: Launch) -> None:
    """Probe the storage URL before any training: a clear error beats a failure after an hour."""
    fs, root = filesystem(launch.storage, launch.options)
    probe = join(runs_dir(root), ".write-probe")
    try:
        fs.makedirs(runs_dir(root), exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except STORAGE_ERRORS as exc:
        raise describe_error(exc, f"storage {launch.storage} is not writable") from exc


def make_lane_trainer(launch: Launch, lane: str, queue, callbacks: list | None = None):
    import ray.train
    from platebench.datasets.storage import pyarrow_filesystem
    from ray.train.torch import TorchTrainer

    from ..ray_local import torch_config
    from .lane_worker import lane_worker

    fs, path = pyarrow_filesystem(lanes_dir(launch.storage), launch.options)
    resources = {"CPU": launch.cpus_per_worker, **({"GPU": 1} if launch.use_gpu else {})}
    return TorchTrainer(
        lane_worker,
        train_loop_config={"launch": launch, "queue": queue, "lane": lane},
        # Per-rank BatchNorm (no SyncBatchNorm): each rank's statistics stay plate-pure. The rendezvous store
        # listens on rank 0's node address only (127.0.0.1 on a local Ray), not on every interface.
        torch_config=torch_config("nccl" if launch.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=launch.workers, use_gpu=launch.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=launch.placement_strategy),
        run_config=ray.train.RunConfig(
            name=lane, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=launch.max_failures), callbacks=callbacks),
    )


def fit_lane(launch: Launch, lane: str, queue, callbacks: list | None = None) -> float:
    """Run one lane to the end of the queue; returns its wall time."""
    t0 = time.time()
    make_lane_trainer(launch, lane, queue, callbacks).fit()
    return time.time() - t0


def _queue_actor(jobs: list[dict]):
    import ray

    return ray.remote(num_cpus=0)(JobQueue).remote(jobs)


def fit_run(spec: RunSpec, launch: Launch, callbacks: list | None = None) -> dict:
    """Train and evaluate one run in a lane of its own (a sweep trial); returns its done marker."""
    import ray

    existing = read_done(launch.storage, spec.run_id, launch.options)
    if existing is not None:
        return {**existing, "skipped": True}
    jobs = plan_jobs([spec])
    queue = _queue_actor([j.to_dict() for j in jobs])
    lane = f"lane-{spec.run_id}-{uuid.uuid4().hex[:6]}"
    error = None
    try:
        fit_lane(launch, lane, queue, callbacks)
    except Exception as exc:  # noqa: BLE001 - reported below with the queue's own account
        error = _short(exc)
    summary = ray.get(queue.summary.remote())
    ray.kill(queue)
    failed = summary["failed"].get(jobs[0].key) or error
    done = read_done(launch.storage, spec.run_id, launch.options)
    if done is None:
        raise HarnessError(f"run {spec.run_id} failed: {failed or 'no done marker was written'}")
    return {**done, "skipped": False}


def run_many(specs: Sequence[RunSpec], launch: Launch, max_concurrent: int,
             on_event: Callable[[str, RunSpec, dict | None], None] | None = None) -> tuple[list[dict], dict]:
    """Train every run (shared trainings once) in at most `max_concurrent` lanes. Returns one result per
    spec (its done marker, or {"error"}) and a timing summary of the lanes. Failed runs are reported, not
    fatal to the others."""
    import ray

    on_event = on_event or (lambda *a: None)
    results: dict[str, dict] = {}
    todo = []
    for spec in specs:
        done = read_done(launch.storage, spec.run_id, launch.options)
        if done is not None:
            results[spec.run_id] = {**done, "skipped": True}
            on_event("skipped", spec, results[spec.run_id])
        else:
            todo.append(spec)
    jobs = plan_jobs(todo)
    by_key = {j.key: j for j in jobs}
    lanes_info: dict = {"lanes": 0, "lane_seconds": 0.0, "startup_s": 0.0}
    if jobs:
        queue = _queue_actor([j.to_dict() for j in jobs])
        remote_fit = ray.remote(num_cpus=0, max_retries=0)(fit_lane)
        tag = uuid.uuid4().hex[:6]
        names = [f"lane-{time.strftime('%Y%m%d-%H%M%S')}-{tag}-{k}" for k in range(min(max_concurrent, len(jobs)))]
        started = {name: time.time() for name in names}
        running = {remote_fit.remote(launch, name, queue): name for name in names}
        wall: dict[str, float] = {}
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
            for ref in ready:
                name = running.pop(ref)
                try:
                    wall[name] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the lane's job fails; the other lanes go on
                    wall[name] = time.time() - started[name]
                    ray.get(queue.abandon.remote(name, _short(exc)))
            polled = ray.get(queue.poll.remote())
            _dispatch(polled["events"], by_key, results, on_event)
            on_event("tick", None, polled["progress"])
        summary = ray.get(queue.summary.remote())
        ray.kill(queue)
        for key in summary["pending"]:  # every lane stopped before reaching these
            _dispatch([("failed", key, "not run: every lane stopped before it")], by_key, results, on_event)
        first = summary["lane_first_claim"]
        lanes_info = {"lanes": len(names), "lane_seconds": sum(wall.values()),
                      "startup_s": sum(max(0.0, first.get(n, started[n] + wall[n]) - started[n]) for n in names)}
    ordered = [results.get(s.run_id) or {"run_id": s.run_id, "method": s.method, "seed": s.seed,
                                         "error": "no result"} for s in specs]
    return ordered, lanes_info


def _dispatch(events, by_key: dict, results: dict, on_event) -> None:
    for kind, key, payload in events:
        job = by_key[key]
        if kind == "started":
            for spec in job.runs:
                on_event("started", spec, None)
        elif kind == "finished":
            for res in payload:
                results[res["run_id"]] = res
            for spec in job.runs:
                if spec.run_id in results:
                    on_event("skipped" if results[spec.run_id].get("skipped") else "finished", spec,
                             results[spec.run_id])
        else:
            for spec in job.runs:
                results[spec.run_id] = {"run_id": spec.run_id, "method": spec.method, "seed": spec.seed,
                                        "error": str(payload)}
                on_event("failed", spec, results[spec.run_id])


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
