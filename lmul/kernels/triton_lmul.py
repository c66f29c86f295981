"""GPU backend ``"triton"``: one Triton kernel computing exact L-Mul products per (i, k, j) and
summing them in float32 (CUDA cores), for every mode and every m, special values included.

Per product, from the float32 bits of the quantized operands ``[s|eeeeeeee|mmm...]``:

* ``bit``: mantissa fields (top m of 23 bits) add with the offset, ``S = Mx + My + off``, carry
  ``q = S >> 23`` into the exponent field ``f = fx + fy - 127 + q``; when 1 <= f <= 254 the product
  is the bit pattern ``(f << 23) | (S mod 2^23)`` (paper Figure 2); otherwise it is rounded once
  from float64 (subnormal results) or is inf.
* ``formula``: ``(2^23 + Mx + My + off) 2^(xe + ye - 23)`` evaluated in float64 (exact) and
  rounded once to float32.
* ``exact``: the float32 product of the quantized operands (rounded once).
* zero/subnormal operands flush to a signed zero, NaN and inf x 0 give NaN, inf x nonzero gives
  inf (``x * y`` of the flushed operands, as ``lmul.ops.products``).

Operands are quantized by :func:`lmul.formats.quantize` (torch ops on the device) first; the
operand split and the products are fused in the kernel. Tile ``BLOCK_M x BLOCK_N`` accumulators,
k in steps of ``BLOCK_K`` as a [BM, BK, BN] broadcast reduced over k.

Triton is optional (``pip install lmul[gpu]``) and imported on first use only. The kernel also
runs in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors), which the tests use to check
it against the reference backend without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

from lmul.formats import quantize
from lmul.kernels.common import spec_unsupported
from lmul.spec import MODE_CODES, LMulSpec

__all__ = ["triton_matmul", "machine", "unavailable", "DESCRIPTION"]

DESCRIPTION = "Triton GPU kernel: exact per-product L-Mul (bit/formula/exact, any m), float32 sums"


@functools.cache
def _kernel():
    """The jitted kernel (Triton's CPU interpreter version when TRITON_INTERPRET=1 was set
    before triton was first imported: that is when triton decides)."""
    import triton

    from lmul.kernels._triton_kernel import lmul_kernel

    return triton.jit(lmul_kernel)


def triton_matmul(a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, block_m: int = 32, block_n: int = 32,
                  block_k: int = 8) -> torch.Tensor:
    """[B, M, K] x [B, K, N] -> [B, M, N] float32 with the kernel above (CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1)."""
    aq = quantize(a.detach(), spec.fmt, spec.rounding)
    bq = quantize(b.detach(), spec.fmt, spec.rounding)
    bsz, m, k = aq.shape
    n = bq.shape[-1]
    out = torch.zeros(bsz, m, n, dtype=torch.float32, device=a.device)
    if 0 in (bsz, m, n, k):
        return out
    off = int(spec.offset * 2**23) if spec.mode != "exact" else 0
    grid = ((m + block_m - 1) // block_m, (n + block_n - 1) // block_n, bsz)
    _kernel()[grid](aq, bq, out, m, n, k, *aq.stride(), *bq.stride(), *out.stride(),
                    MODE=MODE_CODES[spec.mode], EMIN_FIELD=spec.fmt.emin + 127, OFFS=off,
                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def machine() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'lmul[gpu]')"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs a CUDA device (or TRITON_INTERPRET=1 for Triton's CPU interpreter)"
    return None


def unavailable(a: torch.Tensor, spec: LMulSpec) -> Optional[str]:
    why = spec_unsupported(spec)
    if why:
        return why
    why = machine()
    if why:
        return why
    if a.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"operands are on {a.device}; the Triton kernel runs on CUDA (or in the interpreter)"
    return None

