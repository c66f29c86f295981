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

from lmul.formats import BF16, E4M3, E5M2, FP16, Format, quantize
from lmul.ops import products
from lmul.spec import LMulSpec

__all__ = ["REFERENCE_CHUNK", "reference_matmul", "reference_mul", "reference_quantize", "accumulate",
           "Accumulator", "round_acc"]

REFERENCE_CHUNK = 1 << 21  # products materialised at once by the reference L-Matmul


_CASTS = {E4M3: torch.float8_e4m3fn, E5M2: torch.float8_e5m2, BF16: torch.bfloat16, FP16: torch.float16}


def round_acc(x: torch.Tensor, acc: Format) -> torch.Tensor:
    """``quantize(x, acc)`` (rne, saturating) of float32 ``x``, in one torch cast where ``acc`` is a
    torch dtype: ``.to(float8_e4m3fn)`` saturates like ``quantize``; for e5m2/bf16/fp16 the cast
    is ``quantize(..., overflow="ieee")`` (docs/semantics.md section 1), so a finite ``x`` that
    rounds beyond ``max`` (to ±inf there) becomes ±max. Other formats: :func:`lmul.formats.quantize`."""
    dtype = _CASTS.get(acc)
    if dtype is None:
        return quantize(x, acc)
    y = x.to(dtype).float()
    if dtype == torch.float8_e4m3fn:
        return y
    return torch.where(torch.isinf(y) & torch.isfinite(x), torch.copysign(x.new_tensor(acc.max), x), y)


class Accumulator:
    """The sum of docs/semantics.md section 4 for ``acc=<format>``, fed products in increasing k.

    Per output, with blocks of ``acc_block`` consecutive products: ``s = +0; s = fl32(s + P_k)``
    over the block, then ``total = quantize(fl32(total + s), acc)``; ``total`` starts at ``+0`` or
    at ``init``. ``within_block=True``: every product fed belongs to one block whose float32 sum
    so far is ``init``; nothing is rounded to ``acc`` and :meth:`result` is that block's float32
    sum (how the dispatcher carries a block longer than one k piece). Vectorised over the outputs:
    one float32 add per k, one rounding per block."""

    def __init__(self, spec: LMulSpec, like: torch.Tensor, init: Optional[torch.Tensor] = None,
                 within_block: bool = False) -> None:
        self.acc, self.block, self.within = spec.acc, spec.acc_block, within_block
        zero = torch.zeros_like(like, dtype=torch.float32)
        self.total = zero if within_block or init is None else init.clone()
        self.s: Optional[torch.Tensor] = (init.clone() if init is not None else zero) if within_block else None
        self.pos = 0  # products of the current block seen (self.s is None: none, the block sum is +0)

    def add(self, prods: torch.Tensor, dim: int) -> None:
        """Feed ``prods`` (float32), in increasing k along ``dim``."""
        prods = prods + 0.0  # +0 + P: a block sum is never -0, so a zero product's sign never matters
        for kk in range(prods.shape[dim]):
            p = prods.select(dim, kk)
            if self.block == 1 and not self.within:
                self.total = round_acc(self.total + p, self.acc)
                continue
            self.s = p if self.s is None else self.s + p
            self.pos += 1
            if self.pos == self.block and not self.within:
                self.total = round_acc(self.total + self.s, self.acc)
                self.s, self.pos = None, 0

    def result(self) -> torch.Tensor:
        """The running sum (a last partial block rounded in), or with ``within_block`` the block sum."""
        if self.within:
            return self.s
        return self.total if self.s is None else round_acc(self.total + self.s, self.acc)


def accumulate(prods: torch.Tensor, spec: LMulSpec, dim: int) -> torch.Tensor:
    """Sum ``prods`` (float32) along ``dim`` per ``spec.acc`` (docs/semantics.md section 4):
    ``acc=None`` a float64 sum rounded once, else in increasing k by :class:`Accumulator`."""
    if spec.acc is None:
        return prods.double().sum(dim).float()
    state = Accumulator(spec, prods.select(dim, 0) if prods.shape[dim] else prods.sum(dim))
    state.add(prods, dim)
    return state.result()


def reference_matmul(a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, init: Optional[torch.Tensor] = None,
                     within_block: bool = False) -> torch.Tensor:
    """[B, M, K] x [B, K, N] -> [B, M, N], chunked over batch, rows and k: at most
    :data:`REFERENCE_CHUNK` products at a time. For ``acc=<format>``, ``init`` [B, M, N] is the
    running sum the products continue (or with ``within_block`` the float32 sum of the one block
    they belong to, which is returned: see :class:`Accumulator`); the dispatcher passes them when it
    splits k (the reference itself is never split: it carries the state across its own chunks)."""
    bsz, m, k = a.shape
    n = b.shape[-1]
    aq = quantize(a, spec.fmt, spec.rounding)
    bq = quantize(b, spec.fmt, spec.rounding)
    out = torch.zeros(bsz, m, n, dtype=torch.float32, device=a.device)
    if init is not None:
        out.copy_(init)
    if 0 in (bsz, m, n, k):
        return out
    if spec.acc is not None:
        _acc_matmul(aq, bq, spec, out, init is not None, within_block)
        return out
    k_step = max(1, min(k, REFERENCE_CHUNK // n))
    rows = max(1, REFERENCE_CHUNK // (n * k_step))
    acc64 = torch.zeros(bsz, m, n, dtype=torch.float64, device=a.device)
    for bi in range(bsz):
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            for k0 in range(0, k, k_step):
                k1 = min(k, k0 + k_step)
                p = products(
                    aq[bi, r0:r1, k0:k1, None], bq[bi, None, k0:k1, :], spec.fmt, spec.mode, spec.offset
                )  # [rows, k_step, N]
                acc64[bi, r0:r1] += p.double().sum(1)
    return acc64.float()


def _acc_matmul(aq: torch.Tensor, bq: torch.Tensor, spec: LMulSpec, out: torch.Tensor, has_init: bool,
                within_block: bool) -> None:
    """``acc=<format>``: as many outputs at once as fit (batches, rows), the products of a few k at a
    time (at most REFERENCE_CHUNK), the :class:`Accumulator` carried across the k chunks; ``out``
    holds ``init`` on entry and the result on return."""
    bsz, m, k = aq.shape
    n = bq.shape[-1]
    rows = max(1, min(m, REFERENCE_CHUNK // n))
    bs = max(1, min(bsz, REFERENCE_CHUNK // (rows * n))) if rows == m else 1
    k_step = max(1, min(k, REFERENCE_CHUNK // (bs * rows * n)))
    for b0 in range(0, bsz, bs):
        for r0 in range(0, m, rows):
            view = out[b0:b0 + bs, r0:r0 + rows]
            state = Accumulator(spec, view, view if has_init else None, within_block)
            for k0 in range(0, k, k_step):
                p = products(aq[b0:b0 + bs, r0:r0 + rows, k0:k0 + k_step, None], bq[b0:b0 + bs, None, k0:k0 + k_step],
                             spec.fmt, spec.mode, spec.offset)  # [bs, rows, k_step, N]
                state.add(p, 2)
            view.copy_(state.result())


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
