"""Exhaustive error statistics against an independent brute force in exact rational arithmetic."""

from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lmul.analysis import errors


def _round_k(v: Fraction, k: int, rounding: str) -> Fraction:
    """v in [1, 4) rounded to k fraction bits of its binade, by hand."""
    ulp = Fraction(1, 2**k) * (2 if v >= 2 else 1)
    q, r = divmod(v, ulp)
    if rounding == "trunc" or r < ulp / 2:
        return q * ulp
    if r > ulp / 2:
        return (q + 1) * ulp
    return (q + (q % 2)) * ulp  # tie: to even


def _brute(k: int, arm: str) -> list[float]:
    """Relative errors of every mantissa pair, from the SPEC's definitions, in Fractions."""
    n = 2**k
    lk = k if k <= 3 else (3 if k == 4 else 4)
    c = Fraction(1, 2**lk)
    out = []
    for a in range(n):
        for b in range(n):
            x, y = 1 + Fraction(a, n), 1 + Fraction(b, n)
            if arm in ("lmul-bit", "mitchell"):
                s = a + b + (c * n if arm == "lmul-bit" else 0)
                q = s // n
                p = Fraction(2) ** q * (1 + Fraction(s - q * n, n))
            elif arm == "lmul-formula":
                p = x + y - 1 + c
            else:
                p = _round_k(x * y, k, "rne" if arm == "fp-rne" else "trunc")
            out.append(float(p / (x * y) - 1))
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("arm", list(errors.EXHAUSTIVE_ARMS))
def test_exhaustive_matches_brute_force(k, arm):
    x, y = errors.grid_pairs(k)
    rel = errors.relative_errors(errors.arm_products(x, y, k, arm), x, y)
    ref = torch.tensor(_brute(k, arm), dtype=torch.float64)
    assert torch.allclose(rel, ref, rtol=0, atol=1e-15)
    s, r = errors.exhaustive_stats(k, arm), errors.stats(ref)
    assert s.n == 4**k
    for f in ("mean_abs", "rms", "max_abs", "bias"):
        assert getattr(s, f) == pytest.approx(getattr(r, f), abs=1e-14)


@pytest.mark.parametrize("k", [2, 4, 7])
@pytest.mark.parametrize("arm", list(errors.EXHAUSTIVE_ARMS))
@pytest.mark.parametrize("ex,ey", [(1, 0), (-60, 50), (100, 20), (-70, -50), (3, -9)])
def test_exponents_cancel(k, arm, ex, ey):
    # including the carry into the exponent (s >= 1, and s >= 2 for k >= 4 in bit mode)
    x0, y0 = errors.grid_pairs(k)
    x, y = errors.grid_pairs(k, ex, ey)
    r0 = errors.relative_errors(errors.arm_products(x0, y0, k, arm), x0, y0)
    r = errors.relative_errors(errors.arm_products(x, y, k, arm), x, y)
    assert torch.equal(r, r0)


def test_largest_enumeration_m10():
    s = errors.exhaustive_stats(10, "lmul-bit")
    assert s.n == 2**20
    assert 0 < s.mean_abs < s.max_abs < 0.125


def test_bias_optimal_formula_offset_matches_closed_form():
    # formula mode: r = (1 + xm + ym + c) w - 1, w = 1/((1+xm)(1+ym)); E r = 0 at c* = (1 - E[(1+xm+ym) w]) / E[w]
    k = 5
    n = 2**k
    num = den = Fraction(0)
    for a in range(n):
        for b in range(n):
            w = 1 / ((1 + Fraction(a, n)) * (1 + Fraction(b, n)))
            num += (1 + Fraction(a + b, n)) * w
            den += w
    c_star = float((n * n - num) / den)
    best = errors.best_offsets(k, "formula")["min_bias"]["offset"]
    assert abs(best - c_star) <= 2.0**-10


def test_best_offsets_not_worse_than_paper_or_mitchell():
    for k in (3, 4, 6):
        b = errors.best_offsets(k, "bit")
        assert b["min_mean_abs"]["mean_abs"] <= min(b["paper"]["mean_abs"], b["zero"]["mean_abs"])
        assert abs(b["min_bias"]["bias"]) <= min(abs(b["paper"]["bias"]), abs(b["zero"]["bias"]))
    # k = 4: the paper's l(4) = 3 is not the best bit-mode offset; 2^-4 is (exhaustive)
    assert errors.best_offsets(4, "bit")["min_mean_abs"]["offset"] == 2.0**-4


def test_real_relative_errors_by_hand():
    a = torch.tensor([3.0, 0.0, 1.0, 1e-4])
    b = torch.tensor([4.0, 5.0, 1.0, 1e-4])
    # e8m3, l(3) = 3: 3 x 4 -> 13 (SPEC §3 golden, e4m3 bit), 1 x 1 -> 1.125; the zero product is dropped
    rel = errors.real_relative_errors(a[:3], b[:3], errors.real_arm(3))
    assert rel.tolist() == [13 / 12 - 1, 0.125]
    # e4m3 flushes 1e-4 (below its smallest subnormal 2^-9) to zero: relative error -1
    rel = errors.real_relative_errors(a[3:], b[3:], errors.REAL_BASELINES[0])
    assert rel.tolist() == [-1.0]


def test_stats_and_bad_input():
    s = errors.stats(torch.tensor([0.1, -0.3], dtype=torch.float64))
    assert (s.mean_abs, s.max_abs) == pytest.approx((0.2, 0.3))
    assert s.bias == pytest.approx(-0.1)
    assert s.rms == pytest.approx((0.05) ** 0.5)
    with pytest.raises(ValueError, match="empty"):
        errors.stats(torch.tensor([]))
    with pytest.raises(ValueError, match="mantissa bits"):
        errors.mantissa_grid(11)
    with pytest.raises(ValueError, match="unknown arm"):
        errors.arm_products(*errors.grid_pairs(2), 2, "nope")
    with pytest.raises(ValueError, match="same length"):
        errors.real_relative_errors(torch.ones(3), torch.ones(2), errors.real_arm(3))


@given(
    a=st.floats(1e-3, 1e3), b=st.floats(1e-3, 1e3), ja=st.integers(-40, 40), jb=st.integers(-40, 40),
    k=st.integers(1, 7), neg=st.booleans(),
)
def test_real_errors_invariant_under_power_of_two_scaling(a, b, ja, jb, k, neg):
    # quantizing to e8m{k} and every arm commute with scaling by 2^j (away from the range limits)
    x, y = torch.tensor([a], dtype=torch.float64), torch.tensor([-b if neg else b], dtype=torch.float64)
    for arm in (errors.real_arm(k), errors.real_arm(k, 1), errors.Arm("rne", f"e8m{k}", "exact")):
        r0 = errors.real_relative_errors(x.float(), y.float(), arm)
        r1 = errors.real_relative_errors((x * 2.0**ja).float(), (y * 2.0**jb).float(), arm)
        assert torch.equal(r0, r1)


def test_scaled_fp8_arm():
    # values far below e4m3's range: unscaled they flush to zero, scaled by 2^k they are kept
    a = torch.tensor([1e-4, 3e-5, -2e-4])
    b = torch.tensor([2.0, -1.0, 0.5])
    unscaled = errors.real_relative_errors(a, b, errors.REAL_BASELINES[0])
    scaled = errors.real_relative_errors(a, b, errors.REAL_BASELINES[2])
    assert unscaled.tolist() == [-1.0, -1.0, -1.0]
    # by hand: a scaled by 2^21 (448 / 2e-4 = 2.24e6 -> 2^21), b by 2^7 (448 / 2 = 224 -> 2^7)
    ref = errors.real_relative_errors(a * 2.0**21, b * 2.0**7, errors.REAL_BASELINES[0])
    assert torch.equal(scaled, ref)
    assert scaled.abs().max() < 2.0**-3


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_scaled_arms_equal_an_independent_mx_oracle(fmt):
    # lmul analyze's MXFP8 rows: each operand set one row, 32 consecutive values per E8M0 scale
    # (tests/test_patch_scaled.py's float64 oracle: floor(log2 amax) - emax, nearest-value rounding, spec products)
    import numpy as np

    from tests.oracle import default_offset, spec_products
    from tests.test_patch_scaled import ORACLE_FMT, _oracle_scaled

    g = torch.Generator().manual_seed(2)
    a = torch.randn(1000, generator=g) * torch.exp2(torch.randint(-20, 20, (1000,), generator=g).float())
    b = torch.randn(1000, generator=g)
    a[7] = 0.0
    e, m = ORACLE_FMT[fmt][:2]
    for arm in [x for x in errors.SCALED_ARMS if x.fmt == fmt]:
        keep = (a.double() * b.double() != 0).numpy()
        av, bv = a.numpy()[keep], b.numpy()[keep]
        qa, sa = _oracle_scaled(av, fmt, "mx")
        qb, sb = _oracle_scaled(bv, fmt, "mx")
        p = (spec_products(qa, qb, e, m, arm.mode, default_offset(m)).astype(np.float64) * sa * sb).astype(np.float32)
        expected = p[0].astype(np.float64) / (av.astype(np.float64) * bv.astype(np.float64)) - 1.0
        got = errors.real_relative_errors(a, b, arm)
        np.testing.assert_array_equal(got.numpy(), expected)


def test_analysis_report_has_the_scaled_rows(tmp_path):
    from lmul.analysis import report

    res = report.run_analysis(report.AnalyzeConfig(out=str(tmp_path), max_bits=3, n_pairs=2048),
                              progress=lambda *a: None)
    s = res["real"]["N(0,1) x N(0,1) (synthetic)"]["scaled"]
    assert list(s) == [arm.label for arm in errors.SCALED_ARMS]
    # the exact product of MX elements beats L-Mul on them; MXFP4's 1-bit mantissa is far coarser than MXFP8's
    assert s["MXFP8 e4m3 multiply"]["mean_abs"] < s["MXFP8 e4m3 L-Mul"]["mean_abs"] < s["MXFP4 multiply"]["mean_abs"]
    md = (tmp_path / "analysis.md").read_text()
    assert f"| MXFP4 L-Mul | {s['MXFP4 L-Mul']['mean_abs']:.4f} |" in md and "| MXFP8 e5m2 multiply |" in md
