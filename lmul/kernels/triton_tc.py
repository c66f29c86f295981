"""GPU backend ``"triton-tc"``: L-Matmul on tensor cores. The decompositions of
:mod:`lmul.kernels.decompose` as ``tl.dot`` on bf16 (or fp16) operands with float32 accumulation,
the quantization and operand split fused into the tile loads (nothing doubled is materialised).

Notation as docs/kernels.md: ``X`` the quantized operand (0 when zero or subnormal in the format:
the L-Mul flush), ``X^ = sign 2^xe``, ``M_x`` the m-bit mantissa field, ``c`` the offset.

* ``formula`` (paper Eq. 1): ``P = X Y^ + X^ (Y + (c-1) Y^)``, per K-block two dots,
  ``acc += A_blk @ B^_blk + A^_blk @ (B + (c-1) B^)_blk``. Each operand is exactly a bf16 value
  when ``m <= 7``, ``c 2^7`` is an integer and ``emax <= 127`` (e4m3, e5m2, e8m3, bf16, e5m6):
  ``X`` has m + 1 <= 8 significant bits and ``-126 <= xe <= 127``; ``X^`` is a power of two in
  that range; ``Y + (c-1) Y^ = sign (M_y 2^-m + c) 2^ye`` is a multiple of ``2^(ye-7)`` below
  ``(2 - 2^-6) 2^ye`` (<= 8 bits, at most bf16's largest significand), its last bit
  ``>= 2^-133``, bf16's smallest subnormal. fp16 operands (m = 10) need 11 bits: they use fp16
  dots, exact when ``m <= 10``, ``c 2^10`` is an integer and ``-14 <= emin, emax <= 15`` (fp16:
  ``Y + (c-1) Y^ <= (2 - 2^-9) 2^15 < 65504``, last bit ``>= 2^-24``). Tensor cores multiply
  bf16/fp16 exactly into float32 (8 x 8 or 11 x 11 significand bits, <= 22 <= 24), so every term
  is exact while it is a normal float32; both terms have P's sign (no cancellation inside a
  product) and sum in float32. fp32 operands (24 bits) and fn formats with 8 exponent bits
  (emax = 128) fit neither: unavailable, with the reason.
* ``bit`` with ``m <= 4`` (paper Eq. 2): ``P = X^ (Y^ g(M_x, M_y))``, ``g = 2^q (1 + r 2^-m)``,
  ``S = M_x + M_y + c 2^m = q 2^m + r``. One-hot over ``v = M_x``: per K-block 2^m dots
  ``acc += ([M_A == v] A^)_blk @ (B^ g(v, M_B))_blk``. The left operand is 0 or a power of two;
  the right one is the bit pattern ``[s | ye + q | r 0..0]`` (m + 1 <= 5 bits), exact in bf16
  while ``ye + q <= 127``: columns with ``|y| >= 2^(127 - q_max)`` (8 exponent bits only) are
  recomputed by the reference. Exactly one of the 2^m terms of a product is non-zero and it is
  ``P`` itself, exact unless subnormal or overflowing in float32.
* Quantization in the load, from the float32 bits (bf16/fp16 inputs widen exactly; float64 inputs
  are quantized by :func:`lmul.formats.quantize` first, which rounds them once): round-to-nearest-
  even (or truncate) the 23-bit mantissa field to m bits with an integer add that carries into the
  exponent, saturate at the format's max, and below 2^emin keep only values that round up to
  2^emin on the format's subnormal grid (``|x| >= (2 - 2^-m) 2^(emin-1)``, the tie going to the
  even 2^emin; truncation: none). Subnormal results are flushed, as L-Mul does, so only this
  boundary of the subnormal grid matters. m = 0 (whose ties follow the exponent parity) is left out.
* Summation: float32 tensor-core accumulation over 2K (formula) or 2^m K (bit) terms whose
  absolute sum is ``sum_k |P_k|``, the same as decompose's cuBLAS matmul; the contract's bound
  ``K 2^-24 sum |P|`` (docs/semantics.md section 4) is what the tests check.
* Recomputed by the reference (:func:`lmul.kernels.common.fixup`): rows/columns holding NaN (and
  inf where the format has inf; e4m3 saturates it), float32 overflow risk, and — formats with 8
  exponent bits only — rows/columns where a term could be below 2^-126
  (:func:`lmul.kernels.common.underflow_risk`: tensor cores' treatment of float32 subnormal terms
  is not specified) or a bf16 operand subnormal.

Triton is optional and imported on first use. With CUDA the backend needs compute capability 8.0+
(bf16 ``mma``). The kernel also runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, CPU
tensors) when asked for by name (``backend="triton-tc"``; ``auto`` never picks the interpreter);
the interpreter's ``tl.dot`` cannot read bf16, so there each operand is cast to bf16/fp16 and back
and the dot runs in IEEE float32: this checks the exactness of the casts and the math, not the
tensor cores.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

from lmul.formats import Format, quantize
from lmul.kernels.common import fixup, spec_unsupported, underflow_risk
from lmul.spec import MODE_CODES, LMulSpec

__all__ = ["triton_tc_matmul", "machine", "unavailable", "operand_dtype", "DESCRIPTION", "MAX_BIT_MAN_BITS"]

DESCRIPTION = ("Triton tensor-core kernel (CUDA sm_80+): formula (bf16/fp16 dots, K x2), bit m<=4 "
               "(one-hot, K x2^m), quantize/split fused, float32 accumulation")

MAX_BIT_MAN_BITS = 4  # bit mode: 2^m dots per K-block
_NATIVE = (torch.float32, torch.bfloat16, torch.float16)  # loaded and widened exactly in the kernel


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def operand_dtype(spec: LMulSpec) -> tuple[Optional[torch.dtype], str]:
    """The dot operand dtype for ``spec`` (bf16 or fp16) and, when none fits (None), why."""
    fmt, c = spec.fmt, spec.offset
    m = fmt.man_bits
    if m == 0:
        return None, f"{fmt.name} has m=0 (ties follow the exponent parity): not in the fused quantizer"
    if spec.mode == "bit":
        if m > MAX_BIT_MAN_BITS:
            return None, f"bit mode needs m <= {MAX_BIT_MAN_BITS} here (2^m dots per block), {fmt.name} has m={m}"
        if fmt.emax > 127:
            return None, f"{fmt.name} has emax={fmt.emax} > 127: its powers of two do not fit bf16"
        return torch.bfloat16, ""
    if spec.mode != "formula":
        return None, f"mode={spec.mode!r}: triton-tc implements formula and bit (exact: use decompose, cuBLAS)"
    if m <= 7 and c * 2**7 == int(c * 2**7) and fmt.emax <= 127:
        return torch.bfloat16, ""
    if m <= 10 and c * 2**10 == int(c * 2**10) and fmt.emin >= -14 and fmt.emax <= 15:
        return torch.float16, ""
    return None, (f"{fmt.name} (m={m}, emin={fmt.emin}, emax={fmt.emax}) with c={c!r}: the formula operands are "
                  "exact in neither bf16 (m <= 7, c 2^7 an integer, emax <= 127) nor fp16 (m <= 10, c 2^10 an "
                  "integer, -14 <= emin, emax <= 15)")


def _bits(x: float) -> int:
    """The float32 bit pattern of ``x`` (exact)."""
    return int(torch.tensor(x, dtype=torch.float32).view(torch.int32))


def _quantizer_constants(fmt: Format, rounding: str) -> dict:
    emin_bits = (fmt.emin + 127) << 23
    thresh = _bits((2.0 - 2.0**-fmt.man_bits) * 2.0 ** (fmt.emin - 1)) if rounding == "rne" else emin_bits
    return dict(MAN=fmt.man_bits, RNE=rounding == "rne", EMIN_BITS=emin_bits, THRESH=thresh, MAX_BITS=_bits(fmt.max))


@functools.cache
def _kernel():
    from lmul.kernels._triton_tc_kernel import lmul_tc_kernel

    return lmul_tc_kernel


def _blocks(spec: LMulSpec) -> dict:
    """Tile sizes: GPU defaults (not tuned: no GPU was measured), or small tiles in the interpreter."""
    if _interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if spec.mode == "formula" else 32)


def _special(x: torch.Tensor, dim: int, fmt: Format, top: Optional[float] = None) -> torch.Tensor:
    """Rows (dim=-1) or columns (dim=-2) the kernel does not cover: NaN, inf (formats with inf;
    finite-only ones saturate it), and ``|x| >= top``."""
    bad = torch.isnan(x)
    if fmt.has_inf:
        bad |= torch.isinf(x)
    if top is not None:
        bad |= x.abs() >= top
    return bad.any(dim)


def triton_tc_matmul(a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, block_m: Optional[int] = None,
                     block_n: Optional[int] = None, block_k: Optional[int] = None, num_warps: int = 8,
                     num_stages: int = 3) -> torch.Tensor:
    """[B, M, K] x [B, K, N] -> [B, M, N] float32 (CUDA tensors, or CPU tensors in the interpreter)."""
    dt, why = operand_dtype(spec)
    if dt is None:
        raise RuntimeError(f"triton-tc cannot run {spec.name}: {why}")
    a, b = a.detach(), b.detach()
    a = a if a.dtype in _NATIVE else quantize(a, spec.fmt, spec.rounding)   # float64: rounded once, directly
    b = b if b.dtype in _NATIVE else quantize(b, spec.fmt, spec.rounding)
    bsz, m, k = a.shape
    n = b.shape[-1]
    out = torch.zeros(bsz, m, n, dtype=torch.float32, device=a.device)
    if 0 in (bsz, m, n, k):
        return out
    import triton.language as tl

    blocks = _blocks(spec)
    blocks.update({key: v for key, v in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k)) if v})
    man = spec.fmt.man_bits
    off = int(spec.offset * 2**man) if spec.mode == "bit" else 0
    grid = (((m + blocks["BLOCK_M"] - 1) // blocks["BLOCK_M"]) * ((n + blocks["BLOCK_N"] - 1) // blocks["BLOCK_N"]),
            bsz)
    launch = {} if _interpreting() else dict(num_warps=num_warps, num_stages=num_stages)
    _kernel()[grid](a, b, out, m, n, k, *a.stride(), *b.stride(), *out.stride(),
                    MODE=MODE_CODES[spec.mode], C_MINUS_1=float(spec.offset - 1.0), OFF=off,
                    DT=tl.bfloat16 if dt == torch.bfloat16 else tl.float16, INTERP=_interpreting(), GROUP_M=8,
                    **_quantizer_constants(spec.fmt, spec.rounding), **blocks, **launch)
    top = None
    shift = 0
    if spec.mode == "bit":
        q_max = (2 * ((1 << man) - 1) + off) >> man             # largest carry
        if spec.fmt.emax + q_max > 127:
            top = 2.0 ** (127 - q_max)                         # Y^ g could leave bf16 (raw |y| may round up)
    else:
        shift = 7 if dt == torch.bfloat16 else 10              # Y + (c-1) Y^ >= 2^(ye - shift) when non-zero
    rows, cols = underflow_risk(a, b, spec.fmt.emin, shift)
    return fixup(out, a, b, spec, rows | _special(a, -1, spec.fmt), cols | _special(b, -2, spec.fmt, top))


def machine() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'lmul[gpu]')"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return f"needs compute capability 8.0+ (bf16 tensor cores), this GPU is sm_{major}{minor}"
        return None
    if not _interpreting():
        return "needs a CUDA GPU with compute capability 8.0+ (or TRITON_INTERPRET=1 and backend='triton-tc')"
    return None


def unavailable(a: torch.Tensor, spec: LMulSpec) -> Optional[str]:
    why = spec_unsupported(spec)
    if why:
        return why
    dt, why = operand_dtype(spec)
    if dt is None:
        return why
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'lmul[gpu]')"
    if a.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(a.device)
        if major < 8:
            return f"needs compute capability 8.0+ (bf16 tensor cores), {a.device} is sm_{major}{minor}"
        return None
    if not _interpreting():
        return f"operands are on {a.device}; triton-tc runs on CUDA sm_80+ (or in Triton's interpreter)"
    if spec.backend != "triton-tc":
        return "Triton's CPU interpreter runs only when triton-tc is named (backend='triton-tc'), never for auto"
    return None

