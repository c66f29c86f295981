"""The tensor-core kernel (lmul/kernels/triton_tc.py) against lmul.mul and the reference backend.

Without a GPU the kernel runs in Triton's CPU interpreter (the bf16/fp16 casts are checked there,
the dot runs in float32, see the module docstring); with CUDA the same checks run on the device
(``pytest -m gpu``). Single products (K = 1) are compared bit for bit, sums within the contract's
tolerance (tests/test_kernels.py). Skipped when triton is not installed.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from lmul import kernels, mul
from lmul.formats import Format, quantize
from lmul.matmul import matmul
from lmul.spec import LMulSpec
from tests.conftest import needs_cuda
from tests.test_kernels import _all_8bit_values, _assert_same_bits, _assert_within_tolerance, _edge_values

INTERPRET = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="no CUDA and TRITON_INTERPRET unset"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

# (format, mode) pairs the backend runs: bf16 dots for m <= 7, fp16 dots for fp16, bit mode m <= 4
CASES = [("e4m3", "formula"), ("e5m2", "formula"), ("e8m3", "formula"), ("bf16", "formula"), ("fp16", "formula"),
         ("e5m6", "formula"), ("e4m3", "bit"), ("e5m2", "bit"), ("e8m3", "bit"), ("e8m4", "bit")]


def _run(a, b, fmt, mode, rounding="rne", **blocks):
    """The kernel on [B, M, K] x [B, K, N] (2-D promoted), on the GPU when there is one."""
    from lmul.kernels.triton_tc import triton_tc_matmul

    spec = LMulSpec(fmt, mode, rounding=rounding, backend="triton-tc")
    a3 = (a if a.dim() == 3 else a[None]).to(DEVICE)
    b3 = (b if b.dim() == 3 else b[None]).to(DEVICE)
    out = triton_tc_matmul(a3, b3, spec, **{f"block_{k}": v for k, v in blocks.items()})
    return out.cpu().reshape(*a.shape[:-1], b.shape[-1])


@pytest.mark.parametrize("mode", ["formula", "bit"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_every_8bit_pair_bit_exact(fmt, mode):
    """All encodings x all encodings (K = 1; incl. zeros, subnormals, inf/NaN)."""
    x = torch.unique(quantize(_all_8bit_values(Format.parse(fmt)), fmt))
    a, b = x[:, None], x[None, :]
    _assert_same_bits(_run(a, b, fmt, mode, m=64, n=64), mul(a, b, fmt, mode), f"triton-tc {fmt} {mode}")


def _quantizer_probes(fmt: Format, gen: torch.Generator) -> torch.Tensor:
    """Unquantized float32 inputs: random bit patterns, and values next to every rounding boundary
    (ties, the subnormal/normal boundary and its tie, max and beyond), both signs."""
    rand = torch.randint(-(2**31), 2**31 - 1, (1200,), generator=gen, dtype=torch.int64).to(torch.int32)
    near = torch.randn(600, generator=gen) * 2.0 ** torch.randint(fmt.emin - 3, fmt.emax + 2, (600,), generator=gen)
    m, emin = fmt.man_bits, fmt.emin
    marks = [2.0**emin, (2 - 2.0**-m) * 2.0 ** (emin - 1), (1 - 2.0**-m) * 2.0**emin, fmt.max,
             fmt.max * (1 + 2.0 ** -(m + 2)), fmt.max * (1 + 2.0 ** -(m + 1)),
             1 + 2.0 ** -(m + 1), 1 + 3 * 2.0 ** -(m + 1),
             (2 - 2.0 ** -(m + 1)), 2.0**emin * (1 + 2.0 ** -(m + 1))]
    marks = torch.tensor([v for v in marks if v < 3.4e38], dtype=torch.float32)
    steps = torch.stack([torch.nextafter(marks, torch.zeros_like(marks)), marks,
                         torch.nextafter(marks, torch.full_like(marks, float("inf")))]).flatten()
    x = torch.cat([rand.view(torch.float32), near.float(), steps])
    return torch.cat([x, -x])


@pytest.mark.parametrize("rounding", ["rne", "trunc"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e8m3", "bf16", "fp16", "e5m6"])
def test_fused_quantization_matches_quantize(fmt, rounding):
    """P(x, 1) and P(x, 1.5) in formula mode reveal X: the fused quantizer equals lmul.quantize."""
    f = Format.parse(fmt)
    x = _quantizer_probes(f, torch.Generator().manual_seed(7))
    b = torch.tensor([[1.0, 1.5]])
    spec = LMulSpec(fmt, "formula", rounding=rounding)
    want = mul(x[:, None], b, spec=spec)
    _assert_same_bits(_run(x[:, None], b, fmt, "formula", rounding=rounding, m=128), want, f"{fmt} {rounding}")


@pytest.mark.parametrize("fmt,mode", CASES)
def test_edge_products_bit_exact(fmt, mode):
    """K = 1 over awkward values of the wider formats (whole exponent range, carries, specials)."""
    x = _edge_values(Format.parse(fmt), 160, torch.Generator().manual_seed(1), specials=True)
    x = torch.cat([x, torch.tensor([1.9921875, 1.5, 1.75, 3.0, 1.875, 2.0**-6, 448.0, 1.0, 2.0**-125, 2.0**126])])
    a, b = x[:, None], x[None, :]
    _assert_same_bits(_run(a, b, fmt, mode, m=64, n=64), mul(a, b, fmt, mode), f"triton-tc {fmt} {mode}")


@pytest.mark.parametrize("fmt,mode", CASES)
def test_sums_match_reference(fmt, mode):
    """Random and edge-valued sums, batch dims, M/N/K not multiples of the tiles (and K over two
    tiles), within |C - C_ref| <= K 2^-24 sum|P| + ulp."""
    gen = torch.Generator().manual_seed(3)
    f = Format.parse(fmt)
    a, b = torch.randn(2, 7, 45, generator=gen), torch.randn(2, 45, 37, generator=gen)
    _assert_within_tolerance(_run(a, b, fmt, mode, m=16, n=16, k=16), a, b, fmt, mode, "random")
    a = _edge_values(f, 5 * 40, gen, specials=True).reshape(5, 40)
    b = _edge_values(f, 40 * 33, gen, specials=True).reshape(40, 33)
    if f.exp_bits == 8:
        a, b = a.clamp(-1e18, 1e18), b.clamp(-1e18, 1e18)  # no overflow mid-sum (clamp keeps inf/NaN)
    _assert_within_tolerance(_run(a, b, fmt, mode, k=16), a, b, fmt, mode, "edge")


def test_special_rows_columns_and_zeros():
    """inf/NaN rows and columns, all-zero rows, subnormal operands (flushed), through lmul.matmul."""
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(9, 20, generator=gen), torch.randn(20, 11, generator=gen)
    a[1, 3], a[4, 0], a[6] = float("inf"), float("nan"), 0.0
    b[2, 5], b[7, 9], b[:, 2] = float("-inf"), float("nan"), 1e-40
    for fmt, mode in [("bf16", "formula"), ("e4m3", "formula"), ("e5m2", "bit"), ("fp16", "formula")]:
        out = matmul(a, b, fmt, mode, backend="triton-tc")
        _assert_within_tolerance(out, a, b, fmt, mode, f"{fmt} {mode} specials")


def test_underflow_and_top_binade_are_recomputed():
    """8 exponent bits: terms below 2^-126 (rows/columns recomputed: float32 subnormal sums are the
    reference's), subnormal bf16 right operands, and bit-mode columns with |y| near 2^127."""
    from lmul.kernels.common import underflow_risk

    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 24, generator=gen)
    b = torch.randn(24, 10, generator=gen)
    a[2] *= 2.0**-100
    b[:, 3] *= 2.0**-40
    b[:, 7] *= 2.0**-118                       # Y + (c-1) Y^ subnormal in bf16
    rows, cols = underflow_risk(a[None], b[None], -126, 7)
    assert bool(rows[0, 2] or cols[0, 3]) and bool(cols[0, 7]), (rows, cols)
    x = torch.tensor([2.0**-100, 1.5 * 2.0**-60, 2.0**-126, 1.75 * 2.0**-30, 1.0, 2.0**126, 1.9 * 2.0**126, 2.0**127])
    for fmt, mode in [("bf16", "formula"), ("e8m3", "formula"), ("e8m3", "bit")]:
        _assert_within_tolerance(matmul(a, b, fmt, mode, backend="triton-tc"), a, b, fmt, mode, f"{fmt} {mode}")
        _assert_same_bits(_run(x[:, None], x[None, :], fmt, mode), mul(x[:, None], x[None, :], fmt, mode), fmt)
        big = torch.full((3, 4), 2.0**-3)
        col = torch.tensor([[1.5 * 2.0**126, 1.0, 2.0**127, 3.0]]).expand(4, 4)
        _assert_within_tolerance(matmul(big, col, fmt, mode, backend="triton-tc"), big, col, fmt, mode, "top")


def test_layouts_and_dtypes():
    """Non-contiguous, float64 (rounded once by quantize), bf16 and fp16 inputs, empty operands."""
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(3, 40, 21, generator=gen).transpose(1, 2)       # [3, 21, 40], strided
    b = torch.randn(3, 33, 40, generator=gen).transpose(1, 2)       # [3, 40, 33]
    for x, y in [(a, b), (a.double(), b.double()), (a.bfloat16(), b.bfloat16()), (a.half(), b.half())]:
        out = matmul(x, y, "e4m3", "formula", backend="triton-tc")
        assert torch.equal(out, matmul(x.contiguous(), y.contiguous(), "e4m3", "formula", backend="triton-tc"))
        _assert_within_tolerance(out, x.float() if x.dtype != torch.float64 else x, y.float()
                                 if y.dtype != torch.float64 else y, "e4m3", "formula", str(x.dtype))
    assert matmul(torch.zeros(4, 0), torch.zeros(0, 3), "bf16", "formula", backend="triton-tc").abs().sum() == 0


def test_availability_reasons():
    x = torch.zeros(1, 1, 1, device=DEVICE)
    why = lambda fmt, mode, **kw: kernels.get("matmul", "triton-tc").unavailable(  # noqa: E731
        x, LMulSpec(fmt, mode, backend="triton-tc", **kw))
    assert why("bf16", "formula") is None and why("fp16", "formula") is None and why("e4m3", "bit") is None
    assert "bf16" in why("fp32", "formula") and "fp16" in why("fp32", "formula")
    assert "emax=128" in why("e8m3fn", "bit")
    assert "m <= 4" in why("bf16", "bit")
    assert "exact" in why("e4m3", "exact")
    assert "acc" in why("e4m3", "formula", acc="e4m3")
    assert why("fp16", "formula", offset=2.0**-12) is not None  # c 2^10 not an integer
    with pytest.raises(RuntimeError, match="triton-tc"):
        matmul(torch.ones(2, 2), torch.ones(2, 2), "fp32", "formula", backend="triton-tc")
    if INTERPRET:  # auto never runs the interpreter
        auto = kernels.get("matmul", "triton-tc").unavailable(x, LMulSpec("bf16", "formula"))
        assert auto and "named" in auto
        assert kernels.select("matmul", x, LMulSpec("bf16", "formula")).name != "triton-tc"
    assert kernels.AUTO_ORDER["matmul"].index("triton-tc") < kernels.AUTO_ORDER["matmul"].index("decompose")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fmt,mode", CASES)
def test_cuda_tiles_match_reference(fmt, mode):
    """On the device: the default (large) tiles, auto selection, shapes over several tiles."""
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(3, 300, 520, generator=gen)
    b = torch.randn(520, 260, generator=gen)
    spec = LMulSpec(fmt, mode)
    assert kernels.select("matmul", a.cuda(), spec).name == "triton-tc"
    out = matmul(a.cuda(), b.cuda(), spec=spec).cpu()
    _assert_within_tolerance(out, a, b, fmt, mode, "cuda")
