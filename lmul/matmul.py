"""L-Matmul: ``C[..., i, j] = sum_k P(a[..., i, k], b[..., k, j])`` with ``P`` the L-Mul product.

Shapes and batch broadcasting follow :func:`torch.matmul` (1-D operands are promoted and the
added dimension removed). Products are the elementwise :func:`lmul.mul` products, bit for bit;
only the float32 summation order is unspecified. See ``docs/semantics.md`` section 4.

:func:`matmul` validates its arguments into an :class:`~lmul.spec.LMulSpec`, then runs the
``torch.library`` custom op ``lmul::matmul`` (one opaque op for ``torch.compile`` / ``torch.export``,
with a fake implementation for shapes and the straight-through gradient of :mod:`lmul.autograd`).
The op picks a backend from :data:`lmul.kernels.BACKENDS` and feeds it pieces of bounded size:

* a batch broadcast against an unbatched operand is folded into M (``[..., M, K] @ [K, N]``) or N
  (``[M, K] @ [..., K, N]``), as torch does; other broadcast batches are gathered a chunk at a time
  (never materialised whole);
* each backend call sees at most :data:`MATMUL_CHUNK` elements of each operand and of its result,
  splitting rows, columns and, for float32 accumulation, ``k`` (partial sums added in float32,
  rows/columns that could overflow recomputed over the whole ``k``; the reference backend, the
  oracle, is never split over ``k``: it keeps a float64 accumulator across its own ``k`` chunks) and,
  for ``acc=<format>``, ``k`` at block boundaries with the accumulator state carried across pieces
  (bit-identical to the whole sum).

So the extra memory of a call is a constant (backend workspace for ``MATMUL_CHUNK``-sized pieces,
``docs/kernels.md``) plus at most one copy of the inputs and of the output.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Optional, Union

import torch

from lmul import autograd, kernels
from lmul.formats import Format, FormatLike, Rounding, check_devices, check_float
from lmul.kernels.common import overflow_risk
from lmul.kernels.reference import reference_matmul, round_acc
from lmul.spec import LMulSpec, Mode, resolve_spec

__all__ = ["matmul", "MATMUL_CHUNK"]

MATMUL_CHUNK = 1 << 22  # elements of each operand piece (and of its result) one backend call sees at most


def _shapes(a_shape: torch.Size, b_shape: torch.Size) -> tuple[tuple, int, int, int]:
    """torch.matmul shape rules: (batch, M, K, N), or ValueError naming both shapes."""
    if len(a_shape) == 0 or len(b_shape) == 0:
        raise ValueError(f"matmul needs operands with at least 1 dimension, got {tuple(a_shape)} and {tuple(b_shape)}")
    a2 = (1, *a_shape) if len(a_shape) == 1 else tuple(a_shape)
    b2 = (*b_shape, 1) if len(b_shape) == 1 else tuple(b_shape)
    if a2[-1] != b2[-2]:
        raise ValueError(
            f"matmul shapes {tuple(a_shape)} and {tuple(b_shape)} do not match: a's last dim {a2[-1]} != "
            f"b's {'only' if len(b_shape) == 1 else 'second-to-last'} dim {b2[-2]}"
        )
    batch = []
    for x, y in itertools.zip_longest(reversed(a2[:-2]), reversed(b2[:-2]), fillvalue=1):
        if x != y and 1 not in (x, y):
            raise ValueError(f"batch dims of {tuple(a_shape)} and {tuple(b_shape)} do not broadcast")
        batch.append(y if x == 1 else x)
    return tuple(reversed(batch)), a2[-2], a2[-1], b2[-1]


def _out_shape(a_shape: torch.Size, b_shape: torch.Size) -> tuple:
    batch, m, _, n = _shapes(a_shape, b_shape)
    return batch + ((m,) if len(a_shape) > 1 else ()) + ((n,) if len(b_shape) > 1 else ())


def _gather(x: torch.Tensor, batch: tuple, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of the flattened broadcast batch of ``x`` [..., r, c]: [len(idx), r, c] (a copy
    of just those)."""
    lead = x.shape[:-2]
    xs = x.reshape((1,) * (len(batch) - len(lead)) + tuple(lead) + tuple(x.shape[-2:]))
    multi = torch.unravel_index(idx, batch)
    index = tuple(mi if xs.shape[d] != 1 else torch.zeros_like(mi) for d, mi in enumerate(multi))
    return xs[index]


def _run(entry: kernels.Backend, a: torch.Tensor, b: torch.Tensor, spec: LMulSpec,
         block_sum: bool = False) -> torch.Tensor:
    """[B, M, K] x [B, K, N] through ``entry`` in pieces of at most MATMUL_CHUNK elements. ``block_sum``
    (``acc=<format>``): the float32 sequential sum of all K products, as one accumulator block, not
    rounded to ``acc`` (the scaled accumulator's block sums)."""
    bsz, m, k = a.shape
    n = b.shape[-1]
    if k == 0:
        return torch.zeros(bsz, m, n, dtype=torch.float32, device=a.device)
    # k per piece when K alone is too long: a backend pads B to 64 columns (the cpu kernels' strips),
    # so even one column of B costs 64 k. Not for the reference: it is the oracle (float64 sums rounded
    # once, inf/NaN from the whole sum; the reduced-precision state) and bounds its own memory by
    # carrying its sum across its own k chunks.
    split_k = entry.name != "reference" and k * 64 > MATMUL_CHUNK
    kk = max(1, MATMUL_CHUNK >> 6) if split_k else k
    rm = min(m, max(1, MATMUL_CHUNK // kk))
    cn = min(n, max(1, MATMUL_CHUNK // kk), max(1, MATMUL_CHUNK // rm))
    whole = (rm, cn, kk) == (m, n, k)
    pm, pn = -(-m // 4) * 4, -(-n // 64) * 64  # the cpu kernels pad rows to 4 and columns to 64, per batch
    bs = min(bsz, max(1, MATMUL_CHUNK // max(pm * k, k * pn, pm * pn))) if whole else 1
    if block_sum:
        return _block_pieces(entry, a, b, spec, kk, rm, cn, bs)
    if whole and bs == bsz:
        return entry.fn(a, b, spec)
    out = torch.empty(bsz, m, n, dtype=torch.float32, device=a.device)
    for b0 in range(0, bsz, bs):
        b1 = min(bsz, b0 + bs)
        for r0 in range(0, m, rm):
            r1 = min(m, r0 + rm)
            for c0 in range(0, n, cn):
                c1 = min(n, c0 + cn)
                ap, bp = a[b0:b1, r0:r1], b[b0:b1, :, c0:c1]
                if kk == k:
                    out[b0:b1, r0:r1, c0:c1] = entry.fn(ap, bp, spec)
                    continue
                if spec.acc is not None:
                    out[b0:b1, r0:r1, c0:c1] = _acc_pieces(entry, ap, bp, spec, kk)
                    continue
                block = out[b0:b1, r0:r1, c0:c1]
                block.zero_()
                for k0 in range(0, k, kk):  # float32 partials: the fp32 contract's order is unspecified
                    block += entry.fn(ap[..., k0:k0 + kk], bp[:, k0:k0 + kk], spec)
                # a partial sum can overflow where the whole sum does not: the reference (whole k) decides
                rows, cols = overflow_risk(ap, bp)
                for bi in range(b1 - b0):
                    r, c = rows[bi].nonzero().flatten(), cols[bi].nonzero().flatten()
                    if r.numel():
                        block[bi, r] = reference_matmul(ap[bi:bi + 1, r], bp[bi:bi + 1], spec)[0]
                    if c.numel():
                        block[bi, :, c] = reference_matmul(ap[bi:bi + 1], bp[bi:bi + 1, :, c], spec)[0]
    return out


def _block_pieces(entry: kernels.Backend, a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, kk: int, rm: int,
                  cn: int, bs: int) -> torch.Tensor:
    """One accumulator block's float32 sums over all of k (:func:`_run`'s ``block_sum``), in pieces of
    at most ``bs`` batches, ``rm`` rows, ``cn`` columns and ``kk`` products, the block sum carried
    across the k pieces (``within_block=True``: the same bits as one piece)."""
    bsz, m, _ = a.shape
    n = b.shape[-1]
    out = torch.empty(bsz, m, n, dtype=torch.float32, device=a.device)
    for b0 in range(0, bsz, bs):
        for r0 in range(0, m, rm):
            for c0 in range(0, n, cn):
                out[b0:b0 + bs, r0:r0 + rm, c0:c0 + cn] = _one_block(
                    entry, a[b0:b0 + bs, r0:r0 + rm], b[b0:b0 + bs, :, c0:c0 + cn], spec, kk)
    return out


def _one_block(entry: kernels.Backend, a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, kk: int) -> torch.Tensor:
    """The float32 sequential sum of all of ``a``'s k products as one accumulator block, from +0, fed
    to ``entry`` in k pieces of at most ``kk`` (``within_block=True``: the same bits as one piece)."""
    s = torch.zeros(a.shape[0], a.shape[1], b.shape[-1], dtype=torch.float32, device=a.device)
    for k0 in range(0, a.shape[-1], kk):
        s = entry.fn(a[..., k0:k0 + kk], b[:, k0:k0 + kk], spec, init=s, within_block=True)
    return s


def _acc_pieces(entry: kernels.Backend, a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, kk: int) -> torch.Tensor:
    """``acc=<format>`` over k pieces of at most ``kk`` products, bit-identical to the whole sum of
    docs/semantics.md section 4: the pieces are cut at block boundaries and each continues the running
    sum the previous one returned (``init=``); a block longer than ``kk`` has its float32 block sum
    carried across its pieces (``within_block=True``) and is then added and rounded here,
    ``total = quantize(fl32(total + s), acc)``."""
    k = a.shape[-1]
    block = spec.acc_block
    total = None
    if block <= kk:
        step = kk // block * block
        for k0 in range(0, k, step):
            piece = (a[..., k0:k0 + step], b[:, k0:k0 + step], spec)
            total = entry.fn(*piece) if total is None else entry.fn(*piece, init=total)
        return total
    total = torch.zeros(a.shape[0], a.shape[1], b.shape[-1], dtype=torch.float32, device=a.device)
    for k0 in range(0, k, block):
        total = round_acc(total + _one_block(entry, a[..., k0:k0 + block], b[:, k0:k0 + block], spec, kk), spec.acc)
    return total


def _matmul(a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, block_sum: bool = False) -> torch.Tensor:
    """The L-Matmul of validated operands (the custom op's implementation); ``block_sum``: see :func:`_run`."""
    if spec.scaling != "none":  # scales from the whole operands, then the unscaled path on wide operands
        from lmul.scaling import scaled_matmul

        return scaled_matmul(a, b, spec)
    if spec.acc_tile:  # the scaled accumulator: block sums of k slices, rounded per output tile
        from lmul.scaling import tile_scaled_sum

        a2 = a.unsqueeze(0) if a.dim() == 1 else a
        b2 = b.unsqueeze(-1) if b.dim() == 1 else b
        inner = spec.replace(acc_tile=0)
        out = tile_scaled_sum(lambda k0, k1: _matmul(a2[..., k0:k1], b2[..., k0:k1, :], inner, block_sum=True),
                              a2.shape[-1], spec)
        return out.reshape(_out_shape(a.shape, b.shape))
    batch, m, k, n = _shapes(a.shape, b.shape)
    shape = _out_shape(a.shape, b.shape)
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    nb = math.prod(batch)
    if 0 in (nb, m, n):
        return torch.zeros(shape, dtype=torch.float32, device=a.device)
    entry = kernels.select("matmul", a, spec)
    if b2.dim() == 2:    # [..., M, K] @ [K, N]: fold the batch into M
        out = _run(entry, a2.reshape(1, nb * m, k), b2[None], spec, block_sum)
        return out.reshape(shape)
    if a2.dim() == 2:    # [M, K] @ [..., K, N]: fold the batch into N
        bf = b2.expand(*batch, k, n).movedim(-2, 0).reshape(1, k, nb * n)
        out = _run(entry, a2[None], bf, spec, block_sum)               # [1, M, nb N]
        return out.reshape(m, *batch, n).movedim(0, -2).reshape(shape)
    a_full, b_full = a2.shape[:-2] == batch, b2.shape[:-2] == batch
    if (a_full or nb * m * k <= MATMUL_CHUNK) and (b_full or nb * k * n <= MATMUL_CHUNK):
        out = _run(entry, a2.expand(*batch, m, k).reshape(nb, m, k), b2.expand(*batch, k, n).reshape(nb, k, n), spec,
                   block_sum)
        return out.reshape(shape)
    out = torch.empty(nb, m, n, dtype=torch.float32, device=a.device)
    step = max(1, MATMUL_CHUNK // max(m * k, k * n))
    for i0 in range(0, nb, step):
        idx = torch.arange(i0, min(nb, i0 + step), device=a.device)
        out[i0:i0 + len(idx)] = _run(entry, _gather(a2, batch, idx), _gather(b2, batch, idx), spec, block_sum)
    return out.reshape(shape)


@lru_cache(maxsize=1024)
def _spec_named(name: str) -> LMulSpec:
    return LMulSpec.from_name(name)


@torch.library.custom_op("lmul::matmul", mutates_args=())
def _matmul_op(a: torch.Tensor, b: torch.Tensor, spec: str) -> torch.Tensor:
    return _matmul(a.detach(), b.detach(), _spec_named(spec)).contiguous()  # the fake impl's strides


@_matmul_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor, spec: str) -> torch.Tensor:
    return a.new_empty(_out_shape(a.shape, b.shape), dtype=torch.float32)


def _setup(ctx, inputs, output) -> None:
    a, b, spec = inputs
    ctx.save_for_backward(a, b)
    ctx.spec = _spec_named(spec)


def _backward(ctx, grad: torch.Tensor):
    a, b = ctx.saved_tensors
    spec = ctx.spec
    mm = torch.matmul if spec.backward == "exact" else (lambda x, y: _matmul(x.detach(), y.detach(), spec))
    ga, gb = autograd.matmul_grads(grad, a, b, spec, ctx.needs_input_grad[:2], mm=mm)
    return ga, gb, None


_matmul_op.register_autograd(_backward, setup_context=_setup)


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    fmt: Union[FormatLike, LMulSpec] = "bf16",
    mode: Mode = "bit",
    offset: Optional[float] = None,
    rounding: Rounding = "rne",
    acc: Union[str, Format, None] = "fp32",
    backend: str = "auto",
    acc_block: int = 1,
    *,
    spec: Optional[LMulSpec] = None,
    scaling: str = "none",
    acc_tile: int = 0,
) -> torch.Tensor:
    """L-Matmul of ``a`` and ``b`` with :func:`torch.matmul` shapes, returned as float32.

    ``C[..., i, j] = sum_k P(a[..., i, k], b[..., k, j])`` where ``P`` is the L-Mul product of the
    operands quantized to ``fmt`` (see :func:`lmul.mul`). ``acc="fp32"`` sums the float32 products
    in float32 precision, order unspecified: ``|C - C_exact| <= K 2^-24 sum_k |P_k|``.
    ``acc=<format>`` (e.g. ``"e4m3"``, paper Table 6) accumulates in increasing ``k``: each block of
    ``acc_block`` consecutive products is summed in float32 and added to the running sum, which
    is rounded to that format (RNE, saturating) after every addition.

    The multiply is given either by the keyword options or as one :class:`~lmul.spec.LMulSpec`
    (``spec=``, or in place of ``fmt``). ``backend`` is ``"auto"`` or a name of :func:`lmul.backends`.
    ``scaling`` (``"none"``, ``"tensor"``, ``"row"``, ``"block"``, ``"mx"``): power-of-two operand scales,
    ``C = sum_k 2^(sa + sb) P(q(a 2^-sa), q(b 2^-sb))`` (:mod:`lmul.scaling`, docs/semantics.md section 7).
    ``acc_tile=T`` (with ``acc=<format>``): the scaled accumulator, whose running sums share one
    power-of-two scale per ``T x T`` output tile, so the format's range never clips (section 7).
    Gradients (when an operand requires them) are the straight-through ones of :mod:`lmul.autograd`.
    """
    a = check_float(a, "a")  # float8 -> float32 (exact); sparse / nested refused
    b = check_float(b, "b")
    check_devices("matmul", a, b)
    if isinstance(fmt, LMulSpec):
        spec, fmt = (fmt if spec is None else spec), "bf16"
    if spec is not None and backend != "auto":  # backend= picks where a given spec runs
        spec, backend = spec.replace(backend=backend), "auto"
    spec = resolve_spec(spec, fmt=fmt, mode=mode, offset=offset, rounding=rounding, acc=acc, backend=backend,
                        acc_block=acc_block, scaling=scaling, acc_tile=acc_tile)
    _shapes(a.shape, b.shape)
    if spec.backend != "auto":
        kernels.select("matmul", a, spec)  # a named backend that cannot run raises here, with its reason
    if _eager(a, b):  # the op's own implementation, without the custom-op dispatch (about 0.2 ms a call)
        return _matmul(a, b, spec).contiguous()
    return _matmul_op(a, b, spec.name)


def _eager(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Plain eager call: no autograd needed, not being traced by torch.compile / torch.export (those
    see the ``lmul::matmul`` op), plain tensors (no subclass or fake tensor)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return False
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return type(a) is torch.Tensor and type(b) is torch.Tensor
