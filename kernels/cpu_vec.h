/* Vector helpers the CPU kernels share (GCC/Clang vector extensions; -march=native picks the
 * instructions, AVX-512 where the CPU has it). */
#ifndef LLMCONSOLE_CPU_VEC_H
#define LLMCONSOLE_CPU_VEC_H

#include <stdint.h>
#include <string.h>

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));

static inline f32x16 load16(const float *p) {
    f32x16 v;
    memcpy(&v, p, 64);
    return v;
}

static inline void store16(float *p, f32x16 v) { memcpy(p, &v, 64); }

static inline f32x16 splat(float x) { return (f32x16){0} + x; }

static inline float hsum(f32x16 v) {
    f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* Lanes of `a` where `mask` is set, else of `b` (C has no vector ?:). */
static inline f32x16 select16(i32x16 mask, f32x16 a, f32x16 b) {
    return (f32x16)(((i32x16)a & mask) | ((i32x16)b & ~mask));
}

/* e^x to ~1 ulp: x = n ln2 + r, |r| <= ln2/2, e^r by Cephes' degree-6 polynomial, 2^n put into
 * the exponent bits. x is clamped to [-87.34, 88]: below, e^x < 2^-126 comes out as 2^-126
 * (no softmax or sigmoid of fp32 values tells it from 0); above, e^88 (sigmoid -> 0 anyway). */
static inline f32x16 exp16(f32x16 x) {
    const f32x16 lo = splat(-87.3365447f), hi = splat(88.0f);
    x = select16(x < lo, lo, x);
    x = select16(x > hi, hi, x);
    const f32x16 magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    f32x16 n = (x * 1.44269504088896341f + magic) - magic;
    f32x16 r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    f32x16 p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    f32x16 y = p * (r * r) + r + 1.0f;
    i32x16 e = (__builtin_convertvector(n, i32x16) + 127) << 23;
    return y * (f32x16)e;
}

#endif
