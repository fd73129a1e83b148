/* y = x W^T on the CPU, with W held in GGUF's 32-weight blocks (Q4_0, Q4_1, Q8_0) and x, y and
 * every product and sum in fp32.
 *
 * A row of W is K/32 blocks; a block stores an fp16 scale d (Q4_1 also an fp16 offset m) and 32
 * quantized values q. Dequantized: Q4_0 d*(q-8), Q4_1 d*q+m, Q8_0 d*q, in fp32, as gguf's
 * numpy reference does it. d*q has at most 11+8 significant bits, so it is exact in fp32 and a
 * fused d*q+m rounds exactly like gguf's separate multiply and add: the weights this kernel
 * multiplies by are bit for bit the fp32 weights a dequantized checkpoint holds. Only the order
 * of the fp32 sums differs from a BLAS product.
 *
 * Why: a decode step reads every weight once. In blocks the default model's weights are ~5x
 * fewer bytes than in fp32, and at one to a few rows the step is bound by those bytes.
 *
 * Portable C with GCC/Clang vector extensions; built with -O3 -march=native by cpu_blocks.py.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __F16C__
#include <immintrin.h>
#endif

#include "cpu_vec.h"

enum { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };
#define QK 32
/* A tile is MR rows of x by NR rows of W: MR*NR accumulators + 2*NR weight vectors + 2 of x in
 * registers (22 of AVX-512's 32). Measured against 4x4 and 6x3 on the default model's shapes. */
#define NR 2
#define MR 8
#define NC 32 /* rows of W per chunk (16-128 measured alike, 2 ~5% slower at 32 rows) */

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(h); /* one instruction where the CPU has it (x86 since 2012) */
#endif
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        float v = (float)man * 0x1p-24f; /* zero or subnormal: exact */
        memcpy(&bits, &v, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline long block_bytes(int kind) {
    return kind == Q4_0 ? 18 : kind == Q4_1 ? 20 : 34;
}

/* Widen to 32-bit lanes first: a direct 8-bit -> float conversion is scalarised by GCC. */
static inline f32x16 to_float(i32x16 v) { return __builtin_convertvector(v, f32x16); }

/* One block as two 16-wide halves: lo = weights 0..15, hi = weights 16..31. */
static inline __attribute__((always_inline)) void dequant(int kind, const uint8_t *b, f32x16 *lo,
                                                          f32x16 *hi) {
    float d = half_to_float(b);
    if (kind == Q8_0) {
        u8x16 q0, q1; /* int8 as (u8 ^ 0x80) - 128: GCC widens unsigned bytes in vectors */
        memcpy(&q0, b + 2, 16);
        memcpy(&q1, b + 18, 16);
        *lo = to_float(__builtin_convertvector((u8x16)(q0 ^ 0x80), i32x16) - 128) * d;
        *hi = to_float(__builtin_convertvector((u8x16)(q1 ^ 0x80), i32x16) - 128) * d;
        return;
    }
    u8x16 q;
    memcpy(&q, b + (kind == Q4_1 ? 4 : 2), 16);
    f32x16 ql = to_float(__builtin_convertvector((u8x16)(q & 15), i32x16));
    f32x16 qh = to_float(__builtin_convertvector((u8x16)(q >> 4), i32x16));
    if (kind == Q4_1) {
        float m = half_to_float(b + 2);
        *lo = d * ql + m;
        *hi = d * qh + m;
    } else {
        *lo = d * (ql - 8.0f);
        *hi = d * (qh - 8.0f);
    }
}

/* Rows n0..n0+nr of y for x rows m0..m0+mr, dequantizing W's blocks on the fly. */
static inline __attribute__((always_inline)) void tile_direct(int kind, int mr, int nr,
                                                              const float *x, long K,
                                                              const uint8_t *w, long row_bytes,
                                                              float *y, long N, long m0, long n0) {
    f32x16 acc[MR][NR] = {{{0}}};
    long nb = K / QK, bs = block_bytes(kind);
    for (long b = 0; b < nb; b++) {
        f32x16 wl[NR], wh[NR];
#pragma GCC unroll 8
        for (int r = 0; r < nr; r++) dequant(kind, w + (n0 + r) * row_bytes + b * bs, &wl[r], &wh[r]);
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            const float *xi = x + (m0 + i) * K + b * QK;
            f32x16 xl = load16(xi), xh = load16(xi + 16);
#pragma GCC unroll 8
            for (int r = 0; r < nr; r++) {
                acc[i][r] += xl * wl[r]; /* two separate fused multiply-adds */
                acc[i][r] += xh * wh[r];
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int r = 0; r < nr; r++) y[(m0 + i) * N + n0 + r] = hsum(acc[i][r]);
}

#define TILE(KIND, R) tile_direct(KIND, R, NR, x, K, w, row_bytes, y, N, m0, n0); break;
#define DIRECT_CASES(KIND)                                                                     \
    if (nr < NR) {                                                                             \
        tile_direct(KIND, mr, nr, x, K, w, row_bytes, y, N, m0, n0);                           \
    } else {                                                                                   \
        switch (mr) {                                                                          \
        case 1: TILE(KIND, 1) case 2: TILE(KIND, 2) case 3: TILE(KIND, 3)                     \
        case 4: TILE(KIND, 4) case 5: TILE(KIND, 5) case 6: TILE(KIND, 6)                     \
        case 7: TILE(KIND, 7) default: TILE(KIND, 8)                                           \
        }                                                                                      \
    }

/* Output rows begin..end for all of x. Rows of W go in chunks of NC: within a chunk every x tile
 * (MR rows, 18 KB at K=576) is reused from L1 across the chunk's W rows instead of being
 * re-read from L2 for every NR of them. */
static void direct(int kind, const float *x, long M, long K, const uint8_t *w, long row_bytes,
                   long N, float *y, long begin, long end) {
    for (long c0 = begin; c0 < end; c0 += NC) {
        long c1 = c0 + NC < end ? c0 + NC : end;
        for (long m0 = 0; m0 < M; m0 += MR) {
            int mr = M - m0 < MR ? (int)(M - m0) : MR;
            for (long n0 = c0; n0 < c1; n0 += NR) {
                int nr = c1 - n0 < NR ? (int)(c1 - n0) : NR;
                if (kind == Q4_0) { DIRECT_CASES(Q4_0) }
                else if (kind == Q4_1) { DIRECT_CASES(Q4_1) }
                else { DIRECT_CASES(Q8_0) }
            }
        }
    }
}

/* y[M,N] = x[M,K] @ W^T, W given as N rows of K/32 blocks of `kind`, on `nthreads` OpenMP
 * threads (the caller's team: torch's own runtime when loaded into torch's process). Returns 0,
 * or -1 for arguments it refuses. */
int blocks_matmul(int kind, const float *x, long M, long K, const uint8_t *w, long N, float *y,
                  int nthreads) {
    if (kind < Q4_0 || kind > Q8_0 || K <= 0 || K % QK || M <= 0 || N <= 0 || nthreads < 1)
        return -1;
    long row_bytes = (K / QK) * block_bytes(kind);
    /* Split N into per-thread ranges of whole tiles. */
    long unit = NR;
    long units = (N + unit - 1) / unit;
    if (units < nthreads) nthreads = (int)units;
#pragma omp parallel num_threads(nthreads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        long n0 = units * t / nt * unit, n1 = units * (t + 1) / nt * unit;
        if (n1 > N) n1 = N;
        if (n0 < n1) {
            direct(kind, x, M, K, w, row_bytes, N, y, n0, n1);
        }
    }
    return 0;
}

/* Dequantize rows [0, N) to fp32 (tests compare this with gguf's reference). */
int blocks_dequantize(int kind, const uint8_t *w, long N, long K, float *out) {
    if (kind < Q4_0 || kind > Q8_0 || K <= 0 || K % QK || N <= 0) return -1;
    long nb = K / QK, bs = block_bytes(kind);
    for (long n = 0; n < N; n++)
        for (long b = 0; b < nb; b++) {
            f32x16 lo, hi;
            dequant(kind, w + (n * nb + b) * bs, &lo, &hi);
            memcpy(out + n * K + b * QK, &lo, 64);
            memcpy(out + n * K + b * QK + 16, &hi, 64);
        }
    return 0;
}
