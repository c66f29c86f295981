// lmul CPU kernels: fused quantize + operand preparation, and the bit-mode L-Matmul integer kernel.
// Plain C++ (GCC/Clang vector extensions + OpenMP), loaded with ctypes by lmul/kernels/cpu_ext.py.
// The math is in docs/kernels.md; the contract in docs/semantics.md (SPEC sections 1, 2, 4).
//
// float32 layout: [s|eeeeeeee|mmmmmmmmmmmmmmmmmmmmmmm]; a value of an m-bit format keeps its m-bit
// mantissa field in the top m bits of the 23-bit field (the rest are zero).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>

extern "C" {

struct QParams {
    int32_t man_bits;   // m
    int32_t emin;       // smallest normal exponent of the format
    int32_t trunc;      // 1: round toward zero, 0: round to nearest even
    int32_t has_inf;    // IEEE-like format (inf kept) vs finite-only (inf saturates)
    float fmax;         // largest finite value of the format
};

}  // extern "C"

static inline uint32_t f2u(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
static inline float u2f(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }

// quantize one float32 to the format (saturating overflow), as lmul.formats.quantize; returns
// bits. Branchless (selects only) so that loops over it vectorise.
static inline uint32_t quant_bits(float x, const QParams& p) {
    const uint32_t bits = f2u(x);
    const uint32_t sign = bits & 0x80000000u, mag = bits & 0x7FFFFFFFu;
    const int32_t field = (int32_t)(mag >> 23);
    const int32_t e = std::max(field, 1) - 127;
    const uint32_t sig = (mag & 0x7FFFFFu) | (field > 0 ? 0x800000u : 0u);  // |x| = sig 2^(e-23)
    const int32_t shift = std::min(23 - p.man_bits + std::max(p.emin - e, 0), 25);
    uint32_t q = sig >> shift;
    const uint32_t rem = sig - (q << shift), half = (1u << shift) >> 1;
    // ties go to the even encoding: the mantissa LSB, or for m = 0 the lower neighbour's exponent
    // field LSB (e + bias, bias = 1 - emin; its significand is the implicit 1, q is 1 or 0)
    const uint32_t odd = p.man_bits ? q : q & (uint32_t)(e + 1 - p.emin);
    const bool up = !p.trunc && shift > 0 && (rem > half || (rem == half && (odd & 1u)));
    q += up ? 1u : 0u;
    // q 2^(e' - m): q <= 2^24 converts exactly, the power of two (>= 2^-149) is built from
    // bits, and the product is representable, so the multiply is exact
    const int32_t pe = std::max(e, p.emin) - p.man_bits;
    const uint32_t sbits = pe >= -126 ? (uint32_t)(pe + 127) << 23 : 1u << std::max(pe + 149, 0);
    float out = (float)(int32_t)q * u2f(sbits);
    out = out > p.fmax ? p.fmax : out;                                       // saturate
    uint32_t res = f2u(out);
    res = mag == 0x7F800000u ? (p.has_inf ? 0x7F800000u : f2u(p.fmax)) : res;  // inf
    res = mag > 0x7F800000u ? 0x7FC00000u : res;                             // NaN
    return res | sign;
}

// a quantized value's status: 0 zero/subnormal (flushed by L-Mul), 1 normal, 2 inf/NaN
static inline int kind_of(uint32_t qb, const QParams& p) {
    const int32_t field = (int32_t)((qb >> 23) & 0xFF);
    return field == 255 ? 2 : (field >= p.emin + 127 && field > 0 ? 1 : 0);
}

// 1 if any of x[0..n) is inf/NaN (exactly the entries whose quantized value is inf/NaN)
static inline int any_nonfinite(const float* x, int64_t n) {
    uint32_t acc = 0;
    for (int64_t i = 0; i < n; ++i) acc |= (f2u(x[i]) & 0x7F800000u) == 0x7F800000u ? 1u : 0u;
    return acc != 0;
}

extern "C" {

void lmul_quantize(const float* x, int64_t n, float* out, const QParams* p, int nt) {
    const QParams q = *p;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = u2f(quant_bits(x[i], q));
}

// formula mode, left operand: out[r] = [X | X^] (rows x 2K); X flushed to 0 if zero/subnormal,
// X^ = sign 2^xe (0 if flushed). rowflag[r] = 1 if the row holds inf/NaN (recomputed elsewhere).
void lmul_prep_formula_a(const float* x, int64_t rows, int64_t K, float* out, uint8_t* rowflag,
                         const QParams* p, int nt) {
    const QParams q = *p;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * K;
        float* o1 = out + r * 2 * K;
        float* o2 = o1 + K;
        for (int64_t k = 0; k < K; ++k) {
            const uint32_t qb = quant_bits(xr[k], q);
            const bool normal = kind_of(qb, q) == 1;
            o1[k] = u2f(normal ? qb : 0u);
            o2[k] = u2f(normal ? (qb & 0xFF800000u) : 0u);  // [s|e|0...0] = sign 2^e
        }
        rowflag[r] = (uint8_t)any_nonfinite(xr, K);
    }
}

// formula mode, right operand (nb batches of K x N, row-major): out = [Y^ ; Y + (c-1) Y^]
// (nb x 2K x N) where Y + (c-1) Y^ = sign (ym + c) 2^ye, exact in float32 when c is a multiple
// of 2^-23. colflag[b * N + j] = 1 if that column holds inf/NaN.
void lmul_prep_formula_b(const float* y, int64_t nb, int64_t K, int64_t N, float* out, uint8_t* colflag,
                         const QParams* p, double c, int nt) {
    const QParams q = *p;
    const float cm1 = (float)(c - 1.0);  // exact: c is a multiple of 2^-23 in [0, 1)
    std::memset(colflag, 0, (size_t)(nb * N));
#pragma omp parallel num_threads(nt)
    {
        uint8_t* local = new uint8_t[nb * N]();
#pragma omp for schedule(dynamic, 16)
        for (int64_t bk = 0; bk < nb * K; ++bk) {
            const int64_t b = bk / K, k = bk % K;
            const float* yr = y + bk * N;
            float* o1 = out + (b * 2 * K + k) * N;
            float* o2 = out + (b * 2 * K + K + k) * N;
            uint8_t* lf = local + b * N;
            for (int64_t j = 0; j < N; ++j) {
                const uint32_t qb = quant_bits(yr[j], q);
                const int kd = kind_of(qb, q);
                lf[j] |= (uint8_t)(kd == 2);
                const float hat = u2f(kd == 1 ? (qb & 0xFF800000u) : 0u);
                const float val = u2f(kd == 1 ? qb : 0u);
                o1[j] = hat;
                o2[j] = val + cm1 * hat;  // sign (ym + c) 2^ye: exact (see above)
            }
        }
#pragma omp critical
        for (int64_t j = 0; j < nb * N; ++j) colflag[j] |= local[j];
        delete[] local;
    }
}

// exact mode: quantize nb batches of rows x cols, zero the inf/NaN entries and flag their rows
// (rowflag[b * rows + r]) and columns (colflag[b * cols + j])
void lmul_prep_exact(const float* x, int64_t nb, int64_t rows, int64_t cols, float* out, uint8_t* rowflag,
                     uint8_t* colflag, const QParams* p, int nt) {
    const QParams q = *p;
    std::memset(colflag, 0, (size_t)(nb * cols));
#pragma omp parallel num_threads(nt)
    {
        uint8_t* local = new uint8_t[nb * cols]();
#pragma omp for schedule(dynamic, 16)
        for (int64_t r = 0; r < nb * rows; ++r) {
            uint8_t flag = 0;
            uint8_t* lf = local + (r / rows) * cols;
            for (int64_t j = 0; j < cols; ++j) {
                uint32_t qb = quant_bits(x[r * cols + j], q);
                bool bad = (qb & 0x7FFFFFFFu) >= 0x7F800000u;
                flag |= bad;
                lf[j] |= bad;
                out[r * cols + j] = bad ? 0.0f : u2f(qb);
            }
            rowflag[r] = flag;
        }
#pragma omp critical
        for (int64_t j = 0; j < nb * cols; ++j) colflag[j] |= local[j];
        delete[] local;
    }
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// bit mode, any m: P bits = (|X| + |Y| - ((127 << 23) - (c 2^m << (23 - m)))) with sign XOR,
// valid while the product's exponent field stays in 1..254 (checked per tile, else exact scalar).
// Left operand  ia = |X| - (127 << 23) + (off << (23 - m)) + (sx << 31)  (uint32, wraps), nz flag.
// Right operand packed in strips of JS columns: vb[s][k][JS] = bits of Y (0.5f if flushed),
// wb[s][k][JS] = 1.0f (normal) or 0.0f (zero/subnormal/inf/NaN/padding).
// Since (sx << 31) + (sy << 31) == (sx ^ sy) << 31 mod 2^32, one integer add gives sign and
// magnitude. A flushed Y gives ia + 0x3F000000, a finite float (field fx - 1 + carry) times 0.
static const int KB = 256;       // k block (tile range checks are per row x k block x strip)
static const int NV = 4;         // 16-lane vectors per strip
static const int JS = 16 * NV;   // strip width
static const int SG = 4;         // strips per L2-resident B block (KB x SG*JS x 8 bytes = 512 KiB)
static const int RBQ = 16;       // row quads per parallel task (64 rows)
typedef uint32_t vu __attribute__((vector_size(64)));
typedef float vf __attribute__((vector_size(64)));

static inline float bit_product_exact(uint32_t ab, uint32_t bb, int m, int off) {
    // both normal and finite; the reference formula evaluated in double, rounded once
    int fa = (int)((ab >> 23) & 0xFF), fb = (int)((bb >> 23) & 0xFF);
    int ma = (int)((ab & 0x7FFFFFu) >> (23 - m)), mb = (int)((bb & 0x7FFFFFu) >> (23 - m));
    int S = ma + mb + off, qc = S >> m;
    int sig = S - (qc << m) + (1 << m);
    float v = (float)std::ldexp((double)sig, (fa - 127) + (fb - 127) + qc - m);
    return ((ab ^ bb) & 0x80000000u) ? -v : v;
}

// one k row of a right-operand strip (JS columns, the first jn real, the rest padding that reads
// as 0: flushed, weight 0): vo = bits (0.5f if not normal), wo = 1/0, the normal entries' exponent
// field range into lo/hi; returns 1 if some entry is inf/NaN. A function of its own so that the
// loops vectorise (inlined into the OpenMP body they do not; a decode step's cost is this loop).
// PRE: the entries are already in the format (quantizing them changes at most a NaN's payload).
template <bool PRE>
__attribute__((noinline)) static int32_t prep_strip_row(const float* yr, int64_t jn, const QParams q, int32_t fmin_normal,
                                     uint32_t* __restrict vo, float* __restrict wo, int32_t& lo, int32_t& hi) {
    float tail[JS];
    const float* src = yr;
    if (jn < JS) {
        for (int j = 0; j < JS; ++j) tail[j] = j < jn ? yr[j] : 0.0f;
        src = tail;
    }
    uint32_t qb[JS];
    for (int j = 0; j < JS; ++j) qb[j] = PRE ? f2u(src[j]) : quant_bits(src[j], q);
    int32_t bad = 0, l = lo, h = hi;
    for (int j = 0; j < JS; ++j) {
        const int32_t f = (int32_t)((qb[j] >> 23) & 0xFF);
        const bool normal = f != 255 && f >= fmin_normal;  // kind_of(qb) == 1
        vo[j] = normal ? qb[j] : 0x3F000000u;
        wo[j] = normal ? 1.0f : 0.0f;
    }
    for (int j = 0; j < JS; ++j) {
        const int32_t f = (int32_t)((qb[j] >> 23) & 0xFF);
        const int32_t normal = (f != 255) & (f >= fmin_normal);
        bad |= (int32_t)(f == 255);
        l = std::min(l, normal ? f : 1000);
        h = std::max(h, normal ? f : -1000);
    }
    lo = l;
    hi = h;
    return bad;
}

// one left-operand row: ia and nz (lmul_prep_bit_a); PRE as prep_strip_row
template <bool PRE>
static inline void prep_bit_row(const float* __restrict xr, int64_t K, uint32_t* __restrict iar, uint8_t* __restrict nzr,
                                const QParams& q, uint32_t addc) {
    for (int64_t k = 0; k < K; ++k) {
        const uint32_t qb = PRE ? f2u(xr[k]) : quant_bits(xr[k], q);
        const bool normal = kind_of(qb, q) == 1;
        iar[k] = normal ? (qb & 0x7FFFFFFFu) - (127u << 23) + addc + (qb & 0x80000000u) : 0u;
        nzr[k] = (uint8_t)normal;
    }
}

extern "C" {

int lmul_strip_width() { return JS; }
int lmul_k_block() { return KB; }

// left operand: nb batches of M x K -> ia, nz [nb][rows_pad][K] (padding rows: nz = 0), per
// (row, k block) min/max exponent field of the normal entries (fmin > fmax when none),
// rowflag[b * rows_pad + r] for inf/NaN rows. pre: x is already in the format (not quantized again).
void lmul_prep_bit_a(const float* x, int64_t nb, int64_t M, int64_t rows_pad, int64_t Kin, uint32_t* ia,
                     uint8_t* nz, int16_t* fmn, int16_t* fmx, uint8_t* rowflag, const QParams* p, int off,
                     int nt, int pre) {
    const QParams q = *p;
    const int m = q.man_bits;
    const uint32_t addc = (uint32_t)off << (23 - m);
    const int64_t nkb = (Kin + KB - 1) / KB;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
    for (int64_t br = 0; br < nb * rows_pad; ++br) {
        const int64_t b = br / rows_pad, r = br % rows_pad;
        const int64_t K = Kin;  // a local copy: the stores below cannot alias it
        uint32_t* iar = ia + br * K;
        uint8_t* nzr = nz + br * K;
        if (r >= M) {  // padding row
            for (int64_t k = 0; k < K; ++k) { iar[k] = 0; nzr[k] = 0; }
            for (int64_t kb = 0; kb < nkb; ++kb) { fmn[br * nkb + kb] = 1000; fmx[br * nkb + kb] = -1000; }
            rowflag[br] = 0;
            continue;
        }
        const float* xr = x + (b * M + r) * K;
        if (pre) prep_bit_row<true>(xr, K, iar, nzr, q, addc);
        else prep_bit_row<false>(xr, K, iar, nzr, q, addc);
        for (int64_t kb = 0; kb < nkb; ++kb) {  // exponent field range of the normal entries
            int lo = 1000, hi = -1000;
            const int64_t k1 = std::min(K, (kb + 1) * KB);
            for (int64_t k = kb * KB; k < k1; ++k) {
                // ia + (127 << 23) - addc restores the quantized bits; field = bits 23..30
                const int f = (int)(((iar[k] + (127u << 23) - addc) >> 23) & 0xFF);
                lo = std::min(lo, nzr[k] ? f : 1000);
                hi = std::max(hi, nzr[k] ? f : -1000);
            }
            fmn[br * nkb + kb] = (int16_t)lo;
            fmx[br * nkb + kb] = (int16_t)hi;
        }
        rowflag[br] = (uint8_t)any_nonfinite(xr, K);
    }
}

// right operand: nb batches of K x N -> packed vb, wb [nb][ns][K][JS], per (batch, k block,
// strip) min/max field [nb][nkb][ns], colflag[b * N + j]; pre as lmul_prep_bit_a
void lmul_prep_bit_b(const float* y, int64_t nb, int64_t K, int64_t N, uint32_t* vb, float* wb, int16_t* fmn,
                     int16_t* fmx, uint8_t* colflag, const QParams* p, int nt, int pre) {
    const QParams q = *p;
    const int64_t ns = (N + JS - 1) / JS, nkb = (K + KB - 1) / KB;
    const int32_t fmin_normal = std::max(q.emin + 127, 1);
    std::memset(colflag, 0, (size_t)(nb * N));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) collapse(3)
    for (int64_t bt = 0; bt < nb; ++bt) {
        for (int64_t s = 0; s < ns; ++s) {
            for (int64_t b = 0; b < nkb; ++b) {
                int32_t lo = 1000, hi = -1000;
                const float* yb = y + bt * K * N;
                const int64_t jn = std::min<int64_t>(JS, N - s * JS);
                for (int64_t k = b * KB; k < std::min(K, (b + 1) * KB); ++k) {
                    uint32_t* __restrict vo = vb + ((bt * ns + s) * K + k) * JS;
                    float* __restrict wo = wb + ((bt * ns + s) * K + k) * JS;
                    const float* yr = yb + k * N + s * JS;
                    const int32_t bad = pre ? prep_strip_row<true>(yr, jn, q, fmin_normal, vo, wo, lo, hi)
                                            : prep_strip_row<false>(yr, jn, q, fmin_normal, vo, wo, lo, hi);
                    if (bad)  // rare: mark the columns (benign race: every writer stores 1)
                        for (int j = 0; j < jn; ++j)
                            if (kind_of(quant_bits(yr[j], q), q) == 2) colflag[bt * N + s * JS + j] = 1;
                }
                fmn[(bt * nkb + b) * ns + s] = (int16_t)lo;
                fmx[(bt * nkb + b) * ns + s] = (int16_t)hi;
            }
        }
    }
}

// C [nb][rows_pad][ns*JS] = bit-mode L-Matmul of the prepared operands (nb batches).
// rows_pad is a multiple of 4 (padding rows have nz = 0).
void lmul_bit_matmul(const uint32_t* ia_all, const uint8_t* nz_all, const int16_t* afmn_all,
                     const int16_t* afmx_all, int64_t nb, int64_t rows_pad, int64_t K, const uint32_t* vb_all,
                     const float* wb_all, const int16_t* bfmn_all, const int16_t* bfmx_all, int64_t ns,
                     float* C_all, int m, int off, int nt) {
    const int64_t nkb = (K + KB - 1) / KB, ldc = ns * JS, nquads = rows_pad / 4;
    const uint32_t addc = (uint32_t)off << (23 - m);
    // (batch, block of RB rows) in parallel; inside: groups of SG strips (B block of KB x SG*JS
    // stays in L2 while all row quads of the block use it), k blocks, row quads, strips
    const int64_t nrb = (nquads + RBQ - 1) / RBQ;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t bq = 0; bq < nb * nrb; ++bq) {
        const int64_t bt = bq / nrb, q0 = (bq % nrb) * RBQ, q1 = std::min(nquads, q0 + RBQ);
        const uint32_t* ia = ia_all + bt * rows_pad * K;
        const uint8_t* nz = nz_all + bt * rows_pad * K;
        const int16_t* afmn = afmn_all + bt * rows_pad * nkb;
        const int16_t* afmx = afmx_all + bt * rows_pad * nkb;
        const uint32_t* vb = vb_all + bt * ns * K * JS;
        const float* wb = wb_all + bt * ns * K * JS;
        const int16_t* bfmn = bfmn_all + bt * nkb * ns;
        const int16_t* bfmx = bfmx_all + bt * nkb * ns;
        float* C = C_all + bt * rows_pad * ldc;
        std::memset(C + q0 * 4 * ldc, 0, sizeof(float) * 4 * ldc * (q1 - q0));
        for (int64_t s0 = 0; s0 < ns; s0 += SG)
        for (int64_t b = 0; b < nkb; ++b)
        for (int64_t qd = q0; qd < q1; ++qd) {
            const int64_t i0 = qd * 4;
            const int64_t k0 = b * KB, k1 = std::min(K, k0 + KB);
            int alo = 1000, ahi = -1000;
            for (int r = 0; r < 4; ++r) {
                alo = std::min(alo, (int)afmn[(i0 + r) * nkb + b]);
                ahi = std::max(ahi, (int)afmx[(i0 + r) * nkb + b]);
            }
            if (ahi < 0) continue;  // no normal entry in these rows and this k block
            for (int64_t s = s0; s < std::min(ns, s0 + SG); ++s) {
                const int blo = bfmn[b * ns + s], bhi = bfmx[b * ns + s];
                if (bhi < 0) continue;
                float* crow[4];
                for (int r = 0; r < 4; ++r) crow[r] = C + (i0 + r) * ldc + s * JS;
                const bool fast = (ahi + bhi - 127 + 2 <= 254) && (alo + blo - 127 >= 1);
                if (fast) {
                    vf acc[4][NV];
                    for (int r = 0; r < 4; ++r)
                        for (int v = 0; v < NV; ++v) std::memcpy(&acc[r][v], crow[r] + 16 * v, 64);
                    for (int64_t k = k0; k < k1; ++k) {
                        const vu* pb = (const vu*)(vb + (s * K + k) * JS);
                        const vf* pw = (const vf*)(wb + (s * K + k) * JS);
                        const uint8_t n0 = nz[i0 * K + k], n1 = nz[(i0 + 1) * K + k];
                        const uint8_t n2 = nz[(i0 + 2) * K + k], n3 = nz[(i0 + 3) * K + k];
                        if (n0 & n1 & n2 & n3) {
                            vu a0 = (vu){} + ia[i0 * K + k], a1 = (vu){} + ia[(i0 + 1) * K + k];
                            vu a2 = (vu){} + ia[(i0 + 2) * K + k], a3 = (vu){} + ia[(i0 + 3) * K + k];
                            for (int v = 0; v < NV; ++v) {
                                vu bv = pb[v];
                                vf w = pw[v];
                                acc[0][v] += (vf)(bv + a0) * w;
                                acc[1][v] += (vf)(bv + a1) * w;
                                acc[2][v] += (vf)(bv + a2) * w;
                                acc[3][v] += (vf)(bv + a3) * w;
                            }
                        } else if (n0 | n1 | n2 | n3) {
                            const uint8_t nn[4] = {n0, n1, n2, n3};
                            for (int r = 0; r < 4; ++r) {
                                if (!nn[r]) continue;
                                vu a = (vu){} + ia[(i0 + r) * K + k];
                                for (int v = 0; v < NV; ++v) acc[r][v] += (vf)(pb[v] + a) * pw[v];
                            }
                        }
                    }
                    for (int r = 0; r < 4; ++r)
                        for (int v = 0; v < NV; ++v) std::memcpy(crow[r] + 16 * v, &acc[r][v], 64);
                } else {  // extreme exponents somewhere in this tile: exact scalar products
                    for (int r = 0; r < 4; ++r) {
                        for (int64_t k = k0; k < k1; ++k) {
                            if (!nz[(i0 + r) * K + k]) continue;
                            const uint32_t ab = ia[(i0 + r) * K + k] - addc + (127u << 23);
                            const uint32_t* pb = vb + (s * K + k) * JS;
                            const float* pw = wb + (s * K + k) * JS;
                            for (int j = 0; j < JS; ++j)
                                if (pw[j] != 0.0f) crow[r][j] += bit_product_exact(ab, pb[j], m, off);
                        }
                    }
                }
            }
        }
    }
}


// elementwise L-Mul (lmul.ops.products of quantized operands), one pass: quantize both, then
// mode 0 bit: S = Mx + My + off, q = S >> m, P = (S - q 2^m + 2^m) 2^(xe + ye + q - m);
// mode 1 formula: P = ((1 + c) + (Mx + My) 2^-m) 2^(xe + ye); mode 2 exact: P = X Y in double.
// P is rounded once to float32. Zero/subnormal flush to zero, IEEE rules for inf/NaN, as ops.py.
__attribute__((optimize("fp-contract=off")))
void lmul_mul_elem(const float* x, const float* y, int64_t n, float* out, const QParams* p, int mode,
                   int32_t off, double c, int nt) {
    const QParams q = *p;
    const int m = q.man_bits;
    const double a1 = 1.0 + c, inv = std::ldexp(1.0, -m);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t bx = quant_bits(x[i], q), by = quant_bits(y[i], q);
        const float fx = u2f(bx), fy = u2f(by);
        if (mode == 2) { out[i] = (float)((double)fx * (double)fy); continue; }
        const int kx = kind_of(bx, q), ky = kind_of(by, q);
        const bool neg = ((bx ^ by) >> 31) != 0;
        float res;
        if (kx == 1 && ky == 1) {
            const int32_t ex = (int32_t)((bx >> 23) & 0xFF) - 127, ey = (int32_t)((by >> 23) & 0xFF) - 127;
            const int32_t mx = (int32_t)((bx & 0x7FFFFFu) >> (23 - m)), my = (int32_t)((by & 0x7FFFFFu) >> (23 - m));
            double mag;
            if (mode == 0) {
                const int32_t s = mx + my + off, cq = s >> m;
                const int32_t e = ex + ey + cq;
                if (e >= -126 && e <= 127) {  // a normal float32: its bits directly (paper Figure 2)
                    res = u2f(((uint32_t)(e + 127) << 23) | ((uint32_t)(s - (cq << m)) << (23 - m)));
                } else {
                    const int32_t sig = (s - (cq << m)) + (1 << m);
                    mag = std::ldexp((double)sig, e - m);
                    res = (float)mag;
                }
            } else {
                const double frac = (double)(mx + my) * inv;
                const int32_t e = ex + ey;
                if (e >= -126 && e <= 125) {  // (float)(a1 + frac) in [1, 4]: scaling by 2^e is exact
                    res = (float)(a1 + frac) * u2f((uint32_t)(e + 127) << 23);
                } else {
                    mag = std::ldexp(a1 + frac, e);
                    res = (float)mag;
                }
            }
            res = neg ? -res : res;
        } else {
            const float gx = kx == 0 ? 0.0f : fx, gy = ky == 0 ? 0.0f : fy;
            const float sp = gx * gy;
            if (std::isnan(sp)) res = sp;
            else { res = std::fabs(sp); res = neg ? -res : res; }
        }
        out[i] = res;
    }
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// Reduced-precision accumulation (acc=<format>, docs/semantics.md section 4), every mode.
// Per output (i, j), in increasing k: each block [k0, k0 + block) of products is summed
// sequentially in float32 starting from +0, then total = quantize(float32(total + block sum))
// (rne, saturating) with total starting from +0. A block sum that starts from +0 is never -0,
// so the signs of zero products never matter and zero products may be skipped.
// Products per mode, from prepared operands (au/af per row and k, bu/bf packed in strips):
//   0 bit:     P = bits(ia + vb) * wb (as lmul_bit_matmul; rows with nz = 0 are skipped)
//   1 formula: P = float(L + R) * (ah * hb), L = 2^23 (1 + c) + Mx 2^(23-m), R = My 2^(23-m),
//              ah = sign 2^(xe - 23), hb = sign 2^ye (0 if flushed): one rounding (int -> float),
//              the power-of-two scaling is exact while the product is a normal float32
//   2 exact:   P = Y * X (one IEEE float32 multiply = the exact product rounded once)
// bit/formula tiles where a product could leave float32's normal range use exact scalar products.
static const int NA = 4;           // 16-lane vectors per accumulator tile (4 rows x 64 columns)
static const int HS = JS / (16 * NA);  // sub-tiles per strip
typedef int32_t vi __attribute__((vector_size(64)));

struct AccQ {             // rne + saturate into the accumulator format, on float32 bit patterns
    uint32_t sh, hm1, lsbm, nmask, minnorm, fmaxb;
    float cbig;           // 2^(emin - m + 23): (|x| + cbig) - cbig rounds |x| < 2^emin to the format
};

static AccQ acc_params(const QParams& p) {
    AccQ a;
    a.sh = (uint32_t)(23 - p.man_bits);
    a.hm1 = a.sh ? (1u << (a.sh - 1)) - 1u : 0u;
    a.lsbm = a.sh ? 1u : 0u;
    a.nmask = ~((1u << a.sh) - 1u);
    a.minnorm = (uint32_t)(p.emin + 127) << 23;
    a.fmaxb = f2u(p.fmax);
    a.cbig = std::ldexp(1.0f, p.emin - p.man_bits + 23);
    return a;
}

// quantize(x, acc) for a vector: rne, saturating, NaN stays NaN, inf -> inf (has_inf) or max.
// Integer path: round the float32 bit pattern at bit sh (normal in the format), (|x| + cbig) - cbig
// below the format's smallest normal.
template <bool HAS_INF>
static inline vf quant_int(vf x, const AccQ& q) {
    const vu u = (vu)x;
    const vu sign = u & 0x80000000u;
    const vu mag = u ^ sign;
    const vu rn = (mag + (q.hm1 + ((mag >> q.sh) & q.lsbm))) & q.nmask;
    const vf ax = (vf)mag;
    const vu rs = (vu)((ax + q.cbig) - q.cbig);
    vu r = mag < q.minnorm ? rs : rn;
    r = r > q.fmaxb ? (vu){} + q.fmaxb : r;
    if (HAS_INF) r = mag == 0x7F800000u ? mag : r;
    r = mag > 0x7F800000u ? (vu){} + 0x7FC00000u : r;
    return (vf)(r | sign);
}

// Magic-number path (1 <= m <= 21 and 2^(emax + 25 - m) finite): with e = clamp(exponent of x,
// emin, emax + 1) and C = 1.5 2^(e + 23 - m), (x + C) - C is x rounded to nearest even at
// 2^(e - m), exactly the format's spacing (both operations exact but the one rounding; C's
// significand is even, so ties go to the even mantissa). x >= 2^(emax + 1) stays above max.
struct AccM {
    int32_t flo, fhi;  // float32 exponent-field clamp: emin + 127, emax + 128
    uint32_t cadd;     // ((23 - m) << 23) | 0x400000
    float fmax;
};

template <bool HAS_INF>
static inline vf quant_magic(vf x, const AccM& q) {
    const vi u = (vi)x;
    const vi mag = u & 0x7FFFFFFF;
    vi f = mag >> 23;
    f = f < q.flo ? q.flo : f;
    f = f > q.fhi ? q.fhi : f;
    const vf c = (vf)((f << 23) + (int32_t)q.cadd);
    vf r = (x + c) - c;
    r = r > q.fmax ? q.fmax : r;     // NaN compares false: stays NaN
    r = r < -q.fmax ? -q.fmax : r;
    if (HAS_INF) r = mag == 0x7F800000 ? x : r;
    return (vf)(((vi)r) | (u & (int32_t)0x80000000));  // signed zero as quantize (copysign)
}

static int32_t fmt_emax(const QParams& p) {  // from max: the exponent of the largest finite value
    int e;
    std::frexp(p.fmax, &e);
    return e - 1;
}

static bool magic_ok(const QParams& p) {
    const int emax = fmt_emax(p);
    return p.man_bits >= 1 && p.man_bits <= 21 && emax >= p.emin && emax + 25 - p.man_bits <= 127;
}

static AccM magic_params(const QParams& p) {
    AccM a;
    a.flo = p.emin + 127;
    a.fhi = std::min(fmt_emax(p) + 128, 254);
    a.cadd = ((uint32_t)(23 - p.man_bits) << 23) | 0x400000u;
    a.fmax = p.fmax;
    return a;
}

struct AccArgs {
    int mode;
    const uint32_t* au; const float* af; const uint8_t* nz;   // [nb][rows_pad][K]
    const int16_t* afmn; const int16_t* afmx;                 // [nb][rows_pad][nkb]
    int64_t nb, rows_pad, M, K;
    const uint32_t* bu; const float* bf;                      // [nb][ns][K][JS]
    const int16_t* bfmn; const int16_t* bfmx;                 // [nb][nkb][ns]
    int64_t ns, N;
    float* C;                                                 // [nb][M][N]
    int m, off;
    int64_t block;
    int carry;  // 0: T and S start at +0; 1: C holds the initial T; 2: C holds the initial S (below)
};

static inline void no_fuse(vf& x) { asm("" : "+v"(x)); }  // keeps a multiply out of an FMA

// the products of rows row[0..3] at k with the NA vectors of the sub-tile (fast path)
template <int MODE>
static inline void fast_products(const AccArgs& A, const int64_t* row, int64_t kk, const uint32_t* bu,
                                 const float* bf, vf P[4][NA]) {
    const int64_t K = A.K;
    const vf* pf = (const vf*)(bf + kk * JS);
    if (MODE == 0) {
        const vu* pu = (const vu*)(bu + kk * JS);
        const uint8_t n0 = A.nz[row[0] * K + kk], n1 = A.nz[row[1] * K + kk];
        const uint8_t n2 = A.nz[row[2] * K + kk], n3 = A.nz[row[3] * K + kk];
        if (n0 & n1 & n2 & n3) {
            for (int r = 0; r < 4; ++r) {
                const vu a = (vu){} + A.au[row[r] * K + kk];
                for (int v = 0; v < NA; ++v) P[r][v] = (vf)(pu[v] + a) * pf[v];
            }
        } else {
            const uint8_t nn[4] = {n0, n1, n2, n3};
            for (int r = 0; r < 4; ++r) {
                const vu a = (vu){} + A.au[row[r] * K + kk];
                for (int v = 0; v < NA; ++v) P[r][v] = nn[r] ? (vf)(pu[v] + a) * pf[v] : (vf){};
            }
        }
    } else if (MODE == 1) {
        const vi* pu = (const vi*)(bu + kk * JS);
        for (int r = 0; r < 4; ++r) {
            const vi l = (vi){} + (int32_t)A.au[row[r] * K + kk];
            const float ah = A.af[row[r] * K + kk];
            for (int v = 0; v < NA; ++v) P[r][v] = __builtin_convertvector(pu[v] + l, vf) * (pf[v] * ah);
        }
    } else {
        for (int r = 0; r < 4; ++r) {
            const float x = A.af[row[r] * K + kk];
            for (int v = 0; v < NA; ++v) {
                vf p = pf[v] * x;
                no_fuse(p);
                P[r][v] = p;
            }
        }
    }
}

// exact scalar products (extreme exponents in this k block), zero where a product is zero
template <int MODE>
static inline void slow_products(const AccArgs& A, const int64_t* row, int64_t kk, const uint32_t* bu,
                                 const float* bf, vf P[4][NA]) {
    const int64_t K = A.K;
    const uint32_t addc = (uint32_t)A.off << (23 - A.m);
    const uint32_t* pu = bu + kk * JS;
    const float* pf = bf + kk * JS;
    for (int r = 0; r < 4; ++r) {
        for (int v = 0; v < NA; ++v) P[r][v] = (vf){};
        if (MODE == 0 && !A.nz[row[r] * K + kk]) continue;
        const uint32_t au = A.au[row[r] * K + kk];
        const float ah = MODE == 1 ? A.af[row[r] * K + kk] : 0.0f;
        if (MODE == 1 && ah == 0.0f) continue;
        for (int v = 0; v < NA; ++v)
            for (int l = 0; l < 16; ++l) {
                const int j = 16 * v + l;
                if (pf[j] == 0.0f) continue;
                if (MODE == 0) P[r][v][l] = bit_product_exact(au - addc + (127u << 23), pu[j], A.m, A.off);
                else P[r][v][l] = (float)((double)(int32_t)(au + pu[j]) * (double)ah * (double)pf[j]);
            }
    }
}

template <bool HAS_INF, bool MAGIC>
static inline vf quant_acc(vf x, const AccQ& q, const AccM& qm) {
    return MAGIC ? quant_magic<HAS_INF>(x, qm) : quant_int<HAS_INF>(x, q);
}

// one tile: rows i0..i0+3 (clamped for loads), columns s*JS + h*16*NA + [0, 16*NA). Block sums
// S start from +0 (S = +0 + P, so a zero product of either sign adds nothing and S is never -0).
template <int MODE, bool HAS_INF, bool MAGIC>
static void acc_tile(const AccArgs& A, const AccQ& q, const AccM& qm, int64_t bt, int64_t i0, int64_t s,
                     int h, const uint8_t* fastkb) {
    const int64_t K = A.K, nkb = (K + KB - 1) / KB;
    const int64_t rp = A.rows_pad;
    int64_t row[4];
    for (int r = 0; r < 4; ++r) row[r] = bt * rp + std::min(i0 + r, rp - 1);
    const uint32_t* bu = A.bu + (bt * A.ns + s) * K * JS + h * 16 * NA;
    const float* bf = A.bf + (bt * A.ns + s) * K * JS + h * 16 * NA;
    vf S[4][NA], T[4][NA], P[4][NA];
    for (int r = 0; r < 4; ++r)
        for (int v = 0; v < NA; ++v) { S[r][v] = (vf){}; T[r][v] = (vf){}; }
    const int64_t j0 = s * JS + h * 16 * NA;
    const int64_t jn = std::min<int64_t>(16 * NA, A.N - j0);
    if (A.carry) {  // the state a previous k piece left in C (rows/columns past the edge stay 0)
        for (int r = 0; r < 4 && i0 + r < A.M; ++r) {
            const float* crow = A.C + (bt * A.M + i0 + r) * A.N + j0;
            float tmp[16 * NA] = {};
            for (int64_t j = 0; j < jn; ++j) tmp[j] = crow[j];
            std::memcpy(A.carry == 1 ? &T[r][0] : &S[r][0], tmp, sizeof(tmp));
        }
    }
    if (A.carry == 2) {  // every product of this piece is in one block: S += P from the given S, no rounding
        for (int64_t kb = 0; kb < nkb; ++kb) {
            const int64_t k1 = std::min(K, (kb + 1) * KB);
            const bool fast = MODE == 2 || fastkb[kb];
            for (int64_t kk = kb * KB; kk < k1; ++kk) {
                if (fast) fast_products<MODE>(A, row, kk, bu, bf, P);
                else slow_products<MODE>(A, row, kk, bu, bf, P);
                for (int r = 0; r < 4; ++r)
                    for (int v = 0; v < NA; ++v) S[r][v] += P[r][v];
            }
        }
        for (int r = 0; r < 4; ++r)
            for (int v = 0; v < NA; ++v) T[r][v] = S[r][v];  // stored below
    } else if (A.block == 1) {  // T = quantize(T + (+0 + P)) per product
        for (int64_t kb = 0; kb < nkb; ++kb) {
            const int64_t k1 = std::min(K, (kb + 1) * KB);
            const bool fast = MODE == 2 || fastkb[kb];
            if (fast) {
                for (int64_t kk = kb * KB; kk < k1; ++kk) {
                    fast_products<MODE>(A, row, kk, bu, bf, P);
                    for (int r = 0; r < 4; ++r)
                        for (int v = 0; v < NA; ++v)
                            T[r][v] = quant_acc<HAS_INF, MAGIC>(T[r][v] + (P[r][v] + 0.0f), q, qm);
                }
            } else {
                for (int64_t kk = kb * KB; kk < k1; ++kk) {
                    slow_products<MODE>(A, row, kk, bu, bf, P);
                    for (int r = 0; r < 4; ++r)
                        for (int v = 0; v < NA; ++v)
                            T[r][v] = quant_acc<HAS_INF, MAGIC>(T[r][v] + (P[r][v] + 0.0f), q, qm);
                }
            }
        }
    } else {
        int64_t next_b = std::min(K, A.block);  // end of the current accumulation block
        for (int64_t k = 0; k < K;) {
            const int64_t kb = k / KB;
            const int64_t e = std::min(next_b, std::min(K, (kb + 1) * KB));
            const bool fast = MODE == 2 || fastkb[kb];
            if (fast) {
                for (int64_t kk = k; kk < e; ++kk) {
                    fast_products<MODE>(A, row, kk, bu, bf, P);
                    for (int r = 0; r < 4; ++r)
                        for (int v = 0; v < NA; ++v) S[r][v] += P[r][v];
                }
            } else {
                for (int64_t kk = k; kk < e; ++kk) {
                    slow_products<MODE>(A, row, kk, bu, bf, P);
                    for (int r = 0; r < 4; ++r)
                        for (int v = 0; v < NA; ++v) S[r][v] += P[r][v];
                }
            }
            if (e == next_b) {
                for (int r = 0; r < 4; ++r)
                    for (int v = 0; v < NA; ++v) {
                        T[r][v] = quant_acc<HAS_INF, MAGIC>(T[r][v] + S[r][v], q, qm);
                        S[r][v] = (vf){};
                    }
                next_b = std::min(K, next_b + A.block);
            }
            k = e;
        }
    }
    for (int r = 0; r < 4 && i0 + r < A.M; ++r) {
        float* crow = A.C + (bt * A.M + i0 + r) * A.N + j0;
        float tmp[16 * NA];
        std::memcpy(tmp, &T[r][0], sizeof(tmp));
        for (int64_t j = 0; j < jn; ++j) crow[j] = tmp[j];
    }
}

template <int MODE, bool HAS_INF, bool MAGIC>
static void acc_run(const AccArgs& A, const AccQ& q, const AccM& qm, int nt) {
    const int64_t nkb = (A.K + KB - 1) / KB, nquads = (A.M + 3) / 4;
    const int64_t nrb = (nquads + RBQ - 1) / RBQ;
    const int64_t ntask = A.nb * A.ns * HS * nrb;
    // tasks ordered (batch, strip, half, row block): consecutive tasks share a strip of B
#pragma omp parallel num_threads(nt)
    {
        uint8_t* fastkb = new uint8_t[nkb + 1];
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntask; ++t) {
            const int64_t rb = t % nrb, h = (t / nrb) % HS, s = (t / (nrb * HS)) % A.ns;
            const int64_t bt = t / (nrb * HS * A.ns);
            for (int64_t qd = rb * RBQ; qd < std::min(nquads, (rb + 1) * RBQ); ++qd) {
                const int64_t i0 = qd * 4;
                if (MODE != 2) {
                    for (int64_t kb = 0; kb < nkb; ++kb) {
                        int alo = 1000, ahi = -1000;
                        for (int r = 0; r < 4; ++r) {
                            const int64_t ri = bt * A.rows_pad + std::min(i0 + r, A.rows_pad - 1);
                            alo = std::min(alo, (int)A.afmn[ri * nkb + kb]);
                            ahi = std::max(ahi, (int)A.afmx[ri * nkb + kb]);
                        }
                        const int blo = A.bfmn[(bt * nkb + kb) * A.ns + s], bhi = A.bfmx[(bt * nkb + kb) * A.ns + s];
                        // no normal entry on one side (all products zero), or every product normal
                        fastkb[kb] = (uint8_t)(ahi < 0 || bhi < 0 || ((ahi + bhi - 127 + 2 <= 254) && (alo + blo - 127 >= 1)));
                    }
                }
                acc_tile<MODE, HAS_INF, MAGIC>(A, q, qm, bt, i0, s, (int)h, fastkb);
            }
        }
        delete[] fastkb;
    }
}

extern "C" {

// C [nb][M][N] = L-Matmul with reduced-precision accumulation (see above). mode 0 bit: au = ia,
// nz, rows_pad rows per batch (lmul_prep_bit_a/b); 1 formula: au = L, af = ah, nz unused;
// 2 exact: af = X (rows_pad = M), au, nz and the exponent ranges unused.
// carry (a k piece of a longer sum, cut at a block boundary): 0 none; 1 C holds the running sum T
// the products continue (blocks start at k = 0 here); 2 the piece lies inside one block whose
// float32 sum so far is in C: the products are added to it in order, nothing is rounded to the
// accumulator format, and C gets that block sum.
void lmul_acc_matmul(int mode, const uint32_t* au, const float* af, const uint8_t* nz, const int16_t* afmn,
                     const int16_t* afmx, int64_t nb, int64_t rows_pad, int64_t M, int64_t K, const uint32_t* bu,
                     const float* bf, const int16_t* bfmn, const int16_t* bfmx, int64_t ns, int64_t N, float* C,
                     int m, int off, int64_t block, const QParams* accp, int nt, int carry) {
    const AccArgs A{mode, au, af, nz, afmn, afmx, nb, rows_pad, M, K, bu, bf, bfmn, bfmx, ns, N, C, m, off, block,
                    carry};
    const AccQ q = acc_params(*accp);
    const AccM qm = magic_params(*accp);
    const bool inf = accp->has_inf != 0, magic = magic_ok(*accp);
#define LMUL_ACC_RUN(MODE) \
    (inf ? (magic ? acc_run<MODE, true, true>(A, q, qm, nt) : acc_run<MODE, true, false>(A, q, qm, nt)) \
         : (magic ? acc_run<MODE, false, true>(A, q, qm, nt) : acc_run<MODE, false, false>(A, q, qm, nt)))
    if (mode == 0) LMUL_ACC_RUN(0);
    else if (mode == 1) LMUL_ACC_RUN(1);
    else LMUL_ACC_RUN(2);
#undef LMUL_ACC_RUN
}

// the vector accumulator quantizers on n floats (n a multiple of 16), for tests: path 0 integer,
// 1 magic number (only where magic_ok), -1 the one the kernels use
int lmul_quantize_acc(const float* x, int64_t n, float* out, const QParams* p, int path) {
    const AccQ q = acc_params(*p);
    const AccM qm = magic_params(*p);
    const bool magic = path == 1 || (path == -1 && magic_ok(*p));
    if (path == 1 && !magic_ok(*p)) return 0;
    for (int64_t i = 0; i + 16 <= n; i += 16) {
        vf v;
        std::memcpy(&v, x + i, 64);
        if (p->has_inf) v = magic ? quant_magic<true>(v, qm) : quant_int<true>(v, q);
        else v = magic ? quant_magic<false>(v, qm) : quant_int<false>(v, q);
        std::memcpy(out + i, &v, 64);
    }
    return 1;
}

// formula mode with acc, left operand: nb batches of M x K -> L (uint32), ah (float) [nb][M][K],
// per (row, k block) min/max exponent field of the normal entries, rowflag for inf/NaN rows
void lmul_prep_acc_formula_a(const float* x, int64_t nb, int64_t M, int64_t K, uint32_t* L, float* ah,
                             int16_t* fmn, int16_t* fmx, uint8_t* rowflag, const QParams* p, int64_t c23, int nt) {
    const QParams q = *p;
    const int m = q.man_bits;
    const int64_t nkb = (K + KB - 1) / KB;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
    for (int64_t br = 0; br < nb * M; ++br) {
        const float* xr = x + br * K;
        uint32_t* lr = L + br * K;
        float* hr = ah + br * K;
        for (int64_t kb = 0; kb < nkb; ++kb) {
            int lo = 1000, hi = -1000;
            for (int64_t k = kb * KB; k < std::min(K, (kb + 1) * KB); ++k) {
                const uint32_t qb = quant_bits(xr[k], q);
                const bool normal = kind_of(qb, q) == 1;
                const int f = (int)((qb >> 23) & 0xFF);
                const uint32_t hb = (f > 23 ? (uint32_t)(f - 23) << 23 : 1u << std::max(f - 1, 0)) | (qb & 0x80000000u);
                lr[k] = normal ? (1u << 23) + (uint32_t)c23 + ((qb & 0x7FFFFFu) >> (23 - m) << (23 - m)) : 0u;
                hr[k] = normal ? u2f(hb) : 0.0f;
                lo = std::min(lo, normal ? f : 1000);
                hi = std::max(hi, normal ? f : -1000);
            }
            fmn[br * nkb + kb] = (int16_t)lo;
            fmx[br * nkb + kb] = (int16_t)hi;
        }
        rowflag[br] = (uint8_t)any_nonfinite(xr, K);
    }
}

// formula (mode 1) or exact (mode 2) with acc, right operand: nb batches of K x N -> packed
// bu, bf [nb][ns][K][JS] (formula: R, hb; exact: bf = Y, inf/NaN and padding 0), per (batch,
// k block, strip) min/max field of the normal entries, colflag[b * N + j]
void lmul_prep_acc_b(const float* y, int64_t nb, int64_t K, int64_t N, int mode, uint32_t* bu, float* bf,
                     int16_t* fmn, int16_t* fmx, uint8_t* colflag, const QParams* p, int nt) {
    const QParams q = *p;
    const int m = q.man_bits;
    const int64_t ns = (N + JS - 1) / JS, nkb = (K + KB - 1) / KB;
    std::memset(colflag, 0, (size_t)(nb * N));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) collapse(3)
    for (int64_t bt = 0; bt < nb; ++bt) {
        for (int64_t s = 0; s < ns; ++s) {
            for (int64_t b = 0; b < nkb; ++b) {
                int lo = 1000, hi = -1000;
                for (int64_t k = b * KB; k < std::min(K, (b + 1) * KB); ++k) {
                    const int64_t o = ((bt * ns + s) * K + k) * JS;
                    const int64_t jn = std::min<int64_t>(JS, N - s * JS);
                    const float* yr = y + bt * K * N + k * N + s * JS;
                    uint8_t bad = 0;
                    for (int j = 0; j < JS; ++j) {
                        const uint32_t qb = j < jn ? quant_bits(yr[j < jn ? j : 0], q) : 0u;
                        const int kd = kind_of(qb, q);
                        const int f = (int)((qb >> 23) & 0xFF);
                        bad |= (uint8_t)(kd == 2);
                        lo = std::min(lo, kd == 1 ? f : 1000);
                        hi = std::max(hi, kd == 1 ? f : -1000);
                        if (mode == 1) {
                            bu[o + j] = kd == 1 ? (qb & 0x7FFFFFu) >> (23 - m) << (23 - m) : 0u;
                            bf[o + j] = u2f(kd == 1 ? (qb & 0xFF800000u) : 0u);
                        } else {
                            bf[o + j] = u2f(kd == 2 ? 0u : qb);
                        }
                    }
                    if (bad)  // rare: mark the columns (benign race: every writer stores 1)
                        for (int j = 0; j < jn; ++j)
                            if (kind_of(quant_bits(yr[j], q), q) == 2) colflag[bt * N + s * JS + j] = 1;
                }
                fmn[(bt * nkb + b) * ns + s] = (int16_t)lo;
                fmx[(bt * nkb + b) * ns + s] = (int16_t)hi;
            }
        }
    }
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// Scaled operands (lmul/scaling.py, docs/semantics.md section 7): nb batches of R x C float32 in
// groups of gr x gc elements (tiles, ragged at the edges), one power-of-two scale X = 2^s each.
// Pass 1: amax per group as the largest |x| bit pattern (integer max: NaN above inf above finite).
// Pass 2: per element y = x (1/X), then by `out`: 0 y; 1 w = quantize(y) X; 2 the same with
// |quantize(y)| <= flush (the format's subnormals) replaced by +0 before the multiply.
extern "C" {

struct ScaleParams {
    int32_t mx;        // 1: OCP MX rule, 0: torchao's amax_to_scale rule (power of two)
    int32_t emax;      // the element format's largest exponent
    int32_t out;       // 0, 1 or 2 (above)
    int32_t pad;
    double fmax;       // the element format's largest finite value
    double eps;        // torchao's amax floor (1e-12)
    float flush;       // out == 2: largest subnormal of the element format
    float wide_max;    // out >= 1: largest finite value of the wide format e8m<m>
};

}  // extern "C"

// the group scale of lmul.scaling._exponents from the amax bit pattern (float32 |x|)
static float group_scale(uint32_t amax_bits, const ScaleParams& sp) {
    if (amax_bits >= 0x7F800000u) return u2f(0x7FC00000u);  // inf or NaN in the group
    if (amax_bits == 0) return 1.0f;
    const double amax = (double)u2f(amax_bits);
    int e = 0, s;
    if (sp.mx) {
        std::frexp(amax, &e);                                   // amax = f 2^e, f in [0.5, 1): floor(log2) = e - 1
        s = (e - 1) - sp.emax;
    } else {
        const double r64 = sp.fmax / std::max(amax, sp.eps);
        const double r32 = (double)(float)r64;                  // torchao's float32 multiplier
        std::frexp(r32 >= 0x1p-126 ? r32 : r64, &e);
        s = -(e - 1);
    }
    s = std::min(std::max(s, -127), 127);
    return s >= -126 ? u2f((uint32_t)(s + 127) << 23) : u2f(1u << (s + 149));  // exact 2^s
}

// quant_bits for m >= 1 in fewer operations (so the pass runs at memory speed): round the float32
// bit pattern at bit 23 - m (|x| normal in the format; trunc: clear the bits), below the format's
// smallest normal (|x| + cbig) - cbig with cbig = 2^(emin - m + 23), whose ulp is the subnormal
// spacing (trunc: one spacing less where that rounded up); saturate; inf and NaN as quant_bits.
struct FastQ {
    uint32_t sh, hm1, nmask, minnorm, fmaxb, infb;
    float cbig, ulp;
};

static FastQ fast_params(const QParams& p) {
    FastQ f;
    f.sh = (uint32_t)(23 - p.man_bits);
    f.hm1 = (1u << (f.sh - 1)) - 1u;
    f.nmask = ~((1u << f.sh) - 1u);
    f.minnorm = (uint32_t)(p.emin + 127) << 23;
    f.fmaxb = f2u(p.fmax);
    f.infb = p.has_inf ? 0x7F800000u : f.fmaxb;
    f.cbig = std::ldexp(1.0f, p.emin - p.man_bits + 23);
    f.ulp = std::ldexp(1.0f, p.emin - p.man_bits);
    return f;
}

template <bool TRUNC>
static inline uint32_t quant_fast(float x, const FastQ& q) {
    const uint32_t u = f2u(x), sign = u & 0x80000000u, mag = u ^ sign;
    const uint32_t rn = TRUNC ? mag & q.nmask : (mag + q.hm1 + ((mag >> q.sh) & 1u)) & q.nmask;
    const float ax = u2f(mag);
    float t = (ax + q.cbig) - q.cbig;
    if (TRUNC) t = t > ax ? t - q.ulp : t;
    uint32_t r = mag < q.minnorm ? f2u(t) : rn;
    r = r > q.fmaxb ? q.fmaxb : r;
    r = mag == 0x7F800000u ? q.infb : r;
    r = mag > 0x7F800000u ? 0x7FC00000u : r;
    return r | sign;
}

static inline uint32_t mag_max(const float* x, int64_t n) {
    uint32_t m = 0;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, f2u(x[i]) & 0x7FFFFFFFu);
    return m;
}

// one element of pass 2; bad |= 1 where a nonzero w (not NaN) is below 2^-126 or above wide_max,
// |= 2 where w is NaN
// Q: 0 quant_bits, 1 quant_fast rne, 2 quant_fast trunc
template <int OUT, int Q>
static inline float scaled_elem(float x, float inv, float X, const QParams& q, const FastQ& fq, float flush,
                                uint32_t wmax, uint32_t& bad) {
    const float y = x * inv;
    if (OUT == 0) return y;
    float v = u2f(Q == 0 ? quant_bits(y, q) : quant_fast<Q == 2>(y, fq));
    if (OUT == 2) v = std::fabs(v) <= flush ? 0.0f : v;     // NaN kept
    const float w = v * X;
    const uint32_t mag = f2u(w) & 0x7FFFFFFFu;
    bad |= (uint32_t)((mag != 0) & (mag <= 0x7F800000u) & ((mag < 0x00800000u) | (mag > wmax)));
    bad |= (uint32_t)(mag > 0x7F800000u) << 1;
    return w;
}

template <int OUT, int Q>
static int scaled_pass2(const float* x, int64_t nb, int64_t R, int64_t C, int64_t gr, int64_t gc, float* out,
                        const float* scales, const float* invs, const QParams& q, const ScaleParams& sp, int nt) {
    const int64_t tr = (R + gr - 1) / gr, tc = (C + gc - 1) / gc;
    const uint32_t wmax = f2u(sp.wide_max);
    const float flush = sp.flush;
    const FastQ fq = fast_params(q);
    uint32_t bad = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : bad)
    for (int64_t br = 0; br < nb * R; ++br) {
        const int64_t bt = br / R, t = (br % R) / gr;
        const float* __restrict xr = x + br * C;
        float* __restrict orow = out + br * C;
        const float* sx = scales + (bt * tr + t) * tc;
        const float* si = invs + (bt * tr + t) * tc;
        uint32_t b = 0;
        if (gc == 1) {
            for (int64_t j = 0; j < C; ++j) orow[j] = scaled_elem<OUT, Q>(xr[j], si[j], sx[j], q, fq, flush, wmax, b);
        } else {
            for (int64_t s = 0; s < tc; ++s) {
                const int64_t j0 = s * gc, j1 = std::min(C, j0 + gc);
                const float X = sx[s], inv = si[s];
                for (int64_t j = j0; j < j1; ++j) orow[j] = scaled_elem<OUT, Q>(xr[j], inv, X, q, fq, flush, wmax, b);
            }
        }
        bad |= b;
    }
    return (int)bad;
}

extern "C" {

// x: nb x R x C (row-major) -> out (same layout, by sp.out), scales [nb][ceil(R/gr)][ceil(C/gc)]
// (float32 X per group, NaN for a group holding inf/NaN), srange = min and max s of the finite
// scales (min > max if none); returns (out >= 1) bit 0: some nonzero w (not NaN) lies outside
// [2^-126, wide_max], bit 1: some w is NaN.
int lmul_scaled_prep(const float* x, int64_t nb, int64_t R, int64_t C, int64_t gr, int64_t gc, float* out,
                     float* scales, int32_t* srange, const QParams* qp, const ScaleParams* spp, int nt) {
    const QParams q = *qp;
    const ScaleParams sp = *spp;
    const int64_t tr = (R + gr - 1) / gr, tc = (C + gc - 1) / gc, ng = nb * tr * tc;
    uint32_t* amax = new uint32_t[ng]();
    if (gc == 1) {  // groups down columns: elementwise max over the group's rows, vectorised along the row
        const int64_t CW = 512, nch = (C + CW - 1) / CW;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t task = 0; task < nb * tr * nch; ++task) {
            const int64_t ch = task % nch, t = (task / nch) % tr, bt = task / (nch * tr);
            const int64_t j0 = ch * CW, jn = std::min(C - j0, CW);
            uint32_t m[CW];
            for (int64_t j = 0; j < CW; ++j) m[j] = 0;
            for (int64_t i = t * gr; i < std::min(R, (t + 1) * gr); ++i) {
                const float* xr = x + (bt * R + i) * C + j0;
                for (int64_t j = 0; j < jn; ++j) m[j] = std::max(m[j], f2u(xr[j]) & 0x7FFFFFFFu);
            }
            for (int64_t j = 0; j < jn; ++j) amax[(bt * tr + t) * tc + j0 + j] = m[j];
        }
    } else if (ng == nb && gr > 1) {  // one group per batch (tensor): a max over all rows
        for (int64_t bt = 0; bt < nb; ++bt) {
            uint32_t m = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(max : m)
            for (int64_t i = 0; i < R; ++i) m = std::max(m, mag_max(x + (bt * R + i) * C, C));
            amax[bt] = m;
        }
    } else {  // segments of gc along rows, combined over the group's gr rows
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t task = 0; task < nb * tr; ++task) {
            const int64_t t = task % tr, bt = task / tr;
            uint32_t* am = amax + task * tc;
            for (int64_t i = t * gr; i < std::min(R, (t + 1) * gr); ++i) {
                const float* xr = x + (bt * R + i) * C;
                for (int64_t s = 0; s < tc; ++s)
                    am[s] = std::max(am[s], mag_max(xr + s * gc, std::min(gc, C - s * gc)));
            }
        }
    }
    float* invs = new float[ng];
    int32_t lo = 1000, hi = -1000;
    for (int64_t g = 0; g < ng; ++g) {
        scales[g] = group_scale(amax[g], sp);
        invs[g] = 1.0f / scales[g];
        if (amax[g] < 0x7F800000u) {
            lo = std::min(lo, (int32_t)std::ilogb(scales[g]));
            hi = std::max(hi, (int32_t)std::ilogb(scales[g]));
        }
    }
    srange[0] = lo;
    srange[1] = hi;
    delete[] amax;
    const int qk = q.man_bits == 0 ? 0 : q.trunc ? 2 : 1;
    int bad = 0;
#define LMUL_PASS2(OUT, Q) scaled_pass2<OUT, Q>(x, nb, R, C, gr, gc, out, scales, invs, q, sp, nt)
    if (sp.out == 0) bad = LMUL_PASS2(0, 0);
    else if (sp.out == 1) bad = qk == 0 ? LMUL_PASS2(1, 0) : qk == 1 ? LMUL_PASS2(1, 1) : LMUL_PASS2(1, 2);
    else bad = qk == 0 ? LMUL_PASS2(2, 0) : qk == 1 ? LMUL_PASS2(2, 1) : LMUL_PASS2(2, 2);
#undef LMUL_PASS2
    delete[] invs;
    return bad;
}

// quant_fast on n floats, for tests (it must equal quant_bits); 0 where it does not apply (m = 0)
int lmul_quantize_fast(const float* x, int64_t n, float* out, const QParams* p) {
    if (p->man_bits == 0) return 0;
    const FastQ fq = fast_params(*p);
    for (int64_t i = 0; i < n; ++i)
        out[i] = u2f(p->trunc ? quant_fast<true>(x[i], fq) : quant_fast<false>(x[i], fq));
    return 1;
}

// out[b][i][j] *= ca[b][i] * cb[b][j] (float32 multiplies: the product of the scales rounded, then
// the multiply, as torch's out.mul_(ca * cb))
void lmul_scale_outer(float* out, int64_t nb, int64_t M, int64_t N, const float* ca, const float* cb, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t bi = 0; bi < nb * M; ++bi) {
        const float s = ca[bi];
        const float* __restrict c = cb + (bi / M) * N;
        float* __restrict o = out + bi * N;
        for (int64_t j = 0; j < N; ++j) o[j] *= s * c[j];
    }
}

}  // extern "C"
