"""Every backend of every operation, in one table: :data:`BACKENDS`, with the ``backend="auto"``
preference order :data:`AUTO_ORDER` written out literally.

Operations (the functions each entry provides):

* ``"matmul"``: ``fn(a, b, spec)`` on [B, M, K] x [B, K, N] -> [B, M, N] float32 (:func:`lmul.matmul`);
* ``"mul"``: ``fn(x, y, spec)`` elementwise, broadcast, float32 (:func:`lmul.mul`);
* ``"quantize"``: ``fn(x, spec)`` to ``spec.fmt`` with ``spec.rounding``, saturating (:func:`lmul.quantize`).

Backends:

* ``"reference"`` (:mod:`lmul.kernels.reference`): the contract in torch ops; every device, mode,
  format and accumulator. The oracle of the others.
* ``"cpu"`` (:mod:`lmul.kernels.cpu_ext`): compiled C++ (OpenMP, vectorised), compiled on first
  use: bit mode by an integer kernel for every m, formula/exact by fused preparation + one BLAS matmul;
  a one-pass elementwise L-Mul; a fused quantizer.
* ``"decompose"`` (:mod:`lmul.kernels.decompose`): pure torch, any device: formula mode as one
  matmul with K doubled, bit mode with m <= 4 as one matmul with K times 2^m, exact mode.
* ``"triton"`` (:mod:`lmul.kernels.triton_lmul`): CUDA, optional triton: exact per-product
  L-Mul for every mode and m, float32 tile sums.
* ``"triton-tc"`` (:mod:`lmul.kernels.triton_tc`): CUDA sm_80+, optional triton: formula mode and
  bit mode m <= 4 as bf16/fp16 tensor-core dots with float32 accumulation, quantization fused.

Nothing is compiled and no optional dependency is imported when this package is imported.
:func:`backends` lists every entry and whether it can run here. See ``docs/kernels.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from lmul.formats import Format
from lmul.kernels import cpu_ext, decompose, reference, triton_lmul, triton_tc
from lmul.spec import LMulSpec

__all__ = ["Backend", "BACKENDS", "AUTO_ORDER", "OPS", "SCALED_BACKENDS", "select", "backends", "get"]

OPS: tuple[str, ...] = ("matmul", "mul", "quantize")


def _always() -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of one operation. ``unavailable(x, spec)`` says why it cannot run this
    call (None: it can); ``machine()`` why it cannot run on this machine at all."""

    name: str
    op: str
    fn: Callable[..., torch.Tensor]
    unavailable: Callable[[torch.Tensor, LMulSpec], Optional[str]]
    description: str
    machine: Callable[[], Optional[str]] = _always


BACKENDS: tuple[Backend, ...] = (
    Backend("reference", "matmul", reference.reference_matmul, reference.available,
            "chunked elementwise products, float64 sums (every mode, format, device, acc=)"),
    Backend("cpu", "matmul", cpu_ext.cpu_matmul, cpu_ext.matmul_unavailable, cpu_ext.DESCRIPTION, cpu_ext.machine),
    Backend("decompose", "matmul", decompose.decompose_matmul, decompose.unavailable, decompose.DESCRIPTION),
    Backend("triton", "matmul", triton_lmul.triton_matmul, triton_lmul.unavailable, triton_lmul.DESCRIPTION,
            triton_lmul.machine),
    Backend("triton-tc", "matmul", triton_tc.triton_tc_matmul, triton_tc.unavailable, triton_tc.DESCRIPTION,
            triton_tc.machine),
    Backend("reference", "mul", reference.reference_mul, reference.available,
            "quantize + lmul.ops.products in torch ops (every device)"),
    Backend("cpu", "mul", cpu_ext.cpu_mul, cpu_ext.mul_unavailable,
            "compiled C++: quantize both operands and multiply in one pass", cpu_ext.machine),
    Backend("reference", "quantize", reference.reference_quantize, reference.available,
            "lmul.formats.quantize in torch ops (every device and option)"),
    Backend("cpu", "quantize", cpu_ext.cpu_quantize, cpu_ext.quantize_unavailable,
            "compiled C++ quantizer (float32 CPU tensors of 2^16+ elements)", cpu_ext.machine),
)

# the order backend="auto" tries, per operation: the first available entry runs
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "matmul": ("cpu", "triton-tc", "decompose", "triton", "reference"),
    "mul": ("cpu", "reference"),
    "quantize": ("cpu", "reference"),
}

_BY_KEY = {(b.op, b.name): b for b in BACKENDS}

# matmul backends that run scaled specs (lmul.scaling): the reference plainly, cpu/decompose as their
# unscaled kernel on wide operands (so they are asked about the wide spec e8m<m>)
SCALED_BACKENDS: tuple[str, ...] = ("reference", "cpu", "decompose")


def _unavailable(entry: Backend, x: torch.Tensor, spec: LMulSpec) -> Optional[str]:
    if spec.scaling != "none":
        if entry.name not in SCALED_BACKENDS:
            return (f"scaling={spec.scaling!r} is implemented by the {', '.join(SCALED_BACKENDS)} backends only "
                    f"({entry.name} has no scaled kernel)")
        spec = spec.replace(fmt=Format(8, spec.fmt.man_bits), scaling="none")
    return entry.unavailable(x, spec)


def get(op: str, name: str) -> Backend:
    """The entry ``name`` of operation ``op`` (ValueError naming the known ones)."""
    try:
        return _BY_KEY[(op, name)]
    except KeyError:
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}; known: {OPS}") from None
        known = sorted(b.name for b in BACKENDS if b.op == op)
        raise ValueError(f"unknown backend {name!r} for {op}; known: {known} or 'auto'") from None


def select(op: str, x: torch.Tensor, spec: LMulSpec, backend: Optional[str] = None) -> Backend:
    """The backend that runs ``op`` on ``x`` (the left operand) for ``spec``: ``backend`` (default
    ``spec.backend``) itself, which must be available (RuntimeError with the reason), or for
    ``"auto"`` the first available entry of :data:`AUTO_ORDER`. For ``mul``/``quantize`` a named
    backend without an entry for that operation (``"decompose"``, ``"triton"``) means ``"auto"``."""
    name = spec.backend if backend is None else backend
    if spec.scaling != "none" and op != "matmul":
        raise ValueError(f"scaling={spec.scaling!r} applies to lmul.matmul only (its scale groups run along K); "
                         f"{op} takes specs with scaling='none' (spec.replace(scaling='none'))")
    if name != "auto" and op != "matmul" and (op, name) not in _BY_KEY and ("matmul", name) in _BY_KEY:
        name = "auto"
    if name != "auto":
        entry = get(op, name)
        why = _unavailable(entry, x, spec)
        if why:
            raise RuntimeError(f"backend {name!r} cannot run this {op}: {why}")
        return entry
    for candidate in AUTO_ORDER[op]:
        entry = _BY_KEY[(op, candidate)]
        if not _unavailable(entry, x, spec):
            return entry
    return _BY_KEY[(op, "reference")]


def backends(op: Optional[str] = None) -> list[dict]:
    """Every backend entry (of ``op``, or of all operations): ``name``, ``op``, ``available`` (on this
    machine, for some inputs), ``reason`` (why not), ``description``, ``auto_rank`` (position in
    :data:`AUTO_ORDER`)."""
    rows = []
    for b in BACKENDS:
        if op is not None and b.op != op:
            continue
        why = b.machine()
        order = AUTO_ORDER[b.op]
        rows.append({"name": b.name, "op": b.op, "available": why is None, "reason": why or "",
                     "description": b.description, "auto_rank": order.index(b.name) if b.name in order else None})
    return rows
