"""Seed-level statistics for leaderboard comparisons: a method against the baseline on the same seeds.

Everything here takes plain `{seed: value}` mappings and returns plain numbers (None where a statistic
is undefined), so the leaderboard can put the results straight into JSON. scipy does the tests; only
Holm's step-down correction is written out, because statsmodels is not a dependency.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
INTERVAL = "paired t"  # how diff_ci95 is computed (named in tables and leaderboard.json settings)


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Summary:
    mean: float | None
    std: float | None  # sample std (ddof=1); None for fewer than 2 values
    n: int


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample standard deviation (ddof=1, as WILDS reports) of per-seed values."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return Summary(None, None, 0)
    std = _finite(np.std(arr, ddof=1)) if arr.size >= 2 else None
    return Summary(_finite(arr.mean()), std, int(arr.size))


@dataclass(frozen=True)
class PairedComparison:
    """A method vs the baseline on the seeds both have (`seeds`)."""

    seeds: tuple[int, ...]
    n_paired: int
    same_seeds: bool  # False when either side has a seed the other lacks (the row is then incomplete)
    diff_mean: float | None  # mean of (method - baseline) over the paired seeds
    p_paired_t: float | None
    p_wilcoxon: float | None
    diff_ci95: tuple[float, float] | None
    no_spread: bool  # every paired difference is the same (n >= 2): the t-test is undefined, p_paired_t is None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        d["diff_ci95"] = list(self.diff_ci95) if self.diff_ci95 is not None else None
        return d


def no_spread(method: Sequence[float], baseline: Sequence[float]) -> bool:
    """Whether n >= 2 paired differences are all the same (up to float rounding): the paired t statistic is then
    0/0 or ±inf, and scipy's p (NaN or 0.0) is no evidence either way."""
    diffs = np.asarray(method, dtype=float) - np.asarray(baseline, dtype=float)
    return diffs.size >= 2 and bool(np.ptp(diffs) <= 1e-12)


def paired_t_pvalue(method: Sequence[float], baseline: Sequence[float]) -> float | None:
    """Two-sided paired t-test (scipy.stats.ttest_rel). None for n < 2 and for differences without spread
    (`no_spread`): scipy answers NaN for all-zero differences and p = 0.0 for constant non-zero ones (t = ±inf),
    which would read as certain significance from seeds that vary together, e.g. identical seeds."""
    if len(method) < 2 or no_spread(method, baseline):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on zero-variance differences
        return _finite(stats.ttest_rel(method, baseline, alternative="two-sided").pvalue)


def wilcoxon_pvalue(method: Sequence[float], baseline: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon, zero_method="wilcox": zero
    differences are dropped). None when no non-zero difference remains: scipy then answers p = 1.0,
    which would read as a test that ran. With n paired seeds the smallest possible p is 2 / 2**n
    (0.25 for 3 seeds), so this test cannot reach 0.05 below 6 seeds; it is reported for larger sweeps."""
    diffs = np.asarray(method, dtype=float) - np.asarray(baseline, dtype=float)
    if diffs.size == 0 or not np.any(diffs != 0):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _finite(stats.wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_t_ci(method: Sequence[float], baseline: Sequence[float],
                confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Confidence interval of the mean paired difference from the paired t-test itself
    (`scipy.stats.ttest_rel(...).confidence_interval`): mean ± t(n-1) · sd / √n. It keeps its level at the
    seed counts benchmarks use (3-10) when the differences are roughly normal, where a percentile
    bootstrap cannot (with 3 seeds it never leaves [min, max] of the differences and covers a true zero
    about 74% of the time). None for fewer than 2 seeds; [d, d] when every difference equals d."""
    if len(method) < 2:
        return None
    diffs = np.asarray(method, dtype=float) - np.asarray(baseline, dtype=float)
    if np.ptp(diffs) <= 1e-12:  # no spread (up to float rounding): the interval is the difference itself
        return (float(diffs.mean()), float(diffs.mean()))
    ci = stats.ttest_rel(method, baseline).confidence_interval(confidence_level=confidence)
    lo, hi = _finite(ci.low), _finite(ci.high)
    return None if lo is None or hi is None else (lo, hi)


def compare_paired(method: Mapping[int, float], baseline: Mapping[int, float]) -> PairedComparison:
    """All paired statistics of `method` against `baseline` on the intersection of their seeds."""
    seeds = tuple(sorted(set(method) & set(baseline)))
    m = [float(method[s]) for s in seeds]
    b = [float(baseline[s]) for s in seeds]
    diffs = [x - y for x, y in zip(m, b)]
    return PairedComparison(
        seeds=seeds,
        n_paired=len(seeds),
        same_seeds=set(method) == set(baseline),
        diff_mean=_finite(np.mean(diffs)) if diffs else None,
        p_paired_t=paired_t_pvalue(m, b),
        p_wilcoxon=wilcoxon_pvalue(m, b),
        diff_ci95=paired_t_ci(m, b),
        no_spread=no_spread(m, b),
    )


def holm(pvalues: Sequence[float | None], alpha: float = 0.05) -> list[tuple[float | None, bool | None]]:
    """Holm's step-down correction over the non-None p-values (None entries are not comparisons and
    come back as (None, None)). Sorted p(1) <= ... <= p(m): adjusted p(i) = max over j <= i of
    min(1, (m - j + 1) * p(j)); a hypothesis is rejected when its adjusted p <= alpha, which is the
    same as stopping at the first p(i) > alpha / (m - i + 1)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out: list[tuple[float | None, bool | None]] = [(None, None)] * len(pvalues)
    running = 0.0
    # Stable sort: equal p-values keep their input order, which does not change any adjusted value.
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = (running, running <= alpha)
    return out
