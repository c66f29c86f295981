"""Independent float64/NumPy oracles for the contract (docs/semantics.md), written from the
spec's formulas without using lmul: decoding encodings, rounding by nearest-value search, and
the L-Mul products of §2."""

from __future__ import annotations

import numpy as np


class SmallFormat:
    """A format described only by (E, m, finite_only), decoded from its bit patterns."""

    def __init__(self, e: int, m: int, finite_only: bool = False):
        self.e, self.m, self.finite_only = e, m, finite_only
        self.bias = 2 ** (e - 1) - 1
        self.n_codes = 2 ** (1 + e + m)
        pos = np.arange(self.n_codes // 2)
        vals = self.decode(pos)
        finite = np.isfinite(vals)
        self.pos_codes = pos[finite]        # positive finite codes, increasing value
        self.pos_vals = vals[finite]
        self.max = self.pos_vals[-1]
        top = self.pos_codes[-1]
        # the encoding just above max, and its value with an unbounded exponent range
        f, mm = (top + 1) >> m, (top + 1) & (2**m - 1)
        self.beyond = (1 + mm / 2**m) * 2.0 ** (f - self.bias) if f else mm / 2**m * 2.0 ** (1 - self.bias)
        self.beyond_code = top + 1

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        e, m = self.e, self.m
        s = (codes >> (e + m)) & 1
        f = (codes >> m) & (2**e - 1)
        man = codes & (2**m - 1)
        val = np.where(f == 0, man / 2**m * 2.0 ** (1 - self.bias), (1 + man / 2**m) * 2.0 ** (f - self.bias))
        top = f == 2**e - 1
        if self.finite_only:
            val = np.where(top & (man == 2**m - 1), np.nan, val)
        else:
            val = np.where(top, np.where(man == 0, np.inf, np.nan), val)
        return np.where(s == 1, -val, val)

    def all_values(self) -> np.ndarray:
        return self.decode(np.arange(self.n_codes))

    def quantize(self, x: np.ndarray, rounding: str = "rne", overflow: str = "saturate") -> np.ndarray:
        """Round float64 x by searching the table of values (ties to the even encoding)."""
        x = np.asarray(x, dtype=np.float64)
        a = np.abs(x)
        lo_i = np.clip(np.searchsorted(self.pos_vals, a, side="right") - 1, 0, None)
        lo = self.pos_vals[lo_i]
        at_top = lo_i == len(self.pos_vals) - 1
        hi_i = np.minimum(lo_i + 1, len(self.pos_vals) - 1)
        hi = np.where(at_top, self.beyond, self.pos_vals[hi_i])
        hi_code = np.where(at_top, self.beyond_code, self.pos_codes[hi_i])
        if rounding == "trunc":
            pick_hi = np.zeros_like(a, dtype=bool)
            overflowed = a >= self.beyond
        else:
            d_lo, d_hi = a - lo, hi - a
            pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi_code % 2 == 0))
            overflowed = (at_top & pick_hi) | (a > self.beyond)
        out = np.where(pick_hi, hi, lo)
        big = np.inf if not self.finite_only else np.nan
        out = np.where(overflowed, self.max if overflow == "saturate" else big, out)
        out = np.where(np.isinf(a), self.max if (self.finite_only and overflow == "saturate") else
                       (np.nan if self.finite_only else np.inf), out)
        out = np.where(np.isnan(a), np.nan, out)
        return np.copysign(out, x)


def default_offset(m: int) -> float:
    return 2.0 ** -(m if m <= 3 else 3 if m == 4 else 4)


def spec_products(x: np.ndarray, y: np.ndarray, e: int, m: int, mode: str, c: float) -> np.ndarray:
    """The spec's product P (§2) of values already in the format (E=e, m), as float32.

    Normal operands are split as (-1)^s (1 + M/2^m) 2^xe by frexp (independent of bit layout)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    emin = 2 - 2 ** (e - 1)
    with np.errstate(all="ignore"):
        if mode == "exact":
            return (x * y).astype(np.float32)
        fx, ex = np.frexp(np.abs(x))     # |x| = fx 2^ex, fx in [0.5, 1)
        fy, ey = np.frexp(np.abs(y))
        xe, ye = ex - 1, ey - 1
        mx = (2 * fx - 1) * 2**m        # mantissa field as an integer
        my = (2 * fy - 1) * 2**m
        if mode == "bit":
            s = mx + my + c * 2**m
            q = np.floor(s / 2**m)
            mag = np.ldexp(1 + (s - q * 2**m) / 2**m, (xe + ye + q).astype(np.int64))
        else:
            mag = np.ldexp(1 + mx / 2**m + my / 2**m + c, (xe + ye).astype(np.int64))
        normal_x = np.isfinite(x) & (np.abs(x) >= 2.0**emin)
        normal_y = np.isfinite(y) & (np.abs(y) >= 2.0**emin)
        both = normal_x & normal_y
        fx0 = np.where(normal_x | ~np.isfinite(x), x, np.copysign(0.0, x))
        fy0 = np.where(normal_y | ~np.isfinite(y), y, np.copysign(0.0, y))
        special = fx0 * fy0
        sign = np.signbit(x) ^ np.signbit(y)
        out = np.where(both, np.where(sign, -mag, mag), special)
        return out.astype(np.float32)
