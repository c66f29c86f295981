"""The Triton kernel of :mod:`lmul.kernels.triton_tc` (imported only on first use: needs triton).

One kernel, two modes (``MODE``: :data:`lmul.spec.MODE_CODES`, bit 0 / formula 1); the math and
the exactness argument are in triton_tc.py's docstring. Jitted when this module is imported, so
TRITON_INTERPRET must be set before that (tests/conftest.py does).
"""

import triton
import triton.language as tl


@triton.jit
def _quantize_normal(x, RNE: tl.constexpr, MAN: tl.constexpr, EMIN_BITS: tl.constexpr, THRESH: tl.constexpr,
                     MAX_BITS: tl.constexpr):
    """float32 ``x`` -> int32 bits of ``quantize(x, fmt, rounding)`` where that is normal in fmt,
    else a signed zero (the L-Mul flush); saturating. inf/NaN give +-max (their rows and columns
    are recomputed by the reference)."""
    xb = x.to(tl.int32, bitcast=True)                               # [s|eeeeeeee|mmm..m] int32
    sign = xb & -2147483648                                         # 0x80000000
    mag = tl.minimum(xb & 0x7FFFFFFF, 0x7F800000)                   # NaN -> inf: no int overflow below
    if RNE:  # add half an ulp of the m-bit grid less one, plus the kept lsb: ties go to even
        r = mag + ((1 << (22 - MAN)) - 1) + ((mag >> (23 - MAN)) & 1)   # a carry runs into the exponent
    else:
        r = mag
    r = tl.minimum((r >> (23 - MAN)) << (23 - MAN), MAX_BITS)      # drop 23 - m bits; saturate (inf too)
    # below 2^emin the format's grid is its subnormal grid: only |x| >= THRESH rounds up to 2^emin
    # (rne: THRESH = (2 - 2^-m) 2^(emin-1), the tie, goes up to the even 2^emin; trunc: THRESH = 2^emin)
    r = tl.where(mag < EMIN_BITS, tl.where(mag >= THRESH, EMIN_BITS, 0), r)
    return sign | r


@triton.jit
def _dot(x, y, acc, DT: tl.constexpr, INTERP: tl.constexpr):
    """``acc + x @ y`` with x, y cast to DT (bf16 or fp16; exact by construction) and float32
    accumulation on tensor cores. The interpreter's dot reads bf16 as raw uint16 integers, so
    there the DT round trip is checked by casting back to float32 and an IEEE float32 dot."""
    if INTERP:
        return tl.dot(x.to(DT).to(tl.float32), y.to(DT).to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(x.to(DT), y.to(DT), acc, out_dtype=tl.float32)


@triton.jit
def lmul_tc_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn,
                   MODE: tl.constexpr, MAN: tl.constexpr, RNE: tl.constexpr, EMIN_BITS: tl.constexpr,
                   THRESH: tl.constexpr, MAX_BITS: tl.constexpr, C_MINUS_1: tl.constexpr, OFF: tl.constexpr,
                   DT: tl.constexpr, INTERP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped tile order (L2 reuse of B tiles across GROUP_M consecutive row tiles)
    pid = tl.program_id(0)
    bat = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        a = tl.load(a_ptr + bat * sab + rm[:, None] * sam + ks[None, :] * sak,
                    mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0).to(tl.float32)   # [BM, BK]
        b = tl.load(b_ptr + bat * sbb + ks[:, None] * sbk + rn[None, :] * sbn,
                    mask=(ks[:, None] < K) & (rn[None, :] < N), other=0.0).to(tl.float32)   # [BK, BN]
        xa = _quantize_normal(a, RNE, MAN, EMIN_BITS, THRESH, MAX_BITS)
        xb = _quantize_normal(b, RNE, MAN, EMIN_BITS, THRESH, MAX_BITS)
        ha = (xa & -8388608).to(tl.float32, bitcast=True)          # X^ = [s|eeeeeeee|0..0] (0xFF800000), +-0 if flushed
        hb = (xb & -8388608).to(tl.float32, bitcast=True)
        if MODE == 1:  # formula: P = X Y^ + X^ (Y + (c-1) Y^)
            acc = _dot(xa.to(tl.float32, bitcast=True), hb, acc, DT, INTERP)
            acc = _dot(ha, xb.to(tl.float32, bitcast=True) + C_MINUS_1 * hb, acc, DT, INTERP)
        else:  # bit, m <= 4: P = sum_v [M_x == v] X^ (Y^ g(v, M_y)), one-hot over v
            ma = (xa >> (23 - MAN)) & ((1 << MAN) - 1)                # m-bit mantissa fields
            mb = (xb >> (23 - MAN)) & ((1 << MAN) - 1)
            fb = (xb >> 23) & 0xFF                                    # exponent field (0: flushed)
            for v in tl.static_range(1 << MAN):
                left = tl.where(ma == v, ha, 0.0)                     # [BM, BK] +-2^xe or 0
                s = mb + (v + OFF)                                    # S = v + M_y + c 2^m
                q = s >> MAN                                          # carry, 0..2
                rest = s - (q << MAN)
                # Y^ g = sign 2^(ye + q) (1 + rest 2^-m): [s|fb+q|rest 0..0]
                g = (xb & -2147483648) | ((fb + q) << 23) | (rest << (23 - MAN))
                right = tl.where(fb > 0, g.to(tl.float32, bitcast=True), 0.0)
                acc = _dot(left, right, acc, DT, INTERP)
    tl.store(c_ptr + bat * scb + rm[:, None] * scm + rn[None, :] * scn, acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))
