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

``LMulSpec(backward="same")`` instead computes the backward's products with the forward's own spec
(format, mode, accumulator): ``dA = L-Matmul(dC, B_q^T)``, ``dB = L-Matmul(A_q^T, dC)``,
``dx = L-Mul(dP, y_q)``: "every multiplication" in training, as the paper's Table 6 says it fine-tunes.
The default stays ``"exact"``: without a loss scale, quantizing gradients into an 8-bit operand
format flushes the small ones to zero (e4m3's smallest normal is 2^-6), which is a property of the
format and not of L-Mul; ``"same"`` is there to measure it.
"""

from __future__ import annotations

from typing import Optional

import torch

from lmul.spec import LMulSpec

__all__ = ["matmul_grads", "mul_grads"]


def _q(x: torch.Tensor, spec: LMulSpec, operand: str = "mul") -> torch.Tensor:
    """The quantized operand the forward multiplied: ``quantize(x)``, or with ``spec.scaling`` the
    scaled one ``q X`` (float32): groups along K as a matmul's ``operand`` ``"a"``/``"b"``
    (:mod:`lmul.scaling`), along the last dimension for ``"mul"`` (:func:`lmul.elementwise.scaled_elements`)."""
    from lmul.elementwise import quantize, scaled_elements  # the fastest quantize backend: same values

    x = x.detach()
    if spec.scaling == "none":
        return quantize(x, spec.fmt, spec.rounding)
    if operand == "mul":
        q, scales = scaled_elements(x, spec)
        return q * scales
    from lmul.scaling import scaled_quantize

    x2 = x.unsqueeze(0 if operand == "a" else -1) if x.dim() == 1 else x
    q, scales = scaled_quantize(x2, spec.fmt, spec.scaling, operand, spec.rounding, per_element=True)
    return (q * scales).reshape(x.shape)


def matmul_grads(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, spec: LMulSpec,
                 needs: tuple[bool, bool], mm=torch.matmul) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dA, dB)`` of ``C = L-Matmul(A, B)`` (torch.matmul shapes): ``mm(dC, B_q^T)`` and
    ``mm(A_q^T, dC)``, reduced over broadcast batch dimensions, in the operands' dtypes (None where not
    needed). ``mm`` is ``torch.matmul`` (``backward="exact"``) or the forward's L-Matmul (``"same"``)."""
    aq = _q(a, spec, "a") if needs[1] else a.detach()   # dA needs only B_q, dB only A_q
    bq = _q(b, spec, "b") if needs[0] else b.detach()
    a2 = aq.unsqueeze(0) if a.dim() == 1 else aq     # [..., M, K]
    b2 = bq.unsqueeze(-1) if b.dim() == 1 else bq    # [..., K, N]
    g = grad.float()
    if b.dim() == 1:
        g = g.unsqueeze(-1)
    if a.dim() == 1:
        g = g.unsqueeze(-2)                           # [..., M, N] (both 1-D: a 0-d grad becomes [1, 1])
    ga = gb = None
    if needs[0]:
        ga = mm(g, b2.transpose(-1, -2)).sum_to_size(a2.shape).reshape(a.shape).to(a.dtype)
    if needs[1]:
        gb = mm(a2.transpose(-1, -2), g).sum_to_size(b2.shape).reshape(b.shape).to(b.dtype)
    return ga, gb


def mul_grads(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, spec: LMulSpec,
              needs: tuple[bool, bool], mul=torch.mul) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dx, dy)`` of ``P = mul(x, y)`` (broadcasting): ``mul(dP, y_q)`` and ``mul(dP, x_q)``, summed
    to the operands' shapes, in their dtypes (None where not needed). ``mul`` is ``torch.mul``
    (``backward="exact"``) or the forward's L-Mul (``"same"``)."""
    xq = _q(x, spec) if needs[1] else None
    yq = _q(y, spec) if needs[0] else None
    g = grad.float()
    gx = mul(g, yq).sum_to_size(x.shape).to(x.dtype) if needs[0] else None
    gy = mul(g, xq).sum_to_size(y.shape).to(y.dtype) if needs[1] else None
    return gx, gy
