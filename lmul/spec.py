"""Which multiply: :class:`LMulSpec`, the one resolved description of an L-Mul (or baseline) product.

A spec says everything :func:`lmul.mul` and :func:`lmul.matmul` need besides the operands: the operand
:class:`~lmul.formats.Format`, the mode (``bit``: paper Eq. 2 and Figure 2; ``formula``: Eq. 1 as real
arithmetic; ``exact``: the ordinary product, the fp8/bf16 baselines), the offset ``c`` (resolved: the
paper's ``2^-l(m)`` unless overridden), the operand rounding, the accumulator (``None`` = float32) and
its block, and the backend (``"auto"`` or a name from :func:`lmul.backends`). It is frozen, validated
once, and hashable; equal specs compute the same bits. ``docs/semantics.md`` is the contract.

One vocabulary names specs everywhere (Python, every command's flags, result files):

* a preset: :data:`PRESETS` (``"lmul"``, ``"e4m3"``, ``"lmul-k3"``, ...; the evaluation arms), or
* a spec name ``<fmt>-<mode>[-c<offset>][-trunc][-<scaling>][-acc<fmt>[x<block>][t<tile>]][-bwsame][-<backend>]``,
  as :attr:`LMulSpec.name` writes it: ``"bf16-bit"``, ``"e8m3-bit-trunc"``, ``"e4m3-exact-acce4m3x16"``,
  ``"e4m3-bit-row"``, ``"fp4-bit-mx-acce8m3x32"``, ``"e4m3-bit-row-acce4m3x128t128"``. ``<scaling>`` is
  one of the tokens ``tensor``, ``row``, ``block``, ``mx`` (:data:`SCALINGS`; absent: ``none``), the
  operand scaling of :mod:`lmul.scaling`; ``t<tile>`` the scaled accumulator (the running sums of each
  tile x tile output block share a power-of-two scale; ``docs/semantics.md`` section 7). The parts after
  ``<mode>`` may come in any order except that the backend, which may contain ``-``, is last.

:meth:`LMulSpec.from_name` reads both; ``LMulSpec.from_name(spec.name) == spec``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Literal, Optional, Union

from lmul.formats import BF16, FP32, Format, FormatLike

__all__ = ["LMulSpec", "MODES", "MODE_CODES", "ROUNDINGS", "BACKWARDS", "SCALINGS", "PRESETS", "Mode",
           "offset_exponent", "resolve_offset", "resolve_spec"]

Mode = Literal["bit", "formula", "exact"]
MODES: tuple[str, ...] = ("bit", "formula", "exact")
MODE_CODES: dict[str, int] = {"bit": 0, "formula": 1, "exact": 2}  # the integer codes every compiled kernel uses
ROUNDINGS: tuple[str, ...] = ("rne", "trunc")
BACKWARDS: tuple[str, ...] = ("exact", "same")  # the gradient's products: lmul.autograd
# operand scaling (lmul.scaling, docs/semantics.md section 7): power-of-two scales per tensor, per row of A /
# column of B, per 1x128 tile of A and 128x128 block of B (DeepSeek-V3), per 32 elements along K (OCP MX v1.0)
SCALINGS: tuple[str, ...] = ("none", "tensor", "row", "block", "mx")
SCALING_MAX_EXP_BITS = 6  # scaled formats: two scaled maxima (< 2^33 each) multiply within float32's range

# The one preset table: name -> (LMulSpec keyword arguments, patch scope). The evaluation arms, the
# `--arms` / `--preset` vocabulary and docs/patching.md's table all come from here.
ACC_BLOCK_MAX = 2**63 - 1  # the largest acc_block: the compiled kernels take it as an int64
ACC_BLOCK_T6 = 128  # Table 6 arms: the accumulator reading chosen from the measurements in docs/finetune.md
ACC_TILE_T6 = 128  # Table 6's scaled-accumulator arms: output tiles sharing one accumulator scale
PRESETS: dict[str, tuple[dict, str]] = {
    "exact": (dict(fmt="fp32", mode="exact"), "none"),                      # the unchanged model
    "e4m3": (dict(fmt="e4m3", mode="exact"), "attention"),                  # paper's fp8 e4m3 attention
    "e5m2": (dict(fmt="e5m2", mode="exact"), "attention"),                  # paper's fp8 e5m2 attention
    "bf16": (dict(fmt="bf16", mode="exact"), "attention"),                  # bf16 attention baseline
    "lmul": (dict(fmt="bf16", mode="bit"), "attention"),                    # paper's L-Mul attention
    "lmul-k2": (dict(fmt="e8m2", mode="bit", rounding="trunc"), "attention"),  # Table 5, k = 2
    "lmul-k3": (dict(fmt="e8m3", mode="bit", rounding="trunc"), "attention"),  # Table 5, k = 3
    "lmul-k4": (dict(fmt="e8m4", mode="bit", rounding="trunc"), "attention"),  # Table 5, k = 4
    "lmul-formula": (dict(fmt="bf16", mode="formula"), "attention"),        # Eq. 1 as real arithmetic
    "mitchell": (dict(fmt="bf16", mode="bit", offset=0.0), "attention"),    # offset 0 (Mitchell 1962)
    "lmul-all": (dict(fmt="bf16", mode="bit"), "all"),                      # every multiply, bf16 L-Mul
    # Table 6 (every multiply, "8-bit accumulation"): fp8 operands, accumulator rounded to fp8 every
    # ACC_BLOCK_T6 products (the reading chosen in docs/finetune.md); L-Mul: e4m3 inputs, k = 3
    "e4m3-all": (dict(fmt="e4m3", mode="exact", acc="e4m3", acc_block=ACC_BLOCK_T6), "all"),
    "e5m2-all": (dict(fmt="e5m2", mode="exact", acc="e5m2", acc_block=ACC_BLOCK_T6), "all"),
    "lmul-all-k3": (dict(fmt="e4m3", mode="bit", acc="e4m3", acc_block=ACC_BLOCK_T6), "all"),
    # Table 6's other accumulator reading: fp8 precision with float32's exponent range (e8m3 / e8m2)
    "e4m3-all-p": (dict(fmt="e4m3", mode="exact", acc="e8m3", acc_block=ACC_BLOCK_T6), "all"),
    "e5m2-all-p": (dict(fmt="e5m2", mode="exact", acc="e8m2", acc_block=ACC_BLOCK_T6), "all"),
    "lmul-all-k3-p": (dict(fmt="e4m3", mode="bit", acc="e8m3", acc_block=ACC_BLOCK_T6), "all"),
    # fp8/fp4 as really run (lmul.scaling, docs/semantics.md section 7): <arm>-row / <arm>-mx is the arm with
    # power-of-two operand scales per row (torchao rowwise) or per 32 along K (OCP MX); float32 sums.
    # L-Mul arms take e4m3 operands (bf16 cannot be scaled); mxfp4: fp4 e2m1 elements, mx scales
    "e4m3-row": (dict(fmt="e4m3", mode="exact", scaling="row"), "attention"),
    "e4m3-mx": (dict(fmt="e4m3", mode="exact", scaling="mx"), "attention"),
    "e5m2-row": (dict(fmt="e5m2", mode="exact", scaling="row"), "attention"),
    "e5m2-mx": (dict(fmt="e5m2", mode="exact", scaling="mx"), "attention"),
    "lmul-row": (dict(fmt="e4m3", mode="bit", scaling="row"), "attention"),
    "lmul-mx": (dict(fmt="e4m3", mode="bit", scaling="mx"), "attention"),
    "mxfp4": (dict(fmt="fp4", mode="exact", scaling="mx"), "attention"),
    "lmul-mxfp4": (dict(fmt="fp4", mode="bit", scaling="mx"), "attention"),
    "e4m3-all-row": (dict(fmt="e4m3", mode="exact", scaling="row"), "all"),
    "e4m3-all-mx": (dict(fmt="e4m3", mode="exact", scaling="mx"), "all"),
    "e5m2-all-row": (dict(fmt="e5m2", mode="exact", scaling="row"), "all"),
    "e5m2-all-mx": (dict(fmt="e5m2", mode="exact", scaling="mx"), "all"),
    "lmul-all-k3-row": (dict(fmt="e4m3", mode="bit", scaling="row"), "all"),
    "lmul-all-k3-mx": (dict(fmt="e4m3", mode="bit", scaling="mx"), "all"),
    # Table 6's third accumulator reading: a scaled fp8 accumulator (the running sums of each 128 x 128 output
    # tile share a power-of-two scale, so e4m3's +-448 never clips), row-scaled operands
    "e4m3-all-row-sacc": (dict(fmt="e4m3", mode="exact", scaling="row", acc="e4m3", acc_block=ACC_BLOCK_T6,
                               acc_tile=ACC_TILE_T6), "all"),
    "e5m2-all-row-sacc": (dict(fmt="e5m2", mode="exact", scaling="row", acc="e5m2", acc_block=ACC_BLOCK_T6,
                               acc_tile=ACC_TILE_T6), "all"),
    "lmul-all-k3-row-sacc": (dict(fmt="e4m3", mode="bit", scaling="row", acc="e4m3", acc_block=ACC_BLOCK_T6,
                                  acc_tile=ACC_TILE_T6), "all"),
    "mxfp4-all": (dict(fmt="fp4", mode="exact", scaling="mx"), "all"),
    "lmul-all-mxfp4": (dict(fmt="fp4", mode="bit", scaling="mx"), "all"),
}


def offset_exponent(m: int) -> int:
    """The paper's offset exponent ``l(m)`` (Eq. 1): ``m`` for ``m <= 3``, 3 for ``m = 4``,
    4 for ``m > 4``. The L-Mul offset is ``c = 2^-l(m)``."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"mantissa bits must be a non-negative int, got {m!r}")
    return m if m <= 3 else (3 if m == 4 else 4)


def _choice(what: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {what}={value!r}")
    return value


def _format(what: str, value: Any) -> Format:
    try:
        return Format.parse(value)
    except (TypeError, ValueError) as err:  # the same class, naming the field
        raise type(err)(f"{what}={value!r} is not a format: {err}") from err


@dataclass(frozen=True)
class LMulSpec:
    """Which multiply, resolved: ``LMulSpec(fmt="e4m3", mode="formula")``.

    Fields accept the usual spellings (a format name, a torch dtype or a :class:`Format`; ``acc``
    ``"fp32"`` or ``None`` for float32 accumulation) and are stored resolved: ``fmt`` and ``acc`` as
    :class:`Format` (``acc=None`` for float32), ``offset`` as the float ``c`` (``2^-l(m)`` when not
    given; ``0 <= c <= 1``, a multiple of ``2^-m`` in ``bit`` mode). ``acc_block``: products summed in
    float32 per accumulator rounding, ``1 <= acc_block <= 2^63 - 1`` (``docs/semantics.md`` section 4).
    ``acc_tile``: 0, or the side ``T`` of the output tiles whose running sums share one power-of-two
    scale (the scaled accumulator, ``docs/semantics.md`` section 7; needs ``acc``).
    Invalid fields raise ``ValueError`` naming the field and what is allowed.
    """

    fmt: Format = field(default=BF16, metadata=dict(help="operand format: e4m3, e5m2, bf16, fp16, fp32 or eXmY"))
    mode: str = field(default="bit", metadata=dict(help="bit (paper Eq. 2), formula (Eq. 1) or exact (baselines)",
                                                   choices=MODES))
    offset: Optional[float] = field(default=None, metadata=dict(help="L-Mul offset c (default 2^-l(m); 0: Mitchell)"))
    rounding: str = field(default="rne", metadata=dict(help="operand rounding", choices=ROUNDINGS))
    acc: Optional[Format] = field(default=None, metadata=dict(help="L-Matmul accumulation format (default fp32)"))
    acc_block: int = field(default=1, metadata=dict(help="products summed in float32 per accumulator rounding"))
    backend: str = field(default="auto", metadata=dict(help="backend name, or auto (see `lmul.backends()`)"))
    backward: str = field(default="exact", metadata=dict(
        help="gradient products: exact (straight-through, exact products of the quantized operands) or same "
             "(the backward matmuls/products use this spec)", choices=BACKWARDS))
    scaling: str = field(default="none", metadata=dict(
        help="operand scaling (power-of-two scales): none, tensor, row, block (1x128 / 128x128) or mx (32 along K)",
        choices=SCALINGS))
    acc_tile: int = field(default=0, metadata=dict(
        help="scaled accumulator: the running sums of each T x T output tile share a power-of-two scale "
             "(0: unscaled; needs acc=<format>)"))

    def __post_init__(self) -> None:
        fmt = _format("fmt", self.fmt)
        mode = _choice("mode", self.mode, MODES)
        rounding = _choice("rounding", self.rounding, ROUNDINGS)
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("fmt", fmt)
        if mode == "exact" and self.offset is not None:
            raise ValueError(f"offset={self.offset!r} has no effect with mode='exact'; leave it None")
        set_("offset", _resolve_offset(fmt, mode, self.offset))
        acc = None if self.acc is None else _format("acc", self.acc)
        set_("acc", None if acc == FP32 else acc)
        if (isinstance(self.acc_block, bool) or not isinstance(self.acc_block, numbers.Integral)
                or not 1 <= self.acc_block <= ACC_BLOCK_MAX):
            raise ValueError(f"acc_block must be an int with 1 <= acc_block <= 2^63 - 1 (the compiled kernels' "
                             f"int64; any value >= K means one block), got acc_block={self.acc_block!r}")
        set_("acc_block", int(self.acc_block))
        if (isinstance(self.acc_tile, bool) or not isinstance(self.acc_tile, numbers.Integral)
                or not 0 <= self.acc_tile <= ACC_BLOCK_MAX):
            raise ValueError(f"acc_tile must be an int with 0 <= acc_tile <= 2^63 - 1 (0: an unscaled accumulator), "
                             f"got acc_tile={self.acc_tile!r}")
        set_("acc_tile", int(self.acc_tile))
        if self.acc_tile and acc in (None, FP32):
            raise ValueError(f"acc_tile={self.acc_tile} scales the running sums of an acc=<format> accumulator; "
                             "with float32 sums (acc=None/'fp32') there is nothing to scale: give acc= (e.g. 'e4m3')")
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"backend must be a backend name or 'auto', got backend={self.backend!r}")
        _choice("backward", self.backward, BACKWARDS)
        if _choice("scaling", self.scaling, SCALINGS) != "none" and fmt.exp_bits > SCALING_MAX_EXP_BITS:
            raise ValueError(
                f"scaling={self.scaling!r} needs an operand format with at most {SCALING_MAX_EXP_BITS} exponent bits, "
                f"got fmt={fmt.name!r} ({fmt.exp_bits}): a power-of-two scale cannot widen a format that already has "
                "(nearly) float32's exponent range, and its scaled products would overflow float32 "
                "(scale e4m3, e5m2, fp4, fp16, eXmY with X <= 6)")
        set_("_name", self._make_name())  # precomputed: the custom ops take the spec by name
        del mode, rounding

    # -- names ------------------------------------------------------------------------------
    @property
    def acc_name(self) -> str:
        return "fp32" if self.acc is None else self.acc.name

    @property
    def default_offset(self) -> bool:
        return self.offset == 2.0 ** -offset_exponent(self.fmt.man_bits)

    @property
    def name(self) -> str:
        """``<fmt>-<mode>[-c<offset>][-trunc][-<scaling>][-acc<fmt>[x<block>][t<tile>]][-bw<backward>][-<backend>]``;
        the offset part only when it is not the paper's default and the mode is not exact."""
        return self._name

    def _make_name(self) -> str:
        parts = [self.fmt.name, self.mode]
        if self.mode != "exact" and not self.default_offset:
            parts.append("c" + repr(self.offset).replace("e-", "em"))  # 1e-07 -> c1em07 ('-' separates parts)
        if self.rounding != "rne":
            parts.append(self.rounding)
        if self.scaling != "none":
            parts.append(self.scaling)
        if self.acc is not None or self.acc_block != 1:
            parts.append(f"acc{self.acc_name}" + (f"x{self.acc_block}" if self.acc_block != 1 else "")
                         + (f"t{self.acc_tile}" if self.acc_tile else ""))
        if self.backward != "exact":
            parts.append(f"bw{self.backward}")
        if self.backend != "auto":
            parts.append(self.backend)
        return "-".join(parts)

    def __str__(self) -> str:
        return self.name

    def to_dict(self) -> dict:
        """Plain JSON-able fields (formats by name), for result files."""
        return dict(name=self.name, fmt=self.fmt.name, mode=self.mode, offset=self.offset, rounding=self.rounding,
                    acc=self.acc_name, acc_block=self.acc_block, backend=self.backend, backward=self.backward,
                    scaling=self.scaling, acc_tile=self.acc_tile)

    def replace(self, **changes) -> LMulSpec:
        """A copy with some fields changed (validated again). Changing ``fmt`` or ``mode`` of a spec
        with the default offset keeps the *default* offset of the new format."""
        if ("fmt" in changes or "mode" in changes) and "offset" not in changes and self.default_offset:
            changes["offset"] = None
        if changes.get("mode", self.mode) == "exact" and "offset" not in changes:
            changes["offset"] = None
        return dataclasses.replace(self, **changes)

    # -- the one parser -----------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: Union[str, LMulSpec], **overrides) -> LMulSpec:
        """A spec from a preset name (:data:`PRESETS`) or a spec name (:attr:`name`), with optional
        field overrides: ``from_name("lmul")``, ``from_name("e8m3-bit-trunc")``,
        ``from_name("e4m3", acc="e4m3")``."""
        if isinstance(name, LMulSpec):
            return name.replace(**overrides) if overrides else name
        if not isinstance(name, str):
            raise TypeError(f"a spec name is a string, got {type(name).__name__}")
        key = name.strip()
        if key in PRESETS:
            return cls(**{**PRESETS[key][0], **overrides})
        return cls(**{**_parse_name(key), **overrides})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, prefix: str = "") -> None:
        """Add ``--<prefix>spec`` (a preset or spec name) and one ``--<prefix><field>`` option per field,
        help texts and choices from the field metadata, defaults ``None`` (see :meth:`from_arguments`)."""
        parser.add_argument(f"--{prefix}spec", dest=f"{_dest(prefix)}spec", default=None, metavar="NAME",
                            help=f"a preset ({', '.join(PRESETS)}) or spec name such as e8m3-bit-trunc; "
                                 "the other options refine it")
        for f in fields(cls):
            kind = {"offset": float, "acc_block": int, "acc_tile": int}.get(f.name, str)
            parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"{_dest(prefix)}{f.name}", type=kind,
                                default=None, choices=f.metadata.get("choices"),
                                help=f"{f.metadata['help']} (default: {_shown(f.default)})")

    @classmethod
    def from_arguments(cls, namespace: argparse.Namespace, prefix: str = "") -> LMulSpec:
        """The spec that :meth:`add_arguments` options describe (unset options keep the default)."""
        p = _dest(prefix)
        given = {f.name: getattr(namespace, p + f.name) for f in fields(cls)}
        given = {k: v for k, v in given.items() if v is not None}
        name = getattr(namespace, p + "spec", None)
        return cls.from_name(name, **given) if name else cls(**given)


def _dest(prefix: str) -> str:
    return prefix.replace("-", "_")


def _shown(value: Any) -> str:
    return value.name if isinstance(value, Format) else repr(value)


def resolve_offset(fmt: FormatLike, mode: str = "bit", offset: Optional[float] = None) -> float:
    """The offset ``c`` used for ``fmt``: ``2^-l(m)`` unless ``offset`` overrides it.

    ``offset`` must be finite with ``0 <= offset <= 1`` (the paper's ``c = 2^-l`` with ``l >= 0``; the
    default for ``m = 0`` is ``c = 2^0 = 1``); in ``bit`` mode ``offset 2^m`` must be an integer (the
    offset is added to the m-bit mantissa field; for ``m = 0``: ``offset`` is 0 or 1)."""
    return _resolve_offset(_format("fmt", fmt), _choice("mode", mode, MODES), offset)


def _resolve_offset(fmt: Format, mode: str, offset: Any) -> float:
    if offset is None:
        return 2.0 ** -offset_exponent(fmt.man_bits)
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real):
        raise ValueError(f"offset must be a number (or None for 2^-l(m)), got offset={offset!r}")
    offset = float(offset)
    if not math.isfinite(offset) or not 0.0 <= offset <= 1.0:
        raise ValueError(f"offset must be a finite number with 0 <= offset <= 1, got offset={offset!r}")
    scaled = offset * 2**fmt.man_bits
    if mode == "bit" and scaled != int(scaled):
        raise ValueError(
            f"offset {offset!r} is not a multiple of 2^-{fmt.man_bits}: in bit mode the offset is "
            f"added to the {fmt.man_bits}-bit mantissa field of {fmt.name}"
        )
    return offset


_NAME = re.compile(r"(?P<fmt>[a-z0-9]+)-(?P<mode>bit|formula|exact)(?P<rest>(-[a-z0-9.+_]+)*)")


def _parse_name(name: str) -> dict:
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"unknown spec {name!r}: use a preset ({', '.join(PRESETS)}) or <fmt>-<mode>[-c<offset>][-trunc]"
            "[-tensor|-row|-block|-mx][-acc<fmt>[x<block>][t<tile>]][-<backend>], e.g. bf16-bit, e8m3-bit-trunc, "
            "e4m3-exact-acce4m3x16, e4m3-bit-row"
        )
    out: dict[str, Any] = dict(fmt=match["fmt"], mode=match["mode"])
    parts = [p for p in match["rest"].split("-") if p]
    for i, part in enumerate(parts):
        if part in ROUNDINGS:
            out["rounding"] = part
        elif re.fullmatch(r"c[0-9.em+]+", part):
            try:
                out["offset"] = float(part[1:].replace("em", "e-"))
            except ValueError as err:
                raise ValueError(f"spec {name!r}: offset part {part!r} is not a number") from err
        elif part in SCALINGS[1:]:
            out["scaling"] = part
        elif part in ("bwexact", "bwsame"):
            out["backward"] = part[2:]
        elif part.startswith("acc"):
            acc = re.fullmatch(r"acc([a-z0-9]+?)(?:x(\d+))?(?:t(\d+))?", part)
            if acc is None:
                raise ValueError(f"spec {name!r}: accumulator part {part!r} is not acc<fmt>[x<block>][t<tile>]")
            out["acc"], out["acc_block"], out["acc_tile"] = acc[1], int(acc[2] or 1), int(acc[3] or 0)
        else:  # the backend name is the rest (it may contain '-')
            out["backend"] = "-".join(parts[i:])
            break
    return out


@lru_cache(maxsize=4096, typed=True)
def _cached(fmt: FormatLike, mode: str, offset: Optional[float], rounding: str, acc: Any, acc_block: int,
            backend: str, scaling: str = "none", acc_tile: int = 0) -> LMulSpec:
    return LMulSpec(fmt, mode, offset, rounding, acc, acc_block, backend, scaling=scaling,
                    acc_tile=acc_tile)  # backward: default


def resolve_spec(spec: Optional[LMulSpec] = None, /, **options) -> LMulSpec:
    """The spec of a call of :func:`lmul.mul` / :func:`lmul.matmul`: ``spec`` itself, or one built from
    the keyword ``options`` (cached, so building it per call costs a dictionary look-up). Passing both
    a spec and options that differ from the defaults is an error."""
    if spec is not None:
        if not isinstance(spec, LMulSpec):
            raise TypeError(f"spec must be an LMulSpec, got {type(spec).__name__}")
        if all(type(v) is type(d) and v == d for k, v in options.items() for d in [_CALL_DEFAULTS.get(k, _MISSING)]):
            return spec  # the common case, cheap (and traceable by torch.compile)
        defaults = {f.name: f.default for f in fields(LMulSpec)}
        clash = {k: v for k, v in options.items() if not _same(v, defaults.get(k))}
        if clash:
            raise ValueError(f"got spec={spec.name!r} and the options {clash}: pass one or the other "
                             "(or spec.replace(...))")
        return spec
    full = {f.name: f.default for f in fields(LMulSpec)}
    full.update(options)
    try:
        return _cached(full["fmt"], full["mode"], full["offset"], full["rounding"], full["acc"], full["acc_block"],
                       full["backend"], full["scaling"], full["acc_tile"])
    except TypeError:  # an unhashable option (a list ...): validate it uncached, for the error message
        return LMulSpec(**full)


_MISSING = object()
# the default values of lmul.mul / lmul.matmul's keyword options, as the functions spell them
_CALL_DEFAULTS = {"fmt": "bf16", "mode": "bit", "offset": None, "rounding": "rne", "acc": "fp32", "backend": "auto",
                  "acc_block": 1, "scaling": "none", "acc_tile": 0}


def _same(value: Any, default: Any) -> bool:
    if value is None or default is None:
        return value is default or (value in ("fp32",) and default is None)
    if isinstance(default, Format):
        try:
            return Format.parse(value) == default
        except (TypeError, ValueError):
            return False
    return value == default
