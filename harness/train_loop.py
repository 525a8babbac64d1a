"""The function every Ray Train worker runs for one run (one method, one seed).

Per epoch: seeded plate-grouped stream over this rank's plates → `Method.training_step` with the LR
schedule → buffer sync → evaluation on every split (ranks share the plates and gather counts) → rank 0
writes that epoch's records, then reports a checkpoint. Records go first so that a crash between the
two only repeats the epoch, and the repeat overwrites the same records file (no duplicates).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
from platebench.datasets.shards import open_dataset
from platebench.datasets.storage import StorageOptions
from platebench.methods import get_method

from . import checkpointing, faults
from .evaluate import Evaluator, main_value
from .records import write_epoch_records
from .runspec import RunSpec, task_spec
from .schedule import lr_factor
from .stream import PartCache, PlateStream, StreamConfig
from .tracking import MlflowTarget, RunTracker, epoch_metrics


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def train_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    t_start = time.perf_counter()
    spec = RunSpec.from_dict(config["spec"])
    storage, options = config["storage"], StorageOptions(**config["storage_options"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    ds = open_dataset(spec.data, options)

    _seed_all(spec.seed)  # same seed on every rank: identical initial parameters
    method = get_method(spec.method)(task_spec(ds), spec.hparams, spec.backbone).to(device)
    state = checkpointing.TrainState()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = checkpointing.load(d, method, device)

    hp = spec.hparams
    req = method.data_request()
    cache = PartCache(int(config.get("cache_mb", 512)) * 2**20)  # shared by the run's streams
    train = PlateStream(ds, StreamConfig(
        scheme=spec.split_scheme, split="train", batch_size=req.batch_size, train=True, plate_pure=req.plate_pure,
        plates_per_step=req.plates_per_step, n_controls=req.n_controls, seed=spec.seed, augment=hp["augment"],
        read_cpus=config.get("read_cpus", 0.25)), rank, world, cache)
    evaluator = Evaluator(ds, spec, method, rank, world, device, cache)
    tracker = RunTracker(MlflowTarget(**config["mlflow"]) if config.get("mlflow") else None,
                         run_id=state.mlflow_run_id, gaps=list(state.mlflow_gaps))
    if rank == 0:
        tracker.start(name=f"{spec.method} seed {spec.seed}", params=_params(spec, config),
                      tags={"platebench.run_id": spec.run_id, "platebench.kind": "seed"})

    _record_placement(spec, storage, options, rank)
    timings = {"setup_s": time.perf_counter() - t_start, "epochs_s": []}
    epochs = hp["epochs"]
    fault = faults.parse(config.get("fault"))
    for epoch in range(state.epoch, epochs):
        t0 = time.perf_counter()
        _seed_all(spec.seed * 7919 + rank * 104729 + epoch)  # per-rank noise, reproducible after resume
        method.train()
        method.on_epoch_start(epoch, epochs)
        steps = train.steps(epoch)
        sums: dict[str, float] = {}
        for i, batch in enumerate(train.epoch(epoch)):
            faults.maybe_fail(fault, storage, options, spec.run_id, epoch, i, rank)
            method.set_lr_factor(lr_factor(epoch, i, steps, epochs, hp["warmup_epochs"], hp["schedule"]))
            batch = [b.to(device) for b in batch] if isinstance(batch, list) else batch.to(device)
            for k, v in method.training_step(batch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        method.sync_buffers()
        train_seconds = time.perf_counter() - t0
        rows = evaluator.main(method, epoch + 1)
        val = main_value(rows, evaluator.scheme.selection_split)
        improved = state.improve(epoch + 1, val, method)
        state.epoch = epoch + 1
        summary = {"epoch": epoch + 1, "steps": steps, "train_seconds": train_seconds,
                   "eval_seconds": time.perf_counter() - t0 - train_seconds,
                   **{f"train_{k}": v / max(1, steps) for k, v in sums.items()},
                   "val_accuracy": val if val is not None else float("nan"), "improved": improved}
        state.history.append(summary)
        timings["epochs_s"].append(time.perf_counter() - t0)
        metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        if rank == 0:
            write_epoch_records(storage, spec.run_id, epoch + 1, rows, options)
            tracker.log_metrics({**epoch_metrics(rows), **{f"train/{k}": v for k, v in metrics.items()}}, epoch + 1)
            state.mlflow_run_id, state.mlflow_gaps = tracker.run_id, list(tracker.gaps)
            with tempfile.TemporaryDirectory() as d:
                checkpointing.save(d, method, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    # The TTA sweeps run once, on the model of the best validation epoch.
    t_sweeps = time.perf_counter()
    if evaluator.track == "tta" and state.best_model is not None:
        method.load_state_dict({k: v.to(device) for k, v in state.best_model.items()})
        sweep_rows = evaluator.sweeps(method, state.best_epoch)
        if rank == 0 and sweep_rows:
            write_epoch_records(storage, spec.run_id, state.best_epoch, sweep_rows, options, kind="sweeps")
    timings["sweeps_s"] = time.perf_counter() - t_sweeps
    if rank == 0:
        t_finish = time.perf_counter()
        _finish_tracking(tracker, spec, state)
        timings["finish_s"] = time.perf_counter() - t_finish
        _write_run_file(storage, options, spec.run_id, "timings.json", timings)
        if tracker.gaps:  # MLflow was unreachable at times: say so where the run's facts live
            _write_run_file(storage, options, spec.run_id, "mlflow_gaps.json", tracker.gaps)


def _write_run_file(storage: str, options: StorageOptions, run_id: str, name: str, payload) -> None:
    import json

    from platebench.datasets.storage import filesystem, join

    fs, root = filesystem(storage, options)
    fs.makedirs(join(root, "runs", run_id), exist_ok=True)
    fs.pipe_file(join(root, "runs", run_id, name), json.dumps(payload, indent=1).encode())


def _record_placement(spec: RunSpec, storage: str, options: StorageOptions, rank: int) -> None:
    """Which node each rank runs on (runs/<run_id>/placement.json), for multi-node checks and debugging."""
    import ray
    from platebench.methods.distributed import all_gather_objects

    mine = [{"rank": rank, "node_id": ray.get_runtime_context().get_node_id()}]
    everyone = all_gather_objects(mine)
    if rank == 0:
        _write_run_file(storage, options, spec.run_id, "placement.json", sorted(everyone, key=lambda r: r["rank"]))


def _params(spec: RunSpec, config: dict) -> dict:
    return {**spec.hparams, "method": spec.method, "seed": spec.seed, "backbone": spec.backbone,
            "dataset": spec.dataset, "dataset_checksum": spec.dataset_checksum, "split_scheme": spec.split_scheme,
            "harness_version": spec.harness_version, "git_commit": config.get("git_commit") or "unknown",
            "run_id": spec.run_id, "workers": config.get("workers", 1)}


def _finish_tracking(tracker: RunTracker, spec: RunSpec, state: checkpointing.TrainState) -> None:
    import json

    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(d, "config.json")
        with open(cfg, "w") as f:
            json.dump(spec.to_dict(), f, indent=1, default=list)
        sel = os.path.join(d, "selected.json")
        with open(sel, "w") as f:
            json.dump({"selected_epoch": state.best_epoch, "val_accuracy": state.best_val,
                       "history": state.history}, f, indent=1)
        tracker.log_artifact(cfg)
        tracker.log_artifact(sel)
        plot = _plot_history(state.history, d)
        if plot:
            tracker.log_artifact(plot)
    tracker.finish()


def _plot_history(history: list[dict], directory: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="validation accuracy")
    if any("train_loss" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("train_loss", float("nan")) for h in history], color="grey", label="train loss")
        ax2.set_ylabel("train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = os.path.join(directory, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
