"""Statistics for per-item scores: standard errors, paired bootstrap, McNemar's exact test.

All arms are scored on the same items, so arm differences are paired: the paired bootstrap
resamples item indices once per replicate and applies them to both arms, and McNemar's test
uses only the discordant items (b = A right & B wrong, c = A wrong & B right), for which
b ~ Binomial(b + c, 1/2) under H0 (equal accuracy). Seeds are explicit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def mean_se(x) -> tuple[float, float]:
    """Mean and standard error ``s / sqrt(n)`` with the n-1 sample standard deviation
    (what lm-eval reports as ``*_stderr``); se is nan for n < 2."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), se


@dataclass(frozen=True)
class Paired:
    """Arm B minus arm A on the same n items."""

    diff: float  # mean(B) - mean(A)
    lo: float  # bootstrap percentile CI of diff
    hi: float
    n: int
    b: int  # A right, B wrong (binary scores only, else -1)
    c: int  # A wrong, B right
    p_mcnemar: float  # exact two-sided; nan when scores are not binary

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        half = (self.hi - self.lo) / 2
        return f"{self.diff * scale:+.{digits}f} ± {half * scale:.{digits}f}"


def paired_bootstrap(a, b, iters: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean(b - a), lo, hi): percentile bootstrap CI of the mean paired difference, resampling
    items with replacement ``iters`` times from ``numpy.random.default_rng(seed)``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need two equal 1-D arrays, got {a.shape} and {b.shape}")
    if a.size == 0:
        return float("nan"), float("nan"), float("nan")
    d = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    for start in range(0, iters, 1000):  # chunks keep memory at 1000 x n
        k = min(1000, iters - start)
        idx = rng.integers(0, d.size, size=(k, d.size))
        means[start:start + k] = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(d.mean()), float(lo), float(hi)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(|X - n/2| >= |b - n/2|), X ~ Binomial(n = b + c, 1/2),
    computed as min(1, 2 · P(X <= min(b, c)))."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def paired(a, b, iters: int = 10_000, seed: int = 0) -> Paired:
    """Paired comparison of arm B against arm A (bootstrap CI; McNemar when scores are 0/1)."""
    diff, lo, hi = paired_bootstrap(a, b, iters, seed)
    a = np.asarray(a, dtype=np.float64)
    b_ = np.asarray(b, dtype=np.float64)
    binary = bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b_, (0.0, 1.0)).all())
    if binary:
        nb = int(((a == 1) & (b_ == 0)).sum())
        nc = int(((a == 0) & (b_ == 1)).sum())
        p = mcnemar_exact(nb, nc)
    else:
        nb = nc = -1
        p = float("nan")
    return Paired(diff, lo, hi, int(a.size), nb, nc, p)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion with ``k`` successes in ``n`` trials: the p with
    ``|k/n - p| <= z·sqrt(p(1 - p)/n)``, i.e.
    ``(k/n + z²/2n ± z·sqrt(k/n·(1 - k/n)/n + z²/4n²)) / (1 + z²/n)``. Asymmetric, inside [0, 1]
    even at k = 0 or k = n (where ``p ± z·se`` gives a zero-width or out-of-range interval)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, mid - half), min(1.0, mid + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)  # exact at the ends, where rounding misses by 1 ulp


MIN_DISCORDANT = 6  # McNemar's exact test on b + c items has smallest p = 2·2^-(b+c): < 0.05 needs b + c >= 6


def resolvable(p: Paired) -> bool:
    """Whether a paired comparison can tell anything from zero or from another difference: its CI
    has width, and for 0/1 scores at least :data:`MIN_DISCORDANT` items changed (with fewer, no
    outcome is significant at 5% and the bootstrap CI understates the uncertainty; at b + c = 0 it
    is [0, 0])."""
    return p.hi > p.lo and (p.b < 0 or p.b + p.c >= MIN_DISCORDANT)
