"""Every fast L-Matmul backend against the reference backend and the elementwise products.

Oracles: :func:`lmul.ops.mul` (elementwise products, itself tested against torch casts and the
paper's PTX formula) and the ``"reference"`` backend (float64 sums of those products). Single
products (K = 1) must be bit-identical; sums must meet the contract's tolerance
``|C - C_ref| <= K 2^-24 sum_k |P_k| + ulp`` (docs/semantics.md section 4).
"""

from __future__ import annotations

import pytest
import torch

import lmul
from lmul import kernels, mul
from lmul.formats import Format, _quantize_torch, quantize
from lmul.matmul import matmul
from lmul.ops import products
from lmul.spec import LMulSpec, resolve_offset

FORMATS = ["e4m3", "e5m2", "e8m3", "bf16", "fp16", "fp32", "e5m6"]
MODES = ["bit", "formula", "exact"]
FAST = ["cpu", "decompose"]


def _why_not(backend: str, fmt: str, mode: str) -> str | None:
    """Why ``backend`` cannot run this config on this machine (None: it can)."""
    spec = LMulSpec(fmt, mode)
    return kernels.get("matmul", backend).unavailable(torch.zeros(1, 1, 1), spec)


def _backend_or_skip(backend: str, fmt: str, mode: str) -> None:
    why = _why_not(backend, fmt, mode)
    if why:
        if backend == "decompose" and mode == "bit":
            assert "m <= 4" in why and Format.parse(fmt).man_bits > 4, why
        pytest.skip(f"{backend}: {why}")


def _edge_values(fmt: Format, n: int, gen: torch.Generator, specials: bool) -> torch.Tensor:
    """Awkward operands: exponents across the whole format range and beyond, all-ones mantissas
    (carries, s >= 2), zeros, subnormals, float32 subnormals, and optionally inf/NaN."""
    e = torch.randint(fmt.emin - fmt.man_bits - 2, fmt.emax + 2, (n,), generator=gen)
    man = torch.rand(n, generator=gen, dtype=torch.float64) + 1.0
    man = torch.where(torch.rand(n, generator=gen) < 0.3, 2.0 - 2.0 ** -(fmt.man_bits + 1), man)
    x = man * torch.pow(2.0, e.double())
    x = torch.where(torch.rand(n, generator=gen) < 0.5, -x, x)
    pick = torch.rand(n, generator=gen)
    x = torch.where(pick < 0.05, torch.zeros_like(x), x)
    x = torch.where((pick >= 0.05) & (pick < 0.1), fmt.min_subnormal * 3.0, x)
    x = torch.where((pick >= 0.1) & (pick < 0.12), -1e-40, x)
    if specials:
        x = torch.where((pick >= 0.12) & (pick < 0.13), float("inf"), x)
        x = torch.where((pick >= 0.13) & (pick < 0.14), float("-inf"), x)
        x = torch.where((pick >= 0.14) & (pick < 0.15), float("nan"), x)
    return x.float().clamp(-3e38, 3e38) if not specials else x.float()


def _assert_same_bits(out: torch.Tensor, want: torch.Tensor, what: str) -> None:
    nan_o, nan_w = torch.isnan(out), torch.isnan(want)
    assert torch.equal(nan_o, nan_w), f"{what}: NaN positions differ ({int((nan_o ^ nan_w).sum())})"
    ob = out.masked_fill(nan_o, 0).view(torch.int32)
    wb = want.masked_fill(nan_w, 0).view(torch.int32)
    # +0 and -0 are the same sum (a matmul starts from +0)
    ob = torch.where(ob == -(2**31), 0, ob)
    wb = torch.where(wb == -(2**31), 0, wb)
    bad = ob != wb
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} products differ, e.g. got {out[bad][:4].tolist()} want {want[bad][:4].tolist()}")


def _assert_within_tolerance(out, a, b, fmt, mode, what):
    """|C - C_ref| <= K 2^-24 sum|P| + ulp(C_ref) (+ one float32 subnormal step per product)."""
    ref = matmul(a, b, fmt, mode, backend="reference")
    assert out.shape == ref.shape and out.dtype == torch.float32, (out.shape, ref.shape, out.dtype)
    fmt = Format.parse(fmt)
    c = resolve_offset(fmt, mode)
    a3 = quantize(a, fmt) if a.dim() > 1 else quantize(a, fmt)[None]
    b3 = quantize(b, fmt)
    p = products(a3[..., :, :, None], (b3 if b.dim() > 1 else b3[:, None])[..., None, :, :], fmt, mode, c)
    sabs = p.double().abs().sum(-2).reshape(ref.shape) if p.numel() else torch.zeros(ref.shape, dtype=torch.float64)
    k = a.shape[-1]
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{what}: NaN positions differ"
    assert torch.equal(out[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)]), f"{what}: inf differ"
    ulp = torch.nextafter(ref.abs(), torch.tensor(float("inf"))) - ref.abs()
    tol = k * 2.0**-24 * sabs + ulp.double() + k * 2.0**-149
    err = (out.double() - ref.double()).abs()
    bad = finite & (err > tol)
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} sums beyond tolerance, worst {float((err - tol).max())}"


# -- single products: bit-identical to lmul.mul ------------------------------------------------

def _operand_values(fmt: Format) -> torch.Tensor:
    if fmt.bits <= 8:  # every encoding (exhaustive), decoded through quantize of a wide sweep
        return torch.unique(quantize(torch.cat([_all_8bit_values(fmt)]), fmt))
    gen = torch.Generator().manual_seed(1)
    return torch.cat([_edge_values(fmt, 400, gen, specials=True),
                      torch.tensor([1.9921875, 1.5, 1.75, 3.0, 4.0, 1.875, 2.0**-6, 448.0, 1.0])])


def _all_8bit_values(fmt: Format) -> torch.Tensor:
    """Every value of an 8-bit format, built from its fields (sign, exponent, mantissa)."""
    vals = []
    for s in (1.0, -1.0):
        for field in range(2**fmt.exp_bits):
            for mfield in range(2**fmt.man_bits):
                if field == 0:
                    v = mfield * 2.0 ** (fmt.emin - fmt.man_bits)
                else:
                    v = (1 + mfield / 2**fmt.man_bits) * 2.0 ** (field - fmt.bias)
                vals.append(s * v)
    x = torch.tensor(vals, dtype=torch.float64)
    return torch.cat([x, torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=torch.float64)]).float()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_single_products_bit_exact(backend, fmt, mode):
    """K = 1: C[i, j] is one product, which must equal lmul.mul bit for bit."""
    _backend_or_skip(backend, fmt, mode)
    f = Format.parse(fmt)
    x = _operand_values(f)
    a, b = x[:, None], x[None, :]
    out = matmul(a, b, fmt, mode, backend=backend)
    want = mul(a, b, fmt, mode)
    if mode == "formula":
        # two exact partial products summed once: identical except where the smaller partial
        # product (>= 2^-4 2^(xe+ye) > |P| 2^-6) falls below float32's normal range 2^-126; then
        # each half is rounded to a subnormal (2^-150 each) and the sum once more (< 2^-143)
        tiny = want.abs() < 2.0**-120
        _assert_same_bits(out.masked_fill(tiny, 0), want.masked_fill(tiny, 0), f"{backend} {fmt} {mode}")
        assert float((out - want)[tiny].abs().max().nan_to_num(0)) <= 2.0**-142
    else:
        _assert_same_bits(out, want, f"{backend} {fmt} {mode}")


# -- sums: within the contract's tolerance ---------------------------------------------------

SHAPES = [
    ((5, 123), (123, 77)),            # odd sizes, not multiples of any block
    ((1, 300), (300, 65)),            # one row, strip + 1 columns
    ((3, 1, 40), (40, 70)),           # batched, one row each
    ((2, 3, 17, 9), (3, 9, 130)),     # batch broadcast
    ((7, 600), (600, 5)),             # K over two k blocks
    ((64,), (64, 33)),                # 1-D left operand
    ((20, 64), (64,)),                # 1-D right operand
]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_random_matches_reference(backend, fmt, mode):
    _backend_or_skip(backend, fmt, mode)
    gen = torch.Generator().manual_seed(7)
    for sa, sb in SHAPES:
        a = torch.randn(sa, generator=gen) * 3
        b = torch.randn(sb, generator=gen)
        _assert_within_tolerance(matmul(a, b, fmt, mode, backend=backend), a, b, fmt, mode, f"{sa}x{sb}")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_edge_values_match_reference(backend, fmt, mode):
    """Huge/tiny exponents (products over- and underflowing float32), carries, zeros, subnormals."""
    _backend_or_skip(backend, fmt, mode)
    gen = torch.Generator().manual_seed(11)
    f = Format.parse(fmt)
    a = _edge_values(f, 9 * 70, gen, specials=False).reshape(9, 70)
    b = _edge_values(f, 70 * 67, gen, specials=False).reshape(70, 67)
    if f.exp_bits == 8:  # keep the sums of finite products finite (no overflow mid-sum)
        a, b = a.clamp(-1e18, 1e18), b.clamp(-1e18, 1e18)
    _assert_within_tolerance(matmul(a, b, fmt, mode, backend=backend), a, b, fmt, mode, "edge")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "bf16", "fp32"])
def test_inf_nan_rows_and_columns(backend, fmt, mode):
    """inf/NaN anywhere: the affected rows/columns follow the contract exactly (reference)."""
    _backend_or_skip(backend, fmt, mode)
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(6, 50, generator=gen)
    b = torch.randn(50, 70, generator=gen)
    a[1, 3], a[4, 0], a[4, 9] = float("inf"), float("nan"), float("-inf")
    b[7, 5], b[2, 66], b[0, 66] = float("-inf"), float("nan"), 0.0
    a[2, 7] = 0.0  # 0 x -inf
    b[7, 6] = float("inf")
    _assert_within_tolerance(matmul(a, b, fmt, mode, backend=backend), a, b, fmt, mode, "specials")


@pytest.mark.parametrize("backend", FAST)
def test_layouts_and_empty(backend):
    """Non-contiguous (transposed, sliced) and float64/bf16 operands; empty dimensions."""
    _backend_or_skip(backend, "bf16", "formula")
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(90, 40, generator=gen).t()          # [40, 90] non-contiguous
    b = torch.randn(100, 90, generator=gen)[::2].t()    # [90, 50] strided
    for mode in ("formula", "exact") + (("bit",) if backend == "cpu" else ()):
        _assert_within_tolerance(matmul(a, b, "bf16", mode, backend=backend), a, b, "bf16", mode, mode)
        a64 = a.double() * 1.0001  # quantized from float64 directly (no double rounding)
        _assert_within_tolerance(matmul(a64, b, "bf16", mode, backend=backend), a64, b, "bf16", mode, "f64")
        abf = a.to(torch.bfloat16)
        _assert_within_tolerance(matmul(abf, b, "bf16", mode, backend=backend), abf.float(), b, "bf16", mode, "bf")
    for sa, sb in [((0, 5), (5, 3)), ((4, 0), (0, 3)), ((4, 5), (5, 0))]:
        out = matmul(torch.ones(sa), torch.ones(sb), "bf16", "formula", backend=backend)
        assert torch.equal(out, torch.matmul(torch.ones(sa), torch.ones(sb)))


def test_trunc_rounding_and_offsets():
    """rounding='trunc' and non-default offsets go through every backend that accepts them."""
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randn(7, 45, generator=gen), torch.randn(45, 21, generator=gen)
    for backend in FAST:
        for mode, fmt, offset in [("bit", "e4m3", 0.0), ("formula", "bf16", 0.25), ("bit", "bf16", 0.5)]:
            if _why_not(backend, fmt, mode):
                continue
            out = matmul(a, b, fmt, mode, offset=offset, rounding="trunc", backend=backend)
            ref = matmul(a, b, fmt, mode, offset=offset, rounding="trunc", backend="reference")
            assert float((out - ref).abs().max()) <= 45 * 2.0**-24 * float(ref.abs().max() + 1) * 8


# -- selection -----------------------------------------------------------------------------------

def test_auto_and_explicit_selection():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    # reduced-precision accumulation: the fast backends implement it bit for bit (tests/test_acc.py)
    assert torch.equal(matmul(a, b, "e4m3", acc="e4m3"), matmul(a, b, "e4m3", acc="e4m3", backend="reference"))
    for backend in FAST:
        assert torch.equal(matmul(a, b, "e4m3", acc="e4m3", backend=backend),
                           matmul(a, b, "e4m3", acc="e4m3", backend="reference"))
    with pytest.raises(RuntimeError, match="m <= 4"):
        matmul(a, b, "bf16", "bit", backend="decompose")
    with pytest.raises(RuntimeError, match="2\\^-23"):
        matmul(a, b, "bf16", "formula", offset=0.1, backend="decompose")
    with pytest.raises(ValueError, match="unknown backend"):
        matmul(a, b, backend="nope")


def test_backends_listing():
    rows = {r["name"]: r for r in lmul.backends("matmul")}
    assert {"reference", "cpu", "decompose"} <= set(rows)
    assert rows["reference"]["available"] and rows["decompose"]["available"]
    for r in rows.values():
        assert r["available"] or r["reason"], r


def test_cpu_quantizer_matches_quantize():
    """The C++ fused quantizer equals lmul.formats.quantize bit for bit."""
    _backend_or_skip("cpu", "bf16", "bit")
    from lmul.kernels.cpu_ext import quantize_cpu

    gen = torch.Generator().manual_seed(2)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.randn(10_000, generator=gen),
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 448.0, 464.0, 3.4e38, 1e-45])])
    for fmt in FORMATS + ["e2m1", "e3m0", "e8m0", "e1m5", "e4m3ieee"]:
        for rounding in ("rne", "trunc"):
            f = Format.parse(fmt)
            want = _quantize_torch(x, f, rounding, "saturate")  # the torch implementation, not a fast path
            _assert_same_bits(quantize_cpu(x, f, rounding), want, f"{fmt} {rounding}")
            _assert_same_bits(quantize(x, f, rounding), want, f"{fmt} {rounding} (lmul.formats.quantize)")


# -- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_matmul_gradient_is_straight_through(mode):
    """dA = dC @ B_q^T and dB = A_q^T @ dC, checked against float64 by hand, with broadcasting."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 5, 7, generator=gen, requires_grad=True)
    b = torch.randn(7, 4, generator=gen, requires_grad=True)
    g = torch.randn(3, 5, 4, generator=gen)
    out = matmul(a, b, "e4m3", mode)
    assert torch.equal(out.detach(), matmul(a.detach(), b.detach(), "e4m3", mode))
    out.backward(g)
    aq, bq = quantize(a.detach(), "e4m3").double(), quantize(b.detach(), "e4m3").double()
    want_a = g.double() @ bq.T
    want_b = (aq.transpose(-1, -2) @ g.double()).sum(0)
    torch.testing.assert_close(a.grad.double(), want_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), want_b, rtol=1e-6, atol=1e-6)


def test_matmul_gradient_vector_operands():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(6, generator=gen, requires_grad=True)
    b = torch.randn(6, 3, generator=gen, requires_grad=True)
    matmul(a, b, "bf16", "bit").sum().backward()
    torch.testing.assert_close(a.grad.double(), quantize(b.detach(), "bf16").double().sum(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), quantize(a.detach(), "bf16").double()[:, None].expand(6, 3),
                               rtol=1e-6, atol=1e-6)


def test_mul_gradient_is_straight_through():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    out = mul(x, y, "bf16", "bit")
    assert torch.equal(out.detach(), mul(x.detach(), y.detach(), "bf16", "bit"))
    g = torch.randn(4, 5, generator=gen)
    out.backward(g)
    xq, yq = quantize(x.detach(), "bf16").double(), quantize(y.detach(), "bf16").double()
    assert x.grad.dtype == torch.float64
    torch.testing.assert_close(x.grad, g.double() * yq)
    torch.testing.assert_close(y.grad, (g.double() * xq).sum(0))


@pytest.mark.parametrize("fmt,offset", [("e8m4", None), ("e8m2", None), ("e8m3", 0.875), ("e8m4", 0.9375)])
@pytest.mark.parametrize("acc", [None, "e8m7"])
@pytest.mark.parametrize("backend", FAST)
def test_bit_carry_of_two_near_the_top_binade(fmt, offset, acc, backend):
    """Bit mode with a mantissa carry of 2 (q = 2: m = 4's default offset 2^-3, or a large offset):
    the carry factor g reaches 4..8, so a decomposition forming Y^ g overflows float32 already for
    |y| in [2^126, 2^127) while the product with a tiny x is finite. Regression test (decompose
    checked only |y| >= 2^127); the oracle is the elementwise L-Mul summed in float64."""
    kw = {} if offset is None else {"offset": offset}
    spec = LMulSpec(fmt, "bit", acc=acc, **kw)
    if (why := _why_not(backend, fmt, "bit")) is not None:
        pytest.skip(why)
    top = 1.0 + (1 - 2.0**-spec.fmt.man_bits)  # the largest mantissa: S = 2 (2^m - 1) + c 2^m
    a = torch.tensor([[2.0**-100 * top, 2.0**-100]])  # small rows: no overflow risk of the sum
    b = torch.tensor([[2.0**126 * top, 2.0**126], [2.0**126, 2.0**126 * top]])
    want = (mul(a[0, :, None].expand(2, 2), b, spec=LMulSpec(fmt, "bit", **kw)).double().sum(0)).float()
    got = matmul(a, b, spec=spec, backend=backend)[0]
    if acc is None:
        assert torch.equal(got, want), (got, want)
    assert torch.isfinite(got).all() and torch.equal(got, matmul(a, b, spec=spec, backend="reference")[0])


@pytest.mark.parametrize("fmt", ["bf16", "e8m3", "fp32"])
@pytest.mark.parametrize("backend", FAST)
def test_formula_products_in_float32_subnormals_are_exact(fmt, backend):
    """Formula mode splits a product into two float32 terms, X Y^ + X^ (Y + (c-1) Y^). Where
    xe + ye < -126 each term rounds on its own in float32's subnormals and their sum can miss the
    once-rounded product by an ulp (found by tests/test_fuzz.py: bf16, 2^-70 x 2^-70). Such rows
    are recomputed by the reference; with K = 1 every entry is a single product, bit for bit the
    elementwise L-Mul (lmul.mul), whose oracle is float64."""
    if (why := _why_not(backend, fmt, "formula")) is not None:
        pytest.skip(why)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 1, generator=g) * 2.0**-70
    b = torch.randn(1, 7, generator=g) * 2.0**-70
    b[0, 0] = 1.0  # a column of normal products beside the subnormal ones
    spec = LMulSpec(fmt, "formula")
    want = mul(a.expand(6, 7), b.expand(6, 7), spec=spec)
    assert (want[:, 1:].abs() < 2.0**-126).all() and (want[:, 1:] != 0).all()  # the case at hand
    got = matmul(a, b, spec=spec, backend=backend)
    assert torch.equal(got, want), (got - want).abs().max()
