"""Leaderboard tables from run records: pure functions returning the JSON-ready structure that
report.py renders (leaderboard.json is exactly `build_leaderboard(...)`).

One table per (dataset, split scheme, split, track) for every test split and the validation split.
Rows are methods at their selected epoch and chosen hparams config (selection.py); cells are mean ± std
over seeds with n. Each row is compared with the baseline on the same seeds (stats.py).

Decisions (documented in docs/leaderboards.md):
- Domain columns: the first of cell_type, batch, source with more than one value in the split's
  records (plates are too many to be columns); none when no kind has two values (Total only).
- A tta table whose track lacks the baseline borrows it from the standard track (same dataset, scheme,
  split, seeds): a `reference` row, labelled `baseline_track: "standard"`, unranked.
- A row is complete only if its seed set equals the baseline's and every seed has every domain column
  and one main eval setting; incomplete rows keep their numbers but get no rank and no Holm decision.
- Each row names the runs behind it (`run_ids`) and, when the records were merged from several bundles or
  storage roots (harness/results/sources.py), the sources those runs came from (`sources`).
- A method that trains as another (AdaBN as ERM) also gets a same-checkpoint row beside its usual one (the
  table's `same_checkpoint`, rendered as a table under it): the paired difference variant − parent per seed,
  both read at the parent's selected epoch (same_checkpoint.py).
- A method whose runs carry different code identities is refused unless `allow_mixed_code`; then its rows are
  marked (`mixed_code`: the code ids).
- Incomplete runs (no done marker, an epoch's records missing, an unreadable records file) are left out before
  this module sees the records (harness/results/completeness.py) and listed in `skipped_runs`, never ranked.
- Across several (dataset, scheme, test split) blocks: an overall table per track of average ranks with a
  Friedman test and Nemenyi critical difference (harness/results/ranks.py); next to accuracy, each method's cost per
  run from the done markers (harness/results/cost.py).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import HarnessError
from ..train.run_identity import SETTING_DEFAULTS
from . import cost, ranks, stats
from .configs import choose_configs
from .representation_tables import representation_tables
from .same_checkpoint import KIND as SAME_CHECKPOINT
from .same_checkpoint import SameCheckpoint
from .selection import LEADERBOARD_RULES, selected_results
from .tables import COLUMN_KINDS, domain_columns, rank_and_correct, seed_cells, sort_rows, source_labels, table_row
from .vocabulary import ALL, BATCH_SIZE_SWEEP, CONTROLS_SWEEP, MAIN, is_main_overall

SWEEP_KNOBS = {BATCH_SIZE_SWEEP: "eval_batch_size", CONTROLS_SWEEP: "n_controls"}
ALPHA = 0.05


def build_leaderboard(records: pa.Table, baseline: str = "erm", rule: str = "val",
                      best_configs: Mapping | None = None, alpha: float = ALPHA, *,
                      sources: Mapping[str, Sequence[str]] | None = None,
                      done: Mapping[str, Mapping] | None = None, allow_mixed_code: bool = False,
                      skipped: Sequence[Mapping] = ()) -> dict:
    """The whole leaderboard as a JSON-ready dict: {"tables": [...], "sweeps": [...], "overall": [...],
    "cost": [...], "settings": {...}}. `sources`: run_id -> the bundles/roots it came from (harness/results/sources.py);
    `done`: run_id -> its done marker (for the cost tables and shared trainings); `allow_mixed_code`: build from runs
    of one method with different code identities (their rows are marked) instead of refusing; `skipped`: the runs left
    out as incomplete (completeness.read_complete), reported as `skipped_runs`."""
    if len(records) == 0:
        raise HarnessError("no records to build a leaderboard from")
    if rule not in LEADERBOARD_RULES:
        raise HarnessError(f"selection rule '{rule}' is not valid for a leaderboard (choose from "
                           f"{', '.join(LEADERBOARD_RULES)}; 'oracle' reads test splits and is for analysis only)")
    # Plates are never columns (too many); dropping them before selection saves most of the rows.
    records = records.filter(pc.not_equal(records.column("domain_kind"), "plate"))
    mixed = mixed_code(records)
    if mixed and not allow_mixed_code:
        raise HarnessError("runs of one method carry different code identities: "
                           + "; ".join(f"{m} ({', '.join(c)})" for m, c in mixed.items())
                           + "; build from one code version or pass --allow-mixed-code")
    selected = selected_results(records, rule, protocols=(MAIN, *SWEEP_KNOBS))
    choices = choose_configs(selected, best_configs)
    selected_rows = selected.to_pylist()
    rows = [r for r in selected_rows
            if r["hparams"] == choices[(r["dataset"], r["split_scheme"], r["method"], r["track"])].hparams]
    if baseline not in {r["method"] for r in rows}:
        methods = sorted({r["method"] for r in rows})
        raise HarnessError(f"baseline '{baseline}' has no records (methods present: {', '.join(methods)}); "
                           "choose one with --baseline")
    main = [r for r in rows if r["protocol"] == MAIN]
    cells = seed_cells(main, sources)
    by_split: dict = defaultdict(list)
    for r in main:
        by_split[(r["dataset"], r["split_scheme"], r["split"])].append(r)
    for (ds, sc, split), srows in by_split.items():
        if len(roles := {r["split_role"] for r in srows}) > 1:
            raise HarnessError(f"{ds}/{sc}: split '{split}' is recorded with several roles {sorted(roles)}")
    checksums: dict = defaultdict(set)
    for r in rows:
        checksums[(r["dataset"], r["split_scheme"])].add(r["dataset_checksum"])
    for (ds, sc), cs in checksums.items():
        if len(cs) > 1:
            raise HarnessError(f"{ds}/{sc}: records come from different dataset versions (checksums "
                               f"{sorted(cs)}); build separate leaderboards")

    same = SameCheckpoint(records, selected_rows, {r["method"] for r in rows}, done)
    tables = []
    # Order: test splits (OOD before id_*), then the validation split.
    order = sorted(by_split, key=lambda k: (k[0], k[1], by_split[k][0]["split_role"] != "test",
                                            k[2].startswith("id_"), k[2]))
    for ds, sc, split in order:
        split_rows = by_split[(ds, sc, split)]
        role = split_rows[0]["split_role"]
        kind, domains = domain_columns(split_rows)
        sel_split = sorted({str(r["selection_split"]) for r in split_rows})
        for track in sorted({r["track"] for r in split_rows}):
            methods = sorted({r["method"] for r in split_rows if r["track"] == track})
            base_track = track if baseline in methods else "standard"
            base_cell = cells.get((ds, sc, split, base_track, baseline))
            if base_cell is None:
                raise HarnessError(f"{ds}/{sc} split '{split}': baseline '{baseline}' has no {track} or standard "
                                   "records at its selected epoch")
            base_total = {s: r["value"] for s, r in base_cell["total"].items()}
            out_rows = []
            if base_track != track:
                ref = table_row(baseline, base_track, base_cell, kind, domains, base_total, True, sources)
                out_rows.append({**ref, "reference": True})
            for m in methods:
                out_rows.append(table_row(m, track, cells[(ds, sc, split, track, m)], kind, domains, base_total,
                                          m == baseline, sources))
            for r in out_rows:
                r["kind"] = "own-selection"
                r["mixed_code"] = mixed.get(r["method"])
                r.setdefault("reference", False)
                r["is_baseline"] = r["method"] == baseline and r["track"] == base_track
                ch = choices[(ds, sc, r["method"], r["track"])]
                r["hparams"], r["hparams_choice"], r["trials"] = json.loads(ch.hparams), ch.to_dict(), ch.trials
                del r["hparams_choice"]["hparams"]
            rank_and_correct(out_rows, alpha)
            same_rows = same.rows((ds, sc, split), track, cells, methods, alpha)
            for r in same_rows:
                r["mixed_code"] = sorted({*mixed.get(r["method"], []), *mixed.get(r["parent"], [])}) or None
            tables.append({
                "dataset": ds, "split_scheme": sc, "split": split, "split_role": role, "track": track,
                "baseline": baseline, "baseline_track": base_track,
                "selection": {"split": None if rule == "last-epoch" else sel_split[0], "rule": rule},
                "dataset_checksum": next(iter(checksums[(ds, sc)])),
                "code": sorted({r["code"] for r in split_rows}),
                "seeds": sorted(base_total), "domain_kind": kind, "domains": domains,
                "rows": sort_rows(out_rows), "same_checkpoint": same_rows,
            })
    representation = representation_tables(records, selected, choices, baseline, alpha, sources) \
        if rule == "val" else []
    for t in representation:
        for r in t["rows"]:
            r["mixed_code"] = mixed.get(r["method"])
    overall, overall_notes = ranks.overall_ranks(tables, alpha)
    cost_out, cost_notes = cost.cost_tables(tables, done or {})
    labels = source_labels(sources)
    run_ids = {r["run_id"] for r in rows}
    return {"tables": tables, "sweeps": build_sweeps(rows), "sweeps_left_out": sweeps_left_out(records, rows),
            "overall": overall, "cost": cost_out, "representation": representation,
            "skipped_runs": [dict(x) for x in skipped],
            "diverged_runs": diverged_runs(run_ids, done),
            "settings": {"baseline": baseline, "selection": rule, "alpha": alpha, "holm_over": "p_paired_t",
                         "run_settings": run_settings(run_ids, done),
                         "interval": {"method": stats.INTERVAL, "confidence": stats.CONFIDENCE,
                                      "of": "mean paired difference vs the baseline over seeds"},
                         "no_spread": "every seed's paired difference equal: no p-value (the t-test is undefined), "
                                      "not in Holm's family",
                         "same_checkpoint": {
                             "rows": f"tables[].same_checkpoint, kind {SAME_CHECKPOINT!r}: a method that trains as "
                                     "another minus that parent, per seed, both at the parent's selected epoch "
                                     "(epochs); seeds without the method's records there are missing_seeds",
                             "holm_over": "the table's complete same-checkpoint rows (their own family)",
                             "notes": same.notes},
                         "allow_mixed_code": allow_mixed_code, "mixed_code": mixed,
                         "std_ddof": 1, "domain_column_kinds": list(COLUMN_KINDS),
                         "sources": labels,
                         "representation": "at the best validation epoch, rule 'val' only" if rule == "val" else
                         f"not shown: runs record the representation metrics at the best validation epoch, and the "
                         f"rule is {rule!r}",
                         "overall": {"blocks": "(dataset, split scheme, test split)", "value": "mean Total accuracy",
                                     "rank": "1 = best, ties averaged", "test": "scipy.stats.friedmanchisquare",
                                     "post_hoc": "scikit_posthocs.posthoc_nemenyi_friedman",
                                     "critical_difference": "Demšar 2006, q_alpha * sqrt(k(k+1)/(6N))",
                                     "notes": overall_notes},
                         "cost": {"images_per_s": "train_images_rank0 * workers / training_s",
                                  "wall_s": "setup_s + training_s + evaluation_s",
                                  "core_hours": "(training_s + evaluation_s) * workers * cpus_per_worker / 3600",
                                  "gpu_hours": "(training_s + evaluation_s) * workers * gpus_per_worker / 3600",
                                  "shared": "a training shared by several methods is counted in full for each",
                                  "notes": cost_notes}}}


def diverged_runs(run_ids, done: Mapping[str, Mapping] | None) -> list[dict]:
    """The runs behind the tables whose training diverged (harness/train/epochs.py): their done markers'
    `diverged_epoch`. They stay in the tables, read at their selected epoch like every run."""
    out = []
    for run_id in sorted(run_ids):
        marker = (done or {}).get(run_id) or {}
        if marker.get("diverged_epoch"):
            spec = marker.get("spec") or {}
            out.append({"run_id": run_id, "method": spec.get("method"), "seed": spec.get("seed"),
                        "epoch": marker["diverged_epoch"]})
    return out


def run_settings(run_ids, done: Mapping[str, Mapping] | None) -> dict[str, list]:
    """Each run setting's values (precision, compile: harness/train/run_identity.py) over the runs behind the tables,
    from their done markers' specs (a spec written before a setting existed has its default); runs without a done
    marker are not counted. Several values in one list: the board mixes them."""
    values: dict[str, set] = {key: set() for key in SETTING_DEFAULTS}
    for run_id in run_ids:
        spec = ((done or {}).get(run_id) or {}).get("spec")
        if spec is not None:
            for key, default in SETTING_DEFAULTS.items():
                values[key].add(spec.get(key, default))
    return {key: sorted(found) for key, found in values.items()}


def mixed_code(records: pa.Table) -> dict[str, list[str]]:
    """method -> its code identities, for the methods whose runs carry more than one (the `code` field)."""
    pairs = records.select(["method", "code"]).group_by(["method", "code"]).aggregate([]).to_pylist()
    codes: dict = defaultdict(set)
    for r in pairs:
        codes[r["method"]].add(r["code"])
    return {m: sorted(c) for m, c in sorted(codes.items()) if len(c) > 1}


def build_sweeps(rows: list[dict]) -> list[dict]:
    """Accuracy (Total) vs test batch size / number of controls for methods with sweep records, at each
    run's selected epoch: one table per (dataset, scheme, split, track, protocol). The evaluator skips the
    main setting in its sweeps, so each curve also gets the method's main evaluation as its point
    (`"main": true`): same model, same split, same epoch."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in rows:
        if r["protocol"] in SWEEP_KNOBS and r["domain_kind"] == ALL:
            key = (r["dataset"], r["split_scheme"], r["split"], r["track"], r["protocol"])
            acc[key][r["method"]][r[SWEEP_KNOBS[r["protocol"]]]][r["seed"]] = r["value"]
    main = defaultdict(list)
    for r in rows:
        if is_main_overall(r, metric=None):  # selected rows: accuracies only
            main[(r["dataset"], r["split_scheme"], r["split"], r["track"], r["method"])].append(r)
    out = []
    for (ds, sc, split, track, proto), methods in sorted(acc.items()):
        knob = SWEEP_KNOBS[proto]
        table_rows = []
        for m, points in sorted(methods.items()):
            from_main: dict = defaultdict(dict)
            for r in main[(ds, sc, split, track, m)]:
                if r[knob] not in points:  # a sweep's own evaluation of that setting wins
                    from_main[r[knob]][r["seed"]] = r["value"]
            pts = []
            for x, seeds in sorted({**points, **from_main}.items()):
                s = stats.summarize([seeds[k] for k in sorted(seeds)])
                pts.append({"value": x, "mean": s.mean, "std": s.std, "n": s.n, "main": x in from_main,
                            "per_seed": {str(k): seeds[k] for k in sorted(seeds)}})
            table_rows.append({"method": m, "points": pts})
        out.append({"dataset": ds, "split_scheme": sc, "split": split, "track": track, "protocol": proto,
                    "parameter": knob, "rows": table_rows})
    return out


def sweeps_left_out(records: pa.Table, rows: list[dict]) -> list[dict]:
    """Runs whose sweep records lie at another epoch than the one selected (e.g. the trainer sweeps the
    best-validation epoch, the table was built with last-epoch): named, never silently dropped."""
    sweep = records.filter(pc.is_in(records.column("protocol"), pa.array(list(SWEEP_KNOBS))))
    sweep_epochs: dict = defaultdict(set)
    keys = ["run_id", "track", "epoch"]
    for r in sweep.select(keys).group_by(keys).aggregate([]).to_pylist():
        sweep_epochs[(r["run_id"], r["track"])].add(r["epoch"])
    chosen = {(r["run_id"], r["track"]): r for r in rows if r["protocol"] == MAIN}
    out = []
    for key, epochs in sorted(sweep_epochs.items()):
        r = chosen.get(key)
        if r is not None and r["epoch"] not in epochs:
            out.append({"run_id": key[0], "method": r["method"], "track": key[1], "seed": r["seed"],
                        "selected_epoch": r["epoch"], "sweep_epochs": sorted(epochs)})
    return out
