"""Small floating-point formats and rounding into them.

A format ``Format(E, m, finite_only)`` has a sign bit, an E-bit exponent field with bias
``2^(E-1) - 1`` and an m-bit mantissa field. Normal values are ``(-1)^s (1 + M/2^m) 2^(e)`` with
``emin <= e <= emax``; subnormals are ``(-1)^s (M/2^m) 2^emin``. An IEEE-like format keeps the
all-ones exponent field for inf/NaN; a ``finite_only`` format (fp8 e4m3fn) uses it for finite
values and keeps only the all-ones pattern ``S.1..1.1..1`` for NaN; a ``finite_only`` format with
``no_nan`` (the OCP MX element formats, FP4 E2M1 = :data:`E2M1`) has neither inf nor NaN: every
encoding is a finite value.

Every value of every format is exactly representable in float32 (E <= 8, m <= 23), so
:func:`quantize` returns float32 tensors. See ``docs/semantics.md`` section 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Union

import torch

__all__ = ["Format", "FormatLike", "E4M3", "E5M2", "E2M1", "BF16", "FP16", "FP32", "quantize", "check_float",
           "check_devices"]

Rounding = Literal["rne", "trunc"]
Overflow = Literal["saturate", "ieee"]

# float32 layout: [s|eeeeeeee|mmmmmmmmmmmmmmmmmmmmmmm], float64: [s|11 e|52 m]
_SOURCE = {
    torch.float32: (23, 127, torch.int32),
    torch.float64: (52, 1023, torch.int64),
}


@dataclass(frozen=True)
class Format:
    """A binary floating-point format with ``exp_bits`` exponent and ``man_bits`` mantissa bits.

    ``bias = 2^(E-1) - 1``, ``emin = 1 - bias``. IEEE-like: ``emax = 2^E - 2 - bias`` and
    ``max = (2 - 2^-m) 2^emax``; ``finite_only``: ``emax = 2^E - 1 - bias`` and
    ``max = (2 - 2^(1-m)) 2^emax``; ``finite_only`` with ``no_nan`` (no NaN encoding either, OCP MX
    v1.0's FP4/FP6 elements): ``emax = 2^E - 1 - bias``, ``max = (2 - 2^-m) 2^emax`` (E2M1: 6).
    Subnormals exist in every format.
    """

    exp_bits: int
    man_bits: int
    finite_only: bool = False
    no_nan: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.exp_bits, bool) or not isinstance(self.exp_bits, int) or not 1 <= self.exp_bits <= 8:
            raise ValueError(f"exp_bits must be an int in 1..8, got exp_bits={self.exp_bits!r}")
        if isinstance(self.man_bits, bool) or not isinstance(self.man_bits, int) or not 0 <= self.man_bits <= 23:
            raise ValueError(f"man_bits must be an int in 0..23, got man_bits={self.man_bits!r}")
        if not isinstance(self.finite_only, bool):
            raise ValueError(f"finite_only must be a bool, got finite_only={self.finite_only!r}")
        if not isinstance(self.no_nan, bool) or (self.no_nan and not self.finite_only):
            raise ValueError(f"no_nan=True needs finite_only=True (an IEEE-like format keeps NaN), got "
                             f"no_nan={self.no_nan!r}, finite_only={self.finite_only!r}")
        if self.finite_only and self.man_bits == 0 and not self.no_nan:
            raise ValueError("a finite_only format needs man_bits >= 1 (its NaN is S.1..1.1..1)")

    # -- derived facts (the only place they are spelled out) ---------------------------------
    @property
    def bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (and the scale of the subnormals)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite binade."""
        top_field = (1 << self.exp_bits) - (1 if self.finite_only else 2)
        return top_field - self.bias

    @property
    def has_inf(self) -> bool:
        return not self.finite_only

    @cached_property
    def max(self) -> float:
        """Largest finite value."""
        m = self.man_bits
        if self.emax < self.emin:  # E = 1, IEEE-like: only subnormals are finite
            return (1 - 2.0**-m) * 2.0**self.emin
        top = 2 - 2.0 ** (1 - m) if self.finite_only and not self.no_nan else 2 - 2.0**-m
        return top * 2.0**self.emax

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)

    @property
    def bits(self) -> int:
        """Total width including the sign bit."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def name(self) -> str:
        """Short name that :meth:`parse` maps back to this format."""
        for alias, fmt in _NAMED.items():
            if fmt == self:
                return alias
        base = f"e{self.exp_bits}m{self.man_bits}"
        if self.no_nan:
            return base + "fnn"
        if self.finite_only:
            return base + "fn"
        return base + ("ieee" if base in _NAMED else "")

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def parse(spec: FormatLike) -> Format:
        """Turn ``"e4m3" | "e5m2" | "fp4" | "bf16" | "fp16" | "fp32" | "eXmY[fn|fnn|ieee]"``, a torch
        floating dtype, or a :class:`Format` into a :class:`Format` (``fnn``: finite, no NaN)."""
        if isinstance(spec, Format):
            return spec
        if isinstance(spec, torch.dtype):
            for alias, dtype in _DTYPES.items():
                if dtype == spec:
                    return _NAMED[alias]
            raise ValueError(f"torch dtype {spec} has no lmul format; use one of {list(_DTYPES.values())}")
        if not isinstance(spec, str):
            raise TypeError(f"a format is a Format, a torch dtype or a string, got {type(spec).__name__}")
        key = spec.strip().lower()
        key = _ALIASES.get(key, key)
        if key in _NAMED:
            return _NAMED[key]
        match = re.fullmatch(r"e(\d+)m(\d+)(fnn|fn|ieee)?", key)
        if match is None:
            raise ValueError(
                f"unknown format {spec!r}: use one of {', '.join(_NAMED)}, or 'eXmY' with 1 <= X <= 8, "
                "0 <= Y <= 23 (suffix 'fn' for finite-only, 'fnn' for finite without NaN, e.g. 'e8m3', "
                "'e4m3fn', 'e2m1fnn', 'e5m6')"
            )
        return Format(int(match[1]), int(match[2]), finite_only=match[3] in ("fn", "fnn"), no_nan=match[3] == "fnn")

    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype with exactly this format, if there is one."""
        return _DTYPES.get(self.name)


FormatLike = Union[Format, str, torch.dtype]

E4M3 = Format(4, 3, finite_only=True)
E5M2 = Format(5, 2)
E2M1 = Format(2, 1, finite_only=True, no_nan=True)  # OCP MX v1.0 FP4: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, no inf/NaN
BF16 = Format(8, 7)
FP16 = Format(5, 10)
FP32 = Format(8, 23)

_NAMED = {"e4m3": E4M3, "e5m2": E5M2, "fp4": E2M1, "bf16": BF16, "fp16": FP16, "fp32": FP32}
_ALIASES = {
    "float8_e4m3fn": "e4m3", "e4m3fn": "e4m3", "float8_e5m2": "e5m2", "bfloat16": "bf16",
    "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32", "float4_e2m1fn": "fp4", "mxfp4": "fp4",
}
_DTYPES = {
    "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "bf16": torch.bfloat16,
    "fp16": torch.float16, "fp32": torch.float32,
}


_WIDE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # computed on directly


def check_float(x: torch.Tensor, what: str = "input") -> torch.Tensor:
    """``x`` as an operand: a dense (``torch.strided``, not nested) tensor of a floating dtype.

    float16, bfloat16, float32 and float64 are returned unchanged; the float8 dtypes
    (``float8_e4m3fn``, ``float8_e5m2``, their ``fnuz`` variants, ``float8_e8m0fnu``) are returned
    converted to float32, which is exact (every float8 value is a float32 value). Non-tensors,
    non-floating or packed dtypes (``float4_e2m1fn_x2``), sparse layouts and nested tensors raise
    ``TypeError`` naming ``what`` and the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested:
        raise TypeError(f"{what} is a nested tensor (layout {x.layout}); lmul takes dense tensors "
                        "(pad it with torch.nested.to_padded_tensor or unbind it)")
    if x.layout != torch.strided:
        raise TypeError(f"{what} has layout {x.layout}; lmul takes dense (torch.strided) tensors (use .to_dense())")
    if not x.is_floating_point():
        raise TypeError(f"{what} must have a floating dtype, got {x.dtype}")
    if x.dtype in _WIDE:
        return x
    if x.dtype.itemsize == 1 and str(x.dtype).startswith("torch.float8_"):
        return x.to(torch.float32)  # exact
    raise TypeError(f"{what} has dtype {x.dtype}, which lmul does not take: use float16, bfloat16, float32, "
                    "float64 or a float8 dtype (unpack packed formats to float32 first)")


def check_devices(what: str, *tensors: torch.Tensor) -> None:
    """Operands must share one real device (``meta`` tensors have no values to multiply)."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{what}: operands are on different devices: {', '.join(sorted(map(str, devices)))}")
    device = next(iter(devices))
    if device.type == "meta":
        raise ValueError(f"{what}: operands are on the 'meta' device, which holds no values "
                         "(use torch.compile / FakeTensorMode for shape-only tracing)")


def pow2(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact ``2^exponent`` built from bits (normal range of ``dtype``; float32 also covers
    its subnormals down to 2^-149)."""
    man, bias, itype = _SOURCE[dtype]
    e = exponent.to(itype)
    normal = (e + bias).clamp(min=1) << man
    if dtype == torch.float32:
        sub = torch.ones_like(e) << (e + 149).clamp(0, 22)  # 2^-149 .. 2^-127
        normal = torch.where(e < -126, sub, normal)
    return normal.view(dtype)


def quantize(
    x: torch.Tensor,
    fmt: FormatLike,
    rounding: Rounding = "rne",
    overflow: Overflow = "saturate",
) -> torch.Tensor:
    """Round ``x`` to the nearest value of ``fmt`` and return it as float32.

    ``rounding="rne"`` rounds to nearest, ties to even; ``"trunc"`` rounds toward zero
    (keeps the leading bits, paper Table 5). A result beyond ``fmt.max`` becomes ``±max``
    with ``overflow="saturate"`` (also ``±inf`` in a format without inf) and ``±inf`` (NaN in
    a finite-only format) with ``overflow="ieee"``. NaN stays NaN, ``±0`` keeps its sign.

    "Beyond max" is judged on the rounded value (exponent range unbounded), so with ``trunc`` a
    finite ``x`` overflows only if keeping its leading bits exceeds ``max``. Ties go to the even
    encoding (for ``m = 0``: the lower neighbour's exponent-field parity).

    ``rne`` + ``ieee`` equals ``x.to(bfloat16 | float16 | float8_e5m2)``; ``rne`` + ``saturate``
    equals ``x.to(float8_e4m3fn)``. Float64 inputs are rounded once, directly.

    This is the torch implementation (every device and option, the oracle of the compiled quantizer);
    :func:`lmul.quantize` is the same function on the fastest backend (``lmul.backends()``).
    """
    fmt = Format.parse(fmt)
    x = check_float(x, "x")
    if not isinstance(rounding, str) or rounding not in ("rne", "trunc"):
        raise ValueError(f"rounding must be 'rne' or 'trunc', got rounding={rounding!r}")
    if not isinstance(overflow, str) or overflow not in ("saturate", "ieee"):
        raise ValueError(f"overflow must be 'saturate' or 'ieee', got overflow={overflow!r}")
    return _quantize_torch(x, fmt, rounding, overflow)


def _quantize_torch(x: torch.Tensor, fmt: Format, rounding: str, overflow: str) -> torch.Tensor:
    """:func:`quantize` in torch ops (every device and option; the oracle for fused quantizers)."""
    src = torch.float64 if x.dtype == torch.float64 else torch.float32
    man, bias, itype = _SOURCE[src]
    xs = x.to(src)
    bits = xs.view(itype)
    mag = bits & ((1 << (man + _exp_width(src))) - 1)          # |x| bits
    field = mag >> man                                          # biased exponent field
    e = field.clamp(min=1) - bias                               # exponent (subnormal: emin)
    sig = (mag & ((1 << man) - 1)) | ((field > 0).to(itype) << man)  # |x| = sig 2^(e - man)
    # keep (m) bits below the leading one, or fewer where the result is subnormal in fmt
    shift = (man - fmt.man_bits + (fmt.emin - e).clamp(min=0)).clamp(max=man + 2)
    q = sig >> shift
    if rounding == "rne":
        rem = sig - (q << shift)
        half = torch.ones_like(shift) << (shift - 1).clamp(min=0)
        # ties go to the neighbour with the even encoding: the mantissa LSB, or for m = 0 the
        # exponent field's LSB of the lower neighbour (its significand is the implicit 1)
        odd = q & 1 if fmt.man_bits else q & (e + fmt.bias) & 1
        up = (rem > half) | ((rem == half) & (odd == 1))
        q = q + (up & (shift > 0)).to(itype)
    scale = pow2(torch.maximum(e, torch.full_like(e, fmt.emin)) - fmt.man_bits, src)
    out = (q.to(src) * scale).to(torch.float32)  # exact: q < 2^(m+2) and fmt fits float32

    fmax = torch.tensor(fmt.max, dtype=torch.float32, device=x.device)
    too_big = out > fmax
    if overflow == "saturate":
        out = torch.where(too_big, fmax, out)
    else:
        over = torch.tensor(float("inf") if fmt.has_inf else float("nan"), device=x.device)
        out = torch.where(too_big, over, out)
    is_inf = torch.isinf(xs)
    if fmt.has_inf:
        out = torch.where(is_inf, torch.tensor(float("inf"), device=x.device), out)
    else:
        inf_to = fmax if overflow == "saturate" else torch.tensor(float("nan"), device=x.device)
        out = torch.where(is_inf, inf_to, out)
    out = torch.where(torch.isnan(xs), torch.tensor(float("nan"), device=x.device), out)
    return torch.copysign(out, xs.to(torch.float32))


def _exp_width(src: torch.dtype) -> int:
    return 8 if src == torch.float32 else 11
