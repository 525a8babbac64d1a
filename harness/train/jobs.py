"""Jobs: one training and the runs (evaluation protocols) that share it, and the queue that hands them to lanes.

A lane is one Ray Train job that trains job after job (harness/runner.py): start-up (worker processes,
imports, the dataset's parts in memory) is paid once per lane instead of once per run. The queue is a Ray
actor, so it outlives a lane whose worker dies: the restarted worker asks again and gets the job it was
on, which resumes from its checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .runspec import RunSpec, TrainingSpec


@dataclass(frozen=True)
class Job:
    training: TrainingSpec
    runs: tuple[RunSpec, ...]  # every run evaluated from this training, the trained method's own first

    @property
    def key(self) -> str:
        return self.training.training_id

    @property
    def label(self) -> str:
        """e.g. "erm+adabn/s0": the methods evaluated from this training, and its seed."""
        return f"{'+'.join(r.method for r in self.runs)}/s{self.training.seed}"

    @property
    def epochs(self) -> int:
        return int(self.training.hparams["epochs"])

    def to_dict(self) -> dict:
        return {"training": self.training.to_dict(), "runs": [r.to_dict() for r in self.runs]}

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        t = {k: v for k, v in d["training"].items() if k != "training_id"}
        return cls(training=TrainingSpec(**t), runs=tuple(RunSpec.from_dict(r) for r in d["runs"]))


def plan_jobs(specs: Sequence[RunSpec]) -> list[Job]:
    """Group runs by training (first appearance keeps its place); longer trainings first, so the lanes'
    last jobs are short ones and no lane idles long at the end."""
    groups: dict[str, tuple[TrainingSpec, list[RunSpec]]] = {}
    for spec in specs:
        training = spec.training()
        groups.setdefault(training.training_id, (training, []))[1].append(spec)
    jobs = []
    for training, runs in groups.values():
        runs.sort(key=lambda r: r.method != training.method)  # stable: the trained method's own run first
        jobs.append(Job(training, tuple(runs)))
    return sorted(jobs, key=lambda j: -j.epochs)


class JobQueue:
    """The jobs of one `run`/`bench`/trial, claimed by lanes (used as a Ray actor; plain Python here).

    `claim(lane)` returns the lane's unfinished job again if it has one (a restarted worker), else the next
    pending job. Progress and outcomes are kept for the driver's progress line and summary.
    """

    def __init__(self, jobs: list[dict]):
        self.pending = list(jobs)
        self.claimed: dict[str, dict] = {}  # lane -> job
        self.progress: dict[str, dict] = {}  # lane -> {"job", "epoch", "epochs", "phase"}
        self.finished: dict[str, list[dict]] = {}  # job key -> per-run results
        self.failed: dict[str, str] = {}  # job key -> error
        self.lane_first_claim: dict[str, float] = {}
        self.events: list[tuple] = []  # (kind, job key, payload) for the driver, drained by `poll`

    @staticmethod
    def _key(job: dict) -> str:
        return job["training"]["training_id"]

    def claim(self, lane: str) -> dict | None:
        self.lane_first_claim.setdefault(lane, time.time())
        job = self.claimed.get(lane)
        if job is not None and self._key(job) not in self.finished and self._key(job) not in self.failed:
            return job
        self.claimed.pop(lane, None)
        if not self.pending:
            return None
        job = self.pending.pop(0)
        self.claimed[lane] = job
        self.events.append(("started", self._key(job), None))
        return job

    def report_progress(self, lane: str, key: str, label: str, epoch: int, epochs: int, phase: str) -> None:
        self.progress[lane] = {"job": key, "label": label, "epoch": epoch, "epochs": epochs, "phase": phase}

    def finish(self, lane: str, key: str, results: list[dict]) -> None:
        self.finished[key] = results
        self.progress.pop(lane, None)
        self.events.append(("finished", key, results))

    def fail(self, lane: str, key: str, error: str) -> None:
        self.failed.setdefault(key, error)
        self.progress.pop(lane, None)
        self.events.append(("failed", key, error))

    def abandon(self, lane: str, error: str) -> None:
        """A lane stopped for good: its unfinished job fails with the lane's error."""
        job = self.claimed.pop(lane, None)
        if job is not None and self._key(job) not in self.finished:
            self.fail(lane, self._key(job), error)

    def is_failed(self, key: str) -> bool:
        return key in self.failed

    def poll(self) -> dict:
        events, self.events = self.events, []
        return {"events": events, "progress": dict(self.progress), "pending": len(self.pending)}

    def summary(self) -> dict:
        return {"finished": self.finished, "failed": self.failed, "pending": [self._key(j) for j in self.pending],
                "lane_first_claim": self.lane_first_claim}
