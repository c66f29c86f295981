"""Statistics against independent computations: the statistics module, scipy, closed forms."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmul.eval import stats


@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=50))
def test_mean_se_matches_statistics_module(xs):
    m, se = stats.mean_se(xs)
    assert m == pytest.approx(statistics.fmean(xs), abs=1e-9)
    assert se == pytest.approx(statistics.stdev(xs) / math.sqrt(len(xs)), rel=1e-9, abs=1e-9)


def test_mean_se_small():
    assert math.isnan(stats.mean_se([])[0])
    m, se = stats.mean_se([1.0])
    assert m == 1.0 and math.isnan(se)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (3, 9), (10, 10), (17, 4), (40, 61), (120, 80)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    sp = pytest.importorskip("scipy.stats")
    expected = 1.0 if b + c == 0 else sp.binomtest(b, b + c, 0.5).pvalue
    assert stats.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_closed_form():
    # b=0, c=n: p = 2 / 2^n
    assert stats.mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    with pytest.raises(ValueError, match="discordant"):
        stats.mcnemar_exact(-1, 2)


def test_bootstrap_is_seeded_and_matches_normal_approximation():
    rng = np.random.default_rng(7)
    a = (rng.random(400) < 0.6).astype(float)
    b = np.where(rng.random(400) < 0.1, 1 - a, a)  # flip 10% of items
    d, lo, hi = stats.paired_bootstrap(a, b, iters=4000, seed=3)
    assert (d, lo, hi) == stats.paired_bootstrap(a, b, iters=4000, seed=3)
    assert d == pytest.approx((b - a).mean())
    # CLT: the CI half-width is about 1.96 * sd(d) / sqrt(n)
    half = 1.96 * (b - a).std(ddof=1) / math.sqrt(a.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.12)
    assert lo < d < hi


def test_bootstrap_identical_arms_is_zero_width():
    a = np.array([1, 0, 1, 1, 0], dtype=float)
    assert stats.paired_bootstrap(a, a.copy(), iters=500, seed=0) == (0.0, 0.0, 0.0)


def test_paired_counts_and_format():
    a = [1, 1, 1, 0, 0, 1]
    b = [1, 0, 0, 1, 0, 1]
    p = stats.paired(a, b, iters=500, seed=1)
    assert (p.b, p.c, p.n) == (2, 1, 6)
    assert p.diff == pytest.approx(-1 / 6)
    assert p.p_mcnemar == pytest.approx(1.0)
    assert p.fmt().startswith("-16.7 ± ")


def test_paired_non_binary_has_no_mcnemar():
    p = stats.paired([0.1, 0.5, 0.2], [0.2, 0.4, 0.3], iters=200, seed=0)
    assert p.b == -1 and math.isnan(p.p_mcnemar)


def test_paired_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="equal 1-D"):
        stats.paired_bootstrap([1, 0], [1, 0, 1])


def test_wilson_interval_is_where_the_score_test_does_not_reject():
    """Oracle: a grid search over p for |k/n - p| <= z·sqrt(p(1-p)/n); and a published value
    (0 of 30: [0, 11.35%], the "rule of three" neighbourhood). Always inside [0, 1], asymmetric."""
    import numpy as np

    from lmul.eval.stats import wilson

    z = 1.959963984540054
    p = np.linspace(0, 1, 1_000_001)
    for k, n in ((0, 30), (8, 30), (30, 30), (1, 4), (57, 100)):
        ok = np.abs(k / n - p) <= z * np.sqrt(p * (1 - p) / n)
        lo, hi = wilson(k, n)
        assert lo == pytest.approx(p[ok].min(), abs=2e-6) and hi == pytest.approx(p[ok].max(), abs=2e-6)
        assert 0 <= lo <= k / n <= hi <= 1
    assert wilson(0, 30)[1] == pytest.approx(0.1135, abs=1e-4)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(5, 4)
