"""The epochs of one training, on every rank of its lane (ranks train disjoint plates): resume from the
training's checkpoint, then per epoch train from the seeded plate stream, save the weights, evaluate every
protocol of the job on the validation splits (records written by rank 0), save the resume state, report to
Ray Train, and stop early when the trained method's validation metric stopped improving, or when the epoch's
training metrics are not finite (the training diverged). Ends with the training's done marker (how many epochs
it ran, its history, the epoch it diverged at)."""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from platebench.methods import Method
from platebench.methods.precision import autocast

from ..data.stream import PlateStream, StreamConfig
from ..results.records import main_value
from . import checkpointing, faults
from .evaluate import Evaluator
from .job_state import JobState
from .runspec import RunSpec, build_method
from .schedule import lr_factor


def seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def should_stop(values: list[float | None], metric: str, patience: int) -> bool:
    """Early stopping: the last `patience` epochs brought no improvement of the validation `metric` (lower
    loss or higher accuracy) over the best epoch before them."""
    if len(values) <= patience or any(v is None for v in values):
        return False
    sign = -1.0 if metric == "loss" else 1.0
    best_before = max(sign * v for v in values[:-patience])
    return all(sign * v <= best_before for v in values[-patience:])


def _monitor(state: JobState, ds, task, todo: list[RunSpec], protocols: dict, evaluators: dict):
    """(spec, method instance, evaluator) whose overall validation metric early stopping watches: the trained
    method's own protocol, evaluated even when its run is not in this job (never recorded then)."""
    t, lane = state.training, state.lane
    for spec in todo:
        if spec.method == t.method:
            return spec, protocols[spec.run_id], evaluators[spec.run_id]
    own = dataclasses.replace(todo[0], method=t.method, hparams=t.hparams)
    method = build_method(own, task, lane.device)
    return own, method, Evaluator(ds, own, method, lane.rank, lane.world, lane.device, lane.cache,
                                  state.channel_stats)


def train_epochs(state: JobState, ds, task, trainer: Method, todo: list[RunSpec], protocols: dict,
                 evaluators: dict) -> None:
    """Train `trainer` to the job's last epoch (or its early stop), validating the protocols of `todo`."""
    import ray.train
    from platebench.methods.distributed import all_gather_objects

    lane, launch, t, timings = state.lane, state.launch, state.training, state.timings
    train_state = checkpointing.TrainState()
    resumed = state.store.load_state(lane.device)
    if resumed is not None:
        trainer.load_checkpoint_state(resumed[0])
        train_state = resumed[1]
    hp, epochs = t.hparams, state.job.epochs
    stream = PlateStream(ds, StreamConfig.for_training(
        trainer.data_request(), t.split_scheme, t.seed, hp["augment"], launch.read_cpus, state.channel_stats),
        lane.rank, lane.world, lane.cache)
    t_warm = time.perf_counter()
    stream.warm(train_state.epoch)
    for evaluator in evaluators.values():
        evaluator.warm(evaluator.val_splits)
    timings["setup_s"] += time.perf_counter() - t_warm
    fault = faults.parse(launch.fault)
    patience = hp["early_stop_patience"]
    monitor = _monitor(state, ds, task, todo, protocols, evaluators) if patience else None
    history = train_state.history
    for epoch in range(train_state.epoch, epochs):
        if history and history[-1].get("diverged"):
            break  # resumed after the diverged epoch's checkpoint
        if patience and should_stop([h["monitor"] for h in history], hp["early_stop_metric"], patience):
            break  # resumed after the stopping epoch's checkpoint
        state.progress(epoch + 1, "training")
        t0 = time.perf_counter()
        seed_all(t.seed * 7919 + lane.rank * 104729 + epoch)  # per-rank noise, reproducible after resume
        trainer.train()
        steps = stream.steps(epoch)
        trainer.on_epoch_start(epoch, epochs, steps)
        sums: dict[str, float] = {}
        for i, batch in enumerate(stream.epoch(epoch, lane.device)):
            faults.maybe_fail(fault, launch.storage, launch.options, t.training_id, epoch, i, lane.rank)
            trainer.set_lr_factor(lr_factor(epoch, i, steps, epochs, hp["warmup_epochs"], hp["schedule"]))
            timings["train_images"] += sum(len(b) for b in batch) if isinstance(batch, list) else len(batch)
            with autocast(t.precision, lane.device):  # the run's precision (methods/precision.py)
                metrics = trainer.training_step(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        trainer.sync_buffers()
        train_seconds = time.perf_counter() - t0
        timings["train_s"] += train_seconds
        weights = trainer.state_dict()
        if lane.rank == 0:
            state.store.save_weights(epoch + 1, weights)
        state.progress(epoch + 1, "validation")
        vals, all_rows = {}, {}
        for spec in todo:
            evaluator = evaluators[spec.run_id]
            rows = state.validate(spec, protocols[spec.run_id], evaluator, weights, epoch + 1)
            vals[spec.run_id], all_rows[spec.run_id] = main_value(rows, evaluator.scheme.selection_split), rows
        train_metrics = {f"train_{k}": v / max(1, steps) for k, v in sums.items()}
        train_state.epoch = epoch + 1
        entry = {"epoch": epoch + 1, "steps": steps, "train_seconds": train_seconds, **train_metrics}
        # A non-finite training loss does not come back: the training stops here (its records show the epoch).
        diverged = any(all_gather_objects([not all(math.isfinite(v) for v in train_metrics.values())]))  # every rank
        if diverged:
            entry["diverged"] = True
        if monitor is not None:
            spec, method, evaluator = monitor
            rows = all_rows.get(spec.run_id)
            if rows is None:
                method.load_state_dict(weights)
                rows = evaluator.main(method, epoch + 1, evaluator.val_splits)
            entry["monitor"] = main_value(rows, evaluator.scheme.selection_split, hp["early_stop_metric"])
        history.append(entry)
        if lane.rank == 0:
            lane.tracker.log_metrics(t.training_id, {"train/seconds": train_seconds,
                                                     **{f"train/{k[6:]}": v for k, v in train_metrics.items()}},
                                     epoch + 1, "train")
            state.store.save_state(trainer.checkpoint_state(), train_state)
        first = vals.get(todo[0].run_id)
        ray.train.report({"epoch": epoch + 1, "steps": steps, "train_seconds": train_seconds,
                          "val_accuracy": first if first is not None else float("nan"), **train_metrics})
        if diverged or patience and should_stop([h["monitor"] for h in history], hp["early_stop_metric"], patience):
            break
    timings["epochs"] = train_state.epoch
    if lane.rank == 0:
        state.store.write_done({"training": t.to_dict(), "epochs": train_state.epoch, "planned_epochs": epochs,
                                "stopped_early": train_state.epoch < epochs, "history": history,
                                "diverged_epoch": next((h["epoch"] for h in history if h.get("diverged")), None),
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
