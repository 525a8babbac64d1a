"""The table pieces every leaderboard section shares (harness/results/leaderboard.py, representation_tables.py):
cells of seeds per method, the per-domain columns, one row with its comparison to the baseline, ranks and Holm
decisions, row order. The rules are the leaderboard's (its module docstring)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from ..errors import HarnessError
from . import stats
from .vocabulary import ALL

COLUMN_KINDS = ("cell_type", "batch", "source")


def seed_cells(rows: list[dict], sources: Mapping[str, Sequence[str]] | None = None) -> dict:
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
        col = "total" if r["domain_kind"] == ALL else (r["domain_kind"], r["domain"])
        cells[key][col][r["seed"]] = r if col == "total" else r["value"]
    return cells


def domain_columns(rows: list[dict]) -> tuple[str | None, list[str]]:
    """The per-domain column kind of one split and its values (the rule: harness/results/leaderboard.py)."""
    for kind in COLUMN_KINDS:
        values = sorted({r["domain"] for r in rows if r["domain_kind"] == kind})
        if len(values) > 1:
            return kind, values
    return None, []


def table_row(method: str, track: str, cell: Mapping, kind: str | None, domains: list[str],
              base_total: Mapping[int, float] | None, is_baseline: bool,
              sources: Mapping[str, Sequence[str]] | None = None) -> dict:
    """One method's row from its cell: mean ± std over seeds, per-domain columns, completeness against the
    baseline's seeds, and the paired comparison with the baseline (`base_total`: seed -> the baseline's Total)."""
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
        "no_spread": False, "p_holm": None, "significant_holm": None,
        "complete": not reasons, "incomplete_reasons": reasons, "rank": None,
        "run_ids": sorted({r["run_id"] for r in total_rows.values()}),
        "sources": _row_sources(total_rows.values(), sources),
    }
    if base_total is not None and not is_baseline:
        cmp = stats.compare_paired(per_seed, base_total)
        row.update(n_paired=cmp.n_paired, diff_mean=cmp.diff_mean, p_paired_t=cmp.p_paired_t,
                   p_wilcoxon=cmp.p_wilcoxon, diff_ci95=list(cmp.diff_ci95) if cmp.diff_ci95 else None,
                   no_spread=cmp.no_spread)
    return row


def source_labels(sources: Mapping[str, Sequence[str]] | None) -> list[str]:
    """Every source label, in the order the sources were given (the run mapping is built in that order)."""
    return list(dict.fromkeys(s for v in (sources or {}).values() for s in v))


def _row_sources(total_rows, sources: Mapping[str, Sequence[str]] | None) -> list[str]:
    order = {s: i for i, s in enumerate(source_labels(sources))}
    return sorted({s for r in total_rows for s in (sources or {}).get(r["run_id"], [])}, key=order.__getitem__)


def rank_and_correct(rows: list[dict], alpha: float) -> None:
    """Competition ranking (1, 2, 2, 4) of complete rows by mean Total; Holm over their t-tests (a row without a
    p-value, e.g. differences without spread, is not in the family)."""
    ranked = [r for r in rows if r["complete"] and not r.get("reference") and r["mean"] is not None]
    ranked.sort(key=lambda r: -r["mean"])
    for i, r in enumerate(ranked):
        r["rank"] = ranked[i - 1]["rank"] if i and r["mean"] == ranked[i - 1]["mean"] else i + 1
    tested = [r for r in rows if r["complete"] and not r.get("is_baseline") and not r.get("reference")]
    for r, (p_adj, sig) in zip(tested, stats.holm([r["p_paired_t"] for r in tested], alpha)):
        r["p_holm"], r["significant_holm"] = p_adj, sig


def sort_rows(rows: list[dict]) -> list[dict]:
    """Reference rows first, then ranked rows by rank, then unranked ones; ties by method name."""
    return sorted(rows, key=lambda r: (not r.get("reference"), r["rank"] is None, r["rank"] or 0, r["method"]))
