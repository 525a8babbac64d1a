"""Leaderboard sections for the representation metrics (harness/analysis/representation.py): one table per (dataset,
scheme, test split, track, metric), rows = methods at their selected epoch and chosen configuration, cells =
mean ± std over seeds (per batch where the metric has batch rows, e.g. the BN-statistics shift), compared with
the baseline on the same seeds exactly as the accuracy tables are (paired t-test and its interval, Holm).

Runs record these metrics at their best-validation epoch only (the analysis costs about as much as one test
evaluation), so the tables exist for the `val` rule; with another rule they are left out and the settings
say so.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from .tables import domain_columns, rank_and_correct, seed_cells, sort_rows, table_row
from .vocabulary import HIGHER_IS_BETTER, REPRESENTATION


def representation_tables(records: pa.Table, selected: pa.Table, choices: Mapping, baseline: str, alpha: float,
                          sources: Mapping[str, Sequence[str]] | None = None) -> list[dict]:
    epochs = {(r["run_id"], r["track"]): r["epoch"] for r in selected.select(["run_id", "track", "epoch"]).to_pylist()}
    rep = records.filter(pc.equal(records.column("protocol"), REPRESENTATION)).to_pylist()
    rows = [r for r in rep if epochs.get((r["run_id"], r["track"])) == r["epoch"]
            and r["hparams"] == choices[(r["dataset"], r["split_scheme"], r["method"], r["track"])].hparams]
    groups: dict = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["split_scheme"], r["split"], r["track"], r["metric"])].append(r)
    base_tracks = defaultdict(set)
    for r in rows:
        if r["method"] == baseline:
            base_tracks[(r["dataset"], r["split_scheme"], r["split"], r["metric"])].add(r["track"])
    tables = []
    for (ds, sc, split, track, metric), grows in sorted(groups.items()):
        cells = seed_cells(grows, sources)
        kind, domains = domain_columns(grows)
        b_tracks = base_tracks.get((ds, sc, split, metric), set())
        base_track = track if track in b_tracks else ("standard" if "standard" in b_tracks else None)
        base_rows = groups.get((ds, sc, split, base_track, metric), []) if base_track else []
        base_cell = seed_cells(base_rows, sources).get((ds, sc, split, base_track, baseline)) if base_rows else None
        base_total = {s: r["value"] for s, r in base_cell["total"].items()} if base_cell else None
        out_rows = []
        if base_cell is not None and base_track != track:
            out_rows.append({**table_row(baseline, base_track, base_cell, kind, domains, base_total, True,
                                         sources), "reference": True})
        for m in sorted({r["method"] for r in grows}):
            out_rows.append(table_row(m, track, cells[(ds, sc, split, track, m)], kind, domains, base_total,
                                      m == baseline and base_track == track, sources))
        for r in out_rows:
            r.setdefault("reference", False)
            r["is_baseline"] = r["method"] == baseline and r["track"] == base_track
            r["hparams"] = json.loads(choices[(ds, sc, r["method"], r["track"])].hparams)
        sign = 1 if HIGHER_IS_BETTER.get(metric, True) else -1
        for r in out_rows:  # rank on the oriented mean, then restore it
            r["_mean"], r["mean"] = r["mean"], None if r["mean"] is None else sign * r["mean"]
        rank_and_correct(out_rows, alpha)
        for r in out_rows:
            r["mean"] = r.pop("_mean")
        tables.append({"dataset": ds, "split_scheme": sc, "split": split, "track": track, "metric": metric,
                       "higher_is_better": HIGHER_IS_BETTER.get(metric, True), "baseline": baseline,
                       "baseline_track": base_track, "domain_kind": kind, "domains": domains,
                       "seeds": sorted(base_total or {}), "rows": sort_rows(out_rows)})
    return tables
