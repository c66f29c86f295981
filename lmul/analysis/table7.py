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

All values are exact rationals (:class:`fractions.Fraction`); the tests check these closed forms
against independent exhaustive enumeration. They are the k-bit-operand expectations, not the
paper's printed Table 7, which measures against n = 7 (bf16) operands: that is
:func:`eq45_expectations` below (Eq. 4-5), for the even, the log-uniform, or a model's weight
mantissa distribution (:func:`real_table7`, ``lmul table7``).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Optional

import torch

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


# ---------------------------------------------------------------------------------------------
# Table 7 as the paper prints it: Eq. 4-5 with n = 7 (bf16) operands truncated to k bits
# ---------------------------------------------------------------------------------------------

BF16_MANTISSA_BITS = 7
TABLE7_KS = tuple(range(1, 7))

# shared/PAPER.md (beside the repository), Table 7 (Appendix A), K = 1..6, to the paper's printed digits;
# tests/test_analysis_paper.py parses PAPER.md and checks these.
PAPER_TABLE7 = {
    "even, abs[f1(n=7,k)]": (0.68, 0.35, 0.17, 0.081, 0.035, 0.012),
    "even, abs[f1+f2]": (0.68, 0.43, 0.30, 0.24, 0.20, 0.19),
    "real, abs[f1(n=7,k)]": (0.61, 0.33, 0.16, 0.077, 0.033, 0.011),
    "real, abs[f1+f2]": (0.16, 0.18, 0.18, 0.12, 0.15, 0.14),
}

__all__ += ["BF16_MANTISSA_BITS", "PAPER_TABLE7", "mantissa_histogram", "even_distribution", "log_distribution",
            "eq45_expectations", "eq45_rows", "weight_distributions", "paper_table7_markdown"]


def mantissa_histogram(tensors, n: int = BF16_MANTISSA_BITS) -> dict:
    """Counts of the 7-bit mantissa field of every element after a cast to bfloat16 (RNE).

    Only normal numbers ``(1 + a/2^7) 2^e`` enter ``counts`` (index ``a``); zeros, subnormals
    and non-finite values are counted apart, since Eq. 1 has no meaning for them."""
    if n != BF16_MANTISSA_BITS:
        raise ValueError(f"only bf16 operands (n = 7) are supported, got n={n!r}")
    counts = torch.zeros(2**n, dtype=torch.int64)
    zero = sub = nonfinite = 0
    for t in tensors:
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise ValueError(f"mantissa_histogram takes floating-point tensors, got {type(t).__name__}")
        flat = t.detach().reshape(-1)
        for chunk in flat.split(1 << 22):
            bits = chunk.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
            exp, man = (bits >> 7) & 0xFF, bits & 0x7F
            normal = (exp > 0) & (exp < 255)
            counts += torch.bincount(man[normal], minlength=2**n)
            zero += int(((exp == 0) & (man == 0)).sum())
            sub += int(((exp == 0) & (man != 0)).sum())
            nonfinite += int((exp == 255).sum())
    return {"counts": counts.tolist(), "normal": int(counts.sum()), "zero": zero, "subnormal": sub,
            "nonfinite": nonfinite}


def even_distribution(n: int = BF16_MANTISSA_BITS) -> torch.Tensor:
    """Uniform mantissa fields ("evenly distributed"), float64 probabilities over ``0..2^n-1``."""
    return torch.full((2**n,), 1.0 / 2**n, dtype=torch.float64)


def log_distribution(n: int = BF16_MANTISSA_BITS) -> torch.Tensor:
    """Benford / log-uniform significand: ``P(a) = log2((2^n + a + 1) / (2^n + a))``, the limit
    for values spread over many binades (a reference, not a measurement)."""
    a = torch.arange(2**n, dtype=torch.float64)
    return torch.log2((2**n + a + 1) / (2**n + a))


def eq45_expectations(p: torch.Tensor, k: int, offset: Optional[float] = None) -> tuple[float, float]:
    """``(f1(n, k), f2(k))`` of the paper's Eq. 4-5 (signed) for mantissa-field probabilities ``p``.

    Reading: ``x = (1 + xm) 2^xe``, ``y = (1 + ym) 2^ye`` with ``n``-bit fields ``a, b`` drawn
    independently from ``p`` (``xm = a/2^n``); ``xm^(k)`` keeps the first k bits (truncation,
    as in Table 5). On the significand scale

    * ``f1 = E[(1 + xm^(k))(1 + ym^(k)) - (1 + xm)(1 + ym)]``, the error of an exact multiply of
      k-bit-truncated operands, ``= 2 (E[xk] - E[xm]) + E[xk]^2 - E[xm]^2`` by independence;
    * ``f2 = E[c - xm^(k) ym^(k)] = c - E[xk]^2``, what L-Mul adds on top of it: L-Mul's error
      ``(1 + xk + yk + c) - (1 + xm)(1 + ym)`` is exactly ``e1 + e2``, so its mean is ``f1 + f2``.

    ``offset=None`` is the rule ``c = 2^-l(k)``. Table 7 prints ``|f1|`` and ``|f1 + f2|``."""
    _check(k)
    p = torch.as_tensor(p, dtype=torch.float64)
    size = p.numel()
    n = size.bit_length() - 1
    if p.dim() != 1 or 2**n != size or k > n:
        raise ValueError(f"p must be 1-D over 2^n mantissa fields with n >= k={k}, got shape {tuple(p.shape)}")
    if (p < 0).any() or abs(float(p.sum()) - 1) > 1e-9:
        raise ValueError("p must be a probability vector (non-negative, summing to 1)")
    a = torch.arange(size, dtype=torch.float64)
    xm, xk = a / 2**n, torch.floor(a / 2 ** (n - k)) / 2**k
    e_m, e_k = float((p * xm).sum()), float((p * xk).sum())
    c = 2.0 ** -offset_exponent(k) if offset is None else float(offset)
    return 2 * (e_k - e_m) + e_k**2 - e_m**2, c - e_k**2


def eq45_rows(p: torch.Tensor, ks=TABLE7_KS) -> list[dict]:
    """Per k: signed f1, f2 with ``c = 2^-4`` and with ``c = 2^-l(k)``, and the |·| Table 7 prints."""
    rows = []
    for k in ks:
        f1, f2_16 = eq45_expectations(p, k, 1 / 16)
        _, f2_lk = eq45_expectations(p, k)
        rows.append({"k": k, "f1": f1, "f2_c_2^-4": f2_16, "f2_c_2^-l(k)": f2_lk, "abs_f1": abs(f1),
                     "abs_f1f2_c_2^-4": abs(f1 + f2_16), "abs_f1f2_c_2^-l(k)": abs(f1 + f2_lk)})
    return rows


def _group(name: str, t: torch.Tensor) -> str:
    if t.dim() <= 1:
        return "1-D (norms, biases)"
    return "embedding" if "embed" in name else "linear (decoder layers)"


def weight_distributions(model: torch.nn.Module) -> dict:
    """Mantissa histograms of a model's parameters (tied weights once), in total and by group."""
    by: dict[str, list] = {}
    for name, t in model.named_parameters():
        by.setdefault(_group(name, t), []).append(t)
    out = {g: mantissa_histogram(ts) for g, ts in sorted(by.items())}
    out["all parameters"] = mantissa_histogram([t for ts in by.values() for t in ts])
    return out


def _probs(hist: dict) -> torch.Tensor:
    c = torch.tensor(hist["counts"], dtype=torch.float64)
    if c.sum() == 0:
        raise ValueError("no normal numbers in the histogram")
    return c / c.sum()


def paper_table7_markdown(dists: dict, ks=TABLE7_KS) -> str:
    """The paper's four printed rows beside ours for each distribution in ``dists``
    (``{label: probabilities or histogram dict}``), with both offsets for f1 + f2."""
    head = "| row | " + " | ".join(f"K={k}" for k in ks) + " |"
    lines = [head, "|---|" + "---|" * len(ks)]
    for label, vals in PAPER_TABLE7.items():
        lines.append(f"| **paper** {label} | " + " | ".join(f"{v:g}" for v in vals) + " |")
    for label, d in dists.items():
        p = _probs(d) if isinstance(d, dict) else d
        rows = eq45_rows(p, ks)
        for key, what in (("abs_f1", "abs[f1(n=7,k)]"), ("abs_f1f2_c_2^-4", "abs[f1+f2], c = 2^-4"),
                          ("abs_f1f2_c_2^-l(k)", "abs[f1+f2], c = 2^-l(k)")):
            lines.append(f"| ours, {label}: {what} | " + " | ".join(f"{r[key]:.3g}" for r in rows) + " |")
    return "\n".join(lines)


def real_table7(models: list[str], progress=print) -> dict:
    """Load each model (``lmul.eval.models.load``: ``smollm2``, ``gemma3-270m`` or a folder) and
    return its weight mantissa histograms and Eq. 4-5 rows, next to the even and log-uniform ones."""
    from lmul.eval.models import load

    res: dict = {"paper": {k: list(v) for k, v in PAPER_TABLE7.items()},
                 "reference": {"even": eq45_rows(even_distribution()), "log-uniform": eq45_rows(log_distribution())},
                 "models": {}}
    for name in models:
        progress(f"loading {name} ...")
        model, _, desc = load(name)
        hists = weight_distributions(model)
        res["models"][name] = {"description": desc, "groups": {
            g: {**h, "rows": eq45_rows(_probs(h))} for g, h in hists.items()}}
        del model
    return res


def real_table7_markdown(res: dict) -> str:
    dists = {"even": even_distribution(), "log-uniform (Benford)": log_distribution()}
    for name, m in res["models"].items():
        dists[f"{name} all parameters"] = m["groups"]["all parameters"]
    lines = [paper_table7_markdown(dists), "", "By parameter group (abs[f1] / abs[f1+f2] with c = 2^-l(k)):", "",
             "| model | group | normal values (zero, subnormal) | " + " | ".join(f"K={k}" for k in TABLE7_KS) + " |",
             "|---|---|---|" + "---|" * len(TABLE7_KS)]
    for name, m in res["models"].items():
        for g, h in m["groups"].items():
            cells = [f"{r['abs_f1']:.3g} / {r['abs_f1f2_c_2^-l(k)']:.3g}" for r in h["rows"]]
            lines.append(f"| {name} | {g} | {h['normal']} ({h['zero']}, {h['subnormal']}) | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)
