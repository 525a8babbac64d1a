"""`platebench analyze`: the representation analysis of one finished run, with plots.

    platebench analyze --records STORAGE --run RUN_ID [--out DIR] [--epoch N] [--data URL]
                       [--projection umap|tsne] [--write-records] [--mlflow-uri URI | --no-mlflow]

Reads runs/<run_id>/spec.json and done.json (the selected epoch: best validation, else the last), loads that
epoch's weights from trainings/<training_id>/weights/, rebuilds the method and runs harness/representation.py on
the run's test splits. Writes to --out: representation.csv (the record rows), bn_shift.csv (per plate and BN
layer), projection-<split>.png (well profiles coloured by batch, plate and class) and bn-shift-<split>.png (the
shift per layer); logs them to the run's MLflow run when done.json names one (a failure is a warning).
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

from ..errors import HarnessError
from ..results.layout import DONE_FILE, SPEC_FILE, finished_run_id, read_run_json, run_file, weights_epoch

PROJECTIONS = ("umap", "tsne")


def add_parser(sub):
    from platebench.harness.commands import flags

    p = sub.add_parser("analyze", help="representation analysis of a finished run: batch mixing, biological "
                                       "retrieval (mAP), BN-statistics shift, UMAPs",
                       description="Embed a finished run's test splits with its selected weights, aggregate to "
                                   "well profiles and measure batch mixing (silhouette, iLISI), biological "
                                   "signal (copairs mAP) and the BatchNorm-statistics shift; draw projections "
                                   "and per-layer shift curves. STORAGE holds the run's runs/, trainings/ and "
                                   "records/; without --data the run's own dataset is read (the same checksum).")
    flags.add_records_flag(p)
    flags.add_run_flag(p)
    flags.add_out_flag(p)
    flags.add_epoch_flag(p)
    flags.add_data_flag(p)
    p.add_argument("--projection", choices=PROJECTIONS, default="umap",
                   help="2-D projection of the profiles: umap (umap-learn, default) or tsne (scikit-learn)")
    p.add_argument("--device", default="cpu", help="torch device for the embeddings (default: cpu)")
    p.add_argument("--write-records", action="store_true",
                   help="also write the rows as the run's records (records/<run>/epoch-N.representation.parquet)")
    flags.add_mlflow_flags(p)
    return p


def _run_file(storage: str, run_id: str, name: str) -> dict:
    data = read_run_json(storage, run_id, name)
    if data is None:
        raise HarnessError(f"{run_file(storage, run_id, name)}: not found (is {run_id!r} a finished run?)")
    return data


def run(args) -> int:
    import torch
    from platebench.datasets.shards import open_dataset
    from platebench.harness.data.batching import on_device
    from platebench.methods import get_method

    from ..analysis.representation import analyze, training_batches
    from ..data.stream import PartCache
    from ..results.records import write_epoch_records
    from ..train.checkpointing import TrainingStore
    from ..train.evaluate import Evaluator
    from ..train.runspec import RunSpec, task_spec

    args.run = finished_run_id(args.records, args.run)
    spec = RunSpec.from_dict(_run_file(args.records, args.run, SPEC_FILE))
    done = _run_file(args.records, args.run, DONE_FILE)
    epoch = args.epoch or weights_epoch(done, args.run)
    ds = open_dataset(args.data or spec.data)
    if ds.manifest.checksum() != spec.dataset_checksum:
        raise HarnessError(f"{ds.url}: dataset checksum {ds.manifest.checksum()[:12]} differs from the run's "
                           f"{spec.dataset_checksum[:12]} (not the data the run was trained on)")
    store = TrainingStore(args.records, None, done["training_id"])
    method = on_device(get_method(spec.method)(task_spec(ds), spec.hparams, spec.backbone), args.device)
    method.load_state_dict(store.load_weights(epoch, args.device))
    cache = PartCache(2**30)
    evaluator = Evaluator(ds, spec, method, 0, 1, args.device, cache, _channel_stats(spec, store, ds, cache))
    with torch.no_grad():
        result = analyze(method, evaluator, training_batches(evaluator), epoch)

    out = Path(args.out or Path("analysis") / args.run)
    out.mkdir(parents=True, exist_ok=True)
    files = _write_tables(result, out) + _write_plots(result, out, args.projection, spec, epoch)
    _print_summary(result.rows, spec, epoch)
    if args.write_records and result.rows:
        path = write_epoch_records(args.records, spec.run_id, epoch, result.rows, kind="representation")
        print(f"records: {path}")
    _log_mlflow(args, done, files)
    print(f"wrote {len(files)} files to {out}")
    return 0


def _channel_stats(spec, store, ds, cache):
    """The per-channel statistics a `normalize: dataset` run was trained with (stored beside its weights)."""
    if spec.hparams.get("normalize", "self") != "dataset":
        return None
    stats = store.read_json("channel_stats.json")
    if stats is None:
        from ..data.channel_stats import channel_stats

        stats = channel_stats(ds, spec.split_scheme, "train", cache)
    return tuple(stats[0]), tuple(stats[1])


def _write_tables(result, out: Path) -> list[Path]:
    import csv

    files = []
    for name, rows, fields in (
            ("representation.csv", result.rows, ["split", "split_role", "domain_kind", "domain", "metric", "value",
                                                  "n", "epoch", "eval_batch_size", "n_controls"]),
            ("bn_shift.csv", result.bn_shift, ["split", "plate", "batch", "depth", "layer", "kl", "mmd", "n"])):
        path = out / name
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        files.append(path)
    return files


def _print_summary(rows: list[dict], spec, epoch: int) -> None:
    overall = [r for r in rows if r["domain_kind"] == "all"]
    splits = sorted({r["split"] for r in overall})
    metrics = list(dict.fromkeys(r["metric"] for r in overall))
    print(f"{spec.method} seed {spec.seed} ({spec.run_id}), epoch {epoch}")
    print("| metric | " + " | ".join(splits) + " |")
    print("|---|" + "---|" * len(splits))
    values = {(r["split"], r["metric"]): r["value"] for r in overall}
    for m in metrics:
        cells = [f"{values[(s, m)]:.4f}" if (s, m) in values else "—" for s in splits]
        print(f"| {m} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------------------------------------
# plots (matplotlib Figure + Agg canvas: no pyplot state)
# ---------------------------------------------------------------------------------------------
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5"]
CONTROL_COLOUR = "#7f7f7f"


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    path.write_bytes(buf.getvalue())
    return path


def project(features, method: str, seed: int = 0):
    """2-D coordinates of the profiles (UMAP, or t-SNE without umap-learn's numba compile)."""
    import warnings

    import numpy as np

    n = len(features)
    if n < 3:
        return np.zeros((n, 2))
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise HarnessError("--projection umap needs umap-learn (pip install umap-learn), or use "
                               "--projection tsne") from None
        with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": reproducible on purpose
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            return umap.UMAP(n_neighbors=min(15, n - 1), random_state=seed).fit_transform(features)
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), random_state=seed, init="pca").fit_transform(
        features)


def _write_plots(result, out: Path, projection: str, spec, epoch: int) -> list[Path]:
    files = []
    for split, profiles in result.profiles.items():
        if len(profiles.features) >= 3:
            files.append(_save(_projection_figure(profiles, project(profiles.features, projection),
                                                  f"{spec.method} · {split} · epoch {epoch} · {projection}"),
                               out / f"projection-{split}.png"))
        shifts = [s for s in result.bn_shift if s["split"] == split]
        if shifts:
            files.append(_save(_shift_figure(shifts, f"{spec.method} · {split} · epoch {epoch}"),
                               out / f"bn-shift-{split}.png"))
    return files


def _projection_figure(profiles, xy, title: str):
    from matplotlib.figure import Figure

    meta = profiles.meta
    controls = meta["is_control"].to_numpy(bool)
    classes = meta["label"].astype(str).where(~controls, "control")
    fig = Figure(figsize=(15, 4.8))
    fig.suptitle(title)
    for k, (name, labels) in enumerate((("batch", meta["batch"].astype(str)), ("plate", meta["plate"].astype(str)),
                                        ("class", classes))):
        ax = fig.add_subplot(1, 3, k + 1)
        values = sorted(set(labels) - {"control"})
        for i, value in enumerate(values):
            sel = (labels == value).to_numpy()
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=PALETTE[i % len(PALETTE)], label=value,
                       linewidths=0)
        if name == "class" and controls.any():
            ax.scatter(xy[controls, 0], xy[controls, 1], s=10, marker="x", color=CONTROL_COLOUR, label="control",
                       linewidths=0.8)
        ax.set_title(f"by {name} ({len(values)})")
        ax.set_xticks([])
        ax.set_yticks([])
        if len(values) <= 12:
            ax.legend(fontsize=7, markerscale=2, loc="best", frameon=False)
    return fig


def _shift_figure(shifts: list[dict], title: str):
    import numpy as np
    from matplotlib.figure import Figure

    layers = sorted({(s["depth"], s["layer"]) for s in shifts})
    prefix = os.path.commonprefix([name for _, name in layers])
    prefix = prefix[: prefix.rfind(".") + 1] if len(layers) > 1 else ""  # e.g. "network.featurizer."
    batches = sorted({s["batch"] for s in shifts})
    fig = Figure(figsize=(12, 4.5))
    fig.suptitle(f"{title}: BatchNorm input statistics, test plates vs training plates")
    for k, (key, label) in enumerate((("kl", "symmetric KL (mean over channels)"), ("mmd", "MMD (pooled features)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for i, batch in enumerate(batches):
            colour = PALETTE[i % len(PALETTE)]
            plates = sorted({s["plate"] for s in shifts if s["batch"] == batch})
            curves = []
            for plate in plates:
                by_depth = {s["depth"]: s[key] for s in shifts if s["plate"] == plate and s[key] is not None}
                curve = [by_depth.get(d, np.nan) for d, _ in layers]
                curves.append(curve)
                ax.plot(range(len(layers)), curve, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(range(len(layers)), np.nanmean(np.asarray(curves, dtype=float), axis=0), color=colour,
                    marker="o", markersize=3, linewidth=1.8, label=f"{batch} ({len(plates)} plates)")
        step = max(1, len(layers) // 24)
        ax.set_xticks(range(0, len(layers), step))
        ax.set_xticklabels([name[len(prefix):] for _, name in layers][::step], rotation=70, ha="right", fontsize=6)
        ax.set_ylabel(label)
        ax.set_xlabel(f"BatchNorm layer input ({prefix}…), in forward order" if prefix
                      else "BatchNorm layer input, in forward order")
        if len(batches) <= 12:
            ax.legend(fontsize=7, frameon=False)
    return fig


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------
def _tracking_uri(args) -> str | None:
    if args.mlflow_uri:
        return args.mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from urllib.parse import urlparse

    if urlparse(args.records).scheme in ("", "file"):
        db = Path(args.records.removeprefix("file://")) / "mlflow.db"
        if db.exists():
            return f"sqlite:///{db.resolve()}"
    return None


def _log_mlflow(args, done: dict, files: list[Path]) -> None:
    run_id = done.get("mlflow_run_id")
    if args.no_mlflow or not run_id or not files:
        return
    uri = _tracking_uri(args)
    if uri is None:
        print(f"warning: run {args.run} has MLflow run {run_id} but no tracking URI was found (give --mlflow-uri); "
              "files not logged", file=sys.stderr)
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="representation")
    except Exception as exc:  # noqa: BLE001 - the analysis is written; MLflow is a copy
        print(f"warning: logging to MLflow run {run_id} at {uri} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return
    print(f"logged {len(files)} files to MLflow run {run_id} (artifacts/representation)")
