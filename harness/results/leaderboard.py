"""Leaderboard tables from run records: pure functions returning the JSON-ready structure that
report.py renders (leaderboard.json is exactly `build_leaderboard(...)`).

One table per (dataset, split scheme, split, track) for every test split and the validation split.
Rows are methods at their selected epoch and chosen hparams config (selection.py); cells are mean ± std
over seeds with n. Each row is compared with the baseline on the same seeds (stats.py).

Decisions (documented in the README):
- Domain columns: the first of cell_type, batch, source with more than one value in the split's
  records (plates are too many to be columns); none when no kind has two values (Total only).
- A tta table whose track lacks the baseline borrows it from the standard track (same dataset, scheme,
  split, seeds): a `reference` row, labelled `baseline_track: "standard"`, unranked.
- A row is complete only if its seed set equals the baseline's and every seed has every domain column
  and one main eval setting; incomplete rows keep their numbers but get no rank and no Holm decision.
- Each row names the runs behind it (`run_ids`) and, when the records were merged from several bundles or
  storage roots (harness/sources.py), the sources those runs came from (`sources`).
- Across several (dataset, scheme, test split) blocks: an overall table per track of average ranks with a
  Friedman test and Nemenyi critical difference (harness/ranks.py); next to accuracy, each method's cost per
  run from the done markers (harness/cost.py).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import HarnessError
from . import cost, ranks, stats
from .configs import choose_configs
from .records import MAIN
from .representation_tables import representation_tables
from .selection import LEADERBOARD_RULES, selected_results

COLUMN_KINDS = ("cell_type", "batch", "source")
SWEEP_KNOBS = {"batch-size-sweep": "eval_batch_size", "controls-sweep": "n_controls"}
ALPHA = 0.05


def _cells(rows: list[dict], sources: Mapping[str, Sequence[str]] | None = None) -> dict:
    """(dataset, scheme, split, track, method) -> {"total": {seed: row}, (kind, domain): {seed: value}}."""
    cells: dict = defaultdict(lambda: defaultdict(dict))
    owner: dict = {}  # (cell key, seed) -> run_id: one run per seed, or the seed's numbers would be mixed
    for r in rows:
        key = (r["dataset"], r["split_scheme"], r["split"], r["track"], r["method"])
        prev = owner.setdefault((key, r["seed"]), r["run_id"])
        if prev != r["run_id"]:
            where = ""
            if sources:
                where = (f" from {', '.join(sources.get(prev, ['?']))} and "
                         f"{', '.join(sources.get(r['run_id'], ['?']))}")
            raise HarnessError(f"{key[0]}/{key[1]} method '{key[4]}' ({key[3]}): two runs for seed {r['seed']} with "
                               f"the same hparams (run ids {prev} and {r['run_id']}{where}); remove one")
        col = "total" if r["domain_kind"] == "all" else (r["domain_kind"], r["domain"])
        cells[key][col][r["seed"]] = r if col == "total" else r["value"]
    return cells


def domain_columns(rows: list[dict]) -> tuple[str | None, list[str]]:
    """The per-domain column kind of one split and its values (rule in the module docstring)."""
    for kind in COLUMN_KINDS:
        values = sorted({r["domain"] for r in rows if r["domain_kind"] == kind})
        if len(values) > 1:
            return kind, values
    return None, []


def _row(method: str, track: str, cell: Mapping, kind: str | None, domains: list[str],
         base_total: Mapping[int, float] | None, is_baseline: bool,
         sources: Mapping[str, Sequence[str]] | None = None) -> dict:
    total_rows = cell.get("total", {})
    per_seed = {s: r["value"] for s, r in sorted(total_rows.items())}
    summ = stats.summarize(list(per_seed.values()))
    reasons = []
    if base_total is not None and set(per_seed) != set(base_total):
        if missing := sorted(set(base_total) - set(per_seed)):
            reasons.append(f"missing seed(s) {missing} that the baseline has")
        if extra := sorted(set(per_seed) - set(base_total)):
            reasons.append(f"seed(s) {extra} the baseline lacks")
    doms = {}
    for d in domains:
        vals = cell.get((kind, d), {})
        if lacking := sorted(set(per_seed) - set(vals)):
            reasons.append(f"domain '{d}' missing for seed(s) {lacking}")
        ds = stats.summarize([vals[s] for s in sorted(vals)])
        doms[d] = {"mean": ds.mean, "std": ds.std, "n": ds.n, "per_seed": {str(s): vals[s] for s in sorted(vals)}}
    settings = sorted({(r["eval_batch_size"], r["n_controls"]) for r in total_rows.values()})
    if len(settings) > 1:
        reasons.append(f"seeds evaluated with different (eval_batch_size, n_controls) {settings}")
    row = {
        "method": method, "track": track,
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "mean": summ.mean, "std": summ.std, "n": summ.n,
        "epochs": {str(s): r["epoch"] for s, r in sorted(total_rows.items())},
        "eval_batch_size": [s[0] for s in settings], "n_controls": [s[1] for s in settings],
        "images": sorted({r["n"] for r in total_rows.values()}),
        "domains": doms,
        "n_paired": None, "diff_mean": None, "p_paired_t": None, "p_wilcoxon": None, "diff_ci95": None,
        "p_holm": None, "significant_holm": None,
        "complete": not reasons, "incomplete_reasons": reasons, "rank": None,
        "run_ids": sorted({r["run_id"] for r in total_rows.values()}),
        "sources": _row_sources(total_rows.values(), sources),
    }
    if base_total is not None and not is_baseline:
        cmp = stats.compare_paired(per_seed, base_total)
        row.update(n_paired=cmp.n_paired, diff_mean=cmp.diff_mean, p_paired_t=cmp.p_paired_t,
                   p_wilcoxon=cmp.p_wilcoxon, diff_ci95=list(cmp.diff_ci95) if cmp.diff_ci95 else None)
    return row


def source_labels(sources: Mapping[str, Sequence[str]] | None) -> list[str]:
    """Every source label, in the order the sources were given (the run mapping is built in that order)."""
    return list(dict.fromkeys(s for v in (sources or {}).values() for s in v))


def _row_sources(total_rows, sources: Mapping[str, Sequence[str]] | None) -> list[str]:
    order = {s: i for i, s in enumerate(source_labels(sources))}
    return sorted({s for r in total_rows for s in (sources or {}).get(r["run_id"], [])}, key=order.__getitem__)


def _rank_and_correct(rows: list[dict], alpha: float) -> None:
    """Competition ranking (1, 2, 2, 4) of complete rows by mean Total; Holm over their t-tests."""
    ranked = [r for r in rows if r["complete"] and not r.get("reference") and r["mean"] is not None]
    ranked.sort(key=lambda r: -r["mean"])
    for i, r in enumerate(ranked):
        r["rank"] = ranked[i - 1]["rank"] if i and r["mean"] == ranked[i - 1]["mean"] else i + 1
    tested = [r for r in rows if r["complete"] and not r.get("is_baseline") and not r.get("reference")]
    for r, (p_adj, sig) in zip(tested, stats.holm([r["p_paired_t"] for r in tested], alpha)):
        r["p_holm"], r["significant_holm"] = p_adj, sig


def _sort_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (not r.get("reference"), r["rank"] is None, r["rank"] or 0, r["method"]))


def build_leaderboard(records: pa.Table, baseline: str = "erm", rule: str = "val",
                      best_configs: Mapping | None = None, alpha: float = ALPHA, *,
                      sources: Mapping[str, Sequence[str]] | None = None,
                      done: Mapping[str, Mapping] | None = None) -> dict:
    """The whole leaderboard as a JSON-ready dict: {"tables": [...], "sweeps": [...], "overall": [...],
    "cost": [...], "settings": {...}}. `sources`: run_id -> the bundles/roots it came from (harness/sources.py);
    `done`: run_id -> its done marker (for the cost tables)."""
    if len(records) == 0:
        raise HarnessError("no records to build a leaderboard from")
    if rule not in LEADERBOARD_RULES:
        raise HarnessError(f"selection rule '{rule}' is not valid for a leaderboard (choose from "
                           f"{', '.join(LEADERBOARD_RULES)}; 'oracle' reads test splits and is for analysis only)")
    # Plates are never columns (too many); dropping them before selection saves most of the rows.
    records = records.filter(pc.not_equal(records.column("domain_kind"), "plate"))
    selected = selected_results(records, rule, protocols=(MAIN, *SWEEP_KNOBS))
    choices = choose_configs(selected, best_configs)
    rows = [r for r in selected.to_pylist()
            if r["hparams"] == choices[(r["dataset"], r["split_scheme"], r["method"], r["track"])].hparams]
    if baseline not in {r["method"] for r in rows}:
        methods = sorted({r["method"] for r in rows})
        raise HarnessError(f"baseline '{baseline}' has no records (methods present: {', '.join(methods)}); "
                           "choose one with --baseline")
    main = [r for r in rows if r["protocol"] == MAIN]
    cells = _cells(main, sources)
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
                ref = _row(baseline, base_track, base_cell, kind, domains, base_total, True, sources)
                out_rows.append({**ref, "reference": True})
            for m in methods:
                out_rows.append(_row(m, track, cells[(ds, sc, split, track, m)], kind, domains, base_total,
                                     m == baseline, sources))
            for r in out_rows:
                r.setdefault("reference", False)
                r["is_baseline"] = r["method"] == baseline and r["track"] == base_track
                ch = choices[(ds, sc, r["method"], r["track"])]
                r["hparams"], r["hparams_choice"], r["trials"] = json.loads(ch.hparams), ch.to_dict(), ch.trials
                del r["hparams_choice"]["hparams"]
            _rank_and_correct(out_rows, alpha)
            tables.append({
                "dataset": ds, "split_scheme": sc, "split": split, "split_role": role, "track": track,
                "baseline": baseline, "baseline_track": base_track,
                "selection": {"split": None if rule == "last-epoch" else sel_split[0], "rule": rule},
                "dataset_checksum": next(iter(checksums[(ds, sc)])),
                "code": sorted({r["code"] for r in split_rows}),
                "seeds": sorted(base_total), "domain_kind": kind, "domains": domains,
                "rows": _sort_rows(out_rows),
            })
    representation = representation_tables(records, selected, choices, baseline, alpha, sources) \
        if rule == "val" else []
    overall, overall_notes = ranks.overall_ranks(tables, alpha)
    cost_out, cost_notes = cost.cost_tables(tables, done or {})
    labels = source_labels(sources)
    return {"tables": tables, "sweeps": build_sweeps(rows), "sweeps_left_out": sweeps_left_out(records, rows),
            "overall": overall, "cost": cost_out, "representation": representation,
            "settings": {"baseline": baseline, "selection": rule, "alpha": alpha, "holm_over": "p_paired_t",
                         "interval": {"method": stats.INTERVAL, "confidence": stats.CONFIDENCE,
                                      "of": "mean paired difference vs the baseline over seeds"},
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


def build_sweeps(rows: list[dict]) -> list[dict]:
    """Accuracy (Total) vs test batch size / number of controls for methods with sweep records, at each
    run's selected epoch: one table per (dataset, scheme, split, track, protocol). The evaluator skips the
    main setting in its sweeps, so each curve also gets the method's main evaluation as its point
    (`"main": true`): same model, same split, same epoch."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in rows:
        if r["protocol"] in SWEEP_KNOBS and r["domain_kind"] == "all":
            key = (r["dataset"], r["split_scheme"], r["split"], r["track"], r["protocol"])
            acc[key][r["method"]][r[SWEEP_KNOBS[r["protocol"]]]][r["seed"]] = r["value"]
    main = defaultdict(list)
    for r in rows:
        if r["protocol"] == MAIN and r["domain_kind"] == "all":
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
