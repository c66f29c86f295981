"""The contract's golden values (``docs/semantics.md`` section 3, ``SPEC.md`` section 3) as labelled
data: the one table that the tests of ``lmul.mul`` and of the RTL units, and ``lmul demo``, read.

Rows are ``(x, y, {spec name: expected product}, note)``; spec names as :attr:`lmul.LMulSpec.name`
(operands quantized with rne, the paper's default offset). The fp32 and bf16 columns of the contract
are one column: both formats give these products.
"""

from __future__ import annotations

__all__ = ["GOLDEN", "golden_cases"]

GOLDEN: list[tuple[float, float, dict[str, float], str]] = [
    (3, 4, {"fp32-bit": 12.5, "fp32-formula": 12.5, "e4m3-bit": 13, "e4m3-formula": 13, "e5m2-bit": 14}, ""),
    (1.5, 1.5, {"fp32-bit": 2.125, "fp32-formula": 2.0625, "e4m3-bit": 2.25, "e4m3-formula": 2.125,
                "e5m2-bit": 2.5}, ""),
    (1.5, 1.75, {"fp32-bit": 2.625, "fp32-formula": 2.3125, "e4m3-bit": 2.75, "e4m3-formula": 2.375,
                 "e5m2-bit": 3}, "mantissa carry"),
    (1, 1, {"fp32-bit": 1.0625, "fp32-formula": 1.0625, "e4m3-bit": 1.125, "e4m3-formula": 1.125,
            "e5m2-bit": 1.25}, ""),
    (-2, 3, {"fp32-bit": -6.25, "fp32-formula": -6.25, "e4m3-bit": -6.5, "e4m3-formula": -6.5, "e5m2-bit": -7},
     "sign"),
    (1.875, 1.875, {"fp32-bit": 3.625, "fp32-formula": 2.8125, "e4m3-bit": 3.75, "e4m3-formula": 2.875,
                    "e5m2-bit": 5}, "e5m2: 1.875 rounds to 2"),
    (0, 5, {"fp32-bit": 0, "fp32-formula": 0, "e4m3-bit": 0, "e4m3-formula": 0, "e5m2-bit": 0}, "zero"),
    (448, 2, {"fp32-bit": 928, "fp32-formula": 928, "e4m3-bit": 960, "e4m3-formula": 960, "e5m2-bit": 1024},
     "exponent not clamped"),
    (2**-6, 2**-6, {"fp32-bit": 2**-12 * 1.0625, "fp32-formula": 2**-12 * 1.0625, "e4m3-bit": 2**-12 * 1.125,
                    "e4m3-formula": 2**-12 * 1.125, "e5m2-bit": 2**-12 * 1.25}, "small"),
    (1.9921875, 1.9921875, {"bf16-bit": 4.1875, "bf16-formula": 3.046875}, "s >= 2 carry"),
    (1.9995039, 0.0154618, {"fp32-bit": 0.03253482}, "s >= 2 carry, fp32"),  # printed to 7 digits
]


def golden_cases(spec: str) -> list[tuple[float, float, float, str]]:
    """``(x, y, expected, note)`` of every row that has a value for ``spec`` (``"fp32-…"`` rows also
    stand for bf16)."""
    out = []
    for x, y, want, note in GOLDEN:
        value = want.get(spec)
        if value is None and spec.startswith("bf16-") and note != "s >= 2 carry, fp32":
            value = want.get("fp32-" + spec[5:])
        if value is not None:
            out.append((x, y, value, note))
    return out
