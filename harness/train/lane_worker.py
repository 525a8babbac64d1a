"""The function every Ray Train worker of a lane runs (harness/train/runner.py starts the lanes): job after
job from the queue (harness/train/jobs.py), each one on every rank (harness/train/job.py), until the queue
is empty."""

from __future__ import annotations

from platebench.datasets.errors import DatasetError
from platebench.methods import MethodError

from ..data.stream import PartCache
from ..errors import HarnessError
from .job import run_job
from .jobs import Job
from .lane import Lane
from .tracking import BackgroundTracker

# Errors that a retry cannot fix (bad data, a bad configuration): the job fails at once, the lane goes on.
PERMANENT_ERRORS = (HarnessError, DatasetError, MethodError)


def lane_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from platebench.methods.distributed import all_gather_objects

    launch, queue = config["launch"], config["queue"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tracker = BackgroundTracker(launch.mlflow if rank == 0 else None)
    lane = Lane(name=config["lane"], launch=launch, rank=rank, world=world, device=ray.train.torch.get_device(),
                tracker=tracker, cache=PartCache(launch.cache_mb * 2**20))
    while True:
        claimed = ray.get(queue.claim.remote(lane.name)) if rank == 0 else None
        job_dict = all_gather_objects([claimed])[0]  # every rank works on rank 0's job
        if job_dict is None:
            break
        job = Job.from_dict(job_dict)
        try:
            results = run_job(job, lane, queue)
        except PERMANENT_ERRORS as exc:
            if rank == 0:
                ray.get(queue.fail.remote(lane.name, job.key, f"{type(exc).__name__}: {exc}"))
            if world > 1:
                raise  # the other ranks cannot go on alone; the restarted lane skips the failed job
            continue
        if rank == 0:
            ray.get(queue.finish.remote(lane.name, job.key, results))
    tracker.flush()
