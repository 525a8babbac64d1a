"""Model selection over run records: which epoch of each run, and which hyperparameter config of each
method, the leaderboard reports. Pure functions of a records `pyarrow.Table` (harness.records schema).

Rules (DomainBed's lesson: select after training from fine-grained records, never from a test split):
- "val": the epoch with the best overall accuracy on the scheme's selection split (split_role "val",
  domain_kind "all", protocol "main"); ties go to the earliest epoch.
- "val-loss": the epoch with the lowest overall loss on the selection split (ties: the earliest), for
  trainings that stop early on validation loss (the CS-ARM-BN code's rule).
- "last-epoch": the last epoch with a val or test evaluation; compares no accuracies.
- "oracle": the best epoch *on the split being reported* (DomainBed's test-domain oracle). It reads
  test splits, so it is an upper bound for analysis and NOT valid for a leaderboard.

A run here is (run_id, track): if one training run is evaluated on both tracks, each track selects its
own epoch from its own validation numbers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import HarnessError
from .records import overall, validate
from .vocabulary import ACCURACY, LOSS, MAIN

RULES = ("val", "val-loss", "last-epoch", "oracle")
LEADERBOARD_RULES = ("val", "val-loss", "last-epoch")

SELECTED_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("dataset", pa.string()), ("dataset_checksum", pa.string()),
    ("split_scheme", pa.string()), ("method", pa.string()), ("track", pa.string()), ("seed", pa.int64()),
    ("hparams", pa.string()), ("code", pa.string()),
    ("selection_rule", pa.string()), ("selection_split", pa.string()), ("epoch", pa.int64()),
    ("split", pa.string()), ("split_role", pa.string()), ("domain_kind", pa.string()), ("domain", pa.string()),
    ("protocol", pa.string()), ("eval_batch_size", pa.int64()), ("n_controls", pa.int64()),
    ("value", pa.float64()), ("n", pa.int64()),
])


@dataclass(frozen=True)
class Selection:
    epoch: int
    rule: str
    split: str | None  # the split whose accuracy chose the epoch; None for "last-epoch"
    value: float | None  # that accuracy at the chosen epoch


def _rows(table: pa.Table | Iterable[Mapping]) -> list[dict]:
    return table.to_pylist() if isinstance(table, pa.Table) else [dict(r) for r in table]


def _best(curve: dict[int, float]) -> int:
    # max over (value, -epoch): the highest accuracy, and among equals the earliest epoch.
    return max(curve, key=lambda e: (curve[e], -e))


def select_epoch(run_records: pa.Table | Iterable[Mapping], rule: str = "val", *,
                 oracle_split: str | None = None) -> Selection:
    """The selected epoch of one run (all its rows, any epochs). "val" reads only rows with
    split_role "val"; "oracle" needs `oracle_split` and reads that split only."""
    rows = _rows(run_records)
    if not rows:
        raise HarnessError("select_epoch: no records for this run")
    run = rows[0]["run_id"]
    if rule == "val":
        curve = overall(rows, role="val")
        if not curve:
            raise HarnessError(f"run {run}: no validation accuracy (split_role 'val', domain_kind 'all', protocol "
                               "'main'); use --selection last-epoch or record the validation split")
        split = next(r["split"] for r in rows if r["split_role"] == "val")
        epoch = _best(curve)
        return Selection(epoch, rule, split, curve[epoch])
    if rule == "val-loss":
        curve = overall(rows, role="val", metric=LOSS)
        if not curve:
            raise HarnessError(f"run {run}: no validation loss (split_role 'val', domain_kind 'all', protocol "
                               "'main'); use --selection last-epoch or record the validation split")
        split = next(r["split"] for r in rows if r["split_role"] == "val")
        epoch = min(curve, key=lambda e: (math.isnan(curve[e]), curve[e], e))  # a NaN loss (diverged) is worst
        return Selection(epoch, rule, split, curve[epoch])
    if rule == "last-epoch":
        epochs = [r["epoch"] for r in rows if r["protocol"] == MAIN]
        if not epochs:
            raise HarnessError(f"run {run}: no 'main' protocol records")
        return Selection(max(epochs), rule, None, None)
    if rule == "oracle":
        if oracle_split is None:
            raise HarnessError("select_epoch: rule 'oracle' needs oracle_split (the split being reported)")
        curve = overall(rows, split=oracle_split)
        if not curve:
            raise HarnessError(f"run {run}: no overall accuracy on split '{oracle_split}'")
        epoch = _best(curve)
        return Selection(epoch, rule, oracle_split, curve[epoch])
    raise HarnessError(f"unknown selection rule '{rule}' (choose from {', '.join(RULES)})")


def group_runs(records: pa.Table) -> dict[tuple[str, str], list[dict]]:
    """Rows by (run_id, track)."""
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records.to_pylist():
        runs[(r["run_id"], r["track"])].append(r)
    return dict(runs)


def _check_unique(rows: list[dict]) -> None:
    # One value per cell: a 'main' evaluation is one number per (split, domain); sweeps add their knob.
    seen: dict[tuple, dict] = {}
    for r in rows:
        key = (r["split"], r["domain_kind"], r["domain"], r["protocol"])
        if r["protocol"] != MAIN:
            key += (r["eval_batch_size"], r["n_controls"])
        if key in seen:
            raise HarnessError(f"run {r['run_id']} epoch {r['epoch']}: duplicate {r['protocol']} accuracy for split "
                               f"'{r['split']}' {r['domain_kind']}={r['domain']} (eval_batch_size "
                               f"{seen[key]['eval_batch_size']} and {r['eval_batch_size']})")
        seen[key] = r


def _out(r: dict, sel: Selection) -> dict:
    return {**{k: r[k] for k in SELECTED_SCHEMA.names if k in r}, "selection_rule": sel.rule,
            "selection_split": sel.split, "epoch": sel.epoch}


def selected_results(records: pa.Table, rule: str = "val", protocols: Iterable[str] = (MAIN,)) -> pa.Table:
    """Per run, the accuracies (overall and per domain) of its val and test splits at its selected
    epoch, one row per number (SELECTED_SCHEMA). Train-split and loss rows are dropped."""
    if rule not in RULES:
        raise HarnessError(f"unknown selection rule '{rule}' (choose from {', '.join(RULES)})")
    protocols = tuple(protocols)
    validate(records)
    # Only val/test accuracies (and the validation loss "val-loss" selects on) matter from here on; filtering in
    # Arrow first keeps big record sets cheap.
    val_loss = pc.and_(pc.equal(records.column("metric"), LOSS), pc.equal(records.column("split_role"), "val"))
    keep = pc.and_(pc.or_(pc.equal(records.column("metric"), ACCURACY), val_loss),
                   pc.is_in(records.column("split_role"), pa.array(["val", "test"])))
    records = records.filter(keep)
    out: list[dict] = []
    for rows in group_runs(records).values():
        wanted = [r for r in rows if r["protocol"] in protocols and r["metric"] == ACCURACY]
        if rule == "oracle":
            for split in sorted({r["split"] for r in wanted}):
                sel = select_epoch(rows, "oracle", oracle_split=split)
                at = [r for r in wanted if r["split"] == split and r["epoch"] == sel.epoch]
                _check_unique(at)
                out.extend(_out(r, sel) for r in at)
            continue
        sel = select_epoch(rows, rule)
        at = [r for r in wanted if r["epoch"] == sel.epoch]
        _check_unique(at)
        out.extend(_out(r, sel) for r in at)
    return pa.Table.from_pylist(out, schema=SELECTED_SCHEMA)
