"""The Triton kernel (lmul/kernels/triton_lmul.py) against lmul.mul and the reference backend.

Without a GPU the kernel runs in Triton's CPU interpreter (tiny shapes); with CUDA the same
checks run on the device. Skipped when triton is not installed (``pip install 'lmul[gpu]'``).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from lmul import mul
from lmul.formats import Format, quantize
from lmul.matmul import matmul
from lmul.spec import LMulSpec
from tests.conftest import needs_cuda
from tests.test_kernels import _all_8bit_values, _assert_same_bits, _assert_within_tolerance, _edge_values

# No GPU: run the kernel in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
# anything imports triton, which is when triton reads it).
INTERPRET = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    # the interpreter runs in numpy: float64 -> float32 overflow to inf is intended here
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CUDA present, or TRITON_INTERPRET unset")

FORMATS = ["e4m3", "e5m2", "e8m3", "bf16", "fp16", "fp32", "e5m6"]
MODES = ["bit", "formula", "exact"]


def _run(a, b, fmt, mode, device="cpu", **kw):
    from lmul.kernels.triton_lmul import triton_matmul

    spec = LMulSpec(fmt, mode)
    a3 = (a if a.dim() == 3 else a[None]).to(device)
    b3 = (b if b.dim() == 3 else b[None]).to(device)
    return triton_matmul(a3, b3, spec, **kw).cpu().reshape(*a.shape[:-1], b.shape[-1])


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_single_products_bit_exact(fmt, mode):
    f = Format.parse(fmt)
    if f.bits <= 8:
        x = torch.unique(quantize(_all_8bit_values(f), f))[::3]  # a third of all encodings (interpreter time)
    else:
        x = _edge_values(f, 150, torch.Generator().manual_seed(1), specials=True)
    a, b = x[:, None], x[None, :]
    _assert_same_bits(_run(a, b, fmt, mode), mul(a, b, fmt, mode), f"triton {fmt} {mode}")


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_sums_match_reference(fmt, mode):
    gen = torch.Generator().manual_seed(3)
    f = Format.parse(fmt)
    a = torch.randn(2, 7, 45, generator=gen)
    b = torch.randn(2, 45, 37, generator=gen)
    _assert_within_tolerance(_run(a, b, fmt, mode), a, b, fmt, mode, "random")
    a = _edge_values(f, 5 * 40, gen, specials=True).reshape(5, 40)
    b = _edge_values(f, 40 * 33, gen, specials=True).reshape(40, 33)
    if f.exp_bits == 8:
        a, b = a.clamp(-1e18, 1e18), b.clamp(-1e18, 1e18)  # no overflow mid-sum (clamp keeps inf/NaN)
    _assert_within_tolerance(_run(a, b, fmt, mode, block_k=16), a, b, fmt, mode, "edge")


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_matches_reference(fmt, mode):
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 70, 130, generator=gen)
    b = torch.randn(130, 65, generator=gen)
    out = matmul(a.cuda(), b.cuda(), fmt, mode, backend="triton").cpu()
    _assert_within_tolerance(out, a, b, fmt, mode, "cuda")
    x = _edge_values(Format.parse(fmt), 300, gen, specials=True)
    _assert_same_bits(_run(x[:, None], x[None, :], fmt, mode, device="cuda"), mul(x[:, None], x[None, :], fmt, mode),
                      "cuda products")
