"""The Triton kernel of :mod:`lmul.kernels.triton_lmul` (imported only on first use: needs triton).

Kept undecorated at module level so that both ``triton.jit`` and Triton's interpreter (which
patches this module's ``tl``) can wrap it; see triton_lmul.py for the math.
"""

import triton.language as tl


def lmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn,
                MODE: tl.constexpr, EMIN_FIELD: tl.constexpr, OFFS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bat = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        a = tl.load(a_ptr + bat * sab + rm[:, None] * sam + ks[None, :] * sak,
                    mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)          # [BM, BK]
        b = tl.load(b_ptr + bat * sbb + ks[:, None] * sbk + rn[None, :] * sbn,
                    mask=(ks[:, None] < K) & (rn[None, :] < N), other=0.0)          # [BK, BN]
        x = a[:, :, None]
        y = b[None, :, :]                                                           # [BM, BK, BN]
        if MODE == 2:  # lmul.spec.MODE_CODES: bit 0, formula 1, exact 2
            p = x * y
        else:
            xb = x.to(tl.int32, bitcast=True)
            yb = y.to(tl.int32, bitcast=True)
            fx = (xb >> 23) & 0xFF
            fy = (yb >> 23) & 0xFF
            nx = (fx >= EMIN_FIELD) & (fx > 0) & (fx < 255)
            ny = (fy >= EMIN_FIELD) & (fy > 0) & (fy < 255)
            s = (xb & 0x7FFFFF) + (yb & 0x7FFFFF) + OFFS                             # < 3 2^23
            neg = (xb ^ yb) < 0
            if MODE == 0:
                q = s >> 23
                frac = s - (q << 23)
                f = fx + fy - 127 + q                                               # result field
                e = tl.maximum(f - 127 - 23, -1000)
                scale = ((e + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
                slow = ((frac + (1 << 23)).to(tl.float64) * scale).to(tl.float32)  # one rounding
                fast = ((f << 23) | frac).to(tl.float32, bitcast=True)
                mag = tl.where((f >= 1) & (f <= 254), fast, slow)
            else:
                e = tl.maximum(fx + fy - 254 - 23, -1000)
                scale = ((e + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
                mag = ((s + (1 << 23)).to(tl.float64) * scale).to(tl.float32)      # one rounding
            mag = tl.where(neg, -mag, mag)
            zero = tl.zeros_like(x)
            fx_ = tl.where(nx | (fx == 255), x, zero)
            fy_ = tl.where(ny | (fy == 255), y, zero)
            special = fx_ * fy_                     # 0, +-inf or NaN where an operand is not normal
            p = tl.where(nx & ny, mag, special)
        acc += tl.sum(p, axis=1)
    tl.store(c_ptr + bat * scb + rm[:, None] * scm + rn[None, :] * scn, acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))
