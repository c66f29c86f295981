"""NAND-gate counts of L-Mul and of floating-point multipliers (paper §2.3.2).

The paper's unit costs: full adder 11 gates, half adder 5, XOR 4. An n-bit ripple-carry adder
is one half adder and ``n - 1`` full adders: ``5 + 11 (n - 1)``.

L-Mul on a format with ``i`` exponent and ``j`` mantissa bits (the paper's rule, SPEC §6):
sign XOR (4) + an ``(i+j)``-bit adder on exponent‖mantissa (``5 + 11 (i+j-1)``) + an 8-bit adder
that subtracts the exponent bias and adds the offset (``5 + 11·7 = 82``):
fp8 (i+j = 7) 157, 12-bit (i+j = 11) 201, fp16 (i+j = 15) 245 -- the paper prints 256 for fp16.

The paper's multiplier counts (e4m3 325, e5m2 296, fp16 584) do not follow from these unit
costs. :func:`multiplier_gates` itemises a conventional multiplier under stated assumptions and
:func:`mantissa_multiplier_lower_bound` gives a bound that no FA/HA multiplier can beat:
an ``n x n`` product starts from ``n^2`` partial-product bits (one AND each) and ends with
``2n`` bits, a full adder removes exactly one bit (3 in, 2 out) and a half adder none, so at
least ``n^2 - 2n`` full adders are needed. For fp16 (``n = 11``) that is 99 full adders = 1089
gates before the 121 ANDs, already above the printed 584.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmul.formats import Format, FormatLike

__all__ = [
    "FULL_ADDER", "HALF_ADDER", "XOR", "AND", "MUX2", "adder", "lmul_gates", "multiplier_gates",
    "mantissa_multiplier_lower_bound", "PAPER_COUNTS", "gate_table", "gate_markdown", "GateCount",
]

FULL_ADDER = 11  # paper §2.3.2
HALF_ADDER = 5   # paper §2.3.2
XOR = 4          # paper §2.3.2
AND = 2          # assumption: NAND + inverter (not stated in the paper)
MUX2 = 4         # assumption: 2:1 multiplexer = 3 NAND + 1 inverter (not stated in the paper)
EXPONENT_OFFSET_ADDER_BITS = 8  # the paper's 8-bit adder for bias and offset

# the numbers printed in the paper (SPEC §6)
PAPER_COUNTS = {
    ("multiplier", "e4m3"): 325, ("multiplier", "e5m2"): 296, ("multiplier", "fp16"): 584,
    ("lmul", "e4m3"): 157, ("lmul", "e5m6"): 201, ("lmul", "fp16"): 256,
}


def adder(n: int) -> int:
    """Gates of an n-bit ripple-carry adder: one half adder and ``n - 1`` full adders."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"adder width must be a positive int, got {n!r}")
    return HALF_ADDER + FULL_ADDER * (n - 1)


@dataclass(frozen=True)
class GateCount:
    """An itemised gate count: ``items`` maps a part to its gates."""

    what: str
    items: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(g for _, g in self.items)


def lmul_gates(fmt: FormatLike) -> GateCount:
    """The paper's L-Mul count: XOR + (i+j)-bit adder + 8-bit exponent-offset adder."""
    f = Format.parse(fmt)
    n = f.exp_bits + f.man_bits
    return GateCount(f"L-Mul {f.name}", (
        ("sign XOR", XOR),
        (f"{n}-bit exponent‖mantissa adder", adder(n)),
        (f"{EXPONENT_OFFSET_ADDER_BITS}-bit bias/offset adder", adder(EXPONENT_OFFSET_ADDER_BITS)),
    ))


def mantissa_multiplier_lower_bound(m: int) -> int:
    """Fewest gates of any ``(m+1) x (m+1)`` AND-array + full/half-adder multiplier at the paper's
    unit costs: ``n^2`` ANDs (counted as 1 gate each, the most favourable) + ``n^2 - 2n`` FAs."""
    n = m + 1
    return n * n * 1 + FULL_ADDER * max(n * n - 2 * n, 0)


def multiplier_gates(fmt: FormatLike) -> GateCount:
    """A conventional multiplier itemised with the paper's unit costs plus the stated assumptions
    (AND = 2, 2:1 MUX = 4): sign XOR; e-bit exponent adder; e-bit bias subtraction; an
    ``n x n`` array multiplier (``n = m + 1``: ``n^2`` ANDs, ``n (n - 2)`` FAs, ``n`` HAs);
    normalisation (n MUX2 for the 1-bit shift, an e-bit incrementer of half adders); rounding
    (an n-bit incrementer of half adders). Sticky/guard logic and special values are left out."""
    f = Format.parse(fmt)
    e, n = f.exp_bits, f.man_bits + 1
    return GateCount(f"multiplier {f.name}", (
        ("sign XOR", XOR),
        (f"{e}-bit exponent adder", adder(e)),
        (f"{e}-bit bias subtraction", adder(e)),
        (f"{n}x{n} partial products (AND)", AND * n * n),
        (f"{n}x{n} array: {n * (n - 2)} full adders", FULL_ADDER * n * (n - 2)),
        (f"{n}x{n} array: {n} half adders", HALF_ADDER * n),
        ("normalise: 1-bit shift mux", MUX2 * n),
        ("normalise: exponent incrementer", HALF_ADDER * e),
        ("round: mantissa incrementer", HALF_ADDER * n),
    ))


def gate_table() -> list[dict]:
    """Every count the paper prints next to the one its rules (or the model above) give."""
    rows = []
    for name, fmt in (("fp8 e4m3", "e4m3"), ("12-bit e5m6", "e5m6"), ("fp16", "fp16")):
        g = lmul_gates(fmt)
        rows.append({"unit": f"L-Mul {name}", "paper": PAPER_COUNTS[("lmul", fmt)], "rules": g.total,
                     "lower_bound": None, "items": dict(g.items)})
    for name, fmt in (("fp8 e4m3", "e4m3"), ("fp8 e5m2", "e5m2"), ("fp16", "fp16")):
        g = multiplier_gates(fmt)
        f = Format.parse(fmt)
        rows.append({"unit": f"multiplier {name}", "paper": PAPER_COUNTS[("multiplier", fmt)], "rules": g.total,
                     "lower_bound": XOR + 2 * adder(f.exp_bits) + mantissa_multiplier_lower_bound(f.man_bits),
                     "items": dict(g.items)})
    return rows


def gate_markdown(rows: list[dict]) -> str:
    lines = ["| unit | paper prints | under the stated rules | lower bound (sign + exponent + mantissa array) |",
             "|---|---|---|---|"]
    for r in rows:
        lb = "" if r["lower_bound"] is None else str(r["lower_bound"])
        lines.append(f"| {r['unit']} | {r['paper']} | {r['rules']} | {lb} |")
    return "\n".join(lines)
