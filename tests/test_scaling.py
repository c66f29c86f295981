"""Scaled operands (``LMulSpec.scaling``, docs/semantics.md section 7) against independent oracles.

Oracles, written here from the contract without lmul's scaling code: the group scale rules in plain
Python floats (``math.frexp``; torchao's float32 multiplier by ``np.float32``), element rounding by
``tests.oracle.SmallFormat`` (e4m3) or a table search over FP4's eight magnitudes, the products by
``tests.oracle.spec_products`` (NumPy float64), the scaled term ``fl32(2^(sa + sb) P)`` by
``np.ldexp`` in float64 and one cast, and the ``acc=`` order by the sequential loop of
tests/test_acc.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lmul
from lmul.formats import Format
from lmul.matmul import matmul
from lmul.scaling import scale_exponents, scaled_quantize
from lmul.spec import LMulSpec, resolve_offset
from tests.oracle import SmallFormat, spec_products
from tests.test_acc import assert_bits, round_acc

SCALINGS = ["tensor", "row", "block", "mx"]
BACKENDS = ["reference", "cpu", "decompose"]
MODES = ["bit", "formula", "exact"]
FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # OCP MX v1.0 FP4 E2M1 magnitudes, codes 0..7


def fp4_quantize(x: np.ndarray) -> np.ndarray:
    """Nearest FP4 value, ties to the even code, saturating at 6 (NaN stays NaN)."""
    mag = np.abs(x)[..., None]
    d = np.abs(mag - FP4)
    best = d.min(-1, keepdims=True)
    codes = np.where(d == best, np.arange(8), 99)
    tie_even = np.where((codes % 2 == 0) & (codes != 99), codes, 99).min(-1)
    code = np.where((d == best).sum(-1) > 1, tie_even, codes.min(-1))
    out = np.where(np.abs(x) >= 6.0, 6.0, FP4[np.minimum(code, 7)])
    return np.where(np.isnan(x), np.nan, np.copysign(out, x))


def elem_quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "fp4":
        return fp4_quantize(x)
    f = Format.parse(fmt)
    return SmallFormat(f.exp_bits, f.man_bits, f.finite_only).quantize(x)


def oracle_scale(amax: float, fmt: str, scaling: str) -> float:
    """The group's scale exponent s (NaN for NaN/inf) from the rules of section 7."""
    f = Format.parse(fmt)
    if not math.isfinite(amax):
        return math.nan
    if amax == 0:
        return 0
    if scaling == "mx":
        s = math.frexp(amax)[1] - 1 - f.emax                     # floor(log2 amax) - emax_elem
    else:
        r = float(np.float32(f.max / max(amax, 1e-12)))           # torchao's float32 multiplier
        s = -(math.frexp(r)[1] - 1)                               # scale = 2^floor(log2 r) = 2^-s
    return max(-127, min(127, s))


def oracle_exponents(x: np.ndarray, fmt: str, scaling: str, operand: str) -> np.ndarray:
    """Per-element scale exponent of a 2-D operand (A [M, K] or B [K, N]), group by group."""
    xt = x if operand == "a" else x.T
    rows, k = xt.shape
    out = np.zeros_like(xt, dtype=np.float64)
    if scaling == "tensor":
        out[:] = oracle_scale(float(np.abs(x).max()), fmt, scaling)
    else:
        g = k if scaling == "row" else 32 if scaling == "mx" else 128
        r = 128 if (scaling == "block" and operand == "b") else 1
        for i0 in range(0, rows, r):
            for k0 in range(0, k, g):
                grp = xt[i0:i0 + r, k0:k0 + g]
                out[i0:i0 + r, k0:k0 + g] = oracle_scale(float(np.abs(grp).max()), fmt, scaling)
    return out if operand == "a" else out.T


def oracle_terms(a: np.ndarray, b: np.ndarray, fmt: str, mode: str, scaling: str) -> np.ndarray:
    """T[i, j, k] = fl32(2^(sa_ik + sb_kj) P(qa_ik, qb_kj)) (NaN where a scale is NaN)."""
    f = Format.parse(fmt)
    sa, sb = oracle_exponents(a, fmt, scaling, "a"), oracle_exponents(b, fmt, scaling, "b")
    with np.errstate(all="ignore"):
        qa = elem_quantize(np.ldexp(a, -np.nan_to_num(sa).astype(int)) + 0 * sa, fmt)
        qb = elem_quantize(np.ldexp(b, -np.nan_to_num(sb).astype(int)) + 0 * sb, fmt)
        p = spec_products(qa[:, None, :], qb.T[None], f.exp_bits, f.man_bits, mode,
                          resolve_offset(f, mode)).astype(np.float64)
        s = sa[:, None, :] + sb.T[None]
        t = np.ldexp(p, np.nan_to_num(s).astype(int)) + 0 * s
    return t.astype(np.float32)


# -- the scaled product on every operand pair: equal to unscaled L-Mul times 2^(sa + sb) ------------

def _values(fmt: str) -> np.ndarray:
    if fmt == "fp4":
        return np.concatenate([FP4, -FP4])
    v = SmallFormat(4, 3, True).all_values()
    return v[~np.isnan(v)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["e4m3", "fp4"])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_every_pair_scaled(scaling, fmt, mode, backend):
    """Row i of A is [v_i 2^ta, max 2^ta, 0], column j of B [w_j 2^tb, 0, max 2^tb]: the pilot maxima
    make every group's scale exactly 2^ta / 2^tb, so C_ij = fl32(2^(ta + tb) L-Mul(v_i, w_j)) for every
    pair of format values; (ta, tb) reach float32's subnormals (-60, -62) and overflow (60, 70)."""
    f = Format.parse(fmt)
    v = _values(fmt)
    for ta, tb in [(0, 0), (-20, 7), (30, -45), (-60, -62), (60, 70)]:
        a = np.stack([v * 2.0**ta, np.full_like(v, f.max * 2.0**ta), np.zeros_like(v)], 1)
        b = np.stack([v * 2.0**tb, np.zeros_like(v), np.full_like(v, f.max * 2.0**tb)], 0)
        got = matmul(torch.from_numpy(a).float(), torch.from_numpy(b).float(), fmt, mode, backend=backend,
                     scaling=scaling)
        # the scales are 2^ta, 2^tb, except where torchao's amax floor 1e-12 caps them (tensor/row/block at -60)
        sa, sb = oracle_scale(f.max * 2.0**ta, fmt, scaling), oracle_scale(f.max * 2.0**tb, fmt, scaling)
        qa, qb = elem_quantize(v * 2.0 ** (ta - sa), fmt), elem_quantize(v * 2.0 ** (tb - sb), fmt)
        for t, st_ in ((ta, sa), (tb, sb)):
            assert st_ == t or (scaling != "mx" and f.max * 2.0**t < 1e-12)
        p = spec_products(qa[:, None], qb[None, :], f.exp_bits, f.man_bits, mode, resolve_offset(f, mode))
        with np.errstate(over="ignore"):
            want = np.ldexp(p.astype(np.float64), sa + sb).astype(np.float32) + np.float32(0.0)
        assert_bits(got, want, f"{fmt} {mode} {scaling} {backend} 2^{ta}, 2^{tb}")
        if (ta, tb) == (0, 0):  # and with scale 1 it is the unscaled L-Matmul, bit for bit
            assert torch.equal(got, matmul(torch.from_numpy(a).float(), torch.from_numpy(b).float(), fmt, mode,
                                           backend="reference"))


# -- group scales and elements against the rules ----------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scaling=st.sampled_from(SCALINGS), fmt=st.sampled_from(["e4m3", "fp4"]),
       k=st.integers(1, 300), operand=st.sampled_from(["a", "b"]), spread=st.integers(0, 40))
def test_scaled_quantize_matches_rules(seed, scaling, fmt, k, operand, spread):
    gen = np.random.default_rng(seed)
    other = int(gen.integers(1, 140))
    shape = (other, k) if operand == "a" else (k, other)
    x = gen.standard_normal(shape) * np.exp2(gen.integers(-spread, spread + 1, shape))
    x[gen.random(shape) < 0.1] = 0.0
    x = x.astype(np.float32).astype(np.float64)
    q, _ = scaled_quantize(torch.from_numpy(x).float(), fmt, scaling, operand)
    s = oracle_exponents(x, fmt, scaling, operand)
    want = elem_quantize(np.ldexp(x, -s.astype(int)), fmt)
    assert_bits(q, want, f"{fmt} {scaling} {operand} k={k}")
    scales = scale_exponents(torch.from_numpy(x).float(), fmt, scaling, operand)
    assert scales.dtype == torch.float32 and bool((scales > 0).all())
    per = np.ldexp(1.0, s.astype(int))
    assert set(np.unique(per).tolist()) == set(torch.unique(scales).double().tolist())


def test_mx_rule_saturates_and_clamps():
    # amax 486 (> 448 = 1.75 2^8): shared_exp = 8 - 8 = 0, the maximum element saturates to 448
    x = torch.tensor([[486.0, 1.0] + [0.0] * 30])
    q, scales = scaled_quantize(x, "e4m3", "mx")
    assert scales.tolist() == [[1.0]] and q[0, :2].tolist() == [448.0, 1.0]
    # torchao's float8 rule rounds 448/486 down to 2^-1: no saturation
    q, scales = scaled_quantize(x, "e4m3", "row")
    assert scales.tolist() == [[2.0]] and q[0, :2].tolist() == [240.0, 0.5]  # 243 -> 240 in e4m3
    # E8M0's lower end: amax 2^-140 -> shared_exp clamped to -127
    tiny = torch.tensor([[2.0**-140, 0.0]], dtype=torch.float64)
    assert scale_exponents(tiny, "e4m3", "mx").item() == 2.0**-127


# -- the L-Matmul: sums of scaled products, sequential acc= oracle -----------------------------------

def _operands(m: int, k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    a = gen.standard_normal((m, k)) * np.exp2(gen.integers(-10, 11, (m, 1))) * np.exp2(gen.integers(-3, 4, (m, k)))
    b = gen.standard_normal((k, n)) * np.exp2(gen.integers(-10, 11, (1, n))) * np.exp2(gen.integers(-3, 4, (k, n)))
    a[:, ::9] = 0.0
    b[5, :] = 0.0
    return a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("mode", MODES)
def test_acc_sequential_oracle(mode, scaling, backend):
    """acc=<fmt>: section 4's order on the scaled terms, bit for bit (K = 150: ragged mx and block groups)."""
    a, b = _operands(6, 150, 140, seed=MODES.index(mode) * 7 + SCALINGS.index(scaling))
    t = oracle_terms(a, b, "e4m3", mode, scaling)
    for acc, block in [("e8m3", 32), ("e8m3", 128), ("e4m3", 1), ("bf16", 150)]:
        total = np.zeros(t.shape[:-1], dtype=np.float32)
        with np.errstate(all="ignore"):
            for k0 in range(0, t.shape[-1], block):
                s = np.zeros_like(total)
                for kk in range(k0, min(t.shape[-1], k0 + block)):
                    s = (s + t[..., kk]).astype(np.float32)
                total = round_acc((total + s).astype(np.float32), acc)
        got = matmul(torch.from_numpy(a).float(), torch.from_numpy(b).float(), "e4m3", mode, acc=acc, acc_block=block,
                     backend=backend, scaling=scaling)
        assert_bits(got, total, f"{mode} {scaling} {backend} acc={acc}x{block}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("fmt", ["e4m3", "fp4", "e5m2"])
def test_fp32_sum_within_bound(fmt, scaling, backend):
    """acc=fp32: |C - sum T| <= K 2^-24 sum |T| + ulp, against the float64 sum of the oracle's terms."""
    a, b = _operands(7, 300, 65, seed=3 + SCALINGS.index(scaling))
    for mode in MODES:
        t = oracle_terms(a, b, fmt, mode, scaling).astype(np.float64)
        exact = t.sum(-1)
        bound = 300 * 2.0**-24 * np.abs(t).sum(-1) + np.spacing(np.abs(exact).astype(np.float32))
        got = matmul(torch.from_numpy(a).float(), torch.from_numpy(b).float(), fmt, mode, backend=backend,
                     scaling=scaling).double().numpy()
        assert np.all(np.abs(got - exact) <= bound), f"{fmt} {mode} {scaling} {backend}"
        if backend == "reference":  # the reference: the float64 sum rounded once
            assert_bits(torch.from_numpy(got).float(), exact.astype(np.float32), f"{fmt} {mode} {scaling}")


@pytest.mark.parametrize("scaling", SCALINGS)
def test_batched_broadcast_and_1d(scaling):
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 5, 40, generator=gen), torch.randn(40, 9, generator=gen)
    for x, y in [(a, b), (a[0], b.expand(2, 40, 9)), (a[0, 0], b), (a[0], b[:, 0])]:
        ref = matmul(x, y, "e4m3", backend="reference", scaling=scaling)
        for backend in ("cpu", "decompose"):
            got = matmul(x, y, "e4m3", backend=backend, scaling=scaling)
            assert got.shape == torch.matmul(x, y).shape
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# -- specs, names and bad input ---------------------------------------------------------------------

@given(fmt=st.sampled_from(["e4m3", "e5m2", "fp4", "fp16", "e3m2"]), mode=st.sampled_from(MODES),
       scaling=st.sampled_from(["none", *SCALINGS]), acc=st.sampled_from([None, "e4m3", "e8m3"]),
       block=st.sampled_from([1, 32, 128]), backend=st.sampled_from(["auto", "cpu", "triton-tc"]))
def test_name_round_trip(fmt, mode, scaling, acc, block, backend):
    spec = LMulSpec(fmt, mode, acc=acc, acc_block=block, backend=backend, scaling=scaling)
    assert LMulSpec.from_name(spec.name) == spec
    assert (scaling in spec.name.split("-")) == (scaling != "none")


def test_fp4_format():
    f = Format.parse("fp4")
    assert (f.exp_bits, f.man_bits, f.bias, f.max, f.emax) == (2, 1, 1, 6.0, 2)
    assert Format.parse("e2m1fnn") == f and f.name == "fp4" and Format.parse(f.name) == f
    vals = torch.tensor([0.25, 0.75, 1.25, 2.5, 3.5, 5.0, 7.0, -100.0, float("inf")])
    assert lmul.quantize(vals, "fp4").tolist() == [0.0, 1.0, 1.0, 2.0, 4.0, 4.0, 6.0, -6.0, 6.0]
    assert fp4_quantize(vals.double().numpy()).tolist() == [0.0, 1.0, 1.0, 2.0, 4.0, 4.0, 6.0, -6.0, 6.0]


def test_zero_nan_inf_groups():
    a = torch.ones(3, 64)
    a[0] = 0.0                     # all-zero row: scale 1, output 0
    a[1, 40] = float("nan")        # NaN in the second mx group of row 1
    a[2, 3] = float("inf")         # inf in the first mx group of row 2
    b = torch.ones(64, 2)
    for scaling in SCALINGS:
        scales = scale_exponents(a, "e4m3", scaling)
        if scaling == "mx":
            assert scales[0].tolist() == [1.0, 1.0] and math.isnan(scales[1, 1]) and math.isnan(scales[2, 0])
            assert scales[1, 0].item() == 2.0**-8
        for backend in BACKENDS:
            out = matmul(a, b, "e4m3", backend=backend, scaling=scaling)
            assert bool(out[1:].isnan().all()), (scaling, backend)
            if scaling == "tensor":  # one group: its NaN reaches every output
                assert bool(out.isnan().all())
            else:
                assert out[0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bad", [
    lambda: LMulSpec("e4m3", "bit", scaling="rows"),
    lambda: LMulSpec("e4m3", "bit", scaling=None),
    lambda: LMulSpec("fp32", "exact", scaling="row"),
    lambda: LMulSpec("bf16", "bit", scaling="mx"),
    lambda: matmul(torch.ones(2, 2), torch.ones(2, 2), "e4m3", scaling="blocks"),
    lambda: scale_exponents(torch.ones(4), "e4m3", "row"),
    lambda: scale_exponents(torch.ones(4, 4), "e4m3", "row", operand="c"),
    lambda: scaled_quantize(torch.ones(4, 4), "e4m3", "none"),
])
def test_bad_input_names_the_problem(bad):
    with pytest.raises(ValueError, match="scaling|operand|dims|fmt"):
        bad()


def test_triton_refuses_scaling():
    spec = LMulSpec("e4m3", "bit", scaling="row")
    for name in ("triton", "triton-tc"):
        why = lmul.kernels._unavailable(lmul.kernels.get("matmul", name), torch.ones(1, 1, 1), spec)
        assert why and "scaling" in why
