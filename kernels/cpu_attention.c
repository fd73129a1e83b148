/* One decode step's attention on the CPU, straight from the merged q|k|v projection: rope on q
 * and k, the new token's K and V written into the paged pool, then each query head's softmax
 * attention over its request's keys, read from the pool by slot. fp32 throughout.
 *
 * Why: in torch a layer's decode attention was ~10 ops (rope, split, two pool writes, the KV
 * mirror's two writes, SDPA and reshapes); at 32 requests SDPA alone took ~0.4 ms a layer on
 * the 2-core CPU box, ~3x the time its ~4 MB of K and V take to stream. Here one call per
 * layer reads each key and value once.
 *
 * Rope is the rotate-half form Hugging Face checkpoints use, with the caller's per-token cos and
 * sin (sin's first half negated): x*cos + roll(x, D/2)*sin, multiplied and added separately
 * (no fused multiply-add) like torch's element-wise ops, so q and k are bit for bit torch's.
 * The softmax is online (flash-style) over tiles of keys with an exp accurate to ~1 ulp; only
 * rounding in the sums differs from SDPA.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_vec.h"

#define TILE 32 /* keys scored before their values are summed */
#define MAX_HEADS 128
#define MAX_DIM 256

/* x*cos + roll(x, D/2)*sin over one head, in place; two roundings like torch's mul, mul, add. */
__attribute__((optimize("fp-contract=off"))) static void rope_head(float *x, const float *cos,
                                                                      const float *sin, long D) {
    float tmp[MAX_DIM];
    long half = D / 2;
    for (long d = 0; d < D; d++) {
        float rolled = x[d < half ? d + half : d - half];
        float a = x[d] * cos[d];
        float b = rolled * sin[d];
        tmp[d] = a + b;
    }
    memcpy(x, tmp, (size_t)D * sizeof(float));
}

/* Attention of C query heads (which read the same KV head, at float offset `off` of each slot)
 * over L keys. NV (= D/16) and C are compile-time constants at every call (see HEADS_PASS), so q,
 * the accumulators and a key's vectors live in registers: 2*C*NV + NV of AVX-512's 32. */
static inline __attribute__((always_inline)) void heads_pass(int NV, int C, const float *q,
                                                             const float *k_pool,
                                                             const float *v_pool,
                                                             const int64_t *slots, long L,
                                                             long tok, long off, float scale,
                                                             float *out) {
    f32x16 qv[4][16], acc[4][16];
    float m[4], l[4];
    float sc[4][TILE] __attribute__((aligned(64)));
    for (int h = 0; h < C; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
        for (int i = 0; i < NV; i++) {
            qv[h][i] = load16(q + h * NV * 16 + 16 * i);
            acc[h][i] = splat(0.0f);
        }
    }
    for (long t0 = 0; t0 < L; t0 += TILE) {
        long n = L - t0 < TILE ? L - t0 : TILE;
        for (long j = 0; j < n; j++) {
            const float *kj = k_pool + slots[t0 + j] * tok + off;
            f32x16 kv[16];
            for (int i = 0; i < NV; i++) kv[i] = load16(kj + 16 * i);
            for (int h = 0; h < C; h++) {
                f32x16 s = qv[h][0] * kv[0];
                for (int i = 1; i < NV; i++) s += qv[h][i] * kv[i];
                sc[h][j] = hsum(s) * scale;
            }
        }
        for (int h = 0; h < C; h++) {
            float mt = m[h];
            for (long j = 0; j < n; j++) mt = sc[h][j] > mt ? sc[h][j] : mt;
            float corr = expf(m[h] - mt); /* 0 on the first tile (m = -inf) */
            m[h] = mt;
            for (long j0 = 0; j0 < TILE; j0 += 16) store16(&sc[h][j0], exp16(load16(&sc[h][j0]) - mt));
            for (long j = n; j < TILE; j++) sc[h][j] = 0.0f; /* past the last key */
            float sum = 0.0f;
            for (long j = 0; j < n; j++) sum += sc[h][j];
            l[h] = l[h] * corr + sum;
            for (int i = 0; i < NV; i++) acc[h][i] *= corr;
        }
        for (long j = 0; j < n; j++) {
            const float *vj = v_pool + slots[t0 + j] * tok + off;
            f32x16 vv[16];
            for (int i = 0; i < NV; i++) vv[i] = load16(vj + 16 * i);
            for (int h = 0; h < C; h++) {
                f32x16 p = splat(sc[h][j]);
                for (int i = 0; i < NV; i++) acc[h][i] += p * vv[i];
            }
        }
    }
    for (int h = 0; h < C; h++) {
        f32x16 inv = splat(1.0f / l[h]);
        for (int i = 0; i < NV; i++) store16(out + h * NV * 16 + 16 * i, acc[h][i] * inv);
    }
}

#define PASS(NV, C) heads_pass(NV, C, q, k_pool, v_pool, slots, L, tok, off, scale, o); break;
/* Only the pass sizes heads_per_pass can pick for NV: each one is compiled out in full. */
#define PASSES_4(NV)                                                                           \
    switch (c) {                                                                               \
    case 1: PASS(NV, 1) case 2: PASS(NV, 2) case 3: PASS(NV, 3) default: PASS(NV, 4)          \
    }
#define PASSES_3(NV)                                                                           \
    switch (c) {                                                                               \
    case 1: PASS(NV, 1) case 2: PASS(NV, 2) default: PASS(NV, 3)                              \
    }

/* Query heads a pass keeps in registers with their accumulators. */
static inline int heads_per_pass(long nv) {
    long c = (30 - nv) / (2 * nv);
    return c < 1 ? 1 : c > 4 ? 4 : (int)c;
}

/* One request's new token: rope on its q and k heads (in place), its K and V into the pool. */
static void rope_and_write(float *qkv, const float *cos, const float *sin, float *k_pool,
                           float *v_pool, int64_t slot, long H, long Hkv, long D) {
    long tok = Hkv * D; /* floats per slot and layer */
    float *k = qkv + H * D, *v = k + tok;
    if (cos != NULL) {
        for (long h = 0; h < H + Hkv; h++) rope_head(qkv + h * D, cos, sin, D);
    }
    memcpy(k_pool + slot * tok, k, (size_t)tok * sizeof(float));
    memcpy(v_pool + slot * tok, v, (size_t)tok * sizeof(float));
}

/* Attention of one request's H query heads over its L keys. */
static void attend(const float *qkv, const float *k_pool, const float *v_pool,
                   const int64_t *slots, long L, long H, long Hkv, long D, float scale,
                   float *out) {
    long G = H / Hkv, nv = D / 16, tok = Hkv * D;
    int most = heads_per_pass(nv);
    for (long g = 0; g < Hkv; g++) {
        long off = g * D;
        for (long h0 = g * G; h0 < (g + 1) * G; h0 += most) {
            long c = (g + 1) * G - h0 < most ? (g + 1) * G - h0 : most;
            const float *q = qkv + h0 * D;
            float *o = out + h0 * D;
            switch (nv) {
            case 1: PASSES_4(1) break;
            case 2: PASSES_4(2) break;
            case 4: PASSES_3(4) break;
            case 8: heads_pass(8, 1, q, k_pool, v_pool, slots, L, tok, off, scale, o); break;
            default: heads_pass(16, 1, q, k_pool, v_pool, slots, L, tok, off, scale, o); break;
            }
        }
    }
}

/* B requests, each with one new token: qkv [B, (H + 2 Hkv) D] (q and k roped in place when cos
 * is given), cos/sin [B, D] or NULL, pools [slots, Hkv, D], kv_slots [B, stride] int64 with the
 * slots of positions 0..kv_lens[b]-1 (the new token's last), out [B, H, D]. Returns 0, or -1 for
 * shapes it does not take (the caller falls back). */
int decode_attention(float *qkv, const float *cos, const float *sin, float *k_pool, float *v_pool,
                     const int64_t *kv_slots, long stride, const int64_t *kv_lens, long B, long H,
                     long Hkv, long D, float scale, float *out, int nthreads) {
    long nv = D / 16;
    if (B <= 0 || Hkv <= 0 || H % Hkv || H > MAX_HEADS || D % 16 || D > MAX_DIM ||
        (nv & (nv - 1)) || nthreads < 1)
        return -1; /* D: 16, 32, 64, 128 or 256 */
    for (long b = 0; b < B; b++)
        if (kv_lens[b] < 1 || kv_lens[b] > stride) return -1;
    long row = (H + 2 * Hkv) * D;
    if (nthreads > B) nthreads = (int)B;
    /* Every new K and V is in the pool before any request reads: a draft tree's nodes, verified
     * in one pass, read their ancestors' (other rows of the same pass), as the torch path does. */
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (long b = 0; b < B; b++)
            rope_and_write(qkv + b * row, cos ? cos + b * D : NULL, sin ? sin + b * D : NULL,
                           k_pool, v_pool, kv_slots[b * stride + kv_lens[b] - 1], H, Hkv, D);
#pragma omp for schedule(dynamic, 1)
        for (long b = 0; b < B; b++)
            attend(qkv + b * row, k_pool, v_pool, kv_slots + b * stride, kv_lens[b], H, Hkv, D,
                   scale, out + b * H * D);
    }
    return 0;
}
