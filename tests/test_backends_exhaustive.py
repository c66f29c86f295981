"""Every backend of every operation (quantize, mul, matmul) on every pair of operands of small
formats, rounding ties included, against the independent float64 oracles of tests/oracle.py
(nearest-value search over the decoded encodings, the spec's product formulas): issue 24.

The formats are the ones with the fewest mantissa bits, where a wrong tie rule shows at once:
m = 0 (ties follow the exponent field's parity, docs/semantics.md section 6), m = 1 and e2m1-like
fp4 formats. Operands are every value of the format, every midpoint of two neighbours (the
ties), the midpoint above the largest value, and inf/NaN; matmul with K = 1 gives one product per
output element, so it must be bit-exact as well. Also: the offset c = 1 (the default for m = 0,
allowed for every m), float8 operands (converted exactly to float32) and the largest acc_block.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmul
from lmul import kernels
from lmul.formats import Format
from lmul.spec import LMulSpec
from tests.oracle import SmallFormat, default_offset, spec_products

SMALL_FORMATS = ["e2m0", "e3m0", "e4m0", "e5m0", "e8m0", "e2m1", "e2m1fn", "e3m1fn", "e4m1", "e5m1"]
MODES = ["bit", "formula", "exact"]
MATMUL_BACKENDS = ["reference", "cpu", "decompose", "triton", "triton-tc"]
MUL_BACKENDS = ["reference", "cpu"]


def _small(fmt: str) -> SmallFormat:
    f = Format.parse(fmt)
    return SmallFormat(f.exp_bits, f.man_bits, f.finite_only)


def _operands(fmt: str) -> np.ndarray:
    """Every value, every midpoint of neighbours (ties), the tie above max, inf and NaN (float64;
    all of them float32 values)."""
    small = _small(fmt)
    pos = np.unique(np.concatenate([small.pos_vals, [small.beyond]]))
    mids = (pos[1:] + pos[:-1]) / 2
    finite = np.concatenate([small.pos_vals, mids])
    x = np.concatenate([finite, -finite, [np.inf, -np.inf, np.nan]])
    assert np.array_equal(x.astype(np.float32).astype(np.float64), x, equal_nan=True)
    return x


def _same_bits(got: torch.Tensor, want: np.ndarray, what: str, zeros_equal: bool = False) -> None:
    want_t = torch.from_numpy(np.ascontiguousarray(want, dtype=np.float32))
    assert got.shape == want_t.shape and got.dtype == torch.float32, (what, got.shape, want_t.shape, got.dtype)
    nan_g, nan_w = torch.isnan(got), torch.isnan(want_t)
    assert torch.equal(nan_g, nan_w), f"{what}: NaN positions differ ({int((nan_g ^ nan_w).sum())})"
    gb, wb = got.masked_fill(nan_g, 0).view(torch.int32), want_t.masked_fill(nan_w, 0).view(torch.int32)
    if zeros_equal:  # a sum starts from +0: the sign of a zero product is not part of the contract
        gb, wb = torch.where(gb == -(2**31), 0, gb), torch.where(wb == -(2**31), 0, wb)
    bad = gb != wb
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} differ, e.g. got {got[bad][:4].tolist()} "
                                 f"want {want_t[bad][:4].tolist()}")


def _skip_unless(op: str, backend: str, x: torch.Tensor, spec: LMulSpec) -> None:
    why = kernels.get(op, backend).unavailable(x, spec)
    if why:
        pytest.skip(f"{backend}: {why}")


def _interpreted(backend: str) -> bool:
    """The Triton backends without CUDA run in Triton's CPU interpreter (tests/conftest.py): slow."""
    return backend.startswith("triton") and not torch.cuda.is_available()


def _want_products(fmt: str, mode: str, offset: float | None, backend: str = "") -> tuple:
    """Operands (float32) and the oracle's products of every pair; in Triton's interpreter every
    value of a format with up to 128 operands, else an evenly spread 128 of them (specials kept)."""
    f = Format.parse(fmt)
    x = _operands(fmt)
    if _interpreted(backend) and len(x) > 128:
        x = np.concatenate([x[np.linspace(0, len(x) - 4, 125).astype(int)], x[-3:]])
    xq = _small(fmt).quantize(x)
    c = default_offset(f.man_bits) if offset is None else offset
    want = spec_products(xq[:, None], xq[None, :], f.exp_bits, f.man_bits, mode, c)
    xt = torch.from_numpy(x).float()
    return xt, want


@pytest.mark.parametrize("backend", MUL_BACKENDS)
@pytest.mark.parametrize("rounding", ["rne", "trunc"])
@pytest.mark.parametrize("fmt", SMALL_FORMATS)
def test_quantize_every_value_and_tie(fmt, rounding, backend):
    x = torch.from_numpy(_operands(fmt)).float()
    spec = LMulSpec(fmt, "exact", rounding=rounding)
    entry = kernels.get("quantize", backend)
    if backend == "cpu":  # the size threshold is a speed choice; call the kernel itself
        try:
            lmul.kernels.cpu_ext.load()
        except RuntimeError as err:
            pytest.skip(str(err))
    _same_bits(entry.fn(x, spec), _small(fmt).quantize(x.double().numpy(), rounding), f"{fmt} {rounding} {backend}")


@pytest.mark.parametrize("backend", MUL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", SMALL_FORMATS)
def test_mul_every_pair(fmt, mode, backend):
    xt, want = _want_products(fmt, mode, None)
    spec = LMulSpec(fmt, mode, backend=backend)
    _skip_unless("mul", backend, xt, spec)
    _same_bits(lmul.mul(xt[:, None], xt[None, :], spec=spec), want, f"mul {fmt} {mode} {backend}")


@pytest.mark.parametrize("backend", MATMUL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", SMALL_FORMATS)
def test_matmul_every_pair_single_products(fmt, mode, backend):
    xt, want = _want_products(fmt, mode, None, backend)
    spec = LMulSpec(fmt, mode, backend=backend)
    _skip_unless("matmul", backend, xt, spec)
    got = lmul.matmul(xt[:, None], xt[None, :], spec=spec)
    _same_bits(got, want, f"matmul {fmt} {mode} {backend}", zeros_equal=True)


@pytest.mark.parametrize("backend", MATMUL_BACKENDS)
@pytest.mark.parametrize("fmt", ["e3m0", "e4m0", "e5m0", "e8m0", "e2m1", "e4m1"])
def test_matmul_sums_of_ties_within_tolerance(fmt, backend):
    """K > 1 on integer and half-integer operands (many ties): the contract's tolerance against
    the float64 sum of the oracle's products (issue 24 measured relative errors up to 1.67)."""
    f = Format.parse(fmt)
    gen = torch.Generator().manual_seed(24)
    a = torch.randint(-12, 13, (9, 33), generator=gen).float() / 2
    b = torch.randint(-12, 13, (33, 70), generator=gen).float() / 2
    small = _small(fmt)
    for mode in MODES:
        spec = LMulSpec(fmt, mode, backend=backend)
        _skip_unless("matmul", backend, a, spec)
        aq, bq = small.quantize(a.double().numpy()), small.quantize(b.double().numpy())
        p = spec_products(aq[:, :, None], bq[None, :, :], f.exp_bits, f.man_bits, mode,
                          default_offset(f.man_bits)).astype(np.float64)      # [M, K, N]
        exact, mag = p.sum(1), np.abs(p).sum(1)
        got = lmul.matmul(a, b, spec=spec).double().numpy()
        tol = 33 * 2.0**-24 * mag + np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
        assert np.all(np.abs(got - exact) <= tol), (fmt, mode, backend, float(np.max(np.abs(got - exact) - tol)))


# -- the offset c = 1 (SPEC: c = 2^-l(m) with l(0) = 0; 0 <= c <= 1 for every m) ------------------------

@pytest.mark.parametrize("backend", MATMUL_BACKENDS + ["mul-" + b for b in MUL_BACKENDS])
@pytest.mark.parametrize("mode", ["bit", "formula"])
@pytest.mark.parametrize("fmt,offset", [("e4m0", 1.0), ("e4m0", 0.0), ("e5m0", 1.0), ("e4m1", 1.0),
                                        ("e3m2", 1.0), ("e4m3", 1.0), ("e2m1fn", 1.0)])
def test_offset_one_every_pair(fmt, offset, mode, backend):
    xt, want = _want_products(fmt, mode, offset, backend)
    op, name = ("mul", backend[4:]) if backend.startswith("mul-") else ("matmul", backend)
    spec = LMulSpec(fmt, mode, offset=offset, backend=name)
    _skip_unless(op, name, xt, spec)
    if op == "mul":
        _same_bits(lmul.mul(xt[:, None], xt[None, :], spec=spec), want, f"mul {fmt} c={offset} {mode} {name}")
    else:
        got = lmul.matmul(xt[:, None], xt[None, :], spec=spec)
        _same_bits(got, want, f"matmul {fmt} c={offset} {mode} {name}", zeros_equal=True)


def test_default_offset_for_m0_is_accepted_explicitly():
    """c = 2^-l(0) = 1 is the default for m = 0; giving it explicitly is the same spec."""
    assert LMulSpec("e4m0").offset == 1.0
    assert LMulSpec("e4m0", offset=1.0) == LMulSpec("e4m0")
    assert LMulSpec("e4m0", offset=1.0).name == "e4m0-bit"
    x = torch.tensor([3.0, 1.5, -6.0])
    assert torch.equal(lmul.mul(x, x, "e4m0", offset=1.0), lmul.mul(x, x, "e4m0"))
    assert LMulSpec.from_name(LMulSpec("e4m1", offset=1.0).name).offset == 1.0


def test_issue_example_e4m0_tie():
    """lmul.mul(3, 1, e4m0): 3 is the tie of 2 (exponent field 8, even) and 4 (field 9): it rounds to
    2, and 2 x 1 in bit mode is 2^(1 + 0 + 1) = 4 on every backend (the cpu backend gave 8)."""
    for backend in MUL_BACKENDS:
        assert lmul.mul(torch.tensor([3.0]), torch.tensor([1.0]), "e4m0", backend=backend).item() == 4.0
    for backend in ("reference", "cpu", "decompose"):
        assert lmul.matmul(torch.tensor([[3.0]]), torch.tensor([[1.0]]), "e4m0", backend=backend).item() == 4.0


# -- float8 operands: exactly their float32 conversion ------------------------------------------------

F8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu]


def _all_f8(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.mark.parametrize("backend", MATMUL_BACKENDS + ["mul-" + b for b in MUL_BACKENDS])
@pytest.mark.parametrize("dtype", F8, ids=str)
def test_float8_operands_equal_their_float32_conversion(dtype, backend):
    """Every value of the float8 dtype as either operand (every pair; 64 of them in Triton's
    interpreter), against its float32 conversion, and mixed with float32 operands (float8_e4m3fn x
    float32 crashed in torch's aminmax before)."""
    x8 = _all_f8(dtype)
    if _interpreted(backend):
        x8 = x8[::4]
    x32 = x8.float()
    other = torch.randn(len(x8), generator=torch.Generator().manual_seed(8))
    op, name = ("mul", backend[4:]) if backend.startswith("mul-") else ("matmul", backend)
    ran = 0
    for fmt, mode in [("e4m3", "bit"), ("bf16", "formula"), ("e5m2", "exact")]:
        spec = LMulSpec(fmt, mode, backend=name)
        if kernels.get(op, name).unavailable(x32, spec):
            continue
        ran += 1
        what = f"{dtype} {fmt} {mode} {backend}"
        if op == "matmul":
            assert torch.equal(_bits(lmul.matmul(x8[:, None], x8[None, :], spec=spec)),
                               _bits(lmul.matmul(x32[:, None], x32[None, :], spec=spec))), what
            assert torch.equal(_bits(lmul.matmul(x8[None, :], other[:, None], spec=spec)),
                               _bits(lmul.matmul(x32[None, :], other[:, None], spec=spec))), what
            assert torch.equal(_bits(lmul.matmul(other[None, :], x8[:, None], spec=spec)),
                               _bits(lmul.matmul(other[None, :], x32[:, None], spec=spec))), what
        else:
            assert torch.equal(_bits(lmul.mul(x8[:, None], x8[None, :], spec=spec)),
                               _bits(lmul.mul(x32[:, None], x32[None, :], spec=spec))), what
            assert torch.equal(_bits(lmul.mul(x8, other, spec=spec)), _bits(lmul.mul(x32, other, spec=spec))), what
            assert torch.equal(_bits(lmul.mul(other, x8, spec=spec)), _bits(lmul.mul(other, x32, spec=spec))), what
    if not ran:
        pytest.skip(f"{backend} runs none of the specs here")


@pytest.mark.parametrize("dtype", F8, ids=str)
def test_float8_quantize_equals_float32_conversion(dtype):
    x8 = _all_f8(dtype)
    x32 = x8.float()
    big8 = x8.repeat(1 << 9)  # 2^17 elements: the compiled quantizer's path
    for fmt in ("e4m3", "e5m2", "e3m0"):
        for backend in ("auto", "reference"):
            assert torch.equal(_bits(lmul.quantize(big8, fmt, backend=backend)),
                               _bits(lmul.quantize(big8.float(), fmt, backend="reference")))
        assert torch.equal(_bits(lmul.quantize(x8, fmt, overflow="ieee")),
                           _bits(lmul.quantize(x32, fmt, overflow="ieee")))


def test_float8_operands_with_gradients():
    """A float8 leaf does not take gradients in torch; a float8 operand next to one that does works."""
    x8 = torch.randn(3, 4).to(torch.float8_e4m3fn)
    w = torch.randn(4, 2, requires_grad=True)
    out = lmul.matmul(x8, w, "e4m3")
    out.sum().backward()
    assert torch.equal(out.detach(), lmul.matmul(x8.float(), w.detach(), "e4m3"))
    assert w.grad is not None and torch.equal(w.grad, x8.float().t() @ torch.ones(3, 2))


# -- acc_block: the largest value the kernels take, one block -------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu", "decompose"])
def test_largest_acc_block_is_one_block(backend):
    """acc_block = 2^63 - 1 >= K: one float32 sum rounded once to the accumulator (the defined order),
    checked against a sequential float32 sum of the oracle's products."""
    gen = torch.Generator().manual_seed(63)
    a, b = torch.randn(5, 40, generator=gen) * 4, torch.randn(40, 7, generator=gen) * 4
    spec = LMulSpec("e4m3", "bit", acc="e4m3", acc_block=2**63 - 1, backend=backend)
    _skip_unless("matmul", backend, a, spec)
    small = _small("e4m3")
    p = spec_products(small.quantize(a.double().numpy())[:, :, None], small.quantize(b.double().numpy())[None],
                      4, 3, "bit", default_offset(3))                        # [M, K, N] float32
    s = np.zeros((5, 7), np.float32)
    for k in range(40):
        s = (s + p[:, k]).astype(np.float32)
    _same_bits(lmul.matmul(a, b, spec=spec), small.quantize(s.astype(np.float64)), f"{backend}")
