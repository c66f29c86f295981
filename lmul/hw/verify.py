"""Bit-exactness of simulated units against their oracles.

* ``lmul`` units and the ``fpmul`` with ``rounding="exact"`` and subnormals: :func:`lmul.mul`
  (``mode="bit"`` / ``"exact"``), the contract's oracle. The unit's output is decoded to float64
  (exact) and rounded once to float32 like ``lmul.mul``; results are compared as int32 views,
  NaN against NaN (a NaN's sign and payload are unspecified). For ``exact`` the float64
  values are additionally compared with the float64 product ``x y`` (no float32 rounding).
* the other ``fpmul`` variants (``rne`` and/or flushed subnormals) have no ``lmul.mul`` mode;
  their oracle is float64 arithmetic: ``x y`` with subnormal operands replaced by signed zeros,
  then rounded to m fraction bits, nearest-even, with an unbounded exponent
  (``ldexp(rint(frexp mantissa 2^(m+1)), ...)``), compared as int64 views.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lmul.elementwise import mul
from lmul.hw.rtl import UnitSpec
from lmul.hw.sim import SimResult, all_pairs, decode_operand, random_pairs, simulate

__all__ = ["Report", "float64_reference", "compare", "verify", "verify_mac"]


@dataclass(frozen=True)
class Report:
    spec: UnitSpec
    pairs: int
    oracle: str
    mismatches: int
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def __str__(self) -> str:
        status = "bit-exact" if self.ok else f"{self.mismatches} MISMATCHES"
        lines = [f"{self.spec.name}: {self.pairs} pairs vs {self.oracle}: {status}"]
        return "\n".join(lines + [f"  {e}" for e in self.examples])


def float64_reference(spec: UnitSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Float64 product of decoded operands per the fpmul options (see the module docstring)."""
    fmt = spec.fmt
    if not spec.subnormals:
        tiny = np.abs(x) < fmt.min_normal
        x = np.where(tiny, np.copysign(0.0, x), x)
        tiny = np.abs(y) < fmt.min_normal
        y = np.where(tiny, np.copysign(0.0, y), y)
    with np.errstate(invalid="ignore"):
        p = x * y  # exact: at most 48 significant bits, exponent within float64
    if spec.unit == "fpmul" and spec.rounding == "rne":
        mant, ex = np.frexp(p)  # p = mant 2^ex, 0.5 <= |mant| < 1
        k = fmt.man_bits + 1
        finite = np.isfinite(p)
        p = np.where(finite, np.ldexp(np.rint(np.ldexp(mant, k)), ex - k), p)  # rint: ties to even
    return p


def _mismatch(got: np.ndarray, ref: np.ndarray, itype) -> np.ndarray:
    gv, rv = got.view(itype), ref.view(itype)
    return ~((gv == rv) | (np.isnan(got) & np.isnan(ref)))


def compare(res: SimResult, a: np.ndarray, b: np.ndarray, max_examples: int = 5) -> Report:
    """Compare a simulation result with the unit's oracle."""
    spec = res.spec
    x, y = decode_operand(a, spec.fmt), decode_operand(b, spec.fmt)
    got = res.values()
    if spec.unit == "lmul" or (spec.rounding == "exact" and spec.subnormals):
        mode = "bit" if spec.unit == "lmul" else "exact"
        ref32 = mul(torch.from_numpy(x).float(), torch.from_numpy(y).float(), spec.fmt, mode, spec.offset).numpy()
        got32 = torch.from_numpy(got).float().numpy()  # the one rounding into float32, as lmul.mul
        bad = _mismatch(got32, ref32, np.int32)
        oracle = f"lmul.mul(mode={mode!r}) as float32"
        shown = ref32
        if mode == "exact":
            bad |= _mismatch(got, float64_reference(spec, x, y), np.int64)
            oracle += " and float64 x*y"
    else:
        shown = float64_reference(spec, x, y)
        bad = _mismatch(got, shown, np.int64)
        oracle = "float64 reference (flush/RNE)"
    idx = np.flatnonzero(bad)
    examples = [f"a=0x{a[i]:x} ({x[i]!r}) b=0x{b[i]:x} ({y[i]!r}): rtl {got[i]!r}, oracle {shown[i]!r}"
                for i in idx[:max_examples]]
    return Report(spec, int(a.size), oracle, int(idx.size), examples)


def verify(spec: UnitSpec, n: int = 100_000, seed: int = 0) -> Report:
    """Simulate ``spec`` on every operand pair (formats of at most 8 bits) or on ``n`` random
    pairs (wider formats) and compare with the oracle."""
    a, b = all_pairs(spec.fmt) if spec.fmt.bits <= 8 else random_pairs(spec.fmt, n, seed)
    return compare(simulate(spec, a, b), a, b)


def verify_mac(spec: UnitSpec, n: int = 100_000, seed: int = 0) -> Report:
    """Simulate the MAC lane around ``spec`` (``lmul`` or exact ``fpmul`` with subnormals) on
    ``n`` random operand pairs (all pairs for <= 8-bit formats if ``n`` covers them) with
    accumulators from :func:`lmul.hw.mac.accumulator_mix`, against ``acc + lmul.mul(a, b)``
    in torch float32 (int32 views; NaN as NaN)."""
    from lmul.hw.mac import MacSpec, accumulator_mix, simulate_mac

    lane = MacSpec(spec)
    if spec.unit == "fpmul" and not (spec.rounding == "exact" and spec.subnormals):
        raise ValueError("verify_mac compares with lmul.mul: use the lmul unit or the exact fpmul with subnormals")
    if spec.fmt.bits <= 8 and n >= 1 << (2 * spec.fmt.bits):
        a, b = all_pairs(spec.fmt)
    else:
        a, b = random_pairs(spec.fmt, n, seed)
    mode = "bit" if spec.unit == "lmul" else "exact"
    x = torch.from_numpy(decode_operand(a, spec.fmt)).float()
    y = torch.from_numpy(decode_operand(b, spec.fmt)).float()
    p = mul(x, y, spec.fmt, mode, spec.offset)
    acc = accumulator_mix(p.numpy(), seed)
    acc_t = torch.from_numpy(acc.astype(np.uint32).view(np.int32)).view(torch.float32)
    ref = (acc_t + p).numpy()
    got = simulate_mac(lane, a, b, acc).view(np.float32)
    bad = _mismatch(got, ref, np.int32)
    idx = np.flatnonzero(bad)
    examples = [f"a=0x{a[i]:x} b=0x{b[i]:x} acc={acc_t[i].item()!r}: rtl {got[i]!r}, oracle {ref[i]!r}"
                for i in idx[:5]]
    return Report(spec, int(a.size), f"float32 acc + lmul.mul(mode={mode!r}) [MAC lane {lane.name}]", int(idx.size),
                  examples)
