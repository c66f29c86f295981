"""Verilog for an L-Mul unit and an ordinary floating-point multiplier of the same format.

Both units are combinational and generated from one small template each (templated
Verilog-2005: the generator is plain string formatting, so what is tested is the text that a
hardware engineer reads). Both take two operands ``a``, ``b`` in ``fmt`` — ``[s|e (E)|m (m)]`` —
and deliver the product in one output encoding that carries it *exactly*:

    s            sign, a XOR b (also for zero/inf; a NaN's sign is unspecified)
    nan/inf/zero flags, in that precedence; when one is set, ``e`` and ``f`` are don't-care
    e            OUT_EXP_BITS-bit biased exponent (bias OUT_BIAS, wider than the operand's)
    f            OUT_FRAC_BITS-bit fraction below the leading one
    value = (-1)^s (1 + f / 2^OUT_FRAC_BITS) 2^(e - OUT_BIAS)

The widths and the bias are per unit (:class:`UnitSpec` derives them; the Verilog states them
as localparams) so that neither unit pays for output bits it never drives.

``lmul`` (SPEC §2 ``bit`` mode, paper Eq. 2 / Figure 2): sign XOR and **one** integer adder over
the ``[e|m]`` fields, ``r = [ea|ma] + [eb|mb] + C`` with ``C = c 2^m`` the offset folded in
(``C = 1`` for m <= 3, i.e. the adder's carry-in). ``r``'s top bits are ``ea + eb + q`` and its
low m bits the fraction, with the mantissa carry ``q`` flowing into the exponent exactly as the
spec defines; the output bias is ``2 bias`` so no bias is subtracted (the paper's separate
8-bit "exponent offset" adder is left to the accumulator). Zero/subnormal operands flush to a
signed zero; NaN, inf x 0 (flushed subnormals count as 0) give NaN; inf x finite gives inf.

``fpmul``: an IEEE-style multiplier: significands ``(1.ma) x (1.mb)`` in an (m+1)x(m+1)
array multiplier, exponent add, normalisation, and

* ``rounding="exact"``: keep all ``2m + 1`` fraction bits — the exact product ``x y``
  (SPEC ``exact`` mode, before the accumulator's rounding);
* ``rounding="rne"``: round to m fraction bits, nearest-even, exponent still unclamped;

with ``subnormals=True`` (default; subnormal operands are real values, as SPEC ``exact`` mode
requires: a leading-zero count and a shifter normalise the product) or ``False`` (subnormals
flush like L-Mul's; a 1-bit normalisation suffices — the cheaper multiplier the paper's gate
counts describe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lmul.formats import Format, FormatLike
from lmul.spec import LMulSpec, resolve_offset

__all__ = ["Unit", "UNITS", "UnitSpec", "verilog"]

Unit = Literal["lmul", "fpmul"]
UNITS: tuple[str, ...] = ("lmul", "fpmul")
FpRounding = Literal["exact", "rne"]


@dataclass(frozen=True)
class UnitSpec:
    """One generated unit: operand format, kind and options; derives the output encoding.

    ``offset`` (lmul only) overrides ``c = 2^-l(m)`` like :func:`lmul.mul`; ``rounding`` and
    ``subnormals`` apply to ``fpmul`` only."""

    fmt: Format
    unit: Unit = "lmul"
    offset: Optional[float] = None
    rounding: FpRounding = "exact"
    subnormals: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", Format.parse(self.fmt))
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.fmt.exp_bits < 2 or self.fmt.man_bits < 1:
            raise ValueError(f"hardware units need exp_bits >= 2 and man_bits >= 1, got {self.fmt.name}")
        if self.rounding not in ("exact", "rne"):
            raise ValueError(f"rounding must be 'exact' or 'rne', got {self.rounding!r}")
        if self.unit == "lmul":
            if self.rounding != "exact" or not self.subnormals:
                raise ValueError("rounding/subnormals are fpmul options; the lmul unit is defined by SPEC bit mode")
            resolve_offset(self.fmt, "bit", self.offset)  # raises for an offset the adder cannot hold
        elif self.offset is not None:
            raise ValueError("offset applies to the lmul unit only")

    @classmethod
    def make(cls, fmt: FormatLike, unit: Unit = "lmul", **options) -> UnitSpec:
        return cls(Format.parse(fmt), unit, **options)

    @classmethod
    def from_spec(cls, spec: LMulSpec | str) -> UnitSpec:
        """The unit that computes an :class:`~lmul.spec.LMulSpec`'s products (a spec or its name, as
        every command spells them): ``bit`` mode is the L-Mul unit (the paper's Figure 2 adder),
        ``exact`` mode the multiplier delivering the exact product. Formula mode has no circuit
        (Eq. 1 as real arithmetic is what the bit-mode adder approximates)."""
        spec = LMulSpec.from_name(spec) if isinstance(spec, str) else spec
        if spec.mode == "formula":
            raise ValueError(f"spec {spec.name!r}: formula mode has no RTL unit; use bit (the L-Mul adder) or exact")
        if spec.acc is not None or spec.acc_block != 1:
            raise ValueError(f"spec {spec.name!r}: a unit computes one product; the accumulator is the MAC lane's")
        if spec.mode == "bit":
            return cls(spec.fmt, "lmul", offset=None if spec.default_offset else spec.offset)
        return cls(spec.fmt, "fpmul", rounding="exact")

    # -- operand facts ------------------------------------------------------------------------
    @property
    def width(self) -> int:
        """Operand width N = 1 + E + m."""
        return self.fmt.bits

    @property
    def top_field(self) -> int:
        """Largest biased exponent field of a finite normal operand."""
        return (1 << self.fmt.exp_bits) - (1 if self.fmt.finite_only else 2)

    @property
    def offset_int(self) -> int:
        """``C = c 2^m``, the integer the L-Mul adder adds to the mantissa field."""
        return int(resolve_offset(self.fmt, "bit", self.offset) * 2**self.fmt.man_bits)

    # -- output encoding ----------------------------------------------------------------------
    @property
    def out_frac_bits(self) -> int:
        m = self.fmt.man_bits
        return 2 * m + 1 if self.unit == "fpmul" and self.rounding == "exact" else m

    @property
    def out_bias(self) -> int:
        """Bias of the output exponent ``e``: ``2 bias``, or ``2 bias + 2m - 1`` for an fpmul with
        subnormal operands (its output exponent is ``xa + xb + 2m - lz``, never negative)."""
        b, m = self.fmt.bias, self.fmt.man_bits
        return 2 * b + 2 * m - 1 if self.unit == "fpmul" and self.subnormals else 2 * b

    @property
    def out_exp_bits(self) -> int:
        """Width holding the largest output exponent of any finite product."""
        m = self.fmt.man_bits
        if self.unit == "lmul":
            max_man = (1 << m) - (2 if self.fmt.finite_only else 1)
            max_r = 2 * ((self.top_field << m) | max_man) + self.offset_int
            return max(max_r.bit_length() - m, 1)
        top = 2 * self.top_field + (2 * m if self.subnormals else 1) + (self.rounding == "rne")
        return top.bit_length()

    @property
    def out_width(self) -> int:
        """Bits of the packed result ``{nan, inf, zero, s, e, f}`` the testbench writes."""
        return 4 + self.out_exp_bits + self.out_frac_bits

    @property
    def name(self) -> str:
        """Verilog module name, e.g. ``lmul_e4m3``, ``fpmul_e4m3_exact``, ``fpmul_bf16_rne_ftz``."""
        base = f"{self.unit}_{self.fmt.name}"
        if self.unit == "lmul":
            return base if self.offset is None else f"{base}_c{self.offset_int}"
        return f"{base}_{self.rounding}" + ("" if self.subnormals else "_ftz")

    def ports(self) -> list[tuple[str, str, int]]:
        """``(direction, name, width)`` of every port, in order."""
        n = self.width
        return [("input", "a", n), ("input", "b", n), ("output", "s", 1), ("output", "zero", 1),
                ("output", "inf", 1), ("output", "nan", 1), ("output", "e", self.out_exp_bits),
                ("output", "f", self.out_frac_bits)]


def _rng(width: int) -> str:
    return f"[{width - 1}:0] " if width > 1 else ""


def _header(spec: UnitSpec, what: str) -> str:
    fmt = spec.fmt
    ports = ",\n".join(f"    {d:<6} wire {_rng(w):<8}{n}" for d, n, w in spec.ports())
    kind = ", finite-only (S.1..1.1..1 is NaN)" if fmt.finite_only else ""
    return f"""// {what}
// Generated by lmul.hw.rtl (python -m lmul rtl); do not edit.
// Operands: {fmt.name} [s|e{fmt.exp_bits}|m{fmt.man_bits}], bias {fmt.bias}{kind}.
// Output: value = (-1)^s (1 + f/2^OUT_FRAC_BITS) 2^(e - OUT_BIAS); flags nan > inf > zero.
module {spec.name} (
{ports}
);
    localparam E = {fmt.exp_bits};
    localparam M = {fmt.man_bits};
    localparam N = {spec.width};
    localparam OUT_EXP_BITS = {spec.out_exp_bits};
    localparam OUT_FRAC_BITS = {spec.out_frac_bits};
    localparam OUT_BIAS = {spec.out_bias};

    wire [E-1:0] ea = a[N-2:M], eb = b[N-2:M];
    wire [M-1:0] ma = a[M-1:0], mb = b[M-1:0];
    wire a_top = &ea, b_top = &eb;              // all-ones exponent field
    wire a_zs = ~|ea, b_zs = ~|eb;              // zero or subnormal
{_specials(fmt)}
    assign s = a[N-1] ^ b[N-1];
"""


def _specials(fmt: Format) -> str:
    if fmt.finite_only:
        return ("    wire a_nan = a_top & (&ma), b_nan = b_top & (&mb);  // finite-only: only S.1..1.1..1\n"
                "    wire a_inf = 1'b0, b_inf = 1'b0;")
    return ("    wire a_nan = a_top & (|ma), b_nan = b_top & (|mb);\n"
            "    wire a_inf = a_top & ~(|ma), b_inf = b_top & ~(|mb);")


def _lmul(spec: UnitSpec) -> str:
    m, ew = spec.fmt.man_bits, spec.out_exp_bits
    rw = ew + m
    what = f"L-Mul unit (SPEC bit mode, paper Eq. 2 / Figure 2), offset C = {spec.offset_int}/2^{m}"
    return _header(spec, what) + f"""
    // flush-to-zero: a zero or subnormal operand gives a signed zero; inf x 0 is NaN
    assign nan = a_nan | b_nan | (a_inf & b_zs) | (b_inf & a_zs);
    assign inf = ~nan & (a_inf | b_inf);
    assign zero = ~nan & (a_zs | b_zs);

    // the one adder: [ea|ma] + [eb|mb] + C; the mantissa carry q flows into the exponent,
    // r = [ea + eb + q | S - q 2^M] with S = ma + mb + C (SPEC section 2)
    wire [{rw - 1}:0] r = a[N-2:0] + b[N-2:0] + {rw}'d{spec.offset_int};
    assign e = r[{rw - 1}:M];
    assign f = r[M-1:0];
endmodule
"""


def _fpmul(spec: UnitSpec) -> str:
    m, ew = spec.fmt.man_bits, spec.out_exp_bits
    pw = 2 * m + 2
    what = (f"IEEE-style multiplier, {'exact product' if spec.rounding == 'exact' else 'RNE to M fraction bits'}, "
            f"{'subnormal operands as real values' if spec.subnormals else 'subnormal operands flushed'}")
    out = [_header(spec, what)]
    if spec.subnormals:
        lzw = (pw - 1).bit_length()
        out.append(f"""
    wire a_z = a_zs & ~(|ma), b_z = b_zs & ~(|mb);  // true zeros
    assign nan = a_nan | b_nan | (a_inf & b_z) | (b_inf & a_z);
    assign inf = ~nan & (a_inf | b_inf);
    assign zero = ~nan & (a_z | b_z);

    // significands and effective exponents (a subnormal has exponent field 1, no hidden one)
    wire [M:0] sa = {{~a_zs, ma}}, sb = {{~b_zs, mb}};
    wire [E-1:0] xa = {{ea[E-1:1], ea[0] | a_zs}}, xb = {{eb[E-1:1], eb[0] | b_zs}};
    wire [{pw - 1}:0] p = sa * sb;                    // (M+1) x (M+1) array multiplier

    // normalise: leading-zero count and left shift (p != 0 whenever zero is clear)
    reg [{lzw - 1}:0] lz;
    integer i;
    always @* begin
        lz = {pw - 1};
        for (i = 0; i < {pw}; i = i + 1)
            if (p[i]) lz = {pw - 1} - i;
    end
    wire [{pw - 1}:0] pn = p << lz;                   // leading one at bit {pw - 1}
    wire [{ew - 1}:0] en = xa + xb + {ew}'d{2 * m} - lz;     // biased by OUT_BIAS
""")
    else:
        out.append(f"""
    // subnormal operands flush to zero, as in the L-Mul unit
    assign nan = a_nan | b_nan | (a_inf & b_zs) | (b_inf & a_zs);
    assign inf = ~nan & (a_inf | b_inf);
    assign zero = ~nan & (a_zs | b_zs);

    wire [M:0] sa = {{1'b1, ma}}, sb = {{1'b1, mb}};
    wire [{pw - 1}:0] p = sa * sb;                    // (M+1) x (M+1) array multiplier, p >= 2^(2M)
    wire hi = p[{pw - 1}];
    wire [{pw - 1}:0] pn = hi ? p : {{p[{pw - 2}:0], 1'b0}};   // 1-bit normalisation
    wire [{ew - 1}:0] en = ea + eb + hi;                   // biased by OUT_BIAS = 2 bias
""")
    if spec.rounding == "exact":
        out.append(f"""
    assign e = en;
    assign f = pn[{pw - 2}:0];                         // all 2M+1 fraction bits: exact
endmodule
""")
    else:
        sticky = f"|pn[{m - 1}:0]"
        out.append(f"""
    // round to nearest, ties to even, at M fraction bits
    wire [M-1:0] kept = pn[{pw - 2}:{m + 1}];
    wire guard = pn[{m}];
    wire sticky = {sticky};
    wire up = guard & (sticky | kept[0]);
    wire [M:0] kr = {{1'b0, kept}} + up;
    assign f = kr[M-1:0];
    assign e = en + kr[M];                             // rounding carry
endmodule
""")
    return "".join(out)


def verilog(spec: UnitSpec) -> str:
    """The Verilog-2005 text of ``spec``'s unit (one module named ``spec.name``)."""
    return _lmul(spec) if spec.unit == "lmul" else _fpmul(spec)
