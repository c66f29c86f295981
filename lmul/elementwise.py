"""The public elementwise operations on a chosen backend: :func:`mul` (L-Mul, paper Eq. 1-2) and
:func:`quantize` (rounding into a format).

:func:`mul` validates its arguments into an :class:`~lmul.spec.LMulSpec` and runs the
``torch.library`` custom op ``lmul::mul`` (opaque to ``torch.compile``, a fake implementation for
shapes, the straight-through gradient of :mod:`lmul.autograd`). The op picks a backend from
:data:`lmul.kernels.BACKENDS` and computes the broadcast result a slice of at most :data:`MUL_CHUNK`
elements at a time, so that its extra memory is a constant plus the output. The math is
:func:`lmul.ops.products`; the contract is ``docs/semantics.md`` section 2.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Union

import torch

from lmul import autograd, kernels
from lmul.formats import FormatLike, Overflow, Rounding, check_devices, check_float
from lmul.formats import quantize as _quantize_formats
from lmul.matmul import _eager
from lmul.spec import LMulSpec, Mode, resolve_spec

__all__ = ["mul", "quantize", "scaled_elements", "MUL_CHUNK"]

MUL_CHUNK = 1 << 22  # result elements one backend call computes at most


def _slices(shape: tuple, budget: int):
    """Index tuples of leading-dim slices that tile ``shape`` in pieces of at most ``budget`` elements
    (a dimension is split only where the dimensions after it already exceed the budget)."""
    if not shape:
        yield ()
        return
    inner = 1
    for d in shape[1:]:
        inner *= d
    if inner <= budget or len(shape) == 1:
        step = max(1, budget // max(inner, 1))
        for i in range(0, shape[0], step):
            yield (slice(i, min(shape[0], i + step)),)
        return
    for i in range(shape[0]):
        for rest in _slices(shape[1:], budget):
            yield (i, *rest)


def scaled_elements(x: torch.Tensor, spec: LMulSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, X)``, both float32 with ``x``'s shape: ``x`` scaled for an element-wise product, in groups
    along its **last** dimension, as :func:`lmul.scaling.scaled_quantize` groups a left operand along K
    (``row``: one scale per row; ``mx``: 32 consecutive elements; ``block``: 128; ``tensor``: one scale).
    ``q = quantize(x / X, fmt)`` and ``X`` is the element's group scale ``2^s`` (NaN for a group holding
    NaN/inf); a 0-d or 1-D ``x`` is one row."""
    from lmul.scaling import scaled_quantize

    x2 = x.reshape(1, -1) if x.dim() < 2 else x
    if x2.numel() == 0:
        z = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return z, z + 1.0
    q, scales = scaled_quantize(x2, spec.fmt, spec.scaling, "a", spec.rounding, per_element=True)
    return q.reshape(x.shape), scales.reshape(x.shape)


def _scaled_mul(x: torch.Tensor, y: torch.Tensor, spec: LMulSpec) -> torch.Tensor:
    """``fl32(2^(sx + sy) P(qx, qy))`` per element (docs/patching.md, scaled element-wise products):
    each operand scaled on its own, before broadcasting, by :func:`scaled_elements`; ``P`` the
    unscaled spec's product of the elements (already in ``fmt``, so quantizing them again is the identity);
    the two powers of two applied in float64 (exact) and the result rounded once to float32."""
    qx, sx = scaled_elements(x, spec)
    qy, sy = scaled_elements(y, spec)
    p = _mul(qx, qy, spec.replace(scaling="none"))
    return (p.double() * (sx.double() * sy.double())).float()


def _mul(x: torch.Tensor, y: torch.Tensor, spec: LMulSpec) -> torch.Tensor:
    if spec.scaling != "none":
        return _scaled_mul(x, y, spec)
    shape = tuple(torch.broadcast_shapes(x.shape, y.shape))
    entry = kernels.select("mul", x, spec)
    n = 1
    for d in shape:
        n *= d
    if n <= MUL_CHUNK:
        return entry.fn(x, y, spec).reshape(shape)
    out = torch.empty(shape, dtype=torch.float32, device=x.device)
    xb, yb = x.expand(shape), y.expand(shape)
    for index in _slices(shape, MUL_CHUNK):
        out[index] = entry.fn(xb[index], yb[index], spec)
    return out


@lru_cache(maxsize=1024)
def _spec_named(name: str) -> LMulSpec:
    return LMulSpec.from_name(name)


@torch.library.custom_op("lmul::mul", mutates_args=())
def _mul_op(x: torch.Tensor, y: torch.Tensor, spec: str) -> torch.Tensor:
    return _mul(x.detach(), y.detach(), _spec_named(spec)).contiguous()  # the fake impl's strides


@_mul_op.register_fake
def _(x: torch.Tensor, y: torch.Tensor, spec: str) -> torch.Tensor:
    return x.new_empty(torch.broadcast_shapes(x.shape, y.shape), dtype=torch.float32)


def _setup(ctx, inputs, output) -> None:
    x, y, spec = inputs
    ctx.save_for_backward(x, y)
    ctx.spec = _spec_named(spec)


def _backward(ctx, grad: torch.Tensor):
    x, y = ctx.saved_tensors
    spec = ctx.spec
    mul_fn = torch.mul if spec.backward == "exact" else (lambda u, v: _mul(u.detach(), v.detach(), spec))
    gx, gy = autograd.mul_grads(grad, x, y, spec, ctx.needs_input_grad[:2], mul=mul_fn)
    return gx, gy, None


_mul_op.register_autograd(_backward, setup_context=_setup)


def mul(
    x: torch.Tensor,
    y: torch.Tensor,
    fmt: Union[FormatLike, LMulSpec] = "bf16",
    mode: Mode = "bit",
    offset: Optional[float] = None,
    rounding: Rounding = "rne",
    *,
    backend: str = "auto",
    spec: Optional[LMulSpec] = None,
) -> torch.Tensor:
    """Elementwise L-Mul of ``x`` and ``y`` (broadcasting), returned as float32.

    Both operands are first quantized to ``fmt`` (``rounding``, saturating overflow), then
    multiplied per ``mode`` (:mod:`lmul.ops`): ``bit`` adds the exponent‖mantissa fields as
    integers (paper Eq. 2, Figure 2), ``formula`` evaluates ``(1 + xm + ym + c) 2^(xe+ye)`` (Eq. 1),
    ``exact`` is the ordinary product. ``offset`` overrides ``c = 2^-l(m)``; ``offset=0`` gives
    Mitchell's logarithmic multiplier. The options may instead be given as one
    :class:`~lmul.spec.LMulSpec` (``spec=``, or in place of ``fmt``). A spec with ``scaling`` scales
    each operand in power-of-two groups along its last dimension (:func:`scaled_elements`) and returns
    ``fl32(2^(sx + sy) P(qx, qy))``.

    >>> mul(torch.tensor(3.0), torch.tensor(4.0))  # (1.5 + 0 + 1/16) * 2^3
    tensor(12.5000)
    """
    x = check_float(x, "x")  # float8 -> float32 (exact); sparse / nested refused
    y = check_float(y, "y")
    check_devices("mul", x, y)
    if isinstance(fmt, LMulSpec):
        spec, fmt = (fmt if spec is None else spec), "bf16"
    if spec is not None and backend != "auto":  # backend= picks where a given spec runs
        spec, backend = spec.replace(backend=backend), "auto"
    spec = resolve_spec(spec, fmt=fmt, mode=mode, offset=offset, rounding=rounding, backend=backend)
    try:
        torch.broadcast_shapes(x.shape, y.shape)
    except RuntimeError as err:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} do not broadcast") from err
    if spec.backend != "auto":  # a named backend that cannot run raises here, with its reason
        kernels.select("mul", x, spec.replace(scaling="none"))  # scaled: the backend multiplies the elements
    if _eager(x, y):  # the op's own implementation, without the custom-op dispatch
        return _mul(x, y, spec).contiguous()
    return _mul_op(x, y, spec.name)


def quantize(
    x: torch.Tensor,
    fmt: FormatLike,
    rounding: Rounding = "rne",
    overflow: Overflow = "saturate",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Round ``x`` to the nearest value of ``fmt`` and return it as float32 (:func:`lmul.formats.quantize`,
    the contract and the torch implementation), on the fastest available backend for saturating
    overflow (the compiled CPU quantizer for large float32 CPU tensors), else in torch ops."""
    x = check_float(x, "x")
    if overflow != "saturate":
        return _quantize_formats(x, fmt, rounding, overflow)
    spec = resolve_spec(fmt=fmt, rounding=rounding, mode="exact", backend=backend)
    entry = kernels.select("quantize", x, spec)
    return entry.fn(x, spec)
