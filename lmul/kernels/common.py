"""Pieces shared by the fast L-Matmul backends: the reference fix-up and operand splitting.

Every fast backend computes the finite part of ``C = sum_k P(a_ik, b_kj)`` by a decomposition
or an integer kernel. A row ``i`` of A or a column ``j`` of B that those paths do not cover has its
row or column of C recomputed by the reference backend, so that the contract
(``docs/semantics.md`` sections 2 and 4) holds exactly there:

* operands that are inf/NaN (and, for some decompositions, values in float32's top binade);
* rows/columns where a term of a decomposition could fall below float32's normal range
  (:func:`underflow_risk`; only formats with float32's exponent range: ``triton-tc``, and formula
  mode on ``cpu`` / ``decompose``, whose two float32 terms would each round in the subnormals);
* rows/columns where a product or a partial sum could leave float32's range: with ``|a_ik| < 2^ea_i``
  and ``|b_kj| < 2^eb_j`` every product has ``|P| < 2^(ea_i + eb_j + 3)`` (L-Mul exceeds the exact
  product by less than a factor 4, quantization rounds up by less than 2), so every partial sum is
  below ``2^(ea_i + eb_j + 3 + ceil(log2 K))``; where that reaches 2^127 the reference (float64 sums,
  one rounding) decides inf and sign. The smaller of the two covering sets (rows or columns) is
  recomputed.

Only those rows/columns cost reference speed.
"""

from __future__ import annotations

import math

import torch

from lmul.formats import Format
from lmul.kernels.reference import reference_matmul
from lmul.ops import split
from lmul.spec import LMulSpec

__all__ = ["fixup", "split_normal", "spec_unsupported", "overflow_risk", "underflow_risk"]


def spec_unsupported(spec: LMulSpec, acc: bool = False) -> str | None:
    """Why a fast backend cannot run ``spec`` (None if it can): reduced-precision accumulation
    only where the backend implements it (``acc=True``), and formula mode splits ``c`` exactly only
    when the offset is a multiple of 2^-23 (``docs/kernels.md``)."""
    if spec.acc is not None and not acc:
        return f"reduced-precision accumulation (acc={spec.acc.name}) is not implemented by this backend"
    if spec.mode == "formula" and (spec.offset * 2**23) != int(spec.offset * 2**23):
        return f"formula mode needs the offset to be a multiple of 2^-23 (exact split), got {spec.offset!r}"
    return None


def _global_exponent(x: torch.Tensor) -> int | None:
    """``e`` with ``|x| < 2^e`` for every entry, or None when ``x`` holds inf/NaN."""
    lo, hi = torch.aminmax(x)
    top = max(-lo.item(), hi.item())
    return math.frexp(top)[1] if math.isfinite(top) else None


def _exponent_bound(x: torch.Tensor, dim: int) -> torch.Tensor:
    """int ``e`` per row (dim=-1) or column (dim=-2) with ``|x| < 2^e`` over its entries (two
    reductions, no temporaries). Rows holding inf/NaN get 0: the backends recompute them anyway."""
    mag = torch.maximum(x.amax(dim), -x.amin(dim))
    return torch.frexp(torch.nan_to_num(mag.float(), nan=0.0, posinf=0.0, neginf=0.0)).exponent


def overflow_risk(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``a`` [B, M, K] and columns of ``b`` [B, K, N] (bool masks [B, M], [B, N]) whose
    products or partial sums could overflow float32 (see the module docstring); only one of the two
    masks is non-empty: the smaller covering set."""
    k = a.shape[-1]
    rows = torch.zeros(a.shape[:-1], dtype=torch.bool, device=a.device)
    cols = torch.zeros(b.shape[0], b.shape[-1], dtype=torch.bool, device=b.device)
    if 0 in a.shape or 0 in b.shape:
        return rows, cols
    ga, gb = _global_exponent(a), _global_exponent(b)
    if ga is not None and gb is not None and ga + gb < 127 - 3 - math.ceil(math.log2(k)):
        return rows, cols  # the common case: no row or column anywhere near float32's range
    ea, eb = _exponent_bound(a, -1), _exponent_bound(b, -2)       # [B, M], [B, N]
    limit = 127 - 3 - math.ceil(math.log2(k))
    risk_rows = ea + eb.amax(-1, keepdim=True) >= limit
    risk_cols = eb + ea.amax(-1, keepdim=True) >= limit
    if not bool(risk_rows.any()):
        return rows, cols
    if int(risk_rows.sum()) * b.shape[-1] <= int(risk_cols.sum()) * a.shape[1]:
        return risk_rows, cols
    return rows, risk_cols


def _low_exponent(x: torch.Tensor, dim: int, emin: int) -> torch.Tensor:
    """int ``e`` per row (dim=-1) or column (dim=-2) with ``|q| >= 2^e`` for every entry whose
    quantization ``q`` is normal (``e >= emin``; rounding never crosses the power of two below
    ``|x|``); 2^20 for rows without a non-zero entry (no term at all)."""
    mag = x.abs()
    lo = torch.where(mag > 0, mag, torch.inf).amin(dim).double()    # zeros and NaN do not count
    e = (torch.frexp(lo).exponent - 1).clamp(min=emin)
    return torch.where(torch.isinf(lo), 1 << 20, e)


def underflow_risk(a: torch.Tensor, b: torch.Tensor, emin: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``a`` [B, M, K] and columns of ``b`` [B, K, N] (bool masks) where a term of a
    decomposition could fall below 2^-126 (float32 subnormal, whose handling by tensor cores is not
    IEEE-specified), for operands normal in a format with exponents >= ``emin`` and terms
    ``>= 2^(xe + ye - shift)``; plus columns whose prepared right operand ``>= 2^(ye - shift)``
    could be subnormal in bf16. The smaller covering set of the first kind is returned."""
    rows = torch.zeros(a.shape[:-1], dtype=torch.bool, device=a.device)
    cols = torch.zeros(b.shape[0], b.shape[-1], dtype=torch.bool, device=b.device)
    if 2 * emin - shift >= -126 or 0 in a.shape or 0 in b.shape:
        return rows, cols  # every format with fewer than 8 exponent bits
    ea, eb = _low_exponent(a, -1, emin), _low_exponent(b, -2, emin)  # [B, M], [B, N]
    cols = eb - shift < -126
    risk_rows = ea + eb.amin(-1, keepdim=True) - shift < -126
    risk_cols = eb + ea.amin(-1, keepdim=True) - shift < -126
    if not bool(risk_rows.any()):
        return rows, cols
    if int(risk_rows.sum()) * b.shape[-1] <= int(risk_cols.sum()) * a.shape[1]:
        return risk_rows, cols
    return rows, cols | risk_cols


def fixup(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, spec: LMulSpec,
          rows: torch.Tensor, cols: torch.Tensor, init: torch.Tensor | None = None,
          within_block: bool = False) -> torch.Tensor:
    """Overwrite ``out[bi, i, :]`` where ``rows[bi, i]`` and ``out[bi, :, j]`` where ``cols[bi, j]``
    with the reference backend's result (``a`` [B, M, K], ``b`` [B, K, N], masks bool), after adding
    the rows/columns at risk of float32 overflow (:func:`overflow_risk`). ``init``/``within_block``:
    the accumulator state the call continues (``acc=<format>``, :func:`reference_matmul`)."""
    risk_rows, risk_cols = overflow_risk(a.detach(), b.detach())
    rows, cols = rows | risk_rows, cols | risk_cols
    if not bool(rows.any()) and not bool(cols.any()):
        return out
    for bi in range(out.shape[0]):
        r = rows[bi].nonzero().flatten()
        if r.numel():
            start = None if init is None else init[bi : bi + 1, r]
            out[bi, r] = reference_matmul(a[bi : bi + 1, r], b[bi : bi + 1], spec, start, within_block)[0]
        c = cols[bi].nonzero().flatten()
        if c.numel():
            start = None if init is None else init[bi : bi + 1, :, c]
            out[bi, :, c] = reference_matmul(a[bi : bi + 1], b[bi : bi + 1, :, c], spec, start, within_block)[0]
    return out


def split_normal(xq: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For quantized float32 ``xq``: ``(X, X^, M)`` with ``X`` flushed to 0 where ``xq`` is zero,
    subnormal in ``fmt`` or not finite, ``X^ = sign 2^xe`` (0 there too) and ``M`` the int32
    m-bit mantissa field (from :func:`lmul.ops.split`). ``X^`` keeps the bits ``[s|eeeeeeee|0..0]``."""
    parts = split(xq, fmt)
    zero = torch.zeros((), dtype=torch.float32, device=xq.device)
    x = torch.where(parts.normal, xq, zero)
    hat = torch.where(parts.normal, (parts.bits & -(1 << 23)).view(torch.float32), zero)  # 0xFF800000 mask
    return x, hat, parts.man
