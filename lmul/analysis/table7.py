"""Closed-form error expectations for evenly distributed mantissas (paper §2.3.1, Table 7).

Setting: ``x = (1 + xm) 2^xe``, ``y = (1 + ym) 2^ye`` with ``xm = a/2^k``, ``ym = b/2^k`` and
``a, b`` independent and uniform on ``{0, .., 2^k - 1}`` (the "even distribution"). Errors are
measured on the significand, i.e. in units of ``2^(xe + ye)`` (signed: approximation minus
exact), which is the scale on which the paper writes Eq. 1:

* L-Mul (Eq. 1, real arithmetic): ``e_L = (1 + xm + ym + c) - (1 + xm)(1 + ym) = c - xm ym``, so
  ``E[e_L] = c - E[xm]^2 = c - ((2^k - 1) / 2^(k+1))^2``.
  With ``c = 2^-4`` for every k this is ``1/16 - (1 - 2^-k)^2 / 4``; with the paper's rule
  ``c = 2^-l(k)`` it is ``2^-l(k) - (1 - 2^-k)^2 / 4``.
* Truncation baseline: an ordinary multiplier keeping the first k fraction bits of the
  (unnormalised) significand ``1 + xm + ym + xm ym``. ``1 + xm + ym`` is on the ``2^-k`` grid, so
  the discarded part is the low half of ``xm ym = ab / 4^k``: ``e_T = -(ab mod 2^k) / 4^k``.
  For ``n = 2^k`` and fixed ``a`` with ``g = gcd(a, n)``, ``ab mod n`` runs over the multiples of
  ``g`` below ``n``, each ``g`` times, so ``Σ_b (ab mod n) = n (n - g) / 2``; summing
  ``Σ_a gcd(a, 2^k) = 2^k + k 2^(k-1)`` gives
  ``E[e_T] = -(2^-(k+1) - (k + 2) 2^-(2k+2))``.
* Truncation with renormalisation (a real k-bit multiplier: when the product is in ``[2, 4)``
  the kept grid is ``2^(1-k)``): no short closed form; :func:`normalised_truncation_expectation`
  sums it exactly.

All values are exact rationals (:class:`fractions.Fraction`). The paper's printed Table 7 digits
were not available to this project (see ``docs/analysis.md``); the tests check these closed
forms against independent exhaustive enumeration instead.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Optional

from lmul.analysis.errors import exhaustive_stats
from lmul.spec import offset_exponent

__all__ = [
    "lmul_expectation", "truncation_expectation", "normalised_truncation_expectation", "table7_rows",
    "table7_markdown", "relative_rows", "relative_markdown",
]

PAPER_CONSTANT_OFFSET = Fraction(1, 16)  # 2^-4


def _check(k: int) -> None:
    if not isinstance(k, int) or not 1 <= k <= 16:
        raise ValueError(f"mantissa bits k must be an int in 1..16, got {k!r}")


def lmul_expectation(k: int, offset: Optional[Fraction] = None) -> Fraction:
    """Signed ``E[c - xm ym]`` for k-bit uniform mantissas; ``offset=None`` uses ``2^-l(k)``."""
    _check(k)
    c = Fraction(1, 2 ** offset_exponent(k)) if offset is None else Fraction(offset)
    mean = Fraction(2**k - 1, 2 ** (k + 1))
    return c - mean * mean


def truncation_expectation(k: int) -> Fraction:
    """Signed ``E[-(xm ym mod 2^-k)] = -(2^-(k+1) - (k+2) 2^-(2k+2))`` (no renormalisation)."""
    _check(k)
    return -(Fraction(1, 2 ** (k + 1)) - Fraction(k + 2, 2 ** (2 * k + 2)))


def normalised_truncation_expectation(k: int) -> Fraction:
    """Signed mean significand error of truncating ``(1 + xm)(1 + ym)`` to k fraction bits of its
    own binade (grid ``2^-k`` in ``[1, 2)``, ``2^(1-k)`` in ``[2, 4)``), summed exactly."""
    _check(k)
    n = 2**k
    total = 0  # in units of 4^-k
    for a in range(n):
        for b in range(n):
            p = (n + a) * (n + b)  # significand * 4^k
            grid = n if p < 2 * n * n else 2 * n  # 2^-k (resp. 2^(1-k)) in units of 4^-k
            total -= p % grid
    return Fraction(total, n * n * n * n)


def table7_rows(ks: range = range(1, 8)) -> list[dict]:
    """One row per k: the closed forms above as exact fractions and floats."""
    rows = []
    for k in ks:
        l16, lk, tr = lmul_expectation(k, PAPER_CONSTANT_OFFSET), lmul_expectation(k), truncation_expectation(k)
        rows.append({
            "k": k, "l(k)": offset_exponent(k),
            "lmul_c_2^-4": float(l16), "lmul_c_2^-l(k)": float(lk), "trunc": float(tr),
            "trunc_normalised": float(normalised_truncation_expectation(k)),
            "exact": {"lmul_c_2^-4": str(l16), "lmul_c_2^-l(k)": str(lk), "trunc": str(tr)},
        })
    return rows


def table7_markdown(rows: list[dict]) -> str:
    head = ("| k | l(k) | E[e_L], c = 2^-4 | \\|·\\| | E[e_L], c = 2^-l(k) | \\|·\\| | E[e_T] truncation | "
            "\\|·\\| | E[e_T] renormalised |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['l(k)']} | {r['exact']['lmul_c_2^-4']} = {r['lmul_c_2^-4']:+.6f} | "
            f"{abs(r['lmul_c_2^-4']):.4f} | {r['exact']['lmul_c_2^-l(k)']} = {r['lmul_c_2^-l(k)']:+.6f} | "
            f"{abs(r['lmul_c_2^-l(k)']):.4f} | {r['exact']['trunc']} = {r['trunc']:+.6f} | {abs(r['trunc']):.4f} | "
            f"{r['trunc_normalised']:+.6f} |"
        )
    return "\n".join(lines)


def relative_rows(ks: range = range(1, 8)) -> list[dict]:
    """The same expectations measured as *relative* errors ``E[P/(xy) - 1]`` by exhaustive
    enumeration (no closed form): L-Mul formula mode with ``c = 2^-4`` and ``2^-l(k)``, bit mode
    with ``2^-l(k)``, and the truncating k-bit multiplier."""
    return [{
        "k": k,
        "formula_c_2^-4": exhaustive_stats(k, "lmul-formula", 1 / 16).bias,
        "formula_c_2^-l(k)": exhaustive_stats(k, "lmul-formula").bias,
        "bit_c_2^-l(k)": exhaustive_stats(k, "lmul-bit").bias,
        "trunc": exhaustive_stats(k, "fp-trunc").bias,
    } for k in ks]


def relative_markdown(rows: list[dict]) -> str:
    lines = ["| k | formula, c = 2^-4 | formula, c = 2^-l(k) | bit, c = 2^-l(k) | truncation |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['formula_c_2^-4']:+.6f} | {r['formula_c_2^-l(k)']:+.6f} | "
                     f"{r['bit_c_2^-l(k)']:+.6f} | {r['trunc']:+.6f} |")
    return "\n".join(lines)
