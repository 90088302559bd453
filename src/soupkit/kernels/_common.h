/* Shared by soupkit's kernel modules (one extension module per src/soupkit/kernels/_*.c file):
 * dtype codes, run-time ISA selection, and scalar float conversions that reproduce torch's.
 *
 * Pure C11, no Python and no torch headers. ISA-specific code lives in the modules, in
 * functions marked SOUPKIT_TARGET_AVX2 / SOUPKIT_TARGET_AVX512, and is called only when
 * soupkit_isa_detect() says the CPU has the features (or a test forces a lower level).
 */
#ifndef SOUPKIT_KERNELS_COMMON_H
#define SOUPKIT_KERNELS_COMMON_H

#include <stdint.h>
#include <string.h>

/* dtype codes: the same numbers as soupkit.kernels' Python side */
enum { SK_F32 = 0, SK_BF16 = 1, SK_F16 = 2 };

/* ISA levels, ordered: a level can always run the ones below it */
enum { SK_PORTABLE = 0, SK_AVX2 = 1, SK_AVX512 = 2 };

static const char *const soupkit_isa_names[] = {"portable", "avx2", "avx512"};

/* -DSOUPKIT_NO_SIMD builds the portable path alone, as on a CPU other than x86-64 (a test
 * of that build: tests/kernels/test_build.py) */
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(SOUPKIT_NO_SIMD)
#define SOUPKIT_X86 1
#include <immintrin.h>
/* AVX2 level: AVX2 + FMA + F16C (every AVX2 CPU soupkit meets has all three) */
#define SOUPKIT_TARGET_AVX2 __attribute__((target("avx,avx2,fma,f16c")))
/* AVX-512 level: AVX-512F (+ AVX2/FMA/F16C, which every AVX-512 CPU has) */
#define SOUPKIT_TARGET_AVX512 __attribute__((target("avx,avx2,fma,f16c,avx512f")))
#else
#define SOUPKIT_X86 0
#endif

/* The best level this CPU runs. */
static int soupkit_isa_detect(void) {
#if SOUPKIT_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f"))
        return SK_AVX512;
    if (avx2)
        return SK_AVX2;
#endif
    return SK_PORTABLE;
}

static inline uint32_t sk_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static inline float sk_float(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static inline int sk_isnan(float x) { return (sk_bits(x) & 0x7fffffffu) > 0x7f800000u; }

/* A NaN as x86 arithmetic returns it: the same payload with the quiet bit set. */
static inline float sk_quiet(float x) { return sk_float(sk_bits(x) | 0x00400000u); }

/* bfloat16 -> float32: exact, NaN payloads kept (torch shifts the bits, as here). */
static inline float sk_bf16_to_f32(uint16_t h) { return sk_float((uint32_t)h << 16); }

/* float16 -> float32 as F16C's vcvtph2ps (and torch's vectorised path): exact, a NaN keeps
 * its sign and payload and is quieted. */
static inline float sk_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f)
        return sk_float(sign | 0x7f800000u | (man ? 0x00400000u | (man << 13) : 0));
    if (exp == 0) {
        if (man == 0)
            return sk_float(sign);
        /* subnormal: man * 2^-24, exact in float32 */
        float v = (float)man * sk_float(0x33800000u); /* 2^-24 */
        return sk_float(sign | sk_bits(v));
    }
    return sk_float(sign | ((exp + 112) << 23) | (man << 13));
}

/* float32 -> bfloat16, round to nearest even (torch's rule); a NaN becomes `nan_word`
 * (torch writes 0xFFFF from its AVX2/AVX-512 kernels, 0x7FC0 from its portable one). */
static inline uint16_t sk_f32_to_bf16(float x, uint16_t nan_word) {
    uint32_t u = sk_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return nan_word;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* float32 -> float16 as F16C's vcvtps2ph with round-to-nearest-even (torch's result on every
 * path): overflow to Inf, subnormals rounded, a NaN keeps its sign and its payload's top bits
 * and is quieted. */
static inline uint16_t sk_f32_to_f16(float x) {
    uint32_t u = sk_bits(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) /* >= 65520: rounds to Inf (and Inf itself) */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* below 2^-14: subnormal or zero in float16 */
        if (a < 0x33000000u) /* below 2^-25: rounds to zero (2^-25 itself is a tie to 0) */
            return sign;
        uint32_t e = a >> 23;                 /* 102..112 */
        uint32_t m = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e;             /* 14..24: result = m >> shift, rounded */
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u)))
            r++;
        return (uint16_t)(sign | r);
    }
    /* normal: rebias 127 -> 15 and round the 13 dropped bits to nearest even */
    uint32_t v = a - 0x38000000u; /* exponent - 112 */
    v = v + 0xfffu + ((v >> 13) & 1u);
    return (uint16_t)(sign | (v >> 13));
}

#endif
