"""The reference backend ``"reference"``: the contract computed directly in torch ops (every mode,
format, accumulator and device). Every other backend is tested against it.

* L-Matmul: the exact products :func:`lmul.ops.products` of the quantized operands, accumulated in
  float64 and rounded once to float32 (``acc=None``), or in increasing ``k`` with the running sum
  rounded to ``spec.acc`` (``docs/semantics.md`` section 4). Computed in chunks so that at most
  :data:`REFERENCE_CHUNK` products are materialised at once (about 40 bytes each at peak).
* ``mul``: :func:`lmul.formats.quantize` then :func:`lmul.ops.products`.
* ``quantize``: :func:`lmul.formats.quantize`.
"""

from __future__ import annotations

from typing import Optional

import torch

from lmul.formats import quantize
from lmul.ops import products
from lmul.spec import LMulSpec

__all__ = ["REFERENCE_CHUNK", "reference_matmul", "reference_mul", "reference_quantize", "accumulate"]

REFERENCE_CHUNK = 1 << 21  # products materialised at once by the reference L-Matmul


def accumulate(prods: torch.Tensor, spec: LMulSpec, dim: int) -> torch.Tensor:
    """Sum ``prods`` (float32) along ``dim`` per ``spec.acc``."""
    if spec.acc is None:
        return prods.double().sum(dim).float()
    # reduced precision: sum blocks of acc_block consecutive k in float32, then add each block
    # sum to the running sum in increasing k order, rounding the sum to spec.acc each time
    k = prods.shape[dim]
    total = torch.zeros_like(prods.select(dim, 0)) if k else prods.sum(dim)
    for start in range(0, k, spec.acc_block):
        block = prods.narrow(dim, start, min(spec.acc_block, k - start)).sum(dim)
        total = quantize(total + block, spec.acc)
    return total


def reference_matmul(a: torch.Tensor, b: torch.Tensor, spec: LMulSpec) -> torch.Tensor:
    """[B, M, K] x [B, K, N] -> [B, M, N], chunked over batch, rows and k."""
    bsz, m, k = a.shape
    n = b.shape[-1]
    aq = quantize(a, spec.fmt, spec.rounding)
    bq = quantize(b, spec.fmt, spec.rounding)
    out = torch.zeros(bsz, m, n, dtype=torch.float32, device=a.device)
    if 0 in (bsz, m, n, k):
        return out
    # k is chunked only for float32 accumulation (reduced precision needs the whole k in order)
    k_step = k if spec.acc is not None else max(1, min(k, REFERENCE_CHUNK // n))
    rows = max(1, REFERENCE_CHUNK // (n * k_step))
    acc64 = torch.zeros(bsz, m, n, dtype=torch.float64, device=a.device) if spec.acc is None else None
    for bi in range(bsz):
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            for k0 in range(0, k, k_step):
                k1 = min(k, k0 + k_step)
                p = products(
                    aq[bi, r0:r1, k0:k1, None], bq[bi, None, k0:k1, :], spec.fmt, spec.mode, spec.offset
                )  # [rows, k_step, N]
                if acc64 is not None:
                    acc64[bi, r0:r1] += p.double().sum(1)
                else:
                    out[bi, r0:r1] = accumulate(p, spec, 1)
    return acc64.float() if acc64 is not None else out


def reference_mul(x: torch.Tensor, y: torch.Tensor, spec: LMulSpec) -> torch.Tensor:
    """Elementwise L-Mul in torch ops (broadcasting)."""
    return products(quantize(x, spec.fmt, spec.rounding), quantize(y, spec.fmt, spec.rounding), spec.fmt,
                    spec.mode, spec.offset)


def reference_quantize(x: torch.Tensor, spec: LMulSpec) -> torch.Tensor:
    """:func:`lmul.formats.quantize` (saturating) to ``spec.fmt`` with ``spec.rounding``."""
    return quantize(x, spec.fmt, spec.rounding)


def available(x: torch.Tensor, spec: LMulSpec) -> Optional[str]:
    """The reference runs everything."""
    return None
