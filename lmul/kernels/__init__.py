"""Fast L-Matmul backends. Importing this package registers them with :mod:`lmul.matmul`
(cheap: nothing is compiled and no optional dependency is imported until first use).

* ``"cpu"`` (:mod:`lmul.kernels.cpu_ext`): compiled C++ (OpenMP, vectorised) fused quantize and
  operand preparation; bit mode by an integer kernel for every m, formula and exact mode by
  one BLAS matmul of prepared operands.
* ``"decompose"`` (:mod:`lmul.kernels.decompose`): pure torch, any device: formula mode as one
  matmul with K doubled, bit mode with m <= 4 as one matmul with K times 2^m, exact mode.
* ``"triton"`` (:mod:`lmul.kernels.triton_lmul`): CUDA, optional triton: exact per-product
  L-Mul for every mode and m, float32 tile sums.

:func:`backends` lists every registered backend and whether it can run here. See
``docs/kernels.md``.
"""

from __future__ import annotations

from lmul.kernels import cpu_ext, decompose, triton_lmul  # noqa: F401  (registers the backends, in auto order)
from lmul.kernels.registry import backends

__all__ = ["backends"]
