"""Per-trial overhead of the Tune + Train machinery against a trial's training time.

A trial's overhead = its wall time in Tune (time_total_s: the trial actor, the TorchTrainer's worker
start-up, reports, teardown) minus the time its worker spent training and evaluating (the epochs'
train_seconds + eval_seconds). `ratio` = mean overhead / mean training time over the sweep's trials.
"""

from __future__ import annotations

import statistics
import tempfile

from platebench.datasets.shards import open_dataset

from ..train.runner import Launch
from ..tune.space import for_method
from ..tune.sweep import SweepConfig, run_sweep

KEYS = ("ratio", "overhead_per_trial_s", "training_per_trial_s", "trial_wall_s", "trials", "method", "max_concurrent",
        "epochs", "dataset")


def run(data: str, split_scheme: str = "new_batches", method: str = "erm", trials: int = 4, epochs: int | None = None,
        max_concurrent: int = 1, storage: str | None = None, hparams: dict | None = None) -> dict:
    ds = open_dataset(data)
    fixed = dict(hparams or {})
    if epochs is not None:
        fixed["epochs"] = epochs
    space = for_method(method, ds.manifest.name)
    cfg = SweepConfig(data=ds.url, split_scheme=split_scheme, method=method, space=space, trials=trials,
                      search="random", scheduler="none", max_concurrent=max_concurrent, seed=0, fixed_hparams=fixed)
    launch = Launch(storage=storage or tempfile.mkdtemp(prefix="pb-perf-tune-"))
    result = run_sweep(cfg, launch)
    timed = [t for t in result["trials"] if t.get("trial_seconds")]
    if not timed:
        raise RuntimeError("no trial reported timings")
    overhead = [t["trial_seconds"] - t["work_seconds"] for t in timed]
    work = [t["work_seconds"] for t in timed]
    return {"ratio": statistics.mean(overhead) / statistics.mean(work),
            "overhead_per_trial_s": statistics.mean(overhead),
            "training_per_trial_s": statistics.mean(work),
            "trial_wall_s": statistics.mean(t["trial_seconds"] for t in timed),
            "trials": len(timed), "method": method, "max_concurrent": max_concurrent,
            "epochs": fixed.get("epochs", "method default"), "dataset": data}
