"""Ranking across datasets and test splits (Demšar 2006, "Statistical comparisons of classifiers over multiple
data sets"): per track, each method's average rank over the blocks, the Friedman test, the Nemenyi post-hoc
p-values and the critical difference.

A block is one (dataset, split scheme, test split) of the leaderboard; a method's value in a block is its
mean Total accuracy over seeds (the table's row). Rank 1 is the best; ties share the average rank. Only
complete, ranked rows enter (a row with another seed set than the baseline's is not comparable), and only
methods present in every block of their track (the Friedman test needs a complete block design); the others
are named in `left_out`. Validation splits are never blocks (their numbers chose the epochs).

The tests are the maintained implementations: `scipy.stats.friedmanchisquare` and scikit-posthocs'
`posthoc_nemenyi_friedman`. The critical difference is Demšar's q_α·√(k(k+1)/6N), with q_α the studentized
range quantile over √2 (the same distribution scikit-posthocs' Nemenyi p-values come from).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

MIN_BLOCKS = 2
MIN_FRIEDMAN_METHODS = 3  # scipy's friedmanchisquare needs k >= 3 (k = 2 is a sign test)


def block_label(b: tuple[str, str, str]) -> str:
    return "/".join(b)


def critical_difference(k: int, n: int, alpha: float) -> float:
    """Demšar's Nemenyi critical difference for k methods over n blocks."""
    q = sps.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(k * (k + 1) / (6.0 * n)))


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def overall_ranks(tables: list[dict], alpha: float) -> tuple[list[dict], list[str]]:
    """(one overall table per track that has one, notes on what was not ranked and why)."""
    tests = [t for t in tables if t["split_role"] == "test"]
    blocks_all = list(dict.fromkeys((t["dataset"], t["split_scheme"], t["split"]) for t in tests))
    if len(blocks_all) < MIN_BLOCKS:
        what = block_label(blocks_all[0]) if blocks_all else "none"
        return [], [f"no overall ranking: the leaderboard has a single (dataset, scheme, test split) ({what})"]
    out, notes = [], []
    for track in sorted({t["track"] for t in tests}):
        values: dict[tuple, dict[str, float]] = {}
        row_of: dict[tuple, dict[str, dict]] = {}
        for t in tests:
            if t["track"] != track:
                continue
            b = (t["dataset"], t["split_scheme"], t["split"])
            ranked = [r for r in t["rows"] if r["rank"] is not None and not r.get("reference")]
            values[b] = {r["method"]: r["mean"] for r in ranked}
            row_of[b] = {r["method"]: r for r in ranked}
        blocks = list(values)
        every = sorted({m for v in values.values() for m in v})
        methods = [m for m in every if all(m in values[b] for b in blocks)]
        left_out = [{"method": m, "missing": [block_label(b) for b in blocks if m not in values[b]]}
                    for m in every if m not in methods]
        if len(blocks) < MIN_BLOCKS or len(methods) < 2:
            why = (f"{len(blocks)} test block(s)" if len(blocks) < MIN_BLOCKS
                   else f"{len(methods)} method(s) ranked in every block")
            notes.append(f"{track} track: no overall ranking ({why}; it needs {MIN_BLOCKS} blocks and 2 methods)")
            continue
        out.append(_track_table(track, blocks, methods, values, row_of, left_out, alpha))
    return out, notes


def _track_table(track, blocks, methods, values, row_of, left_out, alpha) -> dict:
    import scikit_posthocs as sp

    n, k = len(blocks), len(methods)
    matrix = np.array([[values[b][m] for m in methods] for b in blocks], dtype=float)  # n blocks x k methods
    ranks = sps.rankdata(-matrix, axis=1, method="average")  # 1 = highest accuracy
    avg = ranks.mean(axis=0)
    friedman, note = None, None
    if k >= MIN_FRIEDMAN_METHODS:
        with np.errstate(divide="ignore", invalid="ignore"):  # every block tied: scipy gives NaN, kept as None
            res = sps.friedmanchisquare(*matrix.T)
        p_value = _finite(res.pvalue)
        friedman = {"statistic": _finite(res.statistic), "p": p_value, "k": k, "n_blocks": n,
                    "significant": None if p_value is None else p_value <= alpha}
    else:
        note = f"Friedman test not run: it needs at least {MIN_FRIEDMAN_METHODS} methods (k = {k})"
    nemenyi = sp.posthoc_nemenyi_friedman(matrix)  # p-values depend on rank differences only
    p = nemenyi.to_numpy()
    order = sorted(range(k), key=lambda j: (avg[j], methods[j]))
    rows = []
    for j in order:
        m = methods[j]
        srcs = sorted({s for b in blocks for s in row_of[b][m].get("sources", [])})
        rows.append({"method": m, "average_rank": float(avg[j]),
                     "ranks": {block_label(b): float(ranks[i, j]) for i, b in enumerate(blocks)},
                     "accuracy": {block_label(b): float(matrix[i, j]) for i, b in enumerate(blocks)},
                     "nemenyi_p": {methods[i]: float(p[j, i]) for i in order if i != j},
                     "sources": srcs})
    return {"track": track, "blocks": [{"dataset": b[0], "split_scheme": b[1], "split": b[2]} for b in blocks],
            "block_labels": [block_label(b) for b in blocks], "methods": [methods[j] for j in order],
            "rows": rows, "friedman": friedman, "friedman_note": note, "alpha": alpha,
            "critical_difference": critical_difference(k, n, alpha), "left_out": left_out}
