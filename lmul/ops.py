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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from lmul.autograd import LMulFunction  # straight-through gradient, docs/kernels.md
from lmul.formats import Format, FormatLike, Rounding, check_float, pow2, quantize

__all__ = ["Mode", "MODES", "mul", "offset_exponent", "resolve_offset", "products", "MUL_KERNELS",
           "register_mul_kernel"]

Mode = Literal["bit", "formula", "exact"]
MODES: tuple[str, ...] = ("bit", "formula", "exact")


def offset_exponent(m: int) -> int:
    """The paper's offset exponent ``l(m)`` (Eq. 1): ``m`` for ``m <= 3``, 3 for ``m = 4``,
    4 for ``m > 4``. The L-Mul offset is ``c = 2^-l(m)``."""
    if not isinstance(m, int) or m < 0:
        raise ValueError(f"mantissa bits must be a non-negative int, got {m!r}")
    return m if m <= 3 else (3 if m == 4 else 4)


def resolve_offset(fmt: FormatLike, mode: str = "bit", offset: Optional[float] = None) -> float:
    """The offset ``c`` used for ``fmt``: ``2^-l(m)`` unless ``offset`` overrides it.

    ``offset`` must be finite with ``0 <= offset < 1``; in ``bit`` mode ``offset 2^m`` must be an
    integer (the offset is added to the m-bit mantissa field)."""
    fmt = Format.parse(fmt)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if offset is None:
        return 2.0 ** -offset_exponent(fmt.man_bits)
    offset = float(offset)
    if not math.isfinite(offset) or not 0.0 <= offset < 1.0:
        raise ValueError(f"offset must be a finite number with 0 <= offset < 1, got {offset!r}")
    scaled = offset * 2**fmt.man_bits
    if mode == "bit" and scaled != int(scaled):
        raise ValueError(
            f"offset {offset!r} is not a multiple of 2^-{fmt.man_bits}: in bit mode the offset is "
            f"added to the {fmt.man_bits}-bit mantissa field of {fmt.name}"
        )
    return offset


MulKernel = Callable[[torch.Tensor, torch.Tensor, Format, str, float, str], Optional[torch.Tensor]]
MUL_KERNELS: dict[str, MulKernel] = {}


def register_mul_kernel(name: str, fn: MulKernel) -> None:
    """Register a fused kernel for :func:`mul` without autograd: ``fn(x, y, fmt, mode, c, rounding)``
    returns ``products(quantize(x), quantize(y), fmt, mode, c)`` with the same bits, or None where
    it does not apply (device, dtype, ...). Kernels are tried in registration order (the compiled
    CPU one registers itself from :mod:`lmul.kernels.cpu_ext`); delete an entry to disable it."""
    MUL_KERNELS[name] = fn


@dataclass(frozen=True)
class _Parts:
    """A quantized float32 operand split for L-Mul. ``[s|eeeeeeee|mmm...]`` float32 bits."""

    sign: torch.Tensor   # bool, True for negative
    exp: torch.Tensor    # int32 unbiased exponent
    man: torch.Tensor    # int32 m-bit mantissa field Mx
    normal: torch.Tensor  # bool: finite and normal in fmt (zero/subnormal/inf/NaN: False)


def _split(xq: torch.Tensor, fmt: Format) -> _Parts:
    bits = xq.view(torch.int32)
    mag = bits & 0x7FFFFFFF
    field = mag >> 23
    exp = field - 127
    man = (mag & 0x7FFFFF) >> (23 - fmt.man_bits)
    normal = (exp >= fmt.emin) & (field < 255)
    return _Parts(bits < 0, exp, man, normal)


def products(
    xq: torch.Tensor, yq: torch.Tensor, fmt: Format, mode: str, offset: float
) -> torch.Tensor:
    """L-Mul products of operands already quantized to ``fmt`` (float32, broadcastable).

    ``offset`` is the resolved ``c``. Use :func:`mul` unless operands are pre-quantized."""
    if mode == "exact":
        return (xq.double() * yq.double()).float()  # exact in float64, one rounding
    px, py = _split(xq, fmt), _split(yq, fmt)
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


def mul(
    x: torch.Tensor,
    y: torch.Tensor,
    fmt: FormatLike = "bf16",
    mode: Mode = "bit",
    offset: Optional[float] = None,
    rounding: Rounding = "rne",
) -> torch.Tensor:
    """Elementwise L-Mul of ``x`` and ``y`` (broadcasting), returned as float32.

    Both operands are first quantized to ``fmt`` (``rounding``, saturating overflow), then
    multiplied per ``mode`` (see the module docstring). ``offset`` overrides ``c = 2^-l(m)``;
    ``offset=0`` gives Mitchell's logarithmic multiplier.

    >>> mul(torch.tensor(3.0), torch.tensor(4.0))  # (1.5 + 0 + 1/16) * 2^3
    tensor(12.5000)
    """
    fmt = Format.parse(fmt)
    check_float(x, "x")
    check_float(y, "y")
    if x.device != y.device:
        raise ValueError(f"x and y are on different devices: {x.device} and {y.device}")
    try:
        torch.broadcast_shapes(x.shape, y.shape)
    except RuntimeError as err:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} do not broadcast") from err
    c = resolve_offset(fmt, mode, offset)
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        run = lambda u, v: products(quantize(u, fmt, rounding), quantize(v, fmt, rounding), fmt, mode, c)
        return LMulFunction.apply(x, y, run, fmt, rounding)
    for kernel in MUL_KERNELS.values():
        out = kernel(x, y, fmt, mode, c, rounding)
        if out is not None:
            return out
    xq = quantize(x, fmt, rounding)
    yq = quantize(y, fmt, rounding)
    return products(xq, yq, fmt, mode, c)
