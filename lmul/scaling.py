"""Scaled operands: L-Mul on fp8/fp4 as it is really run, with power-of-two scales per group.

A scaled L-Matmul (``LMulSpec.scaling``, ``docs/semantics.md`` section 7) quantizes each operand in
groups that share one power-of-two scale ``X = 2^s``:

* ``"tensor"``: one group per operand (torchao float8 ``tensorwise``);
* ``"row"``: one group per row of A and per column of B, along K (torchao ``rowwise``);
* ``"block"``: A in 1 x 128 tiles along K, B in 128 x 128 blocks (k, n) (DeepSeek-V3, arXiv:2412.19437);
* ``"mx"``: 32 consecutive elements along K, per row of A / column of B (OCP MX v1.0, E8M0 scales).

A ragged last group (K, or N for B's blocks, not a multiple of the group size) is its own smaller
group, as in torchao and the MX spec. The scale exponent ``s`` of a group with ``amax = max |x|``:

* ``"mx"`` (OCP MX v1.0 section 6.3, torchao ``to_mx`` FLOOR): ``s = floor(log2(amax)) - emax_elem``,
  clamped to E8M0's ``[-127, 127]``; ``emax_elem = fmt.emax`` (e4m3 8, e5m2 15, fp4 2);
* ``"tensor"``, ``"row"``, ``"block"`` (torchao ``amax_to_scale`` with ``round_scales_to_power_of_2``):
  torchao's multiplier ``r = fl32(fmt.max / max(amax, 1e-12))`` (float64 division, one rounding to
  float32) rounded down to a power of two, ``2^floor(log2 r)``; ``s = -floor(log2 r)``, clamped to
  ``[-127, 127]`` (reached only by float64 inputs beyond float32's range). ``floor(log2 r)`` is taken
  exactly (from the float32 exponent of ``r``; torchao's float32 ``torch.log2`` can round an ``r``
  within an ulp below ``2^k`` up to ``k``, ``|k| >= 2``, where that group's maximum then saturates);
* an all-zero group has ``s = 0`` (``X = 1``; torchao stores 2^48 / 2^-127 there: every element is
  0 either way); a group holding NaN or ±inf has ``X = NaN`` (MX's E8M0 NaN) and all its elements
  are NaN.

The elements are ``q = quantize(x 2^-s, fmt, rounding)``, saturating to ``±fmt.max`` (torchao's
``to_fp8_saturated``, MX's conversion). The scaled product of two elements is
``fl32(2^(sa + sb) L-Mul(qa, qb))`` and the L-Matmul sums those (float32 accumulation: any order,
float64 on the reference; ``acc=<fmt>``: section 4's order on the scaled products).

Fast path (``cpu``, ``decompose``): a power-of-two scale moves only exponents, so with
``w = q X`` held in the wide format ``e8m<m>`` (float32's exponent range, the element's mantissa),
``L-Mul_e8m(wa, wb) = 2^(sa + sb) L-Mul_fmt(qa, qb)`` exactly in bit, formula and exact mode when no
nonzero ``w`` leaves e8m's normal range; elements subnormal in ``fmt`` (flushed in bit/formula mode)
enter as signed zeros. The unscaled kernels then compute the scaled L-Matmul (fp32 and ``acc=``
alike) at their own speed; an operand with a ``w`` out of range sends the call to the reference.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from lmul.formats import Format, FormatLike, pow2
from lmul.kernels.reference import REFERENCE_CHUNK, Accumulator
from lmul.ops import products
from lmul.spec import SCALINGS, LMulSpec

__all__ = ["SCALINGS", "GROUP", "SCALE_EXP_MIN", "SCALE_EXP_MAX", "TORCHAO_EPS", "Operand", "scale_exponents",
           "scaled_quantize", "wide_format", "wide_spec", "scaled_matmul", "reference_scaled_matmul", "round_tiles",
           "tile_scaled_sum"]

Operand = Literal["a", "b"]
GROUP = {"mx": 32, "block": 128}  # elements along K per scale (block: B's blocks are also 128 along N)
SCALE_EXP_MIN, SCALE_EXP_MAX = -127, 127  # E8M0's exponent range, for every scaling
TORCHAO_EPS = 1e-12  # torchao.float8.float8_utils.EPS: amax below this is clamped to it


def _check(x: torch.Tensor, fmt: FormatLike, scaling: str, operand: str) -> Format:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating torch.Tensor, got {what}")
    if not isinstance(scaling, str) or scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got scaling={scaling!r}")
    if operand not in ("a", "b"):
        raise ValueError(f"operand must be 'a' (left, [..., M, K]) or 'b' (right, [..., K, N]), got {operand!r}")
    if x.dim() < 2:
        raise ValueError(f"a scaled operand has at least 2 dims ([..., M, K] or [..., K, N]), got {tuple(x.shape)}")
    return LMulSpec(fmt, "exact", scaling=scaling).fmt  # validates fmt for scaling (at most 6 exponent bits)


def _grouped(x: torch.Tensor, scaling: str, operand: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """``x`` in groups, zero-padded where ragged (zeros never change a group's amax), with the
    group's elements in dims -3 and -1: A [..., M, K] as [..., Mb, r, G, g] (K in G groups of g,
    rows in Mb groups of r), B [..., K, N] as [..., G, g, Nb, r] (no copy unless padded)."""
    d0, d1 = x.shape[-2:]
    if scaling == "tensor":
        g, r = (d1, d0) if operand == "a" else (d0, d1)
    elif scaling in ("row", "none"):
        g, r = (d1, 1) if operand == "a" else (d0, 1)
    else:
        g = GROUP[scaling]
        r = g if (scaling == "block" and operand == "b") else 1
    g, r = max(g, 1), max(r, 1)
    if operand == "a":
        p0, p1 = -(-d0 // r) * r, -(-d1 // g) * g
        shape = (p0 // r, r, p1 // g, g)
    else:
        p0, p1 = -(-d0 // g) * g, -(-d1 // r) * r
        shape = (p0 // g, g, p1 // r, r)
    if (p0, p1) != (d0, d1):
        x = torch.nn.functional.pad(x, (0, p1 - d1, 0, p0 - d0))
    return x.reshape(*x.shape[:-2], *shape), (d0, d1)


def _exponents(amax: torch.Tensor, fmt: Format, scaling: str) -> torch.Tensor:
    """float32 scale ``X = 2^s`` per group from its float64 ``amax`` (NaN where amax is inf/NaN)."""
    finite = torch.isfinite(amax)
    if scaling == "mx":
        e = torch.frexp(torch.where(finite & (amax > 0), amax, 1.0)).exponent - 1   # floor(log2 amax), exact
        s = e - fmt.emax
    else:
        r64 = fmt.max / torch.where(finite, amax, 1.0).clamp(min=TORCHAO_EPS)
        r32 = r64.float().double()                                     # torchao's float32 multiplier
        r = torch.where(r32 >= 2.0**-126, r32, r64)                    # float64 inputs beyond float32's range
        s = -(torch.frexp(r).exponent - 1)                             # -floor(log2 r), exact
    s = torch.where(amax > 0, s.clamp(SCALE_EXP_MIN, SCALE_EXP_MAX), 0)
    x = pow2(s, torch.float32)
    return torch.where(finite, x, torch.nan)


def _scales_grouped(xv: torch.Tensor, fmt: Format, scaling: str) -> torch.Tensor:
    """The scales of grouped ``xv`` (:func:`_grouped`), shaped like ``xv`` with 1 in dims -3 and -1."""
    if xv.numel() == 0:
        shape = (1,) * xv.dim() if scaling == "tensor" else (*xv.shape[:-3], 1, xv.shape[-2], 1)
        return _exponents(xv.new_zeros(shape, dtype=torch.float64), fmt, scaling)
    # amax and amin, not aminmax nor abs: two plain reductions are several times faster on CPU
    if scaling == "tensor":
        amax = torch.maximum(-xv.amin(), xv.amax()).reshape((1,) * xv.dim())
    else:
        amax = torch.maximum(-xv.amin(dim=(-3, -1), keepdim=True), xv.amax(dim=(-3, -1), keepdim=True))
    return _exponents(amax.double(), fmt, scaling)


def _compact(scales: torch.Tensor, scaling: str, operand: str) -> torch.Tensor:
    """Group scales in the operand's own layout: A [..., M, G] (row: G = 1), B [..., G, N] (block:
    [..., G, Nb]); tensor: a 0-dim tensor."""
    if scaling == "tensor":
        return scales.reshape(())
    return scales.squeeze(-1).squeeze(-2)


def _ungroup(v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    a, b, c, d = v.shape[-4:]
    return v.reshape(*v.shape[:-4], a * b, c * d)[..., :size[0], :size[1]]


def scale_exponents(x: torch.Tensor, fmt: FormatLike, scaling: str, operand: Operand = "a") -> torch.Tensor:
    """The group scales ``X = 2^s`` (float32, NaN for a group holding NaN/inf) of operand ``x``:
    ``operand="a"`` for a left operand [..., M, K] (groups along K within a row), ``"b"`` for a
    right operand [..., K, N] (along K within a column). Layout: A [..., M, G], B [..., G, N]
    (block: [..., G, ceil(N/128)]); ``"tensor"``: 0-dim; ``"row"``: G = 1. Rules: module docstring."""
    f = _check(x, fmt, scaling, operand)
    if scaling == "none":
        raise ValueError("scaling='none' has no scales")
    xv, _ = _grouped(x, scaling, operand)
    return _compact(_scales_grouped(xv, f, scaling), scaling, operand)


def scaled_quantize(x: torch.Tensor, fmt: FormatLike, scaling: str, operand: Operand = "a",
                    rounding: str = "rne", per_element: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, X)``: the elements ``q = quantize(x / X, fmt, rounding)`` (float32, saturating; NaN in a
    NaN group) with ``x``'s shape, and the group scales ``X`` of :func:`scale_exponents` (so
    ``x ~ q * X`` broadcast per group), or with ``per_element=True`` each element's group scale
    (float32, ``x``'s shape: ``q * X`` is the scaled operand). Compare with torchao: ``q`` is the
    float8 data of ``hp_tensor * scale`` (``X = 1 / scale``) or ``to_mx``'s elements (``X`` its E8M0 scale)."""
    f = _check(x, fmt, scaling, operand)
    if rounding not in ("rne", "trunc"):
        raise ValueError(f"rounding must be 'rne' or 'trunc', got rounding={rounding!r}")
    if scaling == "none":
        raise ValueError("scaling='none': use lmul.quantize")
    q, elementwise, scales = _scaled(x, f, scaling, operand, rounding)
    return q, (elementwise if per_element else scales)


def _quantize(x: torch.Tensor, fmt: Format, rounding: str) -> torch.Tensor:
    from lmul import kernels  # the fused quantizer where it runs (float32 CPU, large): same bits

    spec = LMulSpec(fmt, "exact", rounding=rounding)
    return kernels.select("quantize", x, spec).fn(x, spec)


def _scaled(x: torch.Tensor, fmt: Format, scaling: str, operand: str, rounding: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elements q, per-element scales (both [...] like x, float32) and the compact group scales."""
    qv, scales, size = _scaled_grouped(x, fmt, scaling, operand, rounding)
    return _ungroup(qv, size), _ungroup(scales.expand(qv.shape), size), _compact(scales, scaling, operand)


def _scaled_grouped(x: torch.Tensor, fmt: Format, scaling: str, operand: str, rounding: str
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Grouped elements q (float32, a fresh tensor), the scales (:func:`_scales_grouped`) and the size."""
    src = torch.float64 if x.dtype == torch.float64 else torch.float32
    xv, size = _grouped(x.detach().to(src), scaling, operand)
    scales = _scales_grouped(xv, fmt, scaling)
    # x 2^-s: exact in float32 except below 2^-126, where any E <= 6 format rounds to zero anyway
    y = xv * (1.0 / scales).to(src)
    q = _quantize(y.reshape(-1) if src == torch.float32 else y, fmt, rounding).reshape(y.shape)
    return q, scales, size


def wide_format(fmt: FormatLike) -> Format:
    """``e8m<m>``: float32's exponent range with ``fmt``'s mantissa, which holds every scaled element
    ``q 2^s`` of a normal ``q`` exactly (while ``2^-126 <= |q 2^s| <= max``)."""
    return Format(8, Format.parse(fmt).man_bits)


def wide_spec(spec: LMulSpec) -> LMulSpec:
    """The unscaled spec on wide operands that computes ``spec``'s scaled products (module docstring)."""
    return spec.replace(fmt=wide_format(spec.fmt), scaling="none")


def _out(a: torch.Tensor, b: torch.Tensor) -> tuple:
    from lmul.matmul import _out_shape

    return _out_shape(a.shape, b.shape)


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, spec: LMulSpec) -> torch.Tensor:
    """The scaled L-Matmul of validated operands (``lmul.matmul`` with ``spec.scaling != "none"``):
    ``C = sum_k fl32(2^(sa + sb) L-Mul(qa_k, qb_k))`` per ``docs/semantics.md`` section 7. The
    reference backend computes it plainly (:func:`reference_scaled_matmul`); ``cpu``/``decompose``
    run the unscaled kernel on the wide operands ``q X`` (:func:`wide_spec`), or the reference
    where a wide operand would leave e8m's normal range."""
    from lmul import kernels
    from lmul.matmul import _matmul

    shape = _out(a, b)
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    if 0 in a2.shape or 0 in b2.shape:
        return torch.zeros(shape, dtype=torch.float32, device=a.device)
    entry = kernels.select("matmul", a, spec)
    if entry.name != "reference":
        if spec.acc is None and spec.scaling in ("tensor", "row"):
            out = _outer(a2, b2, spec, entry.name)
            if out is not None:
                return out.reshape(shape)
        wa, wb = _wide_operand(a2, spec, "a"), _wide_operand(b2, spec, "b")
        if wa is not None and wb is not None:
            return _matmul(wa, wb, wide_spec(spec).replace(backend=entry.name)).reshape(shape)
    qa, xa, _ = _scaled(a2, spec.fmt, spec.scaling, "a", spec.rounding)
    qb, xb, _ = _scaled(b2, spec.fmt, spec.scaling, "b", spec.rounding)
    if spec.acc_tile:  # the scales are the whole operands'; each block's sum from its slice of k
        inner = spec.replace(acc_tile=0)
        return tile_scaled_sum(lambda k0, k1: _reference_broadcast(
            qa[..., k0:k1], xa[..., k0:k1], qb[..., k0:k1, :], xb[..., k0:k1, :], inner, within_block=True),
            a2.shape[-1], spec).reshape(shape)
    return _reference_broadcast(qa, xa, qb, xb, spec).reshape(shape)


def _wide_operand(x: torch.Tensor, spec: LMulSpec, operand: str) -> torch.Tensor | None:
    """``w = q X`` (float32; fmt-subnormal q flushed to +0 in bit/formula mode, where L-Mul flushes
    them anyway and a zero product's sign never matters), or None where a nonzero ``w`` would leave
    the wide format's normal range (that call needs the reference). From the fused C++ pass where
    it runs (:func:`_fused`, ``w`` in the thread's scratch buffer: use it before the next call for
    this operand), else in place on the fresh q of the torch path; the same bits."""
    fmt, wide = spec.fmt, wide_format(spec.fmt)
    fused = _fused(x, fmt, spec.scaling, operand, spec.rounding, "wide" if spec.mode == "exact" else "wide_flush",
                   True)
    if fused is not None:
        return None if fused[2] else fused[0]
    q, scales, size = _scaled_grouped(x, fmt, spec.scaling, operand, spec.rounding)
    low = fmt.min_normal if spec.mode != "exact" else fmt.min_subnormal  # smallest nonzero |q| that counts
    ok = torch.isnan(scales) | ((scales * low >= wide.min_normal) & (scales * fmt.max <= wide.max))
    if spec.mode != "exact":  # |q| <= the largest subnormal -> 0 (NaN kept), one pass
        q = torch.nn.functional.hardshrink(q, fmt.min_normal - fmt.min_subnormal)
    q.mul_(scales)
    if not bool(ok.all()):  # some group could reach past e8m's normal range: look at its elements
        mag = q.abs()
        if bool(((mag > 0) & ((mag < wide.min_normal) | (mag > wide.max))).any()):
            return None
    return _ungroup(q, size)


def _outer(a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, backend: str) -> torch.Tensor | None:
    """Tensor/row scaling with float32 sums: the scale 2^(sa_i + sb_j) is constant over k, so
    ``C_ij = 2^(sa_i + sb_j) sum_k P(q(a 2^-sa), q(b 2^-sb))``: the unscaled kernel (which quantizes
    ``x 2^-s`` itself) times one power of two per output, exact while every nonzero product and
    partial sum stays in float32's normal range once scaled; None (use the wide path) otherwise.

    Exact mode through the fused C++ pass: the unscaled kernel on the wide operands ``w = q X``
    instead, which it takes as they are (already in e8m<m>, no quantization pass): the same bits,
    since every product and partial sum is then the scaled one, exactly, and no row or column is
    near float32's overflow (one more power of two of margin than above, as the fix-up's bound)."""
    from lmul.matmul import _matmul

    fmt, k = spec.fmt, a.shape[-1]
    grid = 2 * fmt.emin - (2 * fmt.man_bits if spec.mode == "exact" else fmt.man_bits)  # nonzero |P| >= 2^grid
    top = 2 * (fmt.emax + 1) + 2 + math.ceil(math.log2(max(k, 1)))                     # every |partial| < 2^top
    fits = lambda ea, eb, margin: (ea is None or eb is None  # noqa: E731
                                   or (ea[0] + eb[0] + grid >= -126 and ea[1] + eb[1] + top + margin < 127))
    fusable = _fusable(a) and _fusable(b)
    if fusable and spec.mode == "exact":
        wa = _fused(a, fmt, spec.scaling, "a", spec.rounding, "wide", True)
        wb = _fused(b, fmt, spec.scaling, "b", spec.rounding, "wide", True)
        if not (wa[2] or wb[2]):
            if not fits(wa[3], wb[3], 0):
                return None
            if fits(wa[3], wb[3], 1):
                return _matmul(wa[0], wb[0], wide_spec(spec).replace(backend=backend))
    fa = _fused(a, fmt, spec.scaling, "a", spec.rounding, "scaled", True) if fusable else None
    fb = _fused(b, fmt, spec.scaling, "b", spec.rounding, "scaled", True) if fusable else None
    if fb is not None:  # y = x (1/X), the compact scales X and their exponent range, two C++ passes each
        (ya, ca, _, ea), (yb, cb, _, eb) = fa, fb
    else:
        src = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
        av, size_a = _grouped(a.detach().to(src), spec.scaling, "a")
        bv, size_b = _grouped(b.detach().to(src), spec.scaling, "b")
        xa, xb = _scales_grouped(av, fmt, spec.scaling), _scales_grouped(bv, fmt, spec.scaling)
        ca, cb = _compact(xa, spec.scaling, "a"), _compact(xb, spec.scaling, "b")  # 0-dim, or [.., M, 1] / [.., 1, N]
        ea, eb = _finite_exponents(ca), _finite_exponents(cb)
    if not fits(ea, eb, 0):
        return None
    if fb is None:
        ya = _ungroup(av * (1.0 / xa).to(src), size_a)
        yb = _ungroup(bv * (1.0 / xb).to(src), size_b)
    out = _matmul(ya, yb, spec.replace(scaling="none", backend=backend))
    if fb is not None and spec.scaling == "row" and out.is_contiguous():  # no [.., M, N] temporary
        from lmul.kernels import cpu_ext

        m, n = out.shape[-2:]
        lead = out.shape[:-2]
        cpu_ext.scale_outer(out.view(-1, m, n), ca.expand(*lead, m, 1).reshape(-1, m),
                            cb.expand(*lead, 1, n).reshape(-1, n))
        return out
    return out.mul_(ca * cb)  # one power of two per output (NaN for a NaN group): exact in range


def _fusable(x: torch.Tensor) -> bool:
    """Whether :func:`lmul.kernels.cpu_ext.scaled_operand` takes ``x`` (CPU float32/16, C++ loadable)."""
    from lmul.kernels import cpu_ext

    return x.numel() > 0 and cpu_ext.scaled_unavailable(x) is None


def _fused(x: torch.Tensor, fmt: Format, scaling: str, operand: str, rounding: str, out: str, scratch: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, bool, tuple[int, int] | None] | None:
    """``(y, X, bad, s_range)`` from :func:`lmul.kernels.cpu_ext.scaled_operand` with ``scaling``'s groups
    (``y`` with ``x``'s shape; ``X`` compact as :func:`_compact`; ``out``, ``bad``, ``s_range`` as there, the
    wide format :func:`wide_format`), the same bits as the torch path; None where it cannot run.
    ``scratch``: ``y`` in the thread's scratch buffer for ``operand`` (valid until the next such call)."""
    from lmul.kernels import cpu_ext

    if not _fusable(x):
        return None
    d0, d1 = x.shape[-2:]
    if scaling == "tensor":
        x3, tile = x.reshape(1, -1, d1), (x.numel() // d1, d1)
    else:
        g = d1 if scaling == "row" and operand == "a" else d0 if scaling == "row" else GROUP[scaling]
        r = GROUP[scaling] if (scaling == "block" and operand == "b") else 1
        x3, tile = x.reshape(-1, d0, d1), ((1, g) if operand == "a" else (g, r))
    y, scales, bad, s_range = cpu_ext.scaled_operand(x3, tile, fmt, rounding, scaling == "mx", out, TORCHAO_EPS,
                                                      wide_format(fmt), f"scaled_{operand}" if scratch else None)
    lead = x.shape[:-2]
    scales = scales.reshape(()) if scaling == "tensor" else scales.reshape(*lead, *scales.shape[-2:])
    return y.reshape(x.shape), scales, bad, s_range


def _finite_exponents(x: torch.Tensor) -> tuple[int, int] | None:
    """(min, max) exponent of the finite scales ``x`` (None: all NaN)."""
    fin = x[torch.isfinite(x)]
    if fin.numel() == 0:
        return None
    lo, hi = torch.aminmax(fin)
    return int(torch.frexp(lo).exponent) - 1, int(torch.frexp(hi).exponent) - 1


def _reference_broadcast(qa: torch.Tensor, xa: torch.Tensor, qb: torch.Tensor, xb: torch.Tensor,
                         spec: LMulSpec, within_block: bool = False) -> torch.Tensor:
    from lmul.matmul import _shapes

    batch, m, k, n = _shapes(qa.shape, qb.shape)
    nb = math.prod(batch)
    fa = lambda t: t.expand(*batch, m, k).reshape(nb, m, k)  # noqa: E731
    fb = lambda t: t.expand(*batch, k, n).reshape(nb, k, n)  # noqa: E731
    return reference_scaled_matmul(fa(qa), fa(xa), fb(qb), fb(xb), spec, within_block).reshape(*batch, m, n)


def reference_scaled_matmul(qa: torch.Tensor, xa: torch.Tensor, qb: torch.Tensor, xb: torch.Tensor,
                            spec: LMulSpec, within_block: bool = False) -> torch.Tensor:
    """The oracle: [B, M, K] elements ``qa`` with per-element scales ``xa`` times [B, K, N] ``qb``,
    ``xb`` -> [B, M, N]. Terms ``T_k = fl32(P(qa_ik, qb_kj) * xa_ik * xb_kj)`` (the product of two
    powers of two and a float32 is exact in float64; one rounding); ``acc=None``: their float64 sum
    rounded once; ``acc=<fmt>``: section 4's order on the ``T_k`` (:class:`Accumulator`), or with
    ``within_block`` their float32 sequential sum (one accumulator block, not rounded to ``acc``). At
    most :data:`~lmul.kernels.reference.REFERENCE_CHUNK` terms at a time."""
    bsz, m, k = qa.shape
    n = qb.shape[-1]
    out = torch.zeros(bsz, m, n, dtype=torch.float32, device=qa.device)
    if 0 in (bsz, m, n, k):
        return out
    k_step = max(1, min(k, REFERENCE_CHUNK // n))
    rows = max(1, min(m, REFERENCE_CHUNK // (n * k_step)))
    for bi in range(bsz):
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            acc64 = torch.zeros(r1 - r0, n, dtype=torch.float64, device=qa.device)
            state = Accumulator(spec, acc64, within_block=within_block) if spec.acc is not None else None
            for k0 in range(0, k, k_step):
                k1 = min(k, k0 + k_step)
                p = products(qa[bi, r0:r1, k0:k1, None], qb[bi, None, k0:k1, :], spec.fmt, spec.mode, spec.offset)
                sc = xa[bi, r0:r1, k0:k1, None].double() * xb[bi, None, k0:k1, :].double()
                t = (p.double() * sc).float()  # [rows, k_step, N]
                if state is None:
                    acc64 += t.double().sum(1)
                else:
                    state.add(t, 1)
            out[bi, r0:r1] = acc64.float() if state is None else state.result()
    return out


def round_tiles(y: torch.Tensor, acc: FormatLike, tile: int) -> torch.Tensor:
    """The scaled accumulator's rounding of float32 sums ``y`` [..., M, N]: each ``tile x tile`` block
    of the last two dims (aligned at 0; a ragged last tile is its own smaller tile) gets one scale
    ``X = 2^t`` by the torchao rule of the module docstring with ``acc.max`` from the amax of the
    tile's finite elements (NaN and ±inf ignored; no finite nonzero element: ``X = 1``), so the tile's
    largest value maps into ``(acc.max / 2, acc.max]`` and never saturates; then
    ``quantize(y 2^-t, acc) 2^t`` (rne, saturating as in section 4: ±inf stays ±inf where ``acc`` has
    inf and becomes ±max otherwise, NaN stays), in float32."""
    fmt = Format.parse(acc)
    m, n = y.shape[-2:]
    if y.numel() == 0:
        return y.clone()
    tm, tn = min(tile, m), min(tile, n)
    amax = _tile_amax(y, tm, tn)
    if not bool(torch.isfinite(amax).all()):  # a NaN or inf in some tile: leave them out of its amax
        amax = _tile_amax(torch.where(torch.isfinite(y), y, 0.0), tm, tn)
    x = _exponents(amax.double(), fmt, "row").repeat_interleave(tm, dim=-2)[..., :m, :]  # [..., M, ceil(N/tn)]
    if n % tn == 0:  # one scale per tn columns, broadcast without copying
        x = x.unsqueeze(-1)
        yt = y.reshape(*y.shape[:-1], n // tn, tn)
        return (_quantize(yt * (1.0 / x), fmt, "rne") * x).reshape(y.shape)
    x = x.repeat_interleave(tn, dim=-1)[..., :n]
    return _quantize(y * (1.0 / x), fmt, "rne") * x


def _tile_amax(y: torch.Tensor, tm: int, tn: int) -> torch.Tensor:
    """max |y| per ``tm x tn`` tile of the last two dims (ragged last tiles smaller): [..., ceil(M/tm),
    ceil(N/tn)]; NaN where a tile holds NaN. Two plain reductions (amax, amin) instead of abs."""
    m, n = y.shape[-2:]
    pn = -(-n // tn) * tn
    if pn != n:  # zeros never change an amax
        y = torch.nn.functional.pad(y, (0, pn - n))
    yv = y.reshape(*y.shape[:-1], pn // tn, tn)
    cols = torch.maximum(yv.amax(-1), -yv.amin(-1))                 # [..., M, ceil(N/tn)]
    pm = -(-m // tm) * tm
    if pm != m:
        cols = torch.nn.functional.pad(cols, (0, 0, 0, pm - m))
    return cols.reshape(*cols.shape[:-2], pm // tm, tm, cols.shape[-1]).amax(-2)


def tile_scaled_sum(block_sum, k: int, spec: LMulSpec) -> torch.Tensor:
    """The scaled accumulator (``spec.acc_tile > 0``, docs/semantics.md section 7): section 4's order
    with every rounding done per tile, ``total = round_tiles(fl32(total + s), acc, tile)`` for the
    blocks ``[k0, k0 + acc_block)`` in increasing ``k0``, where ``block_sum(k0, k1)`` returns the
    block's float32 sequential sums ``s`` (every output at once, [..., M, N]). ``K = 0``: zeros."""
    total = None
    for k0 in range(0, k, spec.acc_block):
        s = block_sum(k0, min(k, k0 + spec.acc_block))
        total = round_tiles(s if total is None else total + s, spec.acc, spec.acc_tile)
    return block_sum(0, 0) if total is None else total
