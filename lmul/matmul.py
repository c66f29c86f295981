"""L-Matmul: ``C[..., i, j] = sum_k P(a[..., i, k], b[..., k, j])`` with ``P`` the L-Mul product.

Shapes and batch broadcasting follow :func:`torch.matmul` (1-D operands are promoted and the
added dimension removed). Products are the elementwise :func:`lmul.ops.mul` products, bit for
bit; only the float32 summation order is unspecified. See ``docs/semantics.md`` section 4.

Backends register themselves in :data:`BACKENDS`; ``backend="auto"`` picks one per call. This
module provides ``"reference"``: exact products, accumulated in float64 and rounded once to
float32 (``acc="fp32"``), computed in chunks so that the product workspace never exceeds
``REFERENCE_CHUNK`` elements (about 40 bytes each at peak), plus the operands broadcast to the
batch shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

import torch

from lmul.autograd import LMatmulFunction  # straight-through gradient, docs/kernels.md
from lmul.formats import Format, FormatLike, Rounding, check_float, quantize
from lmul.ops import Mode, products, resolve_offset

__all__ = ["matmul", "MatmulSpec", "BACKENDS", "REFERENCE_CHUNK", "register_backend"]

REFERENCE_CHUNK = 1 << 22  # products materialised at once by the reference backend


@dataclass(frozen=True)
class MatmulSpec:
    """Everything a backend needs besides the operands (already validated and resolved)."""

    fmt: Format
    mode: str
    offset: float                 # the resolved c
    rounding: str
    acc: Optional[Format]         # None: float32 accumulation; else round the running sum
    acc_block: int                # products summed in float32 per accumulator rounding


Backend = Callable[[torch.Tensor, torch.Tensor, MatmulSpec], torch.Tensor]
# name -> (function on broadcast 3-D operands [B, M, K] x [B, K, N], availability check)
BACKENDS: dict[str, tuple[Backend, Callable[[torch.Tensor, MatmulSpec], Optional[str]]]] = {}


def register_backend(
    name: str, fn: Backend, unavailable: Callable[[torch.Tensor, MatmulSpec], Optional[str]]
) -> None:
    """Register a backend. ``unavailable(a, spec)`` returns why it cannot run, or None."""
    BACKENDS[name] = (fn, unavailable)


def _accumulate(prods: torch.Tensor, spec: MatmulSpec, dim: int) -> torch.Tensor:
    """Sum ``prods`` (float32) along ``dim`` per ``spec.acc`` (docs/semantics.md section 4).

    ``acc=None``: a float64 sum rounded once. Otherwise the defined order: for each block of
    ``acc_block`` consecutive k (increasing), ``s = +0; s = fl32(s + P_k)`` for k in the block in
    increasing order, then ``total = quantize(fl32(total + s), acc)`` (rne, saturating), with
    ``total = +0`` at the start. Vectorised over the other dimensions, a Python loop over k."""
    if spec.acc is None:
        return prods.double().sum(dim).float()
    k = prods.shape[dim]
    total = torch.zeros_like(prods.select(dim, 0)) if k else prods.sum(dim)
    for start in range(0, k, spec.acc_block):
        block = torch.zeros_like(total)  # +0: a block sum is never -0 (zero products' signs never matter)
        for kk in range(start, min(k, start + spec.acc_block)):
            block += prods.select(dim, kk)
        total = quantize(total + block, spec.acc)
    return total


def _reference(a: torch.Tensor, b: torch.Tensor, spec: MatmulSpec) -> torch.Tensor:
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
                    out[bi, r0:r1] = _accumulate(p, spec, 1)
    return acc64.float() if acc64 is not None else out


register_backend("reference", _reference, lambda a, spec: None)


def _broadcast(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple, Callable]:
    """torch.matmul shape rules: return [B, M, K], [B, K, N] and how to shape the result."""
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(f"matmul needs operands with at least 1 dimension, got {tuple(a.shape)} and {tuple(b.shape)}")
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(
            f"matmul shapes {tuple(a.shape)} and {tuple(b.shape)} do not match: "
            f"a's last dim {a2.shape[-1]} != b's {'only' if b.dim() == 1 else 'second-to-last'} dim {b2.shape[-2]}"
        )
    try:
        batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    except RuntimeError as err:
        raise ValueError(f"batch dims of {tuple(a.shape)} and {tuple(b.shape)} do not broadcast") from err
    m, k = a2.shape[-2:]
    n = b2.shape[-1]
    nb = math.prod(batch)  # not -1: reshape cannot infer it when a dimension is 0
    a3 = a2.expand(*batch, m, k).reshape(nb, m, k)
    b3 = b2.expand(*batch, k, n).reshape(nb, k, n)

    def shape_out(c: torch.Tensor) -> torch.Tensor:
        c = c.reshape(*batch, m, n)
        if a.dim() == 1:
            c = c.squeeze(-2)
        if b.dim() == 1:
            c = c.squeeze(-1)
        return c

    return a3, b3, batch, shape_out


def resolve_backend(a: torch.Tensor, spec: MatmulSpec, backend: str) -> str:
    """The backend that runs: ``backend`` itself (error if unavailable) or, for ``"auto"``, the
    first available registered backend in :data:`AUTO_ORDER`."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; registered: {sorted(BACKENDS)}")
        why = BACKENDS[backend][1](a, spec)
        if why:
            raise RuntimeError(f"backend {backend!r} cannot run this matmul: {why}")
        return backend
    for name in AUTO_ORDER:
        if name in BACKENDS and not BACKENDS[name][1](a, spec):
            return name
    return "reference"


AUTO_ORDER: list[str] = ["reference"]


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    fmt: FormatLike = "bf16",
    mode: Mode = "bit",
    offset: Optional[float] = None,
    rounding: Rounding = "rne",
    acc: Union[str, Format, None] = "fp32",
    backend: str = "auto",
    acc_block: int = 1,
) -> torch.Tensor:
    """L-Matmul of ``a`` and ``b`` with :func:`torch.matmul` shapes, returned as float32.

    ``C[..., i, j] = sum_k P(a[..., i, k], b[..., k, j])`` where ``P`` is the L-Mul product of the
    operands quantized to ``fmt`` (see :func:`lmul.mul`). ``acc="fp32"`` sums the float32 products
    in float32 precision, order unspecified: ``|C - C_exact| <= K 2^-24 sum_k |P_k|``.
    ``acc=<format>`` (e.g. ``"e4m3"``, paper Table 6) accumulates in increasing ``k``: each block of
    ``acc_block`` consecutive products is summed in float32 and added to the running sum, which
    is rounded to that format (RNE, saturating) after every addition.
    """
    check_float(a, "a")
    check_float(b, "b")
    if a.device != b.device:
        raise ValueError(f"a and b are on different devices: {a.device} and {b.device}")
    fmt = Format.parse(fmt)
    c = resolve_offset(fmt, mode, offset)
    if rounding not in ("rne", "trunc"):
        raise ValueError(f"rounding must be 'rne' or 'trunc', got {rounding!r}")
    acc_fmt = None if acc is None or Format.parse(acc) == Format(8, 23) else Format.parse(acc)
    if not isinstance(acc_block, int) or acc_block < 1:
        raise ValueError(f"acc_block must be a positive int, got {acc_block!r}")
    spec = MatmulSpec(fmt, mode, c, rounding, acc_fmt, acc_block)
    a3, b3, _, shape_out = _broadcast(a, b)
    name = resolve_backend(a3, spec, backend)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        run = lambda x, y: shape_out(BACKENDS[name][0](*_broadcast(x, y)[:2], spec))
        return LMatmulFunction.apply(a, b, run, fmt, rounding)
    return shape_out(BACKENDS[name][0](a3, b3, spec))
