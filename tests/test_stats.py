"""harness.stats against scipy/numpy on fixed numbers, and Holm against hand-computed examples."""

import math

import numpy as np
import pytest
from platebench.harness.results import stats
from scipy import stats as sps

METHOD = [0.274, 0.277, 0.301, 0.268, 0.290]
BASE = [0.250, 0.262, 0.279, 0.270, 0.281]


def test_summarize_matches_numpy_ddof1():
    s = stats.summarize(METHOD)
    assert s.n == 5
    assert s.mean == pytest.approx(np.mean(METHOD), abs=1e-15)
    assert s.std == pytest.approx(np.std(METHOD, ddof=1), abs=1e-15)
    # hand check: values 1, 2, 4 -> mean 7/3, sample variance (16/9 + 1/9 + 25/9) / 2 = 7/3
    h = stats.summarize([1.0, 2.0, 4.0])
    assert h.mean == pytest.approx(7 / 3) and h.std == pytest.approx(math.sqrt(7 / 3))


def test_summarize_small():
    assert stats.summarize([0.5]) == stats.Summary(0.5, None, 1)
    assert stats.summarize([]) == stats.Summary(None, None, 0)


def test_paired_t_matches_scipy_and_hand_value():
    assert stats.paired_t_pvalue(METHOD, BASE) == pytest.approx(sps.ttest_rel(METHOD, BASE).pvalue, rel=1e-12)
    # diffs 1, 2, 3, 5: mean 2.75, sd sqrt(8.75 / 3), t = 2.75 / (sd / 2), df 3
    t = 2.75 / (math.sqrt(8.75 / 3) / 2)
    assert stats.paired_t_pvalue([2, 4, 6, 9], [1, 2, 3, 4]) == pytest.approx(2 * sps.t.sf(t, 3), rel=1e-12)


def test_paired_t_undefined():
    assert stats.paired_t_pvalue([0.3], [0.2]) is None  # n < 2
    assert stats.paired_t_pvalue([0.3, 0.4], [0.3, 0.4]) is None  # no differences: scipy gives NaN


def test_wilcoxon_matches_scipy():
    expected = sps.wilcoxon(np.array(METHOD) - np.array(BASE)).pvalue
    assert stats.wilcoxon_pvalue(METHOD, BASE) == pytest.approx(expected, rel=1e-12)
    # exact distribution, 3 positive differences: P(W=0) two-sided = 2 / 2**3
    assert stats.wilcoxon_pvalue([2, 3, 4], [1, 1, 1]) == pytest.approx(0.25)


def test_wilcoxon_null_when_all_differences_zero():
    assert stats.wilcoxon_pvalue([0.3, 0.4, 0.5], [0.3, 0.4, 0.5]) is None
    assert stats.wilcoxon_pvalue([], []) is None


def test_paired_t_interval_is_the_t_tests_own_and_matches_the_formula():
    diffs = np.array(METHOD) - np.array(BASE)
    lo, hi = stats.paired_t_ci(METHOD, BASE)
    half = sps.t.ppf(0.975, len(diffs) - 1) * np.std(diffs, ddof=1) / np.sqrt(len(diffs))
    assert (lo, hi) == (pytest.approx(diffs.mean() - half), pytest.approx(diffs.mean() + half))
    # it agrees with the test next to it: excludes 0 exactly when p < 0.05
    p = stats.paired_t_pvalue(METHOD, BASE)
    assert (lo > 0 or hi < 0) == (p < 0.05)


def test_paired_t_interval_small_and_degenerate():
    assert stats.paired_t_ci([0.1], [0.0]) is None
    assert stats.paired_t_ci([0.12, 0.13, 0.14], [0.1, 0.11, 0.12]) == (pytest.approx(0.02), pytest.approx(0.02))


def _coverage(interval, n: int, reps: int = 4000) -> float:
    """Share of `reps` simulated seed sets (true paired difference 0, normal seed-to-seed noise) whose
    interval covers 0."""
    rng = np.random.default_rng(1000 + n)
    covered = 0
    for _ in range(reps):
        base = rng.normal(0.6, 0.05, n)
        lo, hi = interval(base + rng.normal(0, 0.03, n), base)
        covered += lo <= 0 <= hi
    return covered / reps


@pytest.mark.slow  # a coverage simulation
@pytest.mark.parametrize("n", [3, 5])
def test_interval_keeps_its_level_at_small_seed_counts(n):
    assert _coverage(stats.paired_t_ci, n) >= 0.93


def test_the_percentile_bootstrap_it_replaces_does_not():
    """The same simulation catches the interval the leaderboard used before: at n = 3 a percentile bootstrap
    never leaves [min, max] of the three differences."""
    def bootstrap(method, base):
        res = sps.bootstrap((np.subtract(method, base),), np.mean, n_resamples=999, method="percentile",
                            rng=np.random.default_rng(0))
        return res.confidence_interval.low, res.confidence_interval.high

    assert _coverage(bootstrap, 3, reps=1000) < 0.85


def test_compare_paired_uses_seed_intersection():
    method = {0: 0.30, 1: 0.32, 2: 0.35}
    base = {0: 0.28, 1: 0.31, 3: 0.40}
    c = stats.compare_paired(method, base)
    assert c.seeds == (0, 1) and c.n_paired == 2 and c.same_seeds is False
    assert c.diff_mean == pytest.approx(0.015)
    assert c.p_paired_t == pytest.approx(sps.ttest_rel([0.30, 0.32], [0.28, 0.31]).pvalue)
    full = stats.compare_paired({0: 0.3, 1: 0.4}, {1: 0.35, 0: 0.2})
    assert full.same_seeds is True and full.seeds == (0, 1)
    d = c.to_dict()
    assert d["seeds"] == [0, 1] and isinstance(d["diff_ci95"], list)


def test_holm_hand_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max(0.06, 0.04) = 0.06
    out = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert [p for p, _ in out] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [r for _, r in out] == [True, False, False, True]


def test_holm_none_cap_and_step_down_stop():
    out = stats.holm([None, 0.6, 0.7])
    assert out[0] == (None, None)
    assert [p for p, _ in out[1:]] == [1.0, 1.0]  # 0.6 * 2 capped at 1; monotone
    # 0.02 * 2 = 0.04 rejected; 0.049 * 1 = 0.049 but stays >= previous -> rejected too
    assert [r for _, r in stats.holm([0.02, 0.049])] == [True, True]
    # first hypothesis fails (0.03 * 2 = 0.06) -> nothing after it is rejected even though 0.04 <= 0.05
    assert [r for _, r in stats.holm([0.03, 0.04])] == [False, False]
    assert stats.holm([]) == []


def test_differences_without_spread_have_no_p_value_and_leave_holms_family():
    m, b = [0.12, 0.13, 0.14], [0.1, 0.11, 0.12]  # every difference 0.02: scipy says t = inf, p = 0
    assert stats.no_spread(m, b) and stats.paired_t_pvalue(m, b) is None
    c = stats.compare_paired(dict(enumerate(m)), dict(enumerate(b)))
    assert c.no_spread is True and c.p_paired_t is None
    assert c.diff_ci95 == (pytest.approx(0.02), pytest.approx(0.02)) and c.to_dict()["no_spread"] is True
    assert stats.holm([c.p_paired_t, 0.04]) == [(None, None), (pytest.approx(0.04), True)]
    assert not stats.no_spread([0.3], [0.2])  # one seed: undefined for another reason
    assert stats.compare_paired({0: 0.3, 1: 0.5}, {0: 0.2, 1: 0.3}).no_spread is False
