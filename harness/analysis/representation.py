"""Representation analysis of a run's selected model: is the batch effect gone from its features, and the biology kept?

Every test-split image is embedded with `Method.embed` under the run's main evaluation batching (standard
methods: eval mode, plate-pure batches of the evaluation batch size; TTA methods: their own batch size and
control context, exactly the batches `Evaluator.counts` predicts on), and site embeddings are averaged into
well profiles (negative-control wells included). On those profiles, per test split:

- biological signal (copairs, the JUMP Cell Painting consortium's mAP framework):
  `map_activity`: phenotypic activity, each treated well's replicates (same perturbation, any plate) ranked
  against the negative-control wells of its own plate (cosine similarity), mean over perturbations;
  `frac_retrieved`: fraction of perturbations whose activity mAP has a BH-corrected p < 0.05 (copairs' null);
  `map_consistency`: consensus profiles (a perturbation's treated wells on one plate) retrieving those of the
  same class made by other perturbations, against those of other classes, mean over classes;
- batch mixing, with the perturbation (controls included) as the biological label: `silhouette_batch` (scib's
  batch ASW: per perturbation, the mean of 1 - |silhouette against batch| of its wells, then the mean over
  perturbations; 1 = mixed, 0 = separated), `graph_connectivity` (scib's: per perturbation, the share of its
  wells in the largest connected component of the kNN graph restricted to them, mean over perturbations) and
  `ilisi`: mean iLISI (harmonypy's LISI) rescaled to [0, 1] by (LISI - 1) / (batches - 1) (1 = every
  neighbourhood holds all batches in equal parts);
- BatchNorm statistics shift (ABRA's Fig. 8): for every BN layer, its input's statistics on each test plate
  against the training plates' (`train_reference`), embedded under the same test-time rules:
  `bn_shift_kl`: symmetric KL (Jeffreys divergence, KL(p||q) + KL(q||p)) of the per-channel Gaussians N(mean,
  var + eps), mean over channels; `bn_shift_mmd`: biased RBF-kernel MMD between the per-image pooled features
  (the layer input averaged over space, standardised with the training reference's per-channel mean and std,
  bandwidth = median squared distance within the reference), up to bn_shift.MMD_SAMPLES images a side. Records hold the
  mean over layers per plate, per batch (mean of its plates) and overall; `Representation.bn_shift` holds the
  per-layer values.

Rows are records (protocol "representation", records.py) of the given epoch. With several ranks each embeds its
own plates and rank 0 computes the metrics from everything gathered; every rank must call `analyze`.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from platebench.methods import Batch, Method
from platebench.methods.distributed import all_gather_objects
from platebench.methods.precision import autocast

from ..data.rebatch import Rebatcher, RowBatch
from ..data.stream import PlateStream
from ..results.vocabulary import REPRESENTATION, REPRESENTATION_METRICS
from .bn_shift import BNCapture, Moments, Reference
from .metrics import (
    NULL_SIZE,
    activity_map,
    average_precision,
    consistency_map,
    graph_connectivity,
    ilisi,
    mmd,
    silhouette_batch,
    symmetric_kl,
)

PROTOCOL = REPRESENTATION
METRICS = REPRESENTATION_METRICS
REFERENCE_IMAGES_PER_PLATE = 256  # training images per plate for the BN-shift reference (whole batches)
WELL_COLUMNS = ("plate", "well", "batch", "source", "cell_type", "perturbation", "label", "is_control")


@dataclass
class Profiles:
    """Well-level profiles of one split: features [wells, D] and one metadata row per well (WELL_COLUMNS + n)."""

    features: np.ndarray
    meta: object  # pandas.DataFrame
    n_images: int


@dataclass
class Representation:
    rows: list[dict]  # records (protocol "representation")
    profiles: dict[str, Profiles] = field(default_factory=dict)  # per test split
    bn_shift: list[dict] = field(default_factory=list)  # per (split, plate, layer): depth (forward order), kl, mmd, n


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def representation_rows(method: Method, evaluator, train_reference: Iterable[Batch] | None, epoch: int) -> list[dict]:
    """Record rows of the representation analysis of `method` as it is (weights of `epoch` loaded) on the
    evaluator's test splits. `train_reference`: training-split batches for the BN-shift reference (usually
    `training_batches(evaluator)`); None leaves the BN-shift rows out. Collective over ranks; rows on rank 0."""
    return analyze(method, evaluator, train_reference, epoch).rows


def tracking_metrics(rows: list[dict]) -> dict[str, float]:
    """The overall (domain "all") rows as MLflow metrics named like `test/representation/map_activity`."""
    from ..train.tracking import metric_name

    return {metric_name(r["split"], PROTOCOL, r["metric"]): float(r["value"]) for r in rows
            if r["domain_kind"] == "all"}


def training_batches(evaluator, max_images_per_plate: int | None = REFERENCE_IMAGES_PER_PLATE) -> Iterator[Batch]:
    """This rank's training-split plates as evaluation batches of the run's main protocol (eval batch size and
    controls): the BN-shift reference, seen under the same test-time rules as the test plates. Each plate gives
    its first batches up to `max_images_per_plate` images (None: all), so every plate weighs in and the cost
    stays bounded on large plates."""
    stream = evaluator.stream("train")
    for plate, _ in stream.plan(0)[0]:
        taken = 0
        for item in _plate_items(stream, evaluator.cache, plate, None)[0]:
            if max_images_per_plate is not None and taken >= max_images_per_plate:
                break
            taken += item.queries.num_rows
            yield stream.convert(item, evaluator.device)


def analyze(method: Method, evaluator, train_reference: Iterable[Batch] | None, epoch: int, *,
            null_size: int = NULL_SIZE, seed: int = 0) -> Representation:
    """Embed, aggregate and measure (see the module docstring); rows, profiles and per-layer BN shifts."""
    method.eval()
    # Embeddings under the run's precision, as its predictions; BN inputs and features are read back in float32.
    with torch.no_grad(), BNCapture(method) as capture, autocast(evaluator.spec.precision, evaluator.device):
        reference = None
        if train_reference is not None and capture.names:
            local = Moments(len(capture.names), seed)
            for batch in train_reference:  # queries first, as to_batch makes them
                capture.embed(method, batch, local, int(batch.queries.sum()))
            reference = Reference.merge(all_gather_objects([local.state()]), capture, seed)
        local_splits = {split: _embed_split(method, evaluator, split, capture, reference, seed)
                        for split in evaluator.test_splits}
    depth = {name: k for k, name in enumerate(capture.order)}  # forward order (the same on every rank)
    gathered = all_gather_objects([local_splits])
    if evaluator.rank != 0:
        return Representation(rows=[])
    out = Representation(rows=[])
    base = _base_row(evaluator, epoch)
    for split in evaluator.test_splits:
        parts = [g[split] for g in gathered]
        profiles = _Wells.merge([p["wells"] for p in parts])
        shifts = [s for p in parts for s in p["shifts"]]
        out.profiles[split] = profiles
        out.rows += _split_rows(base, evaluator, split, profiles, shifts, null_size, seed)
        for s in shifts:
            for name, kl, mmd_ in zip(s["layers"], s["kl"], s["mmd"]):
                if name in depth and (kl is not None or mmd_ is not None):
                    out.bn_shift.append({"split": split, "plate": s["plate"], "batch": s["batch"], "layer": name,
                                         "depth": depth[name], "kl": kl, "mmd": mmd_, "n": s["n"]})
    return out


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def _base_row(evaluator, epoch: int) -> dict:
    spec = evaluator.spec
    return {"run_id": spec.run_id, "dataset": spec.dataset, "dataset_checksum": spec.dataset_checksum,
            "split_scheme": spec.split_scheme, "method": spec.method, "track": evaluator.track, "seed": spec.seed,
            "hparams": spec.hparams_json, "epoch": epoch, "eval_batch_size": evaluator.main_batch,
            "n_controls": evaluator.main_controls, "protocol": PROTOCOL, "code": spec.code_label}


def _split_rows(base: dict, evaluator, split: str, profiles: Profiles, shifts: list[dict], null_size: int,
                seed: int) -> list[dict]:
    base = {**base, "split": split, "split_role": evaluator.scheme.role(split)}
    values: list[tuple[str, str, str, float | None, int]] = []
    meta, x, n = profiles.meta, profiles.features, profiles.n_images
    if len(meta):
        activity = activity_map(meta, x, null_size, seed)
        if activity is not None:
            values += [("all", "all", "map_activity", activity[0], n), ("all", "all", "frac_retrieved", activity[1], n)]
        values.append(("all", "all", "map_consistency", consistency_map(meta, x), n))
        batches, perturbations = meta["batch"].to_numpy(), meta["perturbation"].to_numpy()
        values.append(("all", "all", "silhouette_batch", silhouette_batch(x, batches, perturbations, seed), n))
        if len(set(batches)) > 1:  # one batch: nothing to join (silhouette and iLISI say None there too)
            values.append(("all", "all", "graph_connectivity", graph_connectivity(x, perturbations, seed=seed), n))
        values.append(("all", "all", "ilisi", ilisi(x, batches, seed=seed), n))
    if shifts:
        for metric, key in (("bn_shift_kl", "kl"), ("bn_shift_mmd", "mmd")):
            per_plate = {s["plate"]: (_finite_mean(s[key]), s["n"], s["batch"]) for s in shifts}
            groups: dict[tuple[str, str], list[str]] = defaultdict(list)
            for plate, (_, _, batch) in per_plate.items():
                groups[("all", "all")].append(plate)
                groups[("batch", batch)].append(plate)
                groups[("plate", plate)].append(plate)
            for (kind, domain), plates in sorted(groups.items()):
                vals = [per_plate[p][0] for p in plates if per_plate[p][0] is not None]
                values.append((kind, domain, metric, float(np.mean(vals)) if vals else None,
                               sum(per_plate[p][1] for p in plates)))
    rows = []
    for kind, domain, metric, value, count in values:
        if value is None:
            continue
        if not math.isfinite(value):
            warnings.warn(f"representation: {metric} on split {split!r} ({kind} {domain}) is {value}; left out",
                          stacklevel=2)
            continue
        rows.append({**base, "domain_kind": kind, "domain": domain, "metric": metric, "value": float(value),
                     "n": int(count)})
    return rows


def _finite_mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


# ---------------------------------------------------------------------------------------------
# batching: the evaluator's plate-pure batches, plate by plate, plus the plate's control wells
# ---------------------------------------------------------------------------------------------
def _plate_blocks(ds, cache, plate: str) -> Iterator[pa.Table]:
    """A plate's parts in stream order (control-bearing parts first), from the part cache or read directly:
    one analysis reads few parts, and direct reads need no Ray (the analyze command, tests)."""
    parts = ds.manifest.parts_of(plate)
    for part in [p for p in parts if p.controls] + [p for p in parts if not p.controls]:
        table = cache.get(part.path) if cache is not None else None
        if table is None:
            table = ds.read_part(part, verify=True, retries=3)
            if cache is not None:
                cache.put(part.path, table)
        yield table


def _row_mask(block: pa.Table, expr) -> np.ndarray:
    small = block.drop_columns(["image"]).append_column("_row", pa.array(np.arange(block.num_rows)))
    mask = np.zeros(block.num_rows, dtype=bool)
    mask[small.filter(expr).column("_row").to_numpy()] = True
    return mask


def _plate_items(stream: PlateStream, cache, plate: str, control_expr) -> tuple[list[RowBatch], pa.Table | None]:
    """The plate's evaluation batches exactly as `stream.epoch(0)` makes them (the re-batcher restarts at every
    plate in evaluation), and the rows matching `control_expr` (None: none)."""
    rb = Rebatcher(stream.config.rebatch_spec(0))
    controls = []
    for block in _plate_blocks(stream.ds, cache, plate):
        queries, is_control = stream.masks(block)
        rb.push(block, queries, is_control)
        if control_expr is not None and is_control.any():
            mask = _row_mask(block, control_expr)
            if mask.any():
                controls.append(block.filter(pa.array(mask)))
    rb.finish()
    return rb.pop(), (pa.concat_tables(controls) if controls else None)


def _embed_split(method: Method, evaluator, split: str, capture: BNCapture, reference: Reference | None,
                 seed: int) -> dict:
    """This rank's well sums and per-plate BN shifts of one split."""
    ev = evaluator
    stream = ev.stream(split)
    control_expr = ev.ds.split_expression(ev.spec.split_scheme, split) & pc.field("is_control")
    wells, shifts = _Wells(), []
    for plate, _ in stream.plan(0)[0]:
        items, controls = _plate_items(stream, ev.cache, plate, control_expr)
        moments = Moments(len(capture.names), seed) if reference is not None else None
        n_queries = 0
        tta_controls = ev.track == "tta" and controls is not None
        control_chunks = _split_rows_evenly(controls, len(items)) if tta_controls else []
        for i, item in enumerate(items):
            n_q = item.queries.num_rows
            feats = capture.embed(method, stream.convert(item, ev.device), moments, n_q)
            wells.add(item.queries, feats[:n_q])
            n_queries += n_q
            if control_chunks and control_chunks[i] is not None:
                # TTA: a control well is embedded inside a test batch of its plate (appended as further query
                # rows, the batch's own context kept), so it sees test-time statistics like the treated wells;
                # the treated wells' features come from the unchanged batch above.
                chunk = control_chunks[i]
                joined = RowBatch(queries=pa.concat_tables([item.queries, chunk]), controls=item.controls,
                                  plate=item.plate)
                feats = capture.embed(method, stream.convert(joined, ev.device), None, 0)
                wells.add(chunk, feats[n_q:n_q + chunk.num_rows])
        if ev.track != "tta" and controls is not None:  # eval mode: rows are independent, any batching will do
            size = ev.main_batch or controls.num_rows
            for start in range(0, controls.num_rows, size):
                chunk = controls.slice(start, size)
                feats = capture.embed(method, stream.convert(RowBatch(chunk, None, plate), ev.device), None, 0)
                wells.add(chunk, feats[: chunk.num_rows])
        if moments is not None and n_queries:
            shifts.append({"plate": plate, "batch": stream.domains.plate_meta[plate]["batch"], "n": n_queries,
                           **reference.shift(moments)})
    return {"wells": wells.state(), "shifts": shifts}


def _split_rows_evenly(table: pa.Table, parts: int) -> list[pa.Table | None]:
    bounds = np.linspace(0, table.num_rows, parts + 1).round().astype(int)
    return [table.slice(a, b - a) if b > a else None for a, b in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------------------------------------
# well profiles
# ---------------------------------------------------------------------------------------------
class _Wells:
    """Sums of site embeddings per (plate, well) and each well's metadata."""

    def __init__(self):
        self.index: dict[tuple[str, str, str], int] = {}
        self.meta: list[tuple] = []
        self.sums: list[np.ndarray] = []
        self.counts: list[int] = []

    def add(self, rows: pa.Table, feats: torch.Tensor) -> None:
        x = feats.detach().float().cpu().numpy().astype(np.float64)
        cols = {c: rows.column(c).to_pylist() for c in WELL_COLUMNS}
        for r in range(rows.num_rows):
            key = (cols["plate"][r], cols["well"][r], cols["perturbation"][r])
            k = self.index.get(key)
            if k is None:
                k = self.index[key] = len(self.meta)
                self.meta.append(tuple(cols[c][r] for c in WELL_COLUMNS))
                self.sums.append(np.zeros(x.shape[1]))
                self.counts.append(0)
            self.sums[k] += x[r]
            self.counts[k] += 1

    def state(self) -> dict:
        return {"meta": self.meta, "sums": np.stack(self.sums) if self.sums else np.zeros((0, 0)),
                "counts": np.asarray(self.counts, dtype=np.int64)}

    @staticmethod
    def merge(states: list[dict]) -> Profiles:
        import pandas as pd

        meta = [m for s in states for m in s["meta"]]
        states = [s for s in states if len(s["counts"])]
        if not states:
            return Profiles(np.zeros((0, 0), np.float32), pd.DataFrame(columns=[*WELL_COLUMNS, "n"]), 0)
        sums = np.concatenate([s["sums"] for s in states])
        counts = np.concatenate([s["counts"] for s in states])
        df = pd.DataFrame(meta, columns=list(WELL_COLUMNS))
        df["n"] = counts
        df["is_control"] = df["is_control"].astype(bool)
        return Profiles((sums / counts[:, None]).astype(np.float32), df, int(counts.sum()))


__all__ = ["METRICS", "PROTOCOL", "Profiles", "Representation", "activity_map", "analyze", "average_precision",
           "consistency_map", "graph_connectivity", "ilisi", "mmd", "representation_rows", "silhouette_batch",
           "symmetric_kl", "tracking_metrics", "training_batches"]
