"""One real epoch of `platebench run` (Ray Train + Ray Data) against a plain PyTorch loop doing the same work.

Both train one run spec (dataset, split scheme, method, hyperparameters, backbone, seed; epochs=1) and
evaluate it as a run does: the validation splits after the epoch, then the test splits (the only
selectable epoch is the first), a TTA method's sweeps, and the representation analysis at that epoch.
- Ray: `runner.run_many` with one lane, no MLflow, into a fresh storage folder. Its wall time is the
  `run_many` call (the lane's `fit()`: controller and worker start-up, checkpoints, records, done
  markers); its phases come from the run's done marker, `runs/<run_id>/done.json` "timings".
- plain: `workers` spawned processes (a gloo or NCCL process group when there are several), each doing
  what a run's worker does with the same code where the work is the same: the seeded method, the
  stream's plan and batches (`PlainPlateStream`: parts read by pyarrow threads, not Ray Data), the
  schedule, `training_step`, the run's `Evaluator` on plain streams; the weights are saved once. Its
  wall time runs from starting the processes to their exit.
Both use `cpus_per_worker` torch threads per worker and keep parts in memory up to `cache_mb` per worker.
The phases are bracketed alike: setup (dataset, methods, channel statistics, and the part cache warmed with the
epoch's training parts and the validation splits, which a run's lane does before its first step), training (the
epoch's steps), evaluation (every split evaluated; the test splits are read there on both sides); `*_other_s` is
the rest of each wall time. `cache_warm` says where both sides warmed the part cache ("setup", or "none" with
`cache_mb` 0, when neither keeps parts).
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from platebench.datasets.shards import open_dataset
from platebench.methods.backbones import DEFAULT_BACKBONE
from platebench.methods.distributed import free_port
from platebench.methods.precision import DEFAULT_PRECISION

from ..errors import HarnessError
from ..results.vocabulary import main_overall
from ..train.runspec import RunSpec, build_specs, check_trainable

KEYS = ("ratio", "training_ratio", "evaluation_ratio", "ray_wall_s", "ray_setup_s", "ray_training_s",
        "ray_evaluation_s", "ray_other_s", "plain_wall_s", "plain_setup_s", "plain_training_s",
        "plain_evaluation_s", "plain_other_s", "steps", "train_images", "eval_images", "ray_val_accuracy",
        "plain_val_accuracy", "ray_val_loss", "plain_val_loss", "method", "backbone", "batch_size", "split_scheme",
        "workers", "cpus_per_worker", "device", "repeats", "dataset", "cache_warm", "precision", "compile",
        "prep_s_per_image")


# -- the plain loop (one process per worker) ---------------------------------------------------------
def _plain_worker(cfg: dict) -> dict:
    import torch
    import torch.distributed as dist
    from platebench.methods.precision import autocast

    from ..analysis.representation import analyze, training_batches
    from ..data.channel_stats import channel_stats
    from ..data.stream import PartCache, StreamConfig
    from ..results.records import main_value
    from ..train.epochs import seed_all
    from ..train.runspec import build_method, task_spec
    from ..train.schedule import lr_factor
    from .plain import PlainEvaluator, PlainPlateStream
    from .prep import prep_seconds_per_image

    rank, world = cfg["rank"], cfg["workers"]
    torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))
    if world > 1:
        dist.init_process_group("nccl" if cfg["gpu"] else "gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}",
                                rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cfg["gpu"] else torch.device("cpu")
    try:
        spec = RunSpec.from_dict(cfg["spec"])
        t = spec.training()
        hp = t.hparams
        t0 = time.perf_counter()
        ds = open_dataset(spec.data)
        task = task_spec(ds)
        cache = PartCache(cfg["cache_mb"] * 2**20)
        seed_all(t.seed)  # as a run: identical initial parameters on every rank
        trainer = build_method(t, task, device)  # as a run: its precision and compile settings
        protocol = build_method(spec, task, device)
        stats = channel_stats(ds, t.split_scheme, "train", cache) if hp["normalize"] == "dataset" else None
        evaluator = PlainEvaluator(ds, spec, protocol, rank, world, device, cache, stats,
                                   read_threads=cfg["read_threads"])
        setup_s = time.perf_counter() - t0

        stream = PlainPlateStream(ds, StreamConfig.for_training(
            trainer.data_request(), t.split_scheme, t.seed, hp["augment"], channel_stats=stats),
            rank, world, cache, read_threads=cfg["read_threads"])
        epoch, epochs = 0, 1
        t0 = time.perf_counter()  # as a run's lane: the epoch's parts and the validation splits cached in set-up
        stream.warm(epoch)
        evaluator.warm(evaluator.val_splits)
        setup_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        seed_all(t.seed * 7919 + rank * 104729 + epoch)
        trainer.train()
        steps = stream.steps(epoch)
        trainer.on_epoch_start(epoch, epochs, steps)
        sums: dict[str, float] = {}
        images = 0
        for i, batch in enumerate(stream.epoch(epoch, device)):
            trainer.set_lr_factor(lr_factor(epoch, i, steps, epochs, hp["warmup_epochs"], hp["schedule"]))
            images += sum(int(b.queries.sum()) for b in (batch if isinstance(batch, list) else [batch]))
            with autocast(t.precision, device):
                metrics = trainer.training_step(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        trainer.sync_buffers()
        training_s = time.perf_counter() - t0
        weights = trainer.state_dict()
        if rank == 0:
            torch.save({k: v.detach().cpu() for k, v in weights.items()}, cfg["weights_path"])

        protocol.load_state_dict(weights)  # outside the clock, as in a run
        t0 = time.perf_counter()
        val_rows = evaluator.main(protocol, epoch + 1, evaluator.val_splits)
        test_rows = evaluator.main(protocol, epoch + 1, evaluator.test_splits)
        if evaluator.track == "tta" and evaluator.val_splits:  # the run sweeps at the best validation epoch
            evaluator.sweeps(protocol, epoch + 1)
        analyze(protocol, evaluator, training_batches(evaluator), epoch + 1)  # and analyses its representation
        evaluation_s = time.perf_counter() - t0
        rows = val_rows + test_rows
        # after every timed phase and collective: the device-side conversion's own cost (a share of training_s);
        # the time it takes is taken off the plain wall time (plain_epoch)
        t0 = time.perf_counter()
        prep_s = prep_seconds_per_image(stream, device, epoch) if rank == 0 and steps > 1 else None
        measure_s = time.perf_counter() - t0
        return {"rank": rank, "setup_s": setup_s, "training_s": training_s, "evaluation_s": evaluation_s,
                "prep_s_per_image": prep_s, "prep_measure_s": measure_s,
                "steps": steps, "train_images": images, "eval_images": _eval_images(rows),
                "val_accuracy": main_value(val_rows, evaluator.scheme.selection_split),
                "val_loss": main_value(val_rows, evaluator.scheme.selection_split, "loss")}
    finally:
        if world > 1:
            dist.destroy_process_group()


def _eval_images(rows: list[dict]) -> int:
    """Images evaluated under the main protocol, over every split (one 'all' accuracy row per split)."""
    return sum(int(r["n"]) for r in main_overall(rows))



def plain_epoch(spec: RunSpec, workers: int = 1, gpu: bool = False, cpus_per_worker: float = 1.0,
                read_threads: int = 4, cache_mb: int = 512) -> dict:
    """The plain loop in `workers` fresh processes: rank 0's phases (a run reports rank 0's), images trained by
    all ranks, and the wall time of the whole."""
    with tempfile.TemporaryDirectory(prefix="pb-perf-plain-") as work:
        base = {"spec": spec.to_dict(), "workers": workers, "gpu": gpu, "cpus_per_worker": cpus_per_worker,
                "read_threads": read_threads, "cache_mb": cache_mb, "port": free_port(),
                "weights_path": f"{work}/weights.pt"}
        t0 = time.perf_counter()
        # spawn: fresh processes like Ray's workers, and no fork of a driver that runs Ray's threads
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_plain_worker, {**base, "rank": r}) for r in range(workers)]
            results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
    first = next(r for r in results if r["rank"] == 0)
    return {**first, "train_images": sum(r["train_images"] for r in results),
            "wall_s": wall - first["prep_measure_s"]}


# -- the Ray run ---------------------------------------------------------------------------------------
def ray_epoch(spec: RunSpec, storage: str, workers: int = 1, gpu: bool = False, cpus_per_worker: float = 1.0,
              cache_mb: int = 512) -> dict:
    """One `platebench run` of `spec` (1 epoch) into `storage`; its wall time, done-marker timings and counts."""
    from ..results.layout import read_done
    from ..results.records import main_value, read_records
    from ..train.checkpointing import TrainingStore
    from ..train.runner import Launch, check_storage_writable, require_runs_ok, run_many

    launch = Launch(storage=storage, workers=workers, use_gpu=gpu, cpus_per_worker=cpus_per_worker, mlflow=None,
                    cache_mb=cache_mb)
    check_storage_writable(launch)
    if read_done(storage, spec.run_id, launch.options) is not None:
        raise HarnessError(f"{storage}: run {spec.run_id} is already done there; perf train needs a fresh storage")
    t0 = time.perf_counter()
    results, _ = run_many([spec], launch, max_concurrent=1)
    wall = time.perf_counter() - t0
    require_runs_ok(results)
    done = read_done(storage, spec.run_id, launch.options)
    history = TrainingStore(storage, launch.options, spec.training().training_id).read_done()["history"]
    rows = [r for r in read_records(storage, launch.options, run_ids=[spec.run_id]).to_pylist() if r["epoch"] == 1]
    selection_split = open_dataset(spec.data).manifest.scheme(spec.split_scheme).selection_split
    timings = done["timings"]
    return {"wall_s": wall, "setup_s": timings["setup_s"], "training_s": timings["training_s"],
            "evaluation_s": timings["evaluation_s"], "steps": history[0]["steps"],
            "eval_images": _eval_images(rows), "val_accuracy": done["final_metrics"]["val_accuracy"],
            "val_loss": main_value(rows, selection_split, "loss")}


# -- the command ---------------------------------------------------------------------------------------
def prepare(data: str, split_scheme: str = "new_batches", method: str = "erm", hparams: dict | None = None,
            backbone: str = DEFAULT_BACKBONE, seed: int = 0, workers: int = 1, *, precision: str = DEFAULT_PRECISION,
            compile: bool = False) -> RunSpec:
    """The run spec both paths train (epochs=1); every error a run would refuse, before Ray starts."""
    ds = open_dataset(data)
    spec = build_specs(ds, split_scheme, method, {**(hparams or {}), "epochs": 1}, [seed], backbone,
                       precision=precision, compile=compile)[0]
    check_trainable(ds, spec, workers)
    return spec


def run(spec: RunSpec, workers: int = 1, gpu: bool = False, cpus_per_worker: float = 1.0, read_threads: int = 4,
        cache_mb: int = 512, repeats: int = 1, storage: str | None = None) -> dict:
    """`storage`: where the runs go (kept, one folder per repeat); default a temporary folder, removed."""
    if storage is None:
        with tempfile.TemporaryDirectory(prefix="pb-perf-train-") as tmp:
            return run(spec, workers, gpu, cpus_per_worker, read_threads, cache_mb, repeats, tmp)
    storage = storage.rstrip("/")
    plains, rays = [], []
    for k in range(repeats):  # interleaved, best wall time of each: the box is shared and noisy
        plains.append(plain_epoch(spec, workers, gpu, cpus_per_worker, read_threads, cache_mb))
        rays.append(ray_epoch(spec, f"{storage}/repeat-{k}", workers, gpu, cpus_per_worker, cache_mb))
    plain = min(plains, key=lambda r: r["wall_s"])
    ray = min(rays, key=lambda r: r["wall_s"])
    for key in ("steps", "eval_images"):
        if plain[key] != ray[key]:
            raise RuntimeError(f"perf train: the plain loop and the run differ in {key} ({plain[key]} vs {ray[key]}): "
                               f"they did not do the same work")
    out = {"ratio": ray["wall_s"] / plain["wall_s"], "training_ratio": ray["training_s"] / plain["training_s"],
           "evaluation_ratio": ray["evaluation_s"] / plain["evaluation_s"]}
    for name, r in (("ray", ray), ("plain", plain)):
        out.update({f"{name}_wall_s": r["wall_s"], f"{name}_setup_s": r["setup_s"],
                    f"{name}_training_s": r["training_s"], f"{name}_evaluation_s": r["evaluation_s"],
                    f"{name}_other_s": r["wall_s"] - r["setup_s"] - r["training_s"] - r["evaluation_s"]})
    return {**out, "steps": plain["steps"], "train_images": plain["train_images"], "eval_images": plain["eval_images"],
            "ray_val_accuracy": ray["val_accuracy"], "plain_val_accuracy": plain["val_accuracy"],
            "ray_val_loss": ray["val_loss"], "plain_val_loss": plain["val_loss"],
            "prep_s_per_image": plain["prep_s_per_image"],
            "method": spec.method, "backbone": spec.backbone, "batch_size": spec.hparams["batch_size"],
            "split_scheme": spec.split_scheme, "workers": workers, "cpus_per_worker": cpus_per_worker,
            "device": "gpu" if gpu else "cpu", "repeats": repeats, "dataset": spec.data,
            "cache_warm": "setup" if cache_mb > 0 else "none", "precision": spec.precision, "compile": spec.compile}
