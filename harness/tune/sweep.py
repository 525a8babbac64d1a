"""Hyperparameter sweeps: a Ray Tune experiment whose trials are Ray Train runs.

Each trial function builds a `TorchTrainer` (the Ray 2.60 pattern; `Tuner(TorchTrainer)` is gone) and
forwards its per-epoch reports to Tune with `TuneReportCallback`. Search: Optuna TPE (seeded; the
space's default configuration is evaluated first) or seeded random search; ASHA on validation
accuracy. Trials train with one fixed seed (TRIAL_SEED_BASE + sweep seed) so configurations are
compared on equal terms; the selected configuration is then rerun on fresh `--final-seeds` with that
same hyperparameter sample for every seed (DomainBed issue #111). Trial runs keep their records under
`<storage>/sweeps/<experiment>/` so they never mix into the leaderboard's records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from platebench.datasets.shards import open_dataset
from platebench.datasets.storage import filesystem, join
from platebench.methods.backbones import DEFAULT_BACKBONE
from platebench.methods.precision import DEFAULT_PRECISION

from ..errors import HarnessError
from ..results.layout import read_done, sweep_dir, tune_dir
from ..results.records import overall, read_records
from ..results.selection import select_epoch
from ..train.runner import Launch, fit_run
from ..train.runspec import build_specs
from ..train.tracking import MlflowTarget
from .space import SearchSpace

TRIAL_SEED_BASE = 10_000
METRIC = "val_accuracy"


@dataclass(frozen=True)
class SweepConfig:
    data: str
    split_scheme: str
    method: str
    space: SearchSpace
    trials: int = 8
    search: str = "optuna"  # optuna | random
    scheduler: str = "asha"  # asha | none
    max_concurrent: int = 1
    seed: int = 0
    backbone: str = DEFAULT_BACKBONE
    precision: str = DEFAULT_PRECISION  # run settings of every trial (and the final seeds)
    compile: bool = False
    fixed_hparams: dict | None = None  # e.g. {"epochs": 1}

    @property
    def trial_seed(self) -> int:
        return TRIAL_SEED_BASE + self.seed


def experiment_name(cfg: SweepConfig, dataset_checksum: str) -> str:
    # Run settings away from their defaults name the experiment too (its trials are other runs).
    settings = ((f"-{cfg.precision}" if cfg.precision != DEFAULT_PRECISION else "")
                + ("-compiled" if cfg.compile else ""))
    return (f"sweep-{cfg.method.replace('+', '-')}-{cfg.split_scheme}-{dataset_checksum[:8]}-{cfg.space.digest()}"
            f"-{cfg.search}-{cfg.scheduler}-t{cfg.trials}-s{cfg.seed}{settings}")


def trial_storage(launch: Launch, experiment: str) -> str:
    return sweep_dir(launch.storage, experiment)


def trial_spec(cfg: SweepConfig, sampled: dict):
    ds = open_dataset(cfg.data)
    hp = {**(cfg.fixed_hparams or {}), **sampled}
    return build_specs(ds, cfg.split_scheme, cfg.method, hp, [cfg.trial_seed], cfg.backbone, precision=cfg.precision,
                       compile=cfg.compile)[0]


def run_trial(config: dict, cfg: SweepConfig, launch: Launch, experiment: str) -> None:
    """One Tune trial = one Ray Train run of the sampled configuration."""
    from ray import tune

    from ..train import tracking

    spec = trial_spec(cfg, config)
    trial_launch = replace(launch, storage=trial_storage(launch, experiment))
    done = read_done(trial_launch.storage, spec.run_id, trial_launch.options)
    if done is not None:  # the same sample was trained before (e.g. a repeated choice): replay its curve
        rows = read_records(trial_launch.storage, trial_launch.options, run_ids=[spec.run_id]).to_pylist()
        for epoch, value in sorted(overall(rows, role="val").items()):
            tune.report({METRIC: value, "epoch": epoch})
        return
    if launch.mlflow is not None:
        from ray.air.integrations.mlflow import setup_mlflow

        ctx = tune.get_context()
        try:
            mlf = setup_mlflow(tracking.flat_params({**config, "run_id": spec.run_id}),
                               tracking_uri=launch.mlflow.tracking_uri, experiment_id=launch.mlflow.experiment_id,
                               run_name=ctx.get_trial_name(),
                               tags={"mlflow.parentRunId": launch.mlflow.parent_run_id, "platebench.kind": "trial",
                                     "platebench.run_id": spec.run_id})
            trial_parent = mlf.active_run().info.run_id
            trial_launch = replace(trial_launch, mlflow=MlflowTarget(launch.mlflow.tracking_uri,
                                                                     launch.mlflow.experiment_id, trial_parent))
        except Exception:  # noqa: BLE001 - tracking never stops a trial; the seed run records the gap
            mlf = None
    else:
        mlf = None
    result = fit_run(spec, trial_launch, callbacks=[_ReportAllButLast(spec.hparams["epochs"])])
    # The last epoch is reported only now, after the run has finished its TTA sweeps, tracking and done
    # marker: reported from inside Train, ASHA's max_t would stop (kill) the trial before that cleanup.
    tune.report({**result.get("final_metrics", {}), "epoch": spec.hparams["epochs"]})
    if mlf is not None:
        try:
            mlf.end_run()
        except Exception:  # noqa: BLE001
            pass


def _report_all_but_last_class():
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportAllButLast(TuneReportCallback):
        """Forward per-epoch reports to Tune (for ASHA), except the last epoch's (see run_trial)."""

        def __init__(self, last_epoch: int):
            super().__init__()
            self.last_epoch = last_epoch

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("epoch", 0) >= self.last_epoch:
                return
            super().after_report(run_context, metrics, checkpoint)

    return ReportAllButLast


def _ReportAllButLast(last_epoch: int):  # noqa: N802 - builds the callback lazily (Ray import)
    return _report_all_but_last_class()(last_epoch)


def _searcher(cfg: SweepConfig):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    default = [cfg.space.defaults()]
    if cfg.search == "random":
        return BasicVariantGenerator(points_to_evaluate=default, random_state=cfg.seed,
                                     max_concurrent=cfg.max_concurrent)
    if cfg.search != "optuna":
        raise HarnessError(f"--search must be optuna or random, got {cfg.search!r}")
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(metric=METRIC, mode="max", points_to_evaluate=default, seed=cfg.seed,
                            sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    return ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent)


def _scheduler(cfg: SweepConfig):
    if cfg.scheduler == "none":
        return None
    if cfg.scheduler != "asha":
        raise HarnessError(f"--scheduler must be asha or none, got {cfg.scheduler!r}")
    from ray.tune.schedulers import ASHAScheduler

    epochs = int((cfg.fixed_hparams or {}).get("epochs") or trial_spec(cfg, cfg.space.defaults()).hparams["epochs"])
    return ASHAScheduler(time_attr="training_iteration", metric=METRIC, mode="max", max_t=max(1, epochs),
                         grace_period=1, reduction_factor=2)


def run_sweep(cfg: SweepConfig, launch: Launch, resume: bool = False) -> dict:
    """Run (or resume) the experiment; returns {"experiment", "trials": [...], "path"}."""
    import ray.tune as tune
    from platebench.datasets.storage import pyarrow_filesystem

    from ..train.runner import check_storage_writable

    ds = open_dataset(cfg.data)
    experiment = experiment_name(cfg, ds.manifest.checksum())
    check_storage_writable(replace(launch, storage=trial_storage(launch, experiment)))
    fs, path = pyarrow_filesystem(tune_dir(launch.storage), launch.options)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, cfg=cfg, launch=launch, experiment=experiment),
        {"cpu": 0.01})  # the trial only drives its TorchTrainer; Tune rejects 0
    exp_path = f"{path}/{experiment}"
    exists = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if exists and not resume:
        raise HarnessError(f"sweep experiment {experiment} already exists in {tune_dir(launch.storage)}; "
                           f"pass --resume to continue it")
    if resume and exists:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=cfg.space.to_tune(),
            # Concurrency is capped by the searcher (ConcurrencyLimiter / BasicVariantGenerator), not twice.
            tune_config=tune.TuneConfig(num_samples=cfg.trials, search_alg=_searcher(cfg), scheduler=_scheduler(cfg),
                                        reuse_actors=False),
            run_config=tune.RunConfig(name=experiment, storage_path=path, storage_filesystem=fs, verbose=0))
    grid = tuner.fit()
    trials = []
    for res in grid:
        if res.config is None:
            continue
        sampled = {k: res.config[k] for k in cfg.space.params if k in res.config}
        spec = trial_spec(cfg, sampled)
        trials.append({"trial_id": getattr(res, "path", None) and res.path.rsplit("/", 1)[-1],
                       "sampled": sampled, "run_id": spec.run_id, "hparams": spec.hparams,
                       "error": str(res.error).splitlines()[0][:300] if res.error else None,
                       **_timing(res, read_done(trial_storage(launch, experiment), spec.run_id, launch.options))})
    return {"experiment": experiment, "trials": trials, "path": join(tune_dir(launch.storage), experiment)}


def _timing(res, done: dict | None) -> dict:
    """Wall time of a trial (Tune's time_total_s) and the part its run spent training and evaluating (the run's
    done marker). A trial stopped early by the scheduler has no done marker and no timing."""
    df = res.metrics_dataframe
    if df is None or df.empty or "time_total_s" not in df or done is None or "timings" not in done:
        return {}
    t = done["timings"]
    return {"trial_seconds": float(df["time_total_s"].max()), "work_seconds": t["training_s"] + t["evaluation_s"],
            "epochs_reported": int(len(df))}


def select_best(cfg: SweepConfig, launch: Launch, experiment: str, trials: list[dict]) -> dict:
    """The best trial on the validation split only (pure function of the trials' records)."""
    storage = trial_storage(launch, experiment)
    records = read_records(storage, launch.options, run_ids=[t["run_id"] for t in trials])
    rows = records.to_pylist()
    scheme = open_dataset(cfg.data).manifest.scheme(cfg.split_scheme)
    best = None
    for t in trials:
        run_rows = [r for r in rows if r["run_id"] == t["run_id"]]
        if not run_rows:
            continue
        sel = select_epoch(run_rows, "val")
        if best is None or sel.value > best["value"]:
            best = {"method": cfg.method, "hparams": t["hparams"], "metric": "accuracy", "value": sel.value,
                    "selection_split": scheme.selection_split, "selection_rule": scheme.selection_rule,
                    "epoch": sel.epoch, "run_id": t["run_id"], "trials": len(trials), "experiment": experiment}
    if best is None:
        raise HarnessError(f"sweep {experiment}: no trial produced validation records")
    return best


def write_best(best: dict, launch: Launch) -> str:
    """Merge the selected configuration into `<storage>/best_configs.json` (harness/best_configs.py's schema),
    which the leaderboard reads."""
    from ..results import best_configs

    fs, root = filesystem(launch.storage, launch.options)
    path = join(root, best_configs.FILE_NAME)
    current = best_configs.parse(json.loads(fs.cat_file(path)), path) if fs.exists(path) else {}
    current[best["method"]] = best_configs.BestConfig(
        hparams=best["hparams"], trials=best["trials"], value=best["value"], selection_split=best["selection_split"],
        selection_rule=best["selection_rule"], experiment=best["experiment"])
    fs.pipe_file(path, best_configs.dumps(current).encode())
    return path
