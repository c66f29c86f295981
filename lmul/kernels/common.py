"""Pieces shared by the fast L-Matmul backends: the inf/NaN fix-up and operand splitting.

Every fast backend computes the finite part of ``C = sum_k P(a_ik, b_kj)`` by a decomposition
or an integer kernel. A row ``i`` of A or a column ``j`` of B that holds an operand those paths
do not cover (inf/NaN, and for some decompositions values in float32's top binade) has its row
or column of C recomputed by the reference backend, so special values follow the contract
(``docs/semantics.md`` section 2) exactly. Only those rows/columns cost reference speed.
"""

from __future__ import annotations

import torch

from lmul.formats import Format
from lmul.matmul import BACKENDS, MatmulSpec

__all__ = ["fixup", "split_normal", "spec_unsupported"]


def spec_unsupported(spec: MatmulSpec, acc: bool = False) -> str | None:
    """Why a fast backend cannot run ``spec`` (None if it can): reduced-precision accumulation
    only where the backend implements it (``acc=True``), and formula mode splits ``c`` exactly only
    when the offset is a multiple of 2^-23 (``docs/kernels.md``)."""
    if spec.acc is not None and not acc:
        return f"reduced-precision accumulation (acc={spec.acc.name}) is not implemented by this backend"
    if spec.mode == "formula" and (spec.offset * 2**23) != int(spec.offset * 2**23):
        return f"formula mode needs the offset to be a multiple of 2^-23 (exact split), got {spec.offset!r}"
    return None


def fixup(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, spec: MatmulSpec,
          rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Overwrite ``out[bi, i, :]`` where ``rows[bi, i]`` and ``out[bi, :, j]`` where ``cols[bi, j]``
    with the reference backend's result (``a`` [B, M, K], ``b`` [B, K, N], masks bool)."""
    if not bool(rows.any()) and not bool(cols.any()):
        return out
    reference = BACKENDS["reference"][0]
    for bi in range(out.shape[0]):
        r = rows[bi].nonzero().flatten()
        if r.numel():
            out[bi, r] = reference(a[bi : bi + 1, r], b[bi : bi + 1], spec)[0]
        c = cols[bi].nonzero().flatten()
        if c.numel():
            out[bi, :, c] = reference(a[bi : bi + 1], b[bi : bi + 1, :, c], spec)[0]
    return out


def split_normal(xq: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For quantized float32 ``xq``: ``(X, X^, M)`` with ``X`` flushed to 0 where ``xq`` is zero,
    subnormal in ``fmt`` or not finite, ``X^ = sign 2^xe`` (0 there too) and ``M`` the int32
    m-bit mantissa field. ``[s|eeeeeeee|mmm...]`` float32 bits; ``X^`` keeps ``[s|eeeeeeee|0..0]``."""
    bits = xq.view(torch.int32)
    field = (bits >> 23) & 0xFF
    normal = (field >= fmt.emin + 127) & (field < 255)
    zero = torch.zeros((), dtype=torch.float32, device=xq.device)
    x = torch.where(normal, xq, zero)
    hat = torch.where(normal, (bits & -(1 << 23)).view(torch.float32), zero)  # 0xFF800000 mask
    man = (bits & 0x7FFFFF) >> (23 - fmt.man_bits)
    return x, hat, man
