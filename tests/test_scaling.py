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


# The fused C++ scaled operands (lmul.kernels.cpu_ext.scaled_operand, used by the cpu and decompose
# backends on CPU float32/16 tensors) against lmul.scaling's torch path, bit for bit (NaN positions
# equal): the group scales, x 2^-s, the wide operands and whole scaled L-Matmuls.

def _hostile(shape: tuple, seed: int, kind: str) -> torch.Tensor:
    """``mild``: randn with a few all-zero rows/columns and a NaN; ``hostile``: exponents over
    float32's whole range, float32 subnormals, values near float32's max, ±inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    n = flat.numel()
    pick = lambda k: torch.randint(0, n, (k,), generator=g)  # noqa: E731
    if kind == "mild":
        if x.shape[-2] > 2 and x.shape[-1] > 2:
            x[..., 1, :] = 0.0
            x[..., :, 2] = 0.0
        if n > 50:
            flat[pick(1)] = float("nan")
        return x
    flat.mul_(torch.exp2(torch.randint(-150, 128, (n,), generator=g).float()))
    flat[pick(max(1, n // 20))] = torch.randn(max(1, n // 20), generator=g) * 2.0**-140   # float32 subnormals
    flat[pick(max(1, n // 50))] = 3.3e38 * torch.sign(torch.randn(max(1, n // 50), generator=g))
    flat[pick(max(1, n // 10))] = 0.0
    for v in (float("nan"), float("inf"), -float("inf")):
        if n > 200:
            flat[pick(1)] = v
    return x


def _torch_path(monkeypatch) -> None:
    monkeypatch.setattr(lmul.scaling, "_fusable", lambda x: False)


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert_bits(got.float().reshape(-1), want.float().reshape(-1).numpy(), what)


FUSED_SHAPES = [(37, 300), (2, 130, 77), (1, 1), (5, 64), (129, 33)]


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "fp4"])
@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("kind", ["mild", "hostile"])
def test_fused_operand_matches_torch(fmt, scaling, kind, monkeypatch):
    from lmul.scaling import _finite_exponents, _fused, _wide_operand, wide_format

    f = Format.parse(fmt)
    for seed, shape in enumerate(FUSED_SHAPES):
        x = _hostile(shape, seed, kind)
        for operand in ("a", "b"):
            what = f"{fmt} {scaling} {kind} {shape} {operand}"
            y, scales, bad, s_range = _fused(x, f, scaling, operand, "rne", "scaled")
            assert bad is False
            want_scales = scale_exponents(x, fmt, scaling, operand)
            _assert_same(scales, want_scales, what + " scales")
            assert s_range == _finite_exponents(want_scales), what
            _assert_same(y, x / _per_element(want_scales, x, scaling, operand), what + " x 2^-s")
            for mode in ("exact", "bit", "formula"):
                for rounding in ("rne", "trunc"):
                    spec = LMulSpec(fmt, mode, rounding=rounding, scaling=scaling)
                    got = _fused(x, f, scaling, operand, rounding, "wide" if mode == "exact" else "wide_flush")
                    with monkeypatch.context() as m:
                        _torch_path(m)
                        want = _wide_operand(x, spec, operand)
                    assert got[2] == (want is None), (what, mode, rounding)
                    if want is not None:
                        assert got[0].dtype == torch.float32 and wide_format(fmt).man_bits == f.man_bits
                        _assert_same(got[0], want, f"{what} {mode} {rounding} w")


def _per_element(scales: torch.Tensor, x: torch.Tensor, scaling: str, operand: str) -> torch.Tensor:
    """Each element's group scale from the compact ones (a layout independent of lmul.scaling)."""
    if scaling == "tensor":
        return scales.expand(x.shape)
    d0, d1 = x.shape[-2:]
    g = {"row": d1 if operand == "a" else d0, "block": 128, "mx": 32}[scaling]
    if operand == "a":
        return scales.repeat_interleave(g, dim=-1)[..., :d1]
    r = 128 if scaling == "block" else 1
    return scales.repeat_interleave(g, dim=-2)[..., :d0, :].repeat_interleave(r, dim=-1)[..., :d1]


def _matmul_both(a, b, fmt, mode, scaling, rounding, backend, monkeypatch, acc="fp32"):
    got = matmul(a, b, fmt, mode, rounding=rounding, backend=backend, scaling=scaling, acc=acc)
    with monkeypatch.context() as m:
        _torch_path(m)
        want = matmul(a, b, fmt, mode, rounding=rounding, backend=backend, scaling=scaling, acc=acc)
    _assert_same(got, want, f"{backend} {fmt} {mode} {scaling} {rounding} acc={acc}")


@pytest.mark.parametrize("backend", ["cpu", "decompose"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "fp4"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_matmul_matches_torch_path(backend, fmt, mode, monkeypatch):
    for seed, (ash, bsh) in enumerate([((19, 300), (300, 37)), ((2, 3, 129), (129, 66)), ((3, 1, 40), (3, 40, 130))]):
        for kind, rounding in (("mild", "rne"), ("hostile", "trunc")):
            a, b = _hostile(ash, 2 * seed, kind), _hostile(bsh, 2 * seed + 1, kind)
            for scaling in SCALINGS:
                _matmul_both(a, b, fmt, mode, scaling, rounding, backend, monkeypatch)
        _matmul_both(a, b, fmt, mode, SCALINGS[seed], "rne", backend, monkeypatch, acc="e5m2")


def test_fused_matmul_dtypes(monkeypatch):
    """float16/bfloat16 operands (converted exactly) take the fused path, float64 the torch path."""
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        a, b = _hostile((33, 200), 0, "mild").to(dtype), _hostile((200, 65), 1, "mild").to(dtype)
        assert lmul.scaling._fusable(a) == (dtype != torch.float64)
        for scaling in SCALINGS:
            for mode in MODES:
                _matmul_both(a, b, "e4m3", mode, scaling, "rne", "cpu", monkeypatch)
    a, bt = _hostile((33, 200), 2, "mild"), _hostile((65, 200), 3, "mild")
    for scaling in SCALINGS:   # a transposed (non-contiguous) right operand
        _matmul_both(a, bt.t(), "e4m3", "bit", scaling, "rne", "cpu", monkeypatch)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_fused_operand_threads(scaling, monkeypatch):
    """Operands large enough for the fused pass to use every thread (its parallel reductions)."""
    from lmul.scaling import _fused, _wide_operand

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        x = _hostile((2, 300, 520), 7, "mild")
        x[1, 5:40, 100:200] = 0.0
        for operand in ("a", "b"):
            spec = LMulSpec("e4m3", "exact", scaling=scaling)
            got = _fused(x, spec.fmt, scaling, operand, "rne", "wide")
            _assert_same(got[1], scale_exponents(x, "e4m3", scaling, operand), f"{scaling} {operand} scales")
            with monkeypatch.context() as m:
                _torch_path(m)
                want = _wide_operand(x, spec, operand)
            assert want is not None and not got[2]
            _assert_same(got[0], want, f"{scaling} {operand} w")
    finally:
        torch.set_num_threads(threads)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 100),
       scaling=st.sampled_from(SCALINGS), fmt=st.sampled_from(["e4m3", "e5m2", "fp4"]), mode=st.sampled_from(MODES),
       rounding=st.sampled_from(["rne", "trunc"]), kind=st.sampled_from(["mild", "hostile"]),
       spread=st.integers(0, 60), backend=st.sampled_from(["cpu", "decompose"]))
def test_fused_matmul_matches_torch_path_random(seed, m, k, n, scaling, fmt, mode, rounding, kind, spread, backend):
    g = torch.Generator().manual_seed(seed)
    a, b = _hostile((m, k), seed, kind), _hostile((k, n), seed + 1, kind)
    a *= torch.exp2(torch.randint(-spread, spread + 1, (m, 1), generator=g).float())   # rows/columns apart
    b *= torch.exp2(torch.randint(-spread, spread + 1, (1, n), generator=g).float())
    with pytest.MonkeyPatch.context() as mp:
        _matmul_both(a, b, fmt, mode, scaling, rounding, backend, mp)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "fp4", "e3m2", "e2m3", "e5m1"])
@pytest.mark.parametrize("rounding", ["rne", "trunc"])
def test_fast_quantizer_matches_quantize(fmt, rounding):
    """The fused pass's quantizer against the C++ one and lmul.formats.quantize on every float32
    whose low 16 bits are one of a few patterns (each exponent, sign and high mantissa)."""
    import ctypes

    from lmul.kernels import cpu_ext

    hi = torch.arange(1 << 16, dtype=torch.int64) << 16
    lows = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234, 0xBEEF], dtype=torch.int64)
    bits = (hi[:, None] | lows[None, :]).reshape(-1)
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32).contiguous()
    f = Format.parse(fmt)
    out = torch.empty_like(x)
    lib = cpu_ext.load()
    assert lib.lmul_quantize_fast(cpu_ext._ptr(x), ctypes.c_int64(x.numel()), cpu_ext._ptr(out),
                                  ctypes.byref(cpu_ext._qparams(f, rounding))) == 1
    _assert_same(out, cpu_ext.quantize_cpu(x, f, rounding), f"{fmt} {rounding} vs C++")
    _assert_same(out, lmul.quantize(x, fmt, rounding=rounding), f"{fmt} {rounding} vs quantize")


def test_wide_scratch_is_trusted_only_untouched():
    """The exact-mode kernel skips quantizing an operand only while it is the untouched scratch
    buffer the fused pass filled with wide-format values."""
    from lmul.kernels import cpu_ext
    from lmul.scaling import _fused, wide_format

    x = _hostile((16, 64), 0, "mild")
    wide = wide_format("e4m3")
    w = _fused(torch.randn(16, 64), Format.parse("e4m3"), "mx", "a", "rne", "wide", True)[0]
    assert cpu_ext._in_format(w, wide) is True
    assert cpu_ext._in_format(w, Format.parse("e4m3")) is None
    assert cpu_ext._in_format(w.clone(), wide) is None
    assert cpu_ext._in_format(w[1:], wide) is None
    w2 = _fused(x, Format.parse("e4m3"), "mx", "a", "rne", "wide", True)[0]
    assert cpu_ext._in_format(w2, wide) is False          # holds NaN: prepared as usual
    w2.add_(0.1)
    assert cpu_ext._in_format(w2, wide) is None           # written since
    _fused(x, Format.parse("e4m3"), "mx", "a", "rne", "scaled", True)
    assert cpu_ext._in_format(w2, wide) is None
    cpu_ext.release_workspace()
    assert cpu_ext._in_format(w, wide) is None


def test_fused_matmul_inference_mode(monkeypatch):
    """Under torch.inference_mode (tensors without a version counter) the scratch operands stay
    ordinary tensors, so the exact kernel still trusts them; the bits are the torch path's."""
    from lmul.kernels import cpu_ext

    a, b = _hostile((40, 300), 4, "mild"), _hostile((300, 70), 5, "mild")
    with torch.inference_mode():
        ai, bi = a.clone(), b.clone()
        for scaling in SCALINGS:
            for mode in MODES:
                _matmul_both(ai, bi, "e4m3", mode, scaling, "rne", "cpu", monkeypatch)
        lmul.scaling._wide_operand(ai, LMulSpec("e4m3", "exact", scaling="mx"), "a")
        w = cpu_ext._WORKSPACE.known["scaled_a"][0]
        assert not w.is_inference()
