"""What the phases of one job on one rank share (harness/train/job.py): the job, its lane, the training's
checkpoint store, the timings each run's done marker reports, and the writes every phase makes (progress
to the queue, evaluation records, MLflow metrics and texts)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from platebench.methods import Method

from ..results.records import write_epoch_records
from . import checkpointing
from .evaluate import Evaluator
from .jobs import Job
from .lane import Lane
from .runspec import RunSpec, TrainingSpec
from .tracking import epoch_metrics


def _timings() -> dict:
    return {"setup_s": 0.0, "train_s": 0.0, "eval_s": {}, "representation_s": {}, "epochs": 0, "train_images": 0}


@dataclass
class JobState:
    job: Job
    lane: Lane
    queue: object  # the JobQueue actor
    store: checkpointing.TrainingStore
    timings: dict = field(default_factory=_timings)
    channel_stats: tuple | None = None  # per-channel (mean, std) for `normalize: dataset`, else None
    placement: list[dict] = field(default_factory=list)  # the node of each rank

    @classmethod
    def open(cls, job: Job, lane: Lane, queue) -> JobState:
        launch = lane.launch
        return cls(job, lane, queue, checkpointing.TrainingStore(launch.storage, launch.options,
                                                                 job.training.training_id))

    @property
    def launch(self):
        return self.lane.launch

    @property
    def training(self) -> TrainingSpec:
        return self.job.training

    def progress(self, epoch: int, phase: str) -> None:
        if self.lane.rank == 0:
            self.queue.report_progress.remote(self.lane.name, self.job.key, self.job.label, epoch, self.job.epochs,
                                              phase)

    def timed_eval(self, run_id: str, fn, *args):
        """`fn(*args)`, its time added to the run's evaluation time."""
        t0 = time.perf_counter()
        out = fn(*args)
        self.timings["eval_s"][run_id] = self.timings["eval_s"].get(run_id, 0.0) + time.perf_counter() - t0
        return out

    def write(self, spec: RunSpec, epoch: int, rows: list[dict], kind: str = "main") -> None:
        if self.lane.rank == 0 and rows:
            write_epoch_records(self.launch.storage, spec.run_id, epoch, rows, self.launch.options, kind=kind)

    def log_json(self, key: str, filename: str, obj) -> None:
        self.lane.tracker.log_text(key, filename, json.dumps(obj, indent=1, default=list))

    def validate(self, spec: RunSpec, method: Method, evaluator: Evaluator, weights: dict, epoch: int) -> list[dict]:
        """Evaluate `spec`'s protocol with `weights` on the validation splits; record and track the rows."""
        method.load_state_dict(weights)
        rows = self.timed_eval(spec.run_id, evaluator.main, method, epoch, evaluator.val_splits)
        self.write(spec, epoch, rows)
        if self.lane.rank == 0:
            self.lane.tracker.log_metrics(spec.run_id, epoch_metrics(rows), epoch, "val")
        return rows
