"""L-Matmul as ordinary matmuls of prepared operands (pure torch: any device, BLAS / cuBLAS).

Write ``X`` for a quantized operand (flushed to 0 when zero or subnormal), ``X^ = sign(x) 2^xe``
(0 when flushed) and ``M_x`` its m-bit mantissa field, likewise for ``y``.

* ``formula`` (paper Eq. 1): ``P = (1 + xm + ym + c) 2^(xe+ye) = X Y^ + X^ (Y + (c-1) Y^)``, so
  ``C = [A, A^] @ [B^ ; B + (c-1) B^]``: one matmul with K doubled. Both terms are exact in
  float32 (a value with <= 24 significant bits times a power of two; ``Y + (c-1) Y^ =
  sign (M_y 2^-m + c) 2^ye`` has <= 24 bits when c is a multiple of 2^-23) as long as their last
  bit is >= 2^-149, which holds when ``xe + ye >= -126``; rows or columns where some
  ``xe + ye < -126`` (float32 subnormal products, formats with 8 exponent bits) are recomputed by
  the reference, since there each term would round on its own. Both terms have the same sign, so
  they sum without cancellation.
* ``bit`` with ``m <= 4`` (paper Eq. 2): ``P = X^ Y^ g(M_x, M_y)`` with the carry factor
  ``g = 2^q (1 + (S - q 2^m) / 2^m)``, ``S = M_x + M_y + c 2^m``. One-hot expansion of ``M_x``:
  ``C = sum_v [M_A == v] A^ @ (B^ g(v, M_B))``: one matmul with K times 2^m. Each product is one
  exact float32 multiply of ``X^`` and ``Y^ g`` (rounded once, like the reference). ``g < 2^(q_max+1)``
  with ``q_max = (2 (2^m - 1) + c 2^m) >> m`` (1 for the default offsets of m <= 3, 2 for m = 4 or a
  larger offset), so ``Y^ g`` overflows float32 only for ``|y| >= 2^(127 - q_max + 1)``: such columns
  are recomputed by the reference.
* ``exact``: ``C = quantize(A) @ quantize(B)``.

Rows/columns holding inf or NaN are recomputed by the reference backend
(:func:`lmul.kernels.common.fixup`). Float32 matmuls run with TF32 disabled.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from lmul.formats import quantize
from lmul.kernels.common import fixup, spec_unsupported, split_normal, underflow_risk
from lmul.kernels.reference import REFERENCE_CHUNK, Accumulator
from lmul.spec import LMulSpec

__all__ = ["decompose_matmul", "unavailable", "MAX_BIT_MAN_BITS", "carry_table", "DESCRIPTION"]

DESCRIPTION = ("torch matmuls of prepared operands, any device: formula (K x2), bit m<=4 (K x2^m), exact; "
               "acc=<format> per-k products in the defined order")

MAX_BIT_MAN_BITS = 4  # bit mode expands K by 2^m


def carry_table(m: int, off: int, device: torch.device) -> torch.Tensor:
    """``g[v, w] = 2^q (1 + (S - q 2^m) / 2^m)`` with ``S = v + w + off``, float32 [2^m, 2^m]."""
    v = torch.arange(1 << m, device=device, dtype=torch.int64)
    s = v[:, None] + v[None, :] + off
    q = s >> m
    return ((s - (q << m) + (1 << m)).double() * torch.pow(2.0, (q - m).double())).float()


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    """fp32 matmuls must be true fp32 (products exact); restore the caller's setting after."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _special(x: torch.Tensor, dim: int, top: Optional[float] = None) -> torch.Tensor:
    """Rows (dim=-1) or columns (dim=-2) that hold inf/NaN (or ``|x| >= top``)."""
    bad = ~torch.isfinite(x)
    if top is not None:
        bad |= x.abs() >= top
    return bad.any(dim)


def _carry_top(spec: LMulSpec) -> float:
    """Bit mode: ``|y|`` from which ``Y^ g`` may overflow float32 (``g < 2^(q_max + 1)``)."""
    m = spec.fmt.man_bits
    q_max = (2 * ((1 << m) - 1) + int(spec.offset * 2**m)) >> m
    return 2.0 ** (128 - q_max)


def _acc_matmul(a: torch.Tensor, b: torch.Tensor, aq: torch.Tensor, bq: torch.Tensor, spec: LMulSpec,
                init: Optional[torch.Tensor], within_block: bool) -> torch.Tensor:
    """Reduced-precision accumulation (``spec.acc``): a matmul's summation order is unspecified,
    so the products are formed elementwise, for a few k at a time ([B, M, k chunk, N], at most
    ``REFERENCE_CHUNK``; bit-exact as the reference), and summed in the order of docs/semantics.md
    section 4 by the reference's :class:`~lmul.kernels.reference.Accumulator` (one float32 add per k,
    one rounding per block, vectorised over every output); ``init``/``within_block`` as there.

    bit: ``P = X^ (Y^ g(M_x, M_y))``, the factor ``Y^ g`` exact, one rounding; formula: the exact
    ``(2^m (1 + c) + M_x + M_y) 2^(xe + ye - m)`` in float64, rounded once; exact: one float32
    multiply (IEEE: the exact product rounded once)."""
    m = spec.fmt.man_bits
    bsz, rows, k = aq.shape
    n = bq.shape[-1]
    if spec.mode == "bit":
        _, ha, ma = split_normal(aq, spec.fmt)
        _, hb, mb = split_normal(bq, spec.fmt)
        g = carry_table(m, int(spec.offset * 2**m), a.device)
        prod = lambda ks: ha[:, :, ks, None] * (hb[:, None, ks, :] * g[ma[:, :, ks, None], mb[:, None, ks, :]])
    elif spec.mode == "formula":
        xa, ha, _ = split_normal(aq, spec.fmt)
        xb, hb, _ = split_normal(bq, spec.fmt)
        # X Y^ + X^ (Y + (c-1) Y^), both terms exact in float64, summed exactly there
        la, lb = xa.double(), (xb.double() + (spec.offset - 1.0) * hb.double())
        ha64, hb64 = ha.double(), hb.double()
        prod = lambda ks: (la[:, :, ks, None] * hb64[:, None, ks, :]
                           + ha64[:, :, ks, None] * lb[:, None, ks, :]).float()
    else:
        prod = lambda ks: aq[:, :, ks, None] * bq[:, None, ks, :]
    out = torch.zeros(bsz, rows, n, dtype=torch.float32, device=a.device)
    state = Accumulator(spec, out, init, within_block)
    step = max(1, REFERENCE_CHUNK // max(1, bsz * rows * n))
    for k0 in range(0, k, step):
        state.add(prod(slice(k0, min(k, k0 + step))), 2)
    return state.result()


def decompose_matmul(a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, init: Optional[torch.Tensor] = None,
                     within_block: bool = False) -> torch.Tensor:
    """[B, M, K] x [B, K, N] -> [B, M, N] float32 by the decompositions above (``init`` and
    ``within_block``: the ``acc=<format>`` state, as in :func:`lmul.kernels.reference.reference_matmul`)."""
    a = a.detach()
    b = b.detach()
    aq = quantize(a, spec.fmt, spec.rounding)
    bq = quantize(b, spec.fmt, spec.rounding)
    m = spec.fmt.man_bits
    if spec.acc is not None:
        out = _acc_matmul(a, b, aq, bq, spec, init, within_block)
        top = _carry_top(spec) if spec.mode == "bit" else None
        return fixup(out, a, b, spec, _special(aq, -1), _special(bq, -2, top), init, within_block)
    with _no_tf32(a.device):
        if spec.mode == "exact":
            out = torch.matmul(aq, bq)
            rows, cols = _special(aq, -1), _special(bq, -2)
        elif spec.mode == "formula":
            xa, ha, _ = split_normal(aq, spec.fmt)
            xb, hb, _ = split_normal(bq, spec.fmt)
            left = torch.cat([xa, ha], dim=-1)                          # [B, M, 2K]
            right = torch.cat([hb, xb + (spec.offset - 1.0) * hb], dim=-2)  # [B, 2K, N], exact
            out = torch.matmul(left, right)
            rows, cols = underflow_risk(a, b, spec.fmt.emin, 0)  # a term below 2^-126 may round
            rows, cols = rows | _special(aq, -1), cols | _special(bq, -2)
        else:  # bit, m <= 4
            off = int(spec.offset * 2**m)
            _, ha, ma = split_normal(aq, spec.fmt)
            _, hb, mb = split_normal(bq, spec.fmt)
            g = carry_table(m, off, a.device)                           # [2^m, 2^m]
            v = torch.arange(1 << m, device=a.device, dtype=torch.int32)
            left = torch.where(ma[..., None, :] == v[:, None], ha[..., None, :], 0.0)  # [B, M, 2^m, K]
            right = hb[..., None, :, :] * g[:, mb.long()].movedim(0, -3)               # [B, 2^m, K, N]
            out = torch.matmul(left.flatten(-2), right.flatten(-3, -2))
            rows, cols = _special(aq, -1), _special(bq, -2, _carry_top(spec))
    return fixup(out, a, b, spec, rows, cols)


def unavailable(a: torch.Tensor, spec: LMulSpec) -> Optional[str]:
    why = spec_unsupported(spec, acc=True)
    if why:
        return why
    if spec.mode == "bit" and spec.fmt.man_bits > MAX_BIT_MAN_BITS:
        m = spec.fmt.man_bits
        return f"bit mode needs m <= {MAX_BIT_MAN_BITS} here (K grows by 2^m), {spec.fmt.name} has m={m}"
    return None

