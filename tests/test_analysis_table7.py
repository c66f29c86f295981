"""Closed-form Table 7 expectations against independent exhaustive enumeration.

The paper's printed Table 7 digits could not be obtained in this project (see docs/analysis.md),
so these tests check the closed forms, not the printed values.
"""

from fractions import Fraction

import pytest
import torch

from lmul.analysis import errors, table7


def _mean(k, f):
    n = 2**k
    return sum((f(Fraction(a, n), Fraction(b, n)) for a in range(n) for b in range(n)), Fraction(0)) / (n * n)


@pytest.mark.parametrize("k", range(1, 8))
def test_lmul_expectation_brute_force(k):
    for c in (Fraction(1, 16), Fraction(1, 2 ** (k if k <= 3 else (3 if k == 4 else 4)))):
        # (1 + xm + ym + c) - (1 + xm)(1 + ym), averaged over every pair
        ref = _mean(k, lambda xm, ym, c=c: (1 + xm + ym + c) - (1 + xm) * (1 + ym))
        assert table7.lmul_expectation(k, c) == ref
    assert table7.lmul_expectation(k) == table7.lmul_expectation(k, Fraction(1, 2 ** errors.offset_exponent(k)))


@pytest.mark.parametrize("k", range(1, 8))
def test_truncation_expectation_brute_force(k):
    grid = Fraction(1, 2**k)

    def trunc_err(xm, ym):  # keep k fraction bits of 1 + xm + ym + xm ym (no renormalisation)
        v = 1 + xm + ym + xm * ym
        return (v // grid) * grid - v

    assert table7.truncation_expectation(k) == _mean(k, trunc_err)


@pytest.mark.parametrize("k", range(1, 8))
def test_normalised_truncation_matches_lmul_quantize(k):
    # a second implementation: lmul's exact product truncated with formats.quantize, exponent 0,
    # so the absolute error is the significand error
    x, y = errors.grid_pairs(k)
    p = errors.arm_products(x, y, k, "fp-trunc").double()
    mean = (p - x.double() * y.double()).mean().item()
    assert mean == pytest.approx(float(table7.normalised_truncation_expectation(k)), abs=1e-15)


def test_hand_values():
    assert table7.lmul_expectation(1, Fraction(1, 16)) == 0  # 1/16 - (1/4)^2
    assert table7.lmul_expectation(3, Fraction(1, 16)) == Fraction(-33, 256)
    assert table7.lmul_expectation(3) == Fraction(-17, 256)  # c = 2^-3
    assert table7.truncation_expectation(1) == Fraction(-1, 16)
    # c = 2^-4 and 2^-l(k) agree for k >= 5 (l = 4), differ below
    rows = table7.table7_rows()
    assert [r["lmul_c_2^-4"] == r["lmul_c_2^-l(k)"] for r in rows] == [False] * 4 + [True] * 3
    assert "-33/256" in table7.table7_markdown(rows)


def test_bad_k():
    with pytest.raises(ValueError, match="mantissa bits"):
        table7.lmul_expectation(0)
    with pytest.raises(ValueError, match="mantissa bits"):
        table7.truncation_expectation(17)
    assert torch.is_tensor(errors.mantissa_grid(1))


def test_relative_rows_by_hand():
    # k = 1, formula mode, c = 1/16: pairs (1,1), (1,1.5), (1.5,1), (1.5,1.5)
    # relative errors 1/16, 1.5625/1.5 - 1 (twice), 2.0625/2.25 - 1 -> mean 1/64
    row = table7.relative_rows(range(1, 2))[0]
    assert row["formula_c_2^-4"] == pytest.approx(1 / 64, abs=1e-15)
    assert row["trunc"] == pytest.approx(-1 / 36, abs=1e-15)  # only 2.25 -> 2 loses: -1/9 / 4
