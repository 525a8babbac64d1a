"""What every Ray Train worker of a lane runs: job after job from the queue, each one training that is
evaluated under every protocol that shares it (ERM's training under ERM's and AdaBN's protocols).

One job, on every rank (ranks train disjoint plates and gather evaluation counts):
1. train epoch after epoch from the seeded plate stream (resuming from the training's checkpoint);
   after each epoch save the weights, evaluate every protocol on the validation splits, write those
   records (rank 0), then the resume state, then report to Ray Train;
2. evaluate each protocol's test splits only at the epochs a selection rule can choose from its
   validation records (the best validation epoch and the last), from the kept weights; run the TTA
   sweeps at the best validation epoch;
3. write each run's done marker.
A protocol whose records lack epochs the training has (one added after the training ran) is first
evaluated on the validation splits from the kept weights: nothing is trained twice. The lane keeps the
dataset's parts in memory across jobs and sends MLflow writes to a background thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from platebench.datasets.errors import DatasetError
from platebench.datasets.shards import ShardDataset, open_dataset
from platebench.methods import Method, MethodError, get_method
from platebench.methods.base import resolve_hparams

from ..analysis.representation import analyze, tracking_metrics, training_batches
from ..data.batching import on_device
from ..data.stream import PartCache, PlateStream, StreamConfig
from ..errors import HarnessError
from ..results.records import main_value, read_records, write_epoch_records
from ..results.selection import LEADERBOARD_RULES, select_epoch
from . import checkpointing, faults
from .evaluate import Evaluator
from .jobs import Job
from .runspec import RunSpec, task_spec
from .schedule import lr_factor
from .tracking import BackgroundTracker, epoch_metrics

# Errors that a retry cannot fix (bad data, a bad configuration): the job fails at once, the lane goes on.
PERMANENT_ERRORS = (HarnessError, DatasetError, MethodError)


def seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class Lane:
    """What one worker keeps across the jobs of its lane."""

    name: str
    launch: object  # runner.Launch
    rank: int
    world: int
    device: torch.device
    tracker: BackgroundTracker
    cache: PartCache
    datasets: dict[str, ShardDataset] = field(default_factory=dict)

    def dataset(self, url: str) -> ShardDataset:
        if url not in self.datasets:
            self.datasets[url] = open_dataset(url, self.launch.options)
        return self.datasets[url]


def lane_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from platebench.methods.distributed import all_gather_objects

    launch, queue = config["launch"], config["queue"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tracker = BackgroundTracker(launch.mlflow if rank == 0 else None)
    lane = Lane(name=config["lane"], launch=launch, rank=rank, world=world, device=ray.train.torch.get_device(),
                tracker=tracker, cache=PartCache(launch.cache_mb * 2**20))
    import ray

    while True:
        claimed = ray.get(queue.claim.remote(lane.name)) if rank == 0 else None
        job_dict = all_gather_objects([claimed])[0]  # every rank works on rank 0's job
        if job_dict is None:
            break
        job = Job.from_dict(job_dict)
        try:
            results = JobRun(job, lane, queue).run()
        except PERMANENT_ERRORS as exc:
            if rank == 0:
                ray.get(queue.fail.remote(lane.name, job.key, f"{type(exc).__name__}: {exc}"))
            if world > 1:
                raise  # the other ranks cannot go on alone; the restarted lane skips the failed job
            continue
        if rank == 0:
            ray.get(queue.finish.remote(lane.name, job.key, results))
    tracker.flush()


class JobRun:
    """One job on one rank of a lane (see the module docstring)."""

    def __init__(self, job: Job, lane: Lane, queue):
        self.job, self.lane, self.queue = job, lane, queue
        self.launch = lane.launch
        self.training = job.training
        self.store = checkpointing.TrainingStore(self.launch.storage, self.launch.options, self.training.training_id)
        self.timings: dict = {"setup_s": 0.0, "train_s": 0.0, "eval_s": {}, "representation_s": {}, "epochs": 0,
                              "train_images": 0}

    # -- helpers ---------------------------------------------------------------------------------
    def _run_done(self, spec: RunSpec) -> dict | None:
        from .runner import read_done

        return read_done(self.launch, spec.run_id)

    def _progress(self, epoch: int, phase: str) -> None:
        if self.lane.rank == 0:
            self.queue.report_progress.remote(self.lane.name, self.job.key, self.job.label, epoch, self.job.epochs,
                                              phase)

    def _timed_eval(self, run_id: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.timings["eval_s"][run_id] = self.timings["eval_s"].get(run_id, 0.0) + time.perf_counter() - t0
        return out

    def _write(self, spec: RunSpec, epoch: int, rows: list[dict], kind: str = "main") -> None:
        if self.lane.rank == 0 and rows:
            write_epoch_records(self.launch.storage, spec.run_id, epoch, rows, self.launch.options, kind=kind)

    # -- the job ---------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        t0 = time.perf_counter()
        done = {r.run_id: self._run_done(r) for r in self.job.runs}
        todo = [r for r in self.job.runs if done[r.run_id] is None]
        if not todo:
            return [{**d, "skipped": True} for d in done.values()]
        lane, device = self.lane, self.lane.device
        ds = lane.dataset(self.job.runs[0].data)
        task = task_spec(ds)
        seed_all(self.training.seed)  # same seed on every rank: identical initial parameters
        trainer = on_device(get_method(self.training.method)(task, self.training.hparams, self.training.backbone),
                            device)
        protocols = {r.run_id: on_device(get_method(r.method)(task, r.hparams, r.backbone), device) for r in todo}
        self.channel_stats = self._channel_stats(ds)
        evaluators = {r.run_id: Evaluator(ds, r, protocols[r.run_id], lane.rank, lane.world, device, lane.cache,
                                          self.channel_stats) for r in todo}
        self._open_tracking(todo)
        self.timings["setup_s"] = time.perf_counter() - t0

        finished = self.store.read_done()
        if finished is None:
            self._train(ds, task, trainer, todo, protocols, evaluators)
            finished = self.store.read_done() if lane.rank == 0 else None
        from platebench.methods.distributed import all_gather_objects

        epochs = all_gather_objects([finished["epochs"] if lane.rank == 0 else None])[0]  # < planned: stopped early
        for spec in todo:  # protocols that missed epochs (added later, or replayed): from the kept weights
            self._catch_up(spec, protocols[spec.run_id], evaluators[spec.run_id], epochs)
        self._record_placement(todo)
        results = [self._finish(spec, protocols[spec.run_id], evaluators[spec.run_id], epochs) for spec in todo]
        lane.tracker.close(self.training.training_id)
        lane.tracker.flush()
        return [*({**d, "skipped": True} for d in done.values() if d is not None), *results]

    def _channel_stats(self, ds):
        """Per-channel training statistics for `normalize: dataset` (None: images are self-standardised),
        computed once per training and stored beside its weights."""
        from platebench.methods.distributed import all_gather_objects

        from ..data.channel_stats import channel_stats

        if self.training.hparams["normalize"] != "dataset":
            return None
        stats = None
        if self.lane.rank == 0:
            stats = self.store.read_json("channel_stats.json")
            if stats is None:
                stats = channel_stats(ds, self.training.split_scheme, "train", self.lane.cache)
                self.store.write_json("channel_stats.json", stats)
        mean, std = all_gather_objects([stats])[0]
        return tuple(mean), tuple(std)

    def _open_tracking(self, todo: list[RunSpec]) -> None:
        tracker, t = self.lane.tracker, self.training
        tracker.open(t.training_id, f"train {t.method} seed {t.seed}", "training",
                     {**t.hparams, "method": t.method, "seed": t.seed, "backbone": t.backbone, "dataset": t.dataset,
                      "dataset_checksum": t.dataset_checksum, "split_scheme": t.split_scheme,
                      "code": f"{t.code['version']}+{t.code['source']}", "training_id": t.training_id,
                      "workers": self.lane.world, "shared_by": ",".join(r.method for r in self.job.runs)})
        for spec in todo:
            from .code_identity import commit

            tracker.open(spec.run_id, f"{spec.method} seed {spec.seed}", "seed",
                         {**spec.hparams, "method": spec.method, "seed": spec.seed, "backbone": spec.backbone,
                          "dataset": spec.dataset, "dataset_checksum": spec.dataset_checksum,
                          "split_scheme": spec.split_scheme, "code": spec.code_label,
                          "git_commit": commit() or "unknown", "run_id": spec.run_id,
                          "training_id": t.training_id, "workers": self.lane.world},
                         parent_key=t.training_id, tags={"platebench.run_id": spec.run_id,
                                                         "platebench.training_id": t.training_id})

    def _monitor(self, ds, task, todo, protocols, evaluators):
        """(method instance, evaluator) whose overall validation metric early stopping watches: the trained
        method's own protocol, evaluated even when its run is not in this job (never recorded then)."""
        import dataclasses

        for spec in todo:
            if spec.method == self.training.method:
                return spec, protocols[spec.run_id], evaluators[spec.run_id]
        own = dataclasses.replace(todo[0], method=self.training.method,
                                  hparams=resolve_hparams(get_method(self.training.method), self.training.hparams))
        method = on_device(get_method(own.method)(task, own.hparams, own.backbone), self.lane.device)
        return own, method, Evaluator(ds, own, method, self.lane.rank, self.lane.world, self.lane.device,
                                      self.lane.cache, self.channel_stats)

    def _train(self, ds, task, trainer: Method, todo, protocols, evaluators) -> None:
        import ray.train

        lane, launch, t = self.lane, self.launch, self.training
        state = checkpointing.TrainState()
        resumed = self.store.load_state(lane.device)
        if resumed is not None:
            trainer.load_checkpoint_state(resumed[0])
            state = resumed[1]
        hp, epochs = t.hparams, self.job.epochs
        stream = PlateStream(ds, StreamConfig.for_training(
            trainer.data_request(), t.split_scheme, t.seed, hp["augment"], launch.read_cpus, self.channel_stats),
            lane.rank, lane.world, lane.cache)
        t_warm = time.perf_counter()
        stream.warm(state.epoch)
        for evaluator in evaluators.values():
            evaluator.warm(evaluator.val_splits)
        self.timings["setup_s"] += time.perf_counter() - t_warm
        fault = faults.parse(launch.fault)
        patience = hp["early_stop_patience"]
        monitor = self._monitor(ds, task, todo, protocols, evaluators) if patience else None
        for epoch in range(state.epoch, epochs):
            if patience and should_stop([h["monitor"] for h in state.history], hp["early_stop_metric"], patience):
                break  # resumed after the stopping epoch's checkpoint
            self._progress(epoch + 1, "training")
            t0 = time.perf_counter()
            seed_all(t.seed * 7919 + lane.rank * 104729 + epoch)  # per-rank noise, reproducible after resume
            trainer.train()
            steps = stream.steps(epoch)
            trainer.on_epoch_start(epoch, epochs, steps)
            sums: dict[str, float] = {}
            for i, batch in enumerate(stream.epoch(epoch)):
                faults.maybe_fail(fault, launch.storage, launch.options, t.training_id, epoch, i, lane.rank)
                trainer.set_lr_factor(lr_factor(epoch, i, steps, epochs, hp["warmup_epochs"], hp["schedule"]))
                batch = [b.to(lane.device) for b in batch] if isinstance(batch, list) else batch.to(lane.device)
                self.timings["train_images"] += sum(len(b) for b in batch) if isinstance(batch, list) else len(batch)
                for k, v in trainer.training_step(batch).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            trainer.sync_buffers()
            train_seconds = time.perf_counter() - t0
            self.timings["train_s"] += train_seconds
            weights = trainer.state_dict()
            if lane.rank == 0:
                self.store.save_weights(epoch + 1, weights)
            self._progress(epoch + 1, "validation")
            vals, all_rows = {}, {}
            for spec in todo:
                rows = self._validate(spec, protocols[spec.run_id], evaluators[spec.run_id], weights, epoch + 1)
                vals[spec.run_id], all_rows[spec.run_id] = main_value(rows, evaluators[spec.run_id].scheme
                                                                      .selection_split), rows
            train_metrics = {f"train_{k}": v / max(1, steps) for k, v in sums.items()}
            state.epoch = epoch + 1
            entry = {"epoch": epoch + 1, "steps": steps, "train_seconds": train_seconds, **train_metrics}
            if monitor is not None:
                spec, method, evaluator = monitor
                rows = all_rows.get(spec.run_id)
                if rows is None:
                    method.load_state_dict(weights)
                    rows = evaluator.main(method, epoch + 1, evaluator.val_splits)
                entry["monitor"] = main_value(rows, evaluator.scheme.selection_split, hp["early_stop_metric"])
            state.history.append(entry)
            if lane.rank == 0:
                lane.tracker.log_metrics(t.training_id, {"train/seconds": train_seconds,
                                                         **{f"train/{k[6:]}": v for k, v in train_metrics.items()}},
                                         epoch + 1, "train")
                self.store.save_state(trainer.checkpoint_state(), state)
            first = vals.get(todo[0].run_id)
            ray.train.report({"epoch": epoch + 1, "steps": steps, "train_seconds": train_seconds,
                              "val_accuracy": first if first is not None else float("nan"), **train_metrics})
            if patience and should_stop([h["monitor"] for h in state.history], hp["early_stop_metric"], patience):
                break
        self.timings["epochs"] = state.epoch
        if lane.rank == 0:
            self.store.write_done({"training": t.to_dict(), "epochs": state.epoch, "planned_epochs": epochs,
                                   "stopped_early": state.epoch < epochs, "history": state.history,
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def _validate(self, spec: RunSpec, method: Method, evaluator: Evaluator, weights: dict, epoch: int) -> list[dict]:
        method.load_state_dict(weights)
        rows = self._timed_eval(spec.run_id, evaluator.main, method, epoch, evaluator.val_splits)
        self._write(spec, epoch, rows)
        if self.lane.rank == 0:
            self.lane.tracker.log_metrics(spec.run_id, epoch_metrics(rows), epoch, "val")
        return rows

    def _recorded_epochs(self, spec: RunSpec) -> set[int]:
        from platebench.datasets.storage import filesystem, join

        fs, root = filesystem(self.launch.storage, self.launch.options)
        files = fs.glob(join(root, "records", spec.run_id, "epoch-?????.parquet"))
        return {int(f.rsplit("-", 1)[1][:5]) for f in files}

    def _catch_up(self, spec: RunSpec, method: Method, evaluator: Evaluator, epochs: int) -> None:
        from platebench.methods.distributed import all_gather_objects

        missing = sorted(set(range(1, epochs + 1)) - self._recorded_epochs(spec)) if self.lane.rank == 0 else None
        for epoch in all_gather_objects([missing])[0]:
            self._progress(epoch, f"validation of {spec.method} from kept weights")
            self._validate(spec, method, evaluator, self.store.load_weights(epoch, self.lane.device), epoch)

    def _record_placement(self, todo: list[RunSpec]) -> None:
        """Which node each rank ran on (runs/<run_id>/placement.json), for multi-node checks and debugging."""
        import ray
        from platebench.methods.distributed import all_gather_objects

        from .runner import write_run_file

        everyone = all_gather_objects([{"rank": self.lane.rank, "node_id": ray.get_runtime_context().get_node_id()}])
        self.placement = sorted(everyone, key=lambda r: r["rank"])
        if self.lane.rank == 0:
            for spec in todo:
                write_run_file(self.launch, spec.run_id, "placement.json", self.placement)

    def _selection(self, spec: RunSpec, epochs: int) -> dict:
        """From `spec`'s validation records: the epochs a leaderboard rule can choose, the best-validation
        epoch (None without a validation split) and the last epoch's validation accuracy."""
        from platebench.methods.distributed import all_gather_objects

        out = None
        if self.lane.rank == 0:
            rows = read_records(self.launch.storage, self.launch.options, run_ids=[spec.run_id]).to_pylist()
            chosen, best, val = set(), None, None
            for rule in LEADERBOARD_RULES:
                try:
                    sel = select_epoch(rows, rule)
                except HarnessError:  # e.g. a scheme without a validation split: only "last-epoch" applies
                    continue
                chosen.add(sel.epoch)
                if rule == "val":
                    best = sel.epoch
                    val = main_value([r for r in rows if r["epoch"] == epochs], sel.split)
            out = {"chosen": sorted(chosen or {epochs}), "best": best, "last_val": val}
        return all_gather_objects([out])[0]

    def _finish(self, spec: RunSpec, method: Method, evaluator: Evaluator, epochs: int) -> dict:
        """Test splits at the selectable epochs, TTA sweeps, tracking and the run's done marker (`epochs`:
        those the training ran)."""
        from .code_identity import commit
        from .runner import write_run_done

        lane = self.lane
        selection = self._selection(spec, epochs)
        chosen, best = selection["chosen"], selection["best"]
        self._progress(epochs, f"test splits of {spec.method}")
        for epoch in chosen:
            method.load_state_dict(self.store.load_weights(epoch, lane.device))
            rows = self._timed_eval(spec.run_id, evaluator.main, method, epoch, evaluator.test_splits)
            self._write(spec, epoch, rows, kind="tests")
            if lane.rank == 0:
                lane.tracker.log_metrics(spec.run_id, epoch_metrics(rows), epoch, "tests")
            if epoch == best and evaluator.track == "tta":
                self._progress(epochs, f"TTA sweeps of {spec.method}")
                self._write(spec, epoch, self._timed_eval(spec.run_id, evaluator.sweeps, method, epoch), "sweeps")
            if epoch == (best or max(chosen)):
                self._progress(epochs, f"representation of {spec.method}")
                t0 = time.perf_counter()
                analysis = self._timed_eval(spec.run_id, analyze, method, evaluator, training_batches(evaluator),
                                            epoch)
                self.timings["representation_s"][spec.run_id] = time.perf_counter() - t0
                self._write(spec, epoch, analysis.rows, kind="representation")
                if lane.rank == 0 and analysis.rows:
                    lane.tracker.log_metrics(spec.run_id, tracking_metrics(analysis.rows), epoch, "representation")
                    lane.tracker.log_text(spec.run_id, "representation/bn_shift.json", _json(analysis.bn_shift))
        result = {}
        if lane.rank == 0:
            lane.tracker.log_text(spec.run_id, "config.json", _json(spec.to_dict()))
            lane.tracker.log_text(spec.run_id, "selected.json", _json({"selectable_epochs": chosen,
                                                                      "best_val_epoch": best}))
            lane.tracker.close(spec.run_id)
            lane.tracker.flush()
            result = write_run_done(self.launch, spec, {
                "training_id": self.training.training_id, "shared_with": [r.method for r in self.job.runs],
                "selected_epoch": best, "selectable_epochs": chosen, "git_commit": commit(),
                "final_metrics": {"epoch": epochs, "val_accuracy": selection["last_val"]},
                "timings": {"setup_s": self.timings["setup_s"], "training_s": self.timings["train_s"],
                            "evaluation_s": self.timings["eval_s"].get(spec.run_id, 0.0),
                            # part of evaluation_s: the representation analysis at the selected epoch
                            "representation_s": self.timings["representation_s"].get(spec.run_id, 0.0),
                            "trained_epochs": self.timings["epochs"], "lane": lane.name,
                            # images of rank 0 (each rank trains its own plates): x workers for the whole job
                            "train_images_rank0": self.timings["train_images"]},
                "environment": _environment(),
                "resources": {"workers": lane.world, "cpus_per_worker": self.launch.cpus_per_worker,
                              "gpus_per_worker": 1 if self.launch.use_gpu else 0,
                              "device": _device_name(lane.device)},
                "placement": self.placement, "mlflow_gaps": list(lane.tracker.gaps.get(spec.run_id, [])),
                "mlflow_run_id": lane.tracker.run_ids.get(spec.run_id)})
        return result


def _environment() -> dict:
    """The versions a run trained with (bundles and leaderboards report them)."""
    import platform
    from importlib.metadata import version

    import ray

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "platebench": version("platebench")}


def _device_name(device) -> str:
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def should_stop(values: list[float | None], metric: str, patience: int) -> bool:
    """Early stopping: the last `patience` epochs brought no improvement of the validation `metric` (lower
    loss or higher accuracy) over the best epoch before them."""
    if len(values) <= patience or any(v is None for v in values):
        return False
    sign = -1.0 if metric == "loss" else 1.0
    best_before = max(sign * v for v in values[:-patience])
    return all(sign * v <= best_before for v in values[-patience:])


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=1, default=list)
