"""Compiled CPU backend ``"cpu"``: fused quantize + operand preparation and the bit-mode
integer kernel, in C++ (``lmul_cpu.cpp``, GCC/Clang vector extensions + OpenMP).

The source is compiled with the system C++ compiler on first use (never at import) into a
cache directory outside the repository (``$LMUL_CACHE_DIR``, default ``~/.cache/lmul``), keyed
by a hash of the source, flags and compiler, and loaded with :mod:`ctypes` (a plain C ABI: no
torch headers, builds in about 2 s, no ninja). ``LMUL_CXX`` overrides the compiler.

* ``bit`` mode, any m: per product one 32-bit integer add of prepared bit patterns,
  ``ia + vb`` with ``ia = |X| - (127 << 23) + (c 2^m << (23 - m)) + (sx << 31)`` and ``vb`` the
  bits of Y; the carry of the mantissa add flows into the exponent (paper Figure 2) and the two
  sign bits add to their XOR. A flushed Y is encoded as 0.5f with weight 0 (``acc += P * w``).
  Register-blocked 4 rows x 64 columns, k blocks of 256. A tile where some product's exponent
  could leave float32's normal range is computed by an exact scalar path instead.
* ``formula`` / ``exact`` mode: fused preparation in C++, then one torch (BLAS) float32 matmul
  (:mod:`lmul.kernels.decompose` gives the math; formula rows with float32-subnormal products
  go to the reference, as there).
* ``acc=<format>`` (every mode): no BLAS (its order is unspecified); one C++ kernel forms each
  product exactly and sums in the defined order (docs/semantics.md section 4, docs/kernels.md).

inf/NaN rows/columns are recomputed by the reference backend (:func:`lmul.kernels.common.fixup`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from lmul.formats import Format, quantize
from lmul.kernels.common import fixup, spec_unsupported, underflow_risk
from lmul.spec import MODE_CODES, LMulSpec

__all__ = ["load", "compiler", "cpu_matmul", "cpu_mul", "quantize_cpu", "release_workspace", "FLAGS", "machine",
           "matmul_unavailable", "mul_unavailable", "quantize_unavailable", "DESCRIPTION"]

DESCRIPTION = ("compiled C++ (OpenMP, SIMD): bit mode integer kernel (any m), fused prep + BLAS for formula/exact; "
               "acc=<format> in the defined order")

SOURCE = Path(__file__).with_name("lmul_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_LIB: Optional[ctypes.CDLL] = None
_BUILD_ERROR: Optional[str] = None


class _QParams(ctypes.Structure):
    _fields_ = [("man_bits", ctypes.c_int32), ("emin", ctypes.c_int32), ("trunc", ctypes.c_int32),
                ("has_inf", ctypes.c_int32), ("fmax", ctypes.c_float)]


def compiler() -> Optional[str]:
    """The C++ compiler used (``$LMUL_CXX``, else c++/g++/clang++ on PATH), or None."""
    env = os.environ.get("LMUL_CXX")
    if env:
        return shutil.which(env)
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") or line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("LMUL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmul")
    return Path(root)


def load() -> ctypes.CDLL:
    """Compile (once, cached) and load the kernels; raise RuntimeError with the compiler output."""
    global _LIB, _BUILD_ERROR
    if _LIB is not None:
        return _LIB
    if _BUILD_ERROR is not None:
        raise RuntimeError(_BUILD_ERROR)
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set LMUL_CXX or install g++/clang++)")
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), cxx.encode(), _cpu_model().encode(),
                 platform.machine().encode()):
        key.update(part)
    target = _cache_dir() / f"lmul_cpu_{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        proc = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            _BUILD_ERROR = f"compiling {SOURCE.name} with {cxx} failed:\n{proc.stderr[-4000:]}"
            raise RuntimeError(_BUILD_ERROR)
        os.replace(tmp, target)  # atomic: concurrent builders end with the same file
    lib = ctypes.CDLL(str(target))
    lib.lmul_strip_width.restype = ctypes.c_int
    lib.lmul_k_block.restype = ctypes.c_int
    _LIB = lib
    return lib


def _qparams(fmt: Format, rounding: str) -> _QParams:
    return _QParams(fmt.man_bits, fmt.emin, int(rounding == "trunc"), int(fmt.has_inf), float(fmt.max))


_WORKSPACE = threading.local()
WORKSPACE_CAP = 64 << 20  # bytes: a scratch buffer larger than this is freed after its call, never kept


def _buffer(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch tensor reused across calls: fresh large allocations cost a page fault
    per 4 KiB on first touch (about as much as preparing the operand). Never returned to callers.
    Buffers up to :data:`WORKSPACE_CAP` bytes are kept (the dispatcher's pieces need at most 32 MiB
    each); a larger one (a direct backend call on big operands) is a plain temporary."""
    bufs = _WORKSPACE.__dict__.setdefault("bufs", {})
    numel = 1
    for d in shape:
        numel *= d
    if numel * dtype.itemsize > WORKSPACE_CAP:
        bufs.pop(name, None)
        return torch.empty(shape, dtype=dtype)
    buf = bufs.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = bufs[name] = torch.empty(max(numel, 1), dtype=dtype)
    return buf[:numel].view(shape)


def release_workspace() -> None:
    """Free this thread's scratch buffers (they otherwise stay at the largest call's size)."""
    _WORKSPACE.__dict__.pop("bufs", None)
    _WORKSPACE.__dict__.pop("known", None)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


PARALLEL_MIN_WORK = 1 << 22  # below this many elements/products a call runs on one thread


def _threads(work: int = PARALLEL_MIN_WORK) -> int:
    """torch's thread count, or 1 for small work (a thread team's barrier costs more there,
    and far more when the cores are oversubscribed)."""
    return max(1, torch.get_num_threads()) if work >= PARALLEL_MIN_WORK else 1


def _as_f32(x: torch.Tensor, fmt: Format, rounding: str) -> torch.Tensor:
    """Contiguous float32 whose quantization equals ``quantize(x)``: float64 is quantized here
    (once, from float64), narrower dtypes convert exactly; the kernels re-quantize (idempotent)."""
    x = x.detach()
    if x.dtype == torch.float64:
        x = quantize(x, fmt, rounding)
    return x.to(torch.float32).contiguous()


def quantize_cpu(x: torch.Tensor, fmt: Format, rounding: str = "rne") -> torch.Tensor:
    """The C++ quantizer (saturating overflow), same bits as :func:`lmul.formats.quantize`."""
    lib = load()
    xs = _as_f32(x, fmt, rounding)
    out = torch.empty_like(xs)
    lib.lmul_quantize(_ptr(xs), ctypes.c_int64(xs.numel()), _ptr(out), ctypes.byref(_qparams(fmt, rounding)),
                      _threads(16 * xs.numel()))
    return out


def _bit(a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, lib: ctypes.CDLL) -> tuple:
    """One C call each for: left prep, right prep (packed strips), kernel; all batches at once."""
    bsz, m_rows, k = a.shape
    n = b.shape[-1]
    qp = ctypes.byref(_qparams(spec.fmt, spec.rounding))
    m = spec.fmt.man_bits
    off = int(spec.offset * 2**m)
    js, kb = lib.lmul_strip_width(), lib.lmul_k_block()
    ns, nkb = -(-n // js), -(-k // kb)
    rows_pad = -(-m_rows // 4) * 4
    nt_a, nt_b, nt = _threads(16 * a.numel()), _threads(16 * b.numel()), _threads(bsz * m_rows * k * n)
    i64 = ctypes.c_int64
    rowflag = torch.empty(bsz, rows_pad, dtype=torch.uint8)
    colflag = torch.empty(bsz, n, dtype=torch.uint8)
    ia = _buffer("ia", (bsz, rows_pad, k), torch.int32)
    nz = _buffer("nz", (bsz, rows_pad, k), torch.uint8)
    afmn = torch.empty(bsz, rows_pad, nkb, dtype=torch.int16)
    afmx = torch.empty(bsz, rows_pad, nkb, dtype=torch.int16)
    vb = _buffer("vb", (bsz, ns, k, js), torch.int32)
    wb = _buffer("wb", (bsz, ns, k, js), torch.float32)
    bfmn = torch.empty(bsz, nkb, ns, dtype=torch.int16)
    bfmx = torch.empty(bsz, nkb, ns, dtype=torch.int16)
    acc = torch.empty(bsz, rows_pad, ns * js, dtype=torch.float32)
    pre_a, pre_b = int(_in_format(a, spec.fmt) is not None), int(_in_format(b, spec.fmt) is not None)
    lib.lmul_prep_bit_a(_ptr(a), i64(bsz), i64(m_rows), i64(rows_pad), i64(k), _ptr(ia), _ptr(nz), _ptr(afmn),
                        _ptr(afmx), _ptr(rowflag), qp, off, nt_a, pre_a)
    lib.lmul_prep_bit_b(_ptr(b), i64(bsz), i64(k), i64(n), _ptr(vb), _ptr(wb), _ptr(bfmn), _ptr(bfmx),
                        _ptr(colflag), qp, nt_b, pre_b)
    lib.lmul_bit_matmul(_ptr(ia), _ptr(nz), _ptr(afmn), _ptr(afmx), i64(bsz), i64(rows_pad), i64(k), _ptr(vb),
                        _ptr(wb), _ptr(bfmn), _ptr(bfmx), i64(ns), _ptr(acc), m, off, nt)
    out = acc if (rows_pad, ns * js) == (m_rows, n) else acc[:, :m_rows, :n]
    return out, rowflag[:, :m_rows].bool(), colflag.bool()


def _formula_or_exact(a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, lib: ctypes.CDLL) -> tuple:
    bsz, m_rows, k = a.shape
    n = b.shape[-1]
    qp = ctypes.byref(_qparams(spec.fmt, spec.rounding))
    nt_a, nt_b = _threads(16 * a.numel()), _threads(16 * b.numel())
    i64 = ctypes.c_int64
    rowflag = torch.empty(bsz, m_rows, dtype=torch.uint8)
    colflag = torch.empty(bsz, n, dtype=torch.uint8)
    if spec.mode == "formula":
        left = _buffer("left", (bsz, m_rows, 2 * k), torch.float32)
        right = _buffer("right", (bsz, 2 * k, n), torch.float32)
        lib.lmul_prep_formula_a(_ptr(a), i64(bsz * m_rows), i64(k), _ptr(left), _ptr(rowflag), qp, nt_a)
        lib.lmul_prep_formula_b(_ptr(b), i64(bsz), i64(k), i64(n), _ptr(right), _ptr(colflag), qp,
                                ctypes.c_double(spec.offset), nt_b)
    else:  # an operand already in the format without NaN (a scaled operand's w) is its own prepared form
        junk_r = torch.empty(bsz * k, dtype=torch.uint8)
        junk_c = torch.empty(bsz * k, dtype=torch.uint8)
        if _in_format(a, spec.fmt):
            left = a
            rowflag.zero_()
        else:
            left = _buffer("left", (bsz, m_rows, k), torch.float32)
            lib.lmul_prep_exact(_ptr(a), i64(bsz), i64(m_rows), i64(k), _ptr(left), _ptr(rowflag), _ptr(junk_c), qp,
                                nt_a)
        if _in_format(b, spec.fmt):
            right = b
            colflag.zero_()
        else:
            right = _buffer("right", (bsz, k, n), torch.float32)
            lib.lmul_prep_exact(_ptr(b), i64(bsz), i64(k), i64(n), _ptr(right), _ptr(junk_r), _ptr(colflag), qp,
                                nt_b)
    return torch.matmul(left, right), rowflag.bool(), colflag.bool()


def _acc(a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, lib: ctypes.CDLL, init: Optional[torch.Tensor] = None,
         within_block: bool = False) -> tuple:
    """Reduced-precision accumulation (``spec.acc``), every mode: prepared operands, then one C
    call that forms each product exactly (as :func:`lmul.ops.products`) and accumulates in the
    order of docs/semantics.md section 4 (float32 block sums in increasing k, the running sum
    rounded to ``spec.acc`` after each block), continuing ``init`` (the running sum, or with
    ``within_block`` the sum of the one block the products belong to: returned unrounded)."""
    bsz, m_rows, k = a.shape
    n = b.shape[-1]
    qp = ctypes.byref(_qparams(spec.fmt, spec.rounding))
    m = spec.fmt.man_bits
    js, kb = lib.lmul_strip_width(), lib.lmul_k_block()
    ns, nkb = -(-n // js), -(-k // kb)
    nt_a, nt_b, nt = _threads(16 * a.numel()), _threads(16 * b.numel()), _threads(bsz * m_rows * k * n)
    i64 = ctypes.c_int64
    colflag = torch.empty(bsz, n, dtype=torch.uint8)
    bfmn = torch.empty(bsz, nkb, ns, dtype=torch.int16)
    bfmx = torch.empty(bsz, nkb, ns, dtype=torch.int16)
    bf = _buffer("wb", (bsz, ns, k, js), torch.float32)
    bu = _buffer("vb", (bsz, ns, k, js), torch.int32)
    au = nz = afmn = afmx = None
    off = 0
    if spec.mode == "bit":
        off = int(spec.offset * 2**m)
        rows_pad = -(-m_rows // 4) * 4
        rowflag = torch.empty(bsz, rows_pad, dtype=torch.uint8)
        au = _buffer("ia", (bsz, rows_pad, k), torch.int32)
        nz = _buffer("nz", (bsz, rows_pad, k), torch.uint8)
        afmn = torch.empty(bsz, rows_pad, nkb, dtype=torch.int16)
        afmx = torch.empty(bsz, rows_pad, nkb, dtype=torch.int16)
        af = None
        lib.lmul_prep_bit_a(_ptr(a), i64(bsz), i64(m_rows), i64(rows_pad), i64(k), _ptr(au), _ptr(nz), _ptr(afmn),
                            _ptr(afmx), _ptr(rowflag), qp, off, nt_a, 0)
        lib.lmul_prep_bit_b(_ptr(b), i64(bsz), i64(k), i64(n), _ptr(bu), _ptr(bf), _ptr(bfmn), _ptr(bfmx),
                            _ptr(colflag), qp, nt_b, 0)
        rowflag = rowflag[:, :m_rows]
    else:
        rows_pad = m_rows
        rowflag = torch.empty(bsz, m_rows, dtype=torch.uint8)
        af = _buffer("left", (bsz, m_rows, k), torch.float32)
        if spec.mode == "formula":
            au = _buffer("ia", (bsz, m_rows, k), torch.int32)
            afmn = torch.empty(bsz, m_rows, nkb, dtype=torch.int16)
            afmx = torch.empty(bsz, m_rows, nkb, dtype=torch.int16)
            c23 = int(spec.offset * 2**23)  # exact: spec_unsupported checked the offset
            lib.lmul_prep_acc_formula_a(_ptr(a), i64(bsz), i64(m_rows), i64(k), _ptr(au), _ptr(af), _ptr(afmn),
                                        _ptr(afmx), _ptr(rowflag), qp, i64(c23), nt_a)
        else:
            junk = torch.empty(bsz * k, dtype=torch.uint8)
            lib.lmul_prep_exact(_ptr(a), i64(bsz), i64(m_rows), i64(k), _ptr(af), _ptr(rowflag), _ptr(junk), qp,
                                nt_a)
        lib.lmul_prep_acc_b(_ptr(b), i64(bsz), i64(k), i64(n), MODE_CODES[spec.mode], _ptr(bu), _ptr(bf),
                            _ptr(bfmn), _ptr(bfmx), _ptr(colflag), qp, nt_b)
    out = torch.empty(bsz, m_rows, n, dtype=torch.float32)
    if init is not None:
        out.copy_(init)
    carry = 0 if init is None else 2 if within_block else 1
    block = min(spec.acc_block, k)  # a block >= K is one block; at most K keeps the kernel's int64 sums small
    null = ctypes.c_void_p(None)
    opt = lambda t: null if t is None else _ptr(t)  # noqa: E731
    lib.lmul_acc_matmul(MODE_CODES[spec.mode], opt(au), opt(af), opt(nz), opt(afmn), opt(afmx), i64(bsz),
                        i64(rows_pad), i64(m_rows), i64(k), _ptr(bu), _ptr(bf), _ptr(bfmn), _ptr(bfmx), i64(ns),
                        i64(n), _ptr(out), m, off, i64(block), ctypes.byref(_qparams(spec.acc, "rne")), nt,
                        carry)
    return out, rowflag.bool(), colflag.bool()


def cpu_matmul(a: torch.Tensor, b: torch.Tensor, spec: LMulSpec, init: Optional[torch.Tensor] = None,
               within_block: bool = False) -> torch.Tensor:
    """[B, M, K] x [B, K, N] -> [B, M, N] float32 on the CPU (see the module docstring); ``init`` and
    ``within_block``: the ``acc=<format>`` state, as in :func:`lmul.kernels.reference.reference_matmul`."""
    lib = load()
    a32 = _as_f32(a, spec.fmt, spec.rounding)
    b32 = _as_f32(b, spec.fmt, spec.rounding)
    if 0 in a32.shape or 0 in b32.shape:
        if init is not None:
            return init.to(torch.float32).clone()
        return torch.zeros(a.shape[0], a.shape[1], b.shape[-1], dtype=torch.float32)
    if spec.acc is not None:
        out, rows, cols = _acc(a32, b32, spec, lib, init, within_block)
    elif spec.mode == "bit":
        out, rows, cols = _bit(a32, b32, spec, lib)
    else:
        out, rows, cols = _formula_or_exact(a32, b32, spec, lib)
        if spec.mode == "formula":  # float32-subnormal products: the two terms would round apart
            risk_rows, risk_cols = underflow_risk(a, b, spec.fmt.emin, 0)
            rows, cols = rows | risk_rows, cols | risk_cols
    return fixup(out, a, b, spec, rows, cols, init, within_block)


def cpu_mul(x: torch.Tensor, y: torch.Tensor, spec: LMulSpec) -> torch.Tensor:
    """Elementwise L-Mul in one C++ pass (quantize both operands, products, specials): the bits of
    ``lmul.ops.products(quantize(x), quantize(y), fmt, mode, c)``, broadcast, float32 (CPU tensors)."""
    lib = load()
    fmt, rounding, c = spec.fmt, spec.rounding, spec.offset
    shape = torch.broadcast_shapes(x.shape, y.shape)
    xs = _as_f32(x, fmt, rounding).expand(shape).contiguous()
    ys = _as_f32(y, fmt, rounding).expand(shape).contiguous()
    out = torch.empty(shape, dtype=torch.float32)
    n = out.numel()
    if n:
        lib.lmul_mul_elem(_ptr(xs), _ptr(ys), ctypes.c_int64(n), _ptr(out), ctypes.byref(_qparams(fmt, rounding)),
                          MODE_CODES[spec.mode], int(c * 2**fmt.man_bits) if spec.mode == "bit" else 0,
                          ctypes.c_double(c), _threads(16 * n))
    return out


class _SParams(ctypes.Structure):
    _fields_ = [("mx", ctypes.c_int32), ("emax", ctypes.c_int32), ("out", ctypes.c_int32), ("pad", ctypes.c_int32),
                ("fmax", ctypes.c_double), ("eps", ctypes.c_double), ("flush", ctypes.c_float),
                ("wide_max", ctypes.c_float)]


SCALED_OUT = {"scaled": 0, "wide": 1, "wide_flush": 2}


def scaled_operand(x: torch.Tensor, tile: tuple[int, int], fmt: Format, rounding: str, mx: bool, out: str,
                   eps: float, wide: Optional[Format] = None, scratch: Optional[str] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, bool, Optional[tuple[int, int]]]:
    """One operand of a scaled L-Matmul in two C++ passes (:mod:`lmul.scaling` gives the rules):
    ``x`` [nb, R, C] (float32, CPU) in groups of ``tile = (gr, gc)`` elements (ragged at the edges)
    with one scale ``X = 2^s`` each (``mx``: OCP MX's ``s = floor(log2 amax) - fmt.emax``, else
    torchao's ``s = -floor(log2 fl32(fmt.max / max(amax, eps)))``; clamped to [-127, 127]; 1 for an
    all-zero group, NaN for one holding inf/NaN). Returns ``(y, X, bad)``: ``X`` [nb, ceil(R/gr),
    ceil(C/gc)] and by ``out``: ``"scaled"`` ``y = x (1/X)``; ``"wide"`` ``y = quantize(x (1/X)) X``;
    ``"wide_flush"`` the same with the quantized elements subnormal in ``fmt`` as +0; ``bad``: some
    nonzero ``y`` (not NaN) lies outside ``wide``'s normal range (``"wide*"`` only); ``s_range``: the
    least and greatest ``s`` of the finite scales (None: none finite). With ``scratch``
    ``y`` is this thread's scratch buffer of that name (no page faults; overwritten by the next call
    with that name), else a fresh tensor."""
    lib = load()
    x = x.detach().to(torch.float32).contiguous()
    nb, rows, cols = x.shape
    gr, gc = tile
    if scratch is None:
        y = torch.empty_like(x)
    else:
        with torch.inference_mode(False):  # a normal tensor: its version counter guards _in_format
            y = _buffer(scratch, tuple(x.shape), torch.float32)
    scales = torch.empty(nb, -(-rows // gr), -(-cols // gc), dtype=torch.float32)
    flush = fmt.min_normal - fmt.min_subnormal
    sp = _SParams(int(mx), fmt.emax, SCALED_OUT[out], 0, float(fmt.max), float(eps), flush,
                  float(wide.max) if wide is not None else float("inf"))
    i64 = ctypes.c_int64
    srange = (ctypes.c_int32 * 2)()
    flags = lib.lmul_scaled_prep(_ptr(x), i64(nb), i64(rows), i64(cols), i64(gr), i64(gc), _ptr(y), _ptr(scales),
                                 srange, ctypes.byref(_qparams(fmt, rounding)), ctypes.byref(sp),
                                 _threads(16 * x.numel()))
    known = _WORKSPACE.__dict__.setdefault("known", {})
    known.pop(scratch, None)
    kept = scratch in _WORKSPACE.__dict__.get("bufs", {})  # a buffer over WORKSPACE_CAP is the caller's temporary
    if kept and wide is not None and out != "scaled" and not flags & 1 and not y.is_inference():
        known[scratch] = (y, y._version, wide, not flags & 2)
    return y, scales, bool(flags & 1), (srange[0], srange[1]) if srange[0] <= srange[1] else None


def scale_outer(out: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """``out.mul_(ca * cb)`` for [nb, M, N] float32 ``out`` (contiguous, CPU), ``ca`` [nb, M],
    ``cb`` [nb, N] (float32, broadcast over batches of 1), in one C++ pass without the [M, N] temporary."""
    lib = load()
    nb, m, n = out.shape
    ca = ca.expand(nb, m).contiguous()
    cb = cb.expand(nb, n).contiguous()
    lib.lmul_scale_outer(_ptr(out), ctypes.c_int64(nb), ctypes.c_int64(m), ctypes.c_int64(n), _ptr(ca), _ptr(cb),
                         _threads(16 * out.numel()))
    return out


def _in_format(x: torch.Tensor, fmt: Format) -> Optional[bool]:
    """For ``x`` that is, untouched since, a whole scratch buffer :func:`scaled_operand` wrote with
    values in ``fmt`` (so ``quantize(x, fmt) == x``, any rounding): whether all of it is finite
    (no NaN); else None."""
    if x.is_inference():  # no version counter
        return None
    for y, version, f, finite in _WORKSPACE.__dict__.get("known", {}).values():
        if (x.data_ptr(), x.numel(), x._version, f) == (y.data_ptr(), y.numel(), version, fmt) and x.is_contiguous():
            return finite
    return None


def scaled_unavailable(x: torch.Tensor) -> Optional[str]:
    """Why :func:`scaled_operand` cannot take ``x`` (None if it can): CPU float32 (or a narrower
    float, converted exactly) only, and the compiled kernels loadable."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"float32/float16/bfloat16 CPU tensors only, got {x.dtype} on {x.device}"
    return _loadable()


def cpu_quantize(x: torch.Tensor, spec: LMulSpec) -> torch.Tensor:
    """:func:`quantize_cpu` to ``spec.fmt`` with ``spec.rounding``."""
    return quantize_cpu(x, spec.fmt, spec.rounding)


def machine() -> Optional[str]:
    """Why the compiled kernels cannot run on this machine (None if they can; compiles on first call)."""
    if _BUILD_ERROR is not None:
        return _BUILD_ERROR.splitlines()[0]
    if compiler() is None:
        return "no C++ compiler found (set LMUL_CXX or install g++/clang++)"
    return None


def _loadable() -> Optional[str]:
    if _LIB is not None:  # loaded: nothing left to check (the per-call fast path)
        return None
    why = machine()
    if why:
        return why
    try:
        load()  # first use compiles; a failure makes the backend unavailable with the reason
    except RuntimeError as err:
        return str(err).splitlines()[0]
    return None


def matmul_unavailable(a: torch.Tensor, spec: LMulSpec) -> Optional[str]:
    if a.device.type != "cpu":
        return f"CPU only, operands are on {a.device}"
    return spec_unsupported(spec, acc=True) or _loadable()


def mul_unavailable(x: torch.Tensor, spec: LMulSpec) -> Optional[str]:
    if x.device.type != "cpu":
        return f"CPU only, operands are on {x.device}"
    return _loadable()


def quantize_unavailable(x: torch.Tensor, spec: LMulSpec) -> Optional[str]:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return f"float32 CPU tensors only, got {x.dtype} on {x.device}"
    if x.numel() < QUANTIZE_MIN_NUMEL:
        return f"for {QUANTIZE_MIN_NUMEL}+ elements (a C call costs more below), got {x.numel()}"
    if x.requires_grad and torch.is_grad_enabled():
        return "no autograd"
    return _loadable()


QUANTIZE_MIN_NUMEL = 1 << 16
