"""Relative error of L-Mul and of ordinary multiplication, exhaustively and on real operands.

**Exponents cancel.** For normal operands ``x = (1 + a/2^k) 2^ex`` and ``y = (1 + b/2^k) 2^ey``
every arm returns ``P = 2^(ex + ey) · g(a, b)`` where ``g`` depends only on the mantissa fields:

* L-Mul ``bit`` mode: ``S = a + b + c 2^k`` and ``q = floor(S / 2^k)``; the carry ``q`` into the
  exponent is a function of ``(a, b)`` alone, so ``P = 2^(ex+ey) · 2^q (1 + (S - q 2^k)/2^k)``;
* ``formula`` mode: ``P = 2^(ex+ey) (1 + a/2^k + b/2^k + c)``;
* an ordinary product rounded (RNE or truncation) to k mantissa bits: rounding a number to a
  binary grid commutes with scaling by a power of two (as long as the result stays normal).

The exact product is ``2^(ex+ey) (1 + a/2^k)(1 + b/2^k)``, so the relative error
``r = P / (x y) - 1`` is the same for every exponent pair: enumerating the ``2^k × 2^k`` mantissa
pairs at ``ex = ey = 0`` gives the exact distribution of ``r`` for operands whose mantissa
fields are uniformly distributed (the paper's "even distribution", §2.3.1), provided the product
is neither subnormal nor overflows (lmul does not clamp the product exponent; float32 holds it).
``tests/test_analysis_errors.py`` checks this on shifted exponents.

Operands are built in ``e8m{k}`` (bf16 exponent range, k mantissa bits, paper Table 5's "k-bit"
operands) and multiplied with :func:`lmul.ops.mul`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from lmul.elementwise import mul
from lmul.formats import Format, quantize
from lmul.spec import LMulSpec, offset_exponent

__all__ = [
    "EXHAUSTIVE_ARMS", "ErrorStats", "Arm", "mantissa_grid", "grid_pairs", "arm_products",
    "relative_errors", "stats", "exhaustive_stats", "offset_sweep", "best_offsets", "REAL_BASELINES",
    "SCALED_ARMS", "real_arm", "real_relative_errors",
]

MAX_EXHAUSTIVE_BITS = 10  # 2^20 pairs

# arms of the exhaustive table: (name, description)
EXHAUSTIVE_ARMS: dict[str, str] = {
    "lmul-bit": "L-Mul, bit mode (integer add of exponent‖mantissa, carry into exponent), c = 2^-l(k)",
    "lmul-formula": "L-Mul, paper Eq. 1 as real arithmetic, c = 2^-l(k)",
    "mitchell": "Mitchell 1962 (bit mode, offset 0)",
    "fp-rne": "exact product rounded to k mantissa bits, nearest-even (k=3: fp8 e4m3 multiply, k=2: e5m2)",
    "fp-trunc": "exact product truncated to k mantissa bits (the paper's truncation baseline)",
}


@dataclass(frozen=True)
class ErrorStats:
    """Statistics of the relative error ``r = P / (x y) - 1`` over a set of operand pairs."""

    n: int
    mean_abs: float   # E|r|
    rms: float        # sqrt(E r^2)
    max_abs: float    # max |r|
    bias: float       # E r (signed)

    def as_dict(self) -> dict:
        return asdict(self)


def stats(rel: torch.Tensor) -> ErrorStats:
    """:class:`ErrorStats` of a tensor of relative errors (float64 recommended)."""
    rel = rel.double().flatten()
    if rel.numel() == 0:
        raise ValueError("no relative errors to summarise (empty operand set)")
    return ErrorStats(
        n=rel.numel(), mean_abs=rel.abs().mean().item(), rms=rel.pow(2).mean().sqrt().item(),
        max_abs=rel.abs().max().item(), bias=rel.mean().item(),
    )


def _check_bits(k: int) -> None:
    if not isinstance(k, int) or not 0 <= k <= MAX_EXHAUSTIVE_BITS:
        raise ValueError(f"mantissa bits must be an int in 0..{MAX_EXHAUSTIVE_BITS}, got {k!r}")


def mantissa_grid(k: int, exponent: int = 0) -> torch.Tensor:
    """All ``2^k`` normal significands ``(1 + a/2^k) 2^exponent``, ``a = 0..2^k-1`` (float32)."""
    _check_bits(k)
    return (1.0 + torch.arange(2**k, dtype=torch.float64) / 2**k).mul(2.0**exponent).float()


def grid_pairs(k: int, ex: int = 0, ey: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair of k-bit mantissas as two flat float32 tensors of length ``4^k`` (x-major)."""
    gx, gy = mantissa_grid(k, ex), mantissa_grid(k, ey)
    x, y = torch.meshgrid(gx, gy, indexing="ij")
    return x.flatten(), y.flatten()


def arm_products(x: torch.Tensor, y: torch.Tensor, k: int, arm: str, offset: Optional[float] = None) -> torch.Tensor:
    """Products of the ``e8m{k}`` arm ``arm`` (see :data:`EXHAUSTIVE_ARMS`); ``offset`` overrides
    ``c`` for the L-Mul arms."""
    fmt = Format(8, k)
    if arm == "lmul-bit":
        return mul(x, y, fmt, "bit", offset)
    if arm == "lmul-formula":
        return mul(x, y, fmt, "formula", offset)
    if arm == "mitchell":
        return mul(x, y, fmt, "bit", 0.0)
    if arm in ("fp-rne", "fp-trunc"):
        exact = mul(x, y, fmt, "exact")  # exact in float32 for k <= 11
        return quantize(exact, fmt, "rne" if arm == "fp-rne" else "trunc")
    raise ValueError(f"unknown arm {arm!r}; choose from {sorted(EXHAUSTIVE_ARMS)}")


def relative_errors(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``P / (x y) - 1`` in float64 against the exact product of ``x`` and ``y``."""
    exact = x.double() * y.double()
    return p.double() / exact - 1.0


def exhaustive_stats(k: int, arm: str, offset: Optional[float] = None) -> ErrorStats:
    """Exact error statistics of ``arm`` over all ``4^k`` pairs of k-bit mantissas."""
    x, y = grid_pairs(k)
    return stats(relative_errors(arm_products(x, y, k, arm, offset), x, y))


def offset_sweep(k: int, mode: str = "bit", offsets: Optional[list[float]] = None) -> list[tuple[float, ErrorStats]]:
    """Exhaustive statistics of L-Mul with each offset ``c``. Default offsets: every multiple of
    ``2^-k`` in ``[0, 1)`` for ``bit`` mode (the offset is added to the k-bit field), a
    ``2^-10`` grid on ``[0, 1/2)`` for ``formula`` mode."""
    if offsets is None:
        step = 2.0**-k if mode == "bit" else 2.0**-10
        offsets = [j * step for j in range(int((1.0 if mode == "bit" else 0.5) / step))]
    x, y = grid_pairs(k)
    arm = "lmul-bit" if mode == "bit" else "lmul-formula"
    return [(c, stats(relative_errors(arm_products(x, y, k, arm, c), x, y))) for c in offsets]


def best_offsets(k: int, mode: str = "bit") -> dict[str, dict]:
    """The offsets minimising E|r|, E r^2 and |E r| (exhaustive; bit mode: every multiple of
    ``2^-k``, formula mode: a ``2^-10`` grid), next to the paper's ``2^-l(k)`` and ``c = 0``
    (``"zero"``: Mitchell's multiplier in bit mode)."""
    criteria = (("mean_abs", lambda s: s.mean_abs), ("mse", lambda s: s.rms), ("bias", lambda s: abs(s.bias)))
    out = {}
    if mode == "bit":
        sweep = offset_sweep(k, mode)
        for crit, key in criteria:
            c, s = min(sweep, key=lambda cs, key=key: key(cs[1]))
            out[f"min_{crit}"] = {"offset": c, **s.as_dict()}
    else:
        # formula mode: r is affine in c, so all three criteria are convex in c; a 2^-6 grid on
        # [0, 1/2) then a 2^-10 grid around its best is the 2^-10 grid search
        coarse = offset_sweep(k, mode, [j * 2.0**-6 for j in range(32)])
        for crit, key in criteria:
            c0 = min(coarse, key=lambda cs, key=key: key(cs[1]))[0]
            fine = [c0 + j * 2.0**-10 for j in range(-16, 17) if 0 <= c0 + j * 2.0**-10 < 0.5]
            c, s = min(offset_sweep(k, mode, fine), key=lambda cs, key=key: key(cs[1]))
            out[f"min_{crit}"] = {"offset": c, **s.as_dict()}
    arm = "lmul-bit" if mode == "bit" else "lmul-formula"
    paper_c = 2.0 ** -offset_exponent(k)
    out["paper"] = {"offset": paper_c, **exhaustive_stats(k, arm, paper_c).as_dict()}
    out["zero"] = {"offset": 0.0, **exhaustive_stats(k, arm, 0.0).as_dict()}
    return out


# -- real operands ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One multiplier applied to real operands: operands quantized to ``fmt`` then ``mode``."""

    label: str
    fmt: str
    mode: str
    offset: Optional[float] = None
    scaled: bool = False  # per-tensor power-of-two scaling of each operand set to the format's max
    scaling: str = "none"  # lmul.scaling groups (``"mx"``: 32 consecutive values of each operand set share a scale)


# the fp8 multipliers of the paper's Figure 3: fp8 operands, exact product (fp32 accumulation);
# unscaled (values cast as they are) and with a per-tensor power-of-two scale, as fp8 is deployed
REAL_BASELINES = (
    Arm("fp8 e4m3 multiply", "e4m3", "exact"), Arm("fp8 e5m2 multiply", "e5m2", "exact"),
    Arm("fp8 e4m3 multiply, scaled", "e4m3", "exact", scaled=True),
    Arm("fp8 e5m2 multiply, scaled", "e5m2", "exact", scaled=True),
)


# the formats as scaled hardware runs them (lmul.scaling, OCP MX v1.0): E8M0 power-of-two scales per 32
# consecutive operand values, elements in fp8/fp4; the exact product of the elements beside L-Mul on them
SCALED_ARMS = (
    Arm("MXFP8 e4m3 multiply", "e4m3", "exact", scaling="mx"), Arm("MXFP8 e4m3 L-Mul", "e4m3", "bit", scaling="mx"),
    Arm("MXFP8 e5m2 multiply", "e5m2", "exact", scaling="mx"), Arm("MXFP8 e5m2 L-Mul", "e5m2", "bit", scaling="mx"),
    Arm("MXFP4 multiply", "fp4", "exact", scaling="mx"), Arm("MXFP4 L-Mul", "fp4", "bit", scaling="mx"),
)


def real_arm(k: int, lexp: Optional[int] = None) -> Arm:
    """L-Mul (bit mode) on ``e8m{k}`` operands with offset ``2^-lexp`` (``None``: the paper's l(k))."""
    c = None if lexp is None else 2.0**-lexp
    name = f"L-Mul {k}-bit" + ("" if lexp is None else f", l={lexp}")
    return Arm(name, f"e8m{k}", "bit", c)


def real_relative_errors(a: torch.Tensor, b: torch.Tensor, arm: Arm) -> torch.Tensor:
    """Relative error of ``arm`` on the pairs ``(a_i, b_i)`` against the float64 product of the
    unrounded operands (so operand quantization, underflow included, counts). Pairs whose exact
    product is zero are dropped. A ``scaled`` arm multiplies each operand set by the power of two
    ``2^floor(log2(max / amax))`` before quantizing and divides the product by both (exactly). An arm
    with ``scaling`` runs :func:`lmul.mul` with that spec on the kept pairs in order: each operand set is
    one row, so ``"mx"`` gives every 32 consecutive values of it one scale (``fl32(2^(sa+sb) P(qa, qb))``,
    ``docs/patching.md``)."""
    a, b = a.float().flatten(), b.float().flatten()
    if a.shape != b.shape:
        raise ValueError(f"operand pairs must have the same length, got {a.numel()} and {b.numel()}")
    exact = a.double() * b.double()
    keep = exact != 0
    a, b, exact = a[keep], b[keep], exact[keep]
    if arm.scaling != "none":
        spec = LMulSpec(arm.fmt, arm.mode, arm.offset, scaling=arm.scaling)
        p = mul(a[None], b[None], spec=spec)[0].double()
    elif arm.scaled:
        fmax = Format.parse(arm.fmt).max
        sa, sb = (2.0 ** math.floor(math.log2(fmax / t.abs().max().item())) for t in (a, b))
        p = mul(a * sa, b * sb, arm.fmt, arm.mode, arm.offset).double() / (sa * sb)
    else:
        p = mul(a, b, arm.fmt, arm.mode, arm.offset).double()
    return p / exact - 1.0
