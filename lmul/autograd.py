"""Gradients for :func:`lmul.matmul` and :func:`lmul.mul` (for fine-tuning through L-Mul).

The chosen gradient is the **straight-through exact-product gradient**: the backward pass treats
L-Mul as the exact product of the quantized operands, and quantization as the identity
(straight-through estimator). For ``C = L-Matmul(A, B)`` with ``A_q = quantize(A)``,
``B_q = quantize(B)``::

    dA = dC @ B_q^T        dB = A_q^T @ dC         (float32, reduced over broadcast batch dims)

and for ``P = mul(x, y)``: ``dx = dP * y_q``, ``dy = dP * x_q``. Why not the L-Mul surrogate's own
derivative: it is piecewise constant in each operand's mantissa (formula mode: dP/dx = sign(y)
2^ye, a power of two; bit mode adds jumps at every mantissa carry), so it is a biased, noisy
estimate of the exact product's slope that L-Mul approximates; the exact-product gradient is
what quantization-aware training uses for fp8 and differs from it by L-Mul's own relative error
(a few percent, docs/kernels.md). ``mode="exact"`` gets the usual product rule.
The backward pass costs two ordinary float32 matmuls (``torch.matmul``), whatever the backend.
"""

from __future__ import annotations

from typing import Any

import torch

from lmul.formats import quantize

__all__ = ["LMatmulFunction", "LMulFunction"]


def _q(x: torch.Tensor, fmt: Any, rounding: str) -> torch.Tensor:
    return quantize(x.detach(), fmt, rounding)


class _StraightThrough(torch.autograd.Function):
    """Forward shared by both: the value is ``forward_fn(a, b)``; the operands and the operand format
    are kept for the subclass's backward."""

    @staticmethod
    def forward(ctx, a, b, forward_fn, fmt, rounding):  # noqa: D102
        ctx.save_for_backward(a, b)
        ctx.fmt, ctx.rounding = fmt, rounding
        return forward_fn(a.detach(), b.detach())


class LMatmulFunction(_StraightThrough):
    """``apply(a, b, forward_fn, fmt, rounding)``: value ``forward_fn(a, b)``, straight-through grads."""

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        a, b = ctx.saved_tensors
        aq, bq = _q(a, ctx.fmt, ctx.rounding), _q(b, ctx.fmt, ctx.rounding)
        a2 = aq.unsqueeze(0) if a.dim() == 1 else aq     # [..., M, K]
        b2 = bq.unsqueeze(-1) if b.dim() == 1 else bq    # [..., K, N]
        g = grad.float()
        if a.dim() == 1:
            g = g.unsqueeze(-2)
        if b.dim() == 1:
            g = g.unsqueeze(-1)                           # [..., M, N]
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = torch.matmul(g, b2.transpose(-1, -2)).sum_to_size(a2.shape).reshape(a.shape).to(a.dtype)
        if ctx.needs_input_grad[1]:
            gb = torch.matmul(a2.transpose(-1, -2), g).sum_to_size(b2.shape).reshape(b.shape).to(b.dtype)
        return ga, gb, None, None, None


class LMulFunction(_StraightThrough):
    """``apply(x, y, forward_fn, fmt, rounding)``: value ``forward_fn(x, y)``, straight-through grads."""

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, y = ctx.saved_tensors
        xq, yq = _q(x, ctx.fmt, ctx.rounding), _q(y, ctx.fmt, ctx.rounding)
        g = grad.float()
        gx = (g * yq).sum_to_size(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        gy = (g * xq).sum_to_size(y.shape).to(y.dtype) if ctx.needs_input_grad[1] else None
        return gx, gy, None, None, None
