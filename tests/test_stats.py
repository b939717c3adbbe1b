"""dora_cli.stats against scipy.stats: Student-t quantiles and p-values, intervals over seeds, paired t-tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_cli import stats

scipy_stats = pytest.importorskip("scipy.stats")

DFS = [*range(1, 41), 59, 60, 99, 120, 500, 1000]


@pytest.mark.parametrize("confidence", [0.5, 0.8, 0.9, 0.95, 0.99, 0.999])
def test_t_critical_is_scipys_quantile(confidence):
    for df in DFS:
        expected = scipy_stats.t.ppf((1 + confidence) / 2, df)
        assert stats.t_critical(confidence, df) == pytest.approx(expected, rel=1e-11, abs=1e-12), df


@pytest.mark.parametrize("t", [0.0, 0.05, 0.7, 1.0, 1.96, 2.5, 4.3, 12.7, 60.0])
def test_the_two_sided_p_value_is_scipys(t):
    for df in DFS:
        assert stats.t_p_value(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), rel=1e-9, abs=1e-13), df
        assert stats.t_p_value(-t, df) == stats.t_p_value(t, df)


def test_bad_degrees_of_freedom_and_confidence_are_refused():
    for df in (0, -1, 2.5):
        with pytest.raises(ValueError, match="degrees of freedom"):
            stats.t_two_sided_mass(1.0, df)
    for confidence in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence"):
            stats.t_critical(confidence, 3)


# Fixed accuracies of three and five seeds (percent), as a study writes them.
SEEDS3 = [61.2, 63.05, 60.4]
SEEDS5 = [71.3, 70.1, 72.8, 69.95, 71.0]


@pytest.mark.parametrize("values", [SEEDS3, SEEDS5, [0.5, 0.5], [1e-4, 3e-4, 2e-4, 5e-4]])
def test_the_interval_over_seeds_is_scipys_t_interval(values):
    e = stats.over_seeds(values)
    assert e.mean == pytest.approx(np.mean(values), rel=1e-14)
    if np.std(values) == 0:
        assert e.low == e.high == e.mean
    else:
        low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
        assert (e.low, e.high) == (pytest.approx(low, rel=1e-11), pytest.approx(high, rel=1e-11))
    assert e.n == len(values) and e.basis == stats.STUDENT_T
    assert e.to_dict()["half_width"] == pytest.approx((e.high - e.low) / 2)


def test_one_seed_has_no_t_interval_and_the_binomial_one_is_labelled():
    e = stats.over_seeds([62.0])
    assert (e.low, e.high, e.half_width, e.n, e.basis) == (None, None, None, 1, stats.NONE)
    b = stats.binomial(62.0, se=1.5)
    z = scipy_stats.norm.ppf(0.975)
    assert (b.low, b.high) == (pytest.approx(62.0 - z * 1.5, rel=1e-13), pytest.approx(62.0 + z * 1.5, rel=1e-13))
    assert b.basis == stats.BINOMIAL and "one seed" in b.basis and b.n == 1
    d = stats.binomial_difference(1.5, 2.0, 0.7)
    assert d.half_width == pytest.approx(z * math.hypot(1.5, 2.0)) and d.mean == 0.7 and not d.excludes_zero
    assert stats.binomial_difference(None, 2.0, 0.7).low is None


@pytest.mark.parametrize("a, b", [
    (SEEDS3, [62.0, 63.9, 61.0]),
    (SEEDS5, [71.9, 70.0, 73.5, 70.6, 71.2]),
    ([1.25, 1.31, 1.28], [1.21, 1.30, 1.22]),  # validation losses
    ([50.0, 52.0], [49.0, 55.0]),
])
def test_paired_differences_are_scipys_ttest_rel(a, b):
    e = stats.paired(a, b)
    test = scipy_stats.ttest_rel(b, a)
    diffs = np.subtract(b, a)
    low, high = scipy_stats.t.interval(0.95, len(a) - 1, loc=diffs.mean(), scale=scipy_stats.sem(diffs))
    assert e.mean == pytest.approx(diffs.mean(), rel=1e-12, abs=1e-12)
    assert e.t == pytest.approx(test.statistic, rel=1e-10) and e.p == pytest.approx(test.pvalue, rel=1e-9)
    assert (e.low, e.high) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))
    assert e.excludes_zero == (test.pvalue < 0.05)  # the interval excludes 0 exactly when p < 1 - confidence


def test_a_constant_difference_and_a_single_pair():
    e = stats.paired([60.0, 61.0, 62.0], [61.0, 62.0, 63.0])
    assert e.mean == pytest.approx(1.0) and e.low == pytest.approx(1.0) and e.p == 0.0 and e.excludes_zero
    assert stats.paired([60.0], [61.0]).low is None and stats.paired([60.0], [61.0]).mean == 1.0
    with pytest.raises(ValueError):
        stats.paired([1.0], [1.0, 2.0])


finite = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=2, max_size=12))
def test_paired_matches_scipy_on_any_numbers(pairs):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    diffs = np.subtract(b, a)
    if np.ptp(diffs) < 1e-6 * max(1.0, np.abs(diffs).max()):
        return  # (nearly) constant differences: scipy's t is inf or ill-conditioned; covered above
    e = stats.paired(a, b)
    test = scipy_stats.ttest_rel(b, a)
    assert e.t == pytest.approx(test.statistic, rel=1e-7, abs=1e-9)
    assert e.p == pytest.approx(test.pvalue, rel=1e-6, abs=1e-12)
    half = scipy_stats.t.ppf(0.975, len(a) - 1) * scipy_stats.sem(diffs)
    assert e.half_width == pytest.approx(half, rel=1e-9, abs=1e-12)
