"""Elementwise L-Mul (Luo & Sun, arXiv:2410.00907, Eq. 1-2 and Figure 2).

For normal operands ``x = ±(1 + xm) 2^xe`` and ``y = ±(1 + ym) 2^ye`` in a format with an
m-bit mantissa (``xm = Mx / 2^m``) and offset ``c = 2^-l(m)``:

* ``mode="bit"`` adds the exponent‖mantissa fields as integers, the mantissa carry flowing
  into the exponent (the paper's hardware, Figure 2). With ``S = Mx + My + c 2^m`` and
  ``q = floor(S / 2^m)``: ``P = ± 2^(xe + ye + q) (1 + (S - q 2^m) / 2^m)``.
* ``mode="formula"`` reads Eq. 1 as real arithmetic: ``P = ± (1 + xm + ym + c) 2^(xe + ye)``.
* ``mode="exact"`` is the ordinary product of the quantized operands (the fp8/bf16 baselines).

Zero or subnormal operands give a signed zero in ``bit``/``formula`` mode; NaN and ``inf x 0``
give NaN; ``inf x nonzero`` gives ``±inf``. The product exponent is not clamped to the
operand format; ``P`` is rounded once (to nearest even) into float32.
See ``docs/semantics.md`` section 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmul.formats import Format, pow2
from lmul.spec import MODES

__all__ = ["products", "split", "Parts"]


@dataclass(frozen=True)
class Parts:
    """A quantized float32 operand split for L-Mul. ``[s|eeeeeeee|mmm...]`` float32 bits."""

    bits: torch.Tensor    # int32 view of the float32 value
    sign: torch.Tensor    # bool, True for negative
    exp: torch.Tensor     # int32 unbiased exponent
    man: torch.Tensor     # int32 m-bit mantissa field Mx
    normal: torch.Tensor  # bool: finite and normal in fmt (zero/subnormal/inf/NaN: False)


def split(xq: torch.Tensor, fmt: Format) -> Parts:
    """Split float32 ``xq`` (already quantized to ``fmt``) into sign, exponent, m-bit mantissa field
    and whether it is a normal number of ``fmt`` (the one operand split every backend uses)."""
    bits = xq.view(torch.int32)
    mag = bits & 0x7FFFFFFF
    field = mag >> 23
    exp = field - 127
    man = (mag & 0x7FFFFF) >> (23 - fmt.man_bits)
    normal = (exp >= fmt.emin) & (field < 255)
    return Parts(bits, bits < 0, exp, man, normal)


def products(
    xq: torch.Tensor, yq: torch.Tensor, fmt: Format, mode: str, offset: float
) -> torch.Tensor:
    """L-Mul products of operands already quantized to ``fmt`` (float32, broadcastable).

    ``offset`` is the resolved ``c`` (:attr:`lmul.LMulSpec.offset`). This is the elementwise reference
    every backend is tested against; :func:`lmul.mul` quantizes and dispatches to a backend."""
    if mode == "exact":
        return (xq.double() * yq.double()).float()  # exact in float64, one rounding
    px, py = split(xq, fmt), split(yq, fmt)
    m = fmt.man_bits
    if mode == "bit":
        s = px.man + py.man + int(offset * 2**m)            # S = Mx + My + c 2^m
        q = s >> m                                          # carry into the exponent
        sig = (s - (q << m)) + (1 << m)                     # 2^m (1 + frac)
        scale = pow2(px.exp + py.exp + q - m, torch.float64)
        mag = sig.double() * scale
    elif mode == "formula":
        frac = (px.man + py.man).double() * 2.0**-m          # xm + ym, exact
        mag = (1.0 + offset + frac) * pow2(px.exp + py.exp, torch.float64)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    mag = mag.float()  # the one rounding into the accumulator type
    # special operands: flush zero/subnormal, then IEEE rules for inf and NaN
    both = px.normal & py.normal
    fx = torch.where(px.normal | torch.isinf(xq) | torch.isnan(xq), xq, torch.zeros_like(xq))
    fy = torch.where(py.normal | torch.isinf(yq) | torch.isnan(yq), yq, torch.zeros_like(yq))
    special = fx * fy  # only used where an operand is not normal: 0, ±inf or NaN
    out = torch.where(both, mag, special.abs())
    negative = px.sign ^ py.sign
    return torch.where(torch.isnan(special) & ~both, special, torch.where(negative, -out, out))

