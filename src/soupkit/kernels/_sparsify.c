/* soupkit.kernels._sparsify: fused kernels of the sparsifying task-vector methods (TIES,
 * DARE, DELLA, Model Breadcrumbs), bit-identical to their torch references in
 * soupkit.methods._ops (tests/kernels/test_sparsify.py compares them byte for byte).
 *
 * One call = one piece of one tensor on one thread (the GIL is released). Per block of BLK
 * elements: read each model's input and the base in their native dtype, form the float32
 * deltas (x - base), sparsify each model's delta (magnitude cut, band, DARE or DELLA drop,
 * Philox4x32-10 draws computed here), rescale, combine (weighted sum, or TIES' sign election
 * and disjoint merge), scale by lambda and add the base back: the float32 tensor that
 * MethodSpec.call returns. Every float operation is the reference's, in its order, with no
 * contraction (-ffp-contract=off): x * w then + acc, never fma.
 *
 * Also: the magnitude histograms of the radix select (TopKSelect's two passes over the bit
 * patterns of |x - base|), DELLA's per-row keep probabilities (stable magnitude ranks), and
 * the first pass of `rescale: l1` (l1_drop: both L1 norms in the reference's fixed float64
 * order, and the drops recorded as bytes that the fused pass applies instead of drawing again).
 *
 * Pointers arrive as Python ints (tensor.data_ptr()); the Python face (soupkit.kernels.sparsify)
 * checks dtypes, sizes and contiguity before calling.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_common.h"

#define BLK 1024
#define MAX_MODELS 64

/* The block loops are written branch-free so that the compiler vectorises them. Each entry
 * point (gta, count_equal, mag_hist, philox_draws) runs a body compiled three times, for
 * AVX-512, AVX2 and the portable baseline (SK_VARIANTS). The caller names the level as the
 * last argument (soupkit.kernels.isa(): the best this CPU runs, capped by SOUPKIT_KERNELS_ISA),
 * capped here by what the CPU runs. The helpers are always inlined, so each variant vectorises
 * them for its ISA. */
#if defined(__GNUC__)
#define SK_INLINE static inline __attribute__((always_inline))
#else
#define SK_INLINE static inline
#endif

static _Thread_local int g_isa = SK_PORTABLE; /* the level of the call on this thread */
static int g_isa_best = SK_PORTABLE;

static void use_isa(int level) { g_isa = level < g_isa_best ? (level < 0 ? 0 : level) : g_isa_best; }

#if SOUPKIT_X86
#define SK_VARIANTS(ret, name, params, args)                                                   \
    SOUPKIT_TARGET_AVX512 static ret name##_avx512 params { return name##_body args; }          \
    SOUPKIT_TARGET_AVX2 static ret name##_avx2 params { return name##_body args; }              \
    static ret name##_portable params { return name##_body args; }                               \
    static ret name params {                                                                     \
        if (g_isa == SK_AVX512)                                                                  \
            return name##_avx512 args;                                                           \
        if (g_isa == SK_AVX2)                                                                    \
            return name##_avx2 args;                                                             \
        return name##_portable args;                                                             \
    }
#else
#define SK_VARIANTS(ret, name, params, args)                                                   \
    static ret name params { return name##_body args; }
#endif

/* ------------------------------------------------------------------ Philox4x32-10 */

#define PH_M0 0xD2511F53u
#define PH_M1 0xCD9E8D57u
#define PH_W0 0x9E3779B9u
#define PH_W1 0xBB67AE85u

/* Words of counters q0 .. q0 + nq (4 per counter, element order) of one stream. Written as
 * independent lanes so that the compiler vectorises it (vpmuludq). */
SK_INLINE void philox_words(uint64_t q0, size_t nq, uint32_t stream, uint32_t k0, uint32_t k1,
                         uint32_t *out) {
    for (size_t j = 0; j < nq; j++) {
        uint64_t q = q0 + j;
        uint32_t c0 = (uint32_t)q, c1 = (uint32_t)(q >> 32), c2 = stream, c3 = 0;
        uint32_t a0 = k0, a1 = k1;
        for (int r = 0; r < 10; r++) {
            if (r) {
                a0 += PH_W0;
                a1 += PH_W1;
            }
            uint64_t p0 = (uint64_t)PH_M0 * c0;
            uint64_t p1 = (uint64_t)PH_M1 * c2;
            uint32_t y0 = (uint32_t)(p1 >> 32) ^ c1 ^ a0;
            uint32_t y2 = (uint32_t)(p0 >> 32) ^ c3 ^ a1;
            c1 = (uint32_t)p1;
            c3 = (uint32_t)p0;
            c0 = y0;
            c2 = y2;
        }
        out[4 * j] = c0;
        out[4 * j + 1] = c1;
        out[4 * j + 2] = c2;
        out[4 * j + 3] = c3;
    }
}

#if SOUPKIT_X86
/* philox_words with intrinsics, 16 (AVX-512) or 8 (AVX2) counters per vector, one 32-bit lane
 * each: the 32 x 32 -> 64-bit products of the even lanes and of the odd lanes (shifted down)
 * by vpmuludq, their high and low words blended back into place. The four word vectors are
 * transposed into element order by unpacks: 128-bit lane k of u_i holds counter 4k + i's four
 * words. The counters past the last multiple of the width run philox_words. */
SOUPKIT_TARGET_AVX512 static void philox_words_avx512(uint64_t q0, size_t nq, uint32_t stream,
                                                     uint32_t k0, uint32_t k1, uint32_t *out) {
    const __m512i m0 = _mm512_set1_epi64(PH_M0), m1 = _mm512_set1_epi64(PH_M1);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    size_t j = 0;
    for (; j + 16 <= nq; j += 16) {
        uint64_t q = q0 + j;
        /* the low words q + l, l < 16, may carry into the high word within the vector */
        __m512i lo = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)q), iota);
        __mmask16 carry = _mm512_cmplt_epu32_mask(lo, _mm512_set1_epi32((int)(uint32_t)q));
        __m512i c0 = lo;
        __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32((int)(uint32_t)(q >> 32)), carry,
                                           _mm512_set1_epi32((int)(uint32_t)(q >> 32)),
                                           _mm512_set1_epi32(1));
        __m512i c2 = _mm512_set1_epi32((int)stream), c3 = _mm512_setzero_si512();
        uint32_t a0 = k0, a1 = k1;
        for (int r = 0; r < 10; r++) {
            if (r) {
                a0 += PH_W0;
                a1 += PH_W1;
            }
            __m512i pe0 = _mm512_mul_epu32(c0, m0), po0 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
            __m512i pe1 = _mm512_mul_epu32(c2, m1), po1 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
            __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe0, 32), po0);
            __m512i lo0 = _mm512_mask_blend_epi32(0xAAAA, pe0, _mm512_slli_epi64(po0, 32));
            __m512i hi1 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe1, 32), po1);
            __m512i lo1 = _mm512_mask_blend_epi32(0xAAAA, pe1, _mm512_slli_epi64(po1, 32));
            c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32((int)a0));
            c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32((int)a1));
            c1 = lo1;
            c3 = lo0;
        }
        __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
        __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
        __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
        __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
        uint32_t *o = out + 4 * j;
        /* 128-bit lane k of u_i: counter 4k + i. The lane index must be a constant. */
#define PH_STORE512(k)                                                                   \
        _mm_storeu_si128((__m128i *)(o + 16 * (k)), _mm512_extracti32x4_epi32(u0, k));     \
        _mm_storeu_si128((__m128i *)(o + 16 * (k) + 4), _mm512_extracti32x4_epi32(u1, k)); \
        _mm_storeu_si128((__m128i *)(o + 16 * (k) + 8), _mm512_extracti32x4_epi32(u2, k)); \
        _mm_storeu_si128((__m128i *)(o + 16 * (k) + 12), _mm512_extracti32x4_epi32(u3, k));
        PH_STORE512(0)
        PH_STORE512(1)
        PH_STORE512(2)
        PH_STORE512(3)
#undef PH_STORE512
    }
    philox_words(q0 + j, nq - j, stream, k0, k1, out + 4 * j);
}

SOUPKIT_TARGET_AVX2 static void philox_words_avx2(uint64_t q0, size_t nq, uint32_t stream,
                                                 uint32_t k0, uint32_t k1, uint32_t *out) {
    const __m256i m0 = _mm256_set1_epi64x(PH_M0), m1 = _mm256_set1_epi64x(PH_M1);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    size_t j = 0;
    for (; j + 8 <= nq; j += 8) {
        uint64_t q = q0 + j;
        __m256i base = _mm256_set1_epi32((int)(uint32_t)q);
        __m256i lo = _mm256_add_epi32(base, iota);
        /* unsigned lo < base (a carry) as a signed compare of the sign-flipped words */
        __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base, sign), _mm256_xor_si256(lo, sign));
        __m256i c0 = lo;
        __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32((int)(uint32_t)(q >> 32)), carry);
        __m256i c2 = _mm256_set1_epi32((int)stream), c3 = _mm256_setzero_si256();
        uint32_t a0 = k0, a1 = k1;
        for (int r = 0; r < 10; r++) {
            if (r) {
                a0 += PH_W0;
                a1 += PH_W1;
            }
            __m256i pe0 = _mm256_mul_epu32(c0, m0), po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
            __m256i pe1 = _mm256_mul_epu32(c2, m1), po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
            __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
            __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
            __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
            __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)a0));
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)a1));
            c1 = lo1;
            c3 = lo0;
        }
        __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
        __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
        __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
        __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
        uint32_t *o = out + 4 * j;
        _mm256_storeu_si256((__m256i *)o, _mm256_permute2x128_si256(u0, u1, 0x20));
        _mm256_storeu_si256((__m256i *)(o + 8), _mm256_permute2x128_si256(u2, u3, 0x20));
        _mm256_storeu_si256((__m256i *)(o + 16), _mm256_permute2x128_si256(u0, u1, 0x31));
        _mm256_storeu_si256((__m256i *)(o + 24), _mm256_permute2x128_si256(u2, u3, 0x31));
    }
    philox_words(q0 + j, nq - j, stream, k0, k1, out + 4 * j);
}
#endif

/* philox_words on the vector unit of the call's level (g_isa). */
SK_INLINE void philox_words_isa(uint64_t q0, size_t nq, uint32_t stream, uint32_t k0, uint32_t k1,
                             uint32_t *out) {
#if SOUPKIT_X86
    if (g_isa == SK_AVX512) {
        philox_words_avx512(q0, nq, stream, k0, k1, out);
        return;
    }
    if (g_isa == SK_AVX2) {
        philox_words_avx2(q0, nq, stream, k0, k1, out);
        return;
    }
#endif
    philox_words(q0, nq, stream, k0, k1, out);
}

/* The 24-bit draws (word >> 8) of elements e0 .. e0 + n of a stream. */
SK_INLINE void draws24(uint64_t key, uint64_t e0, size_t n, uint32_t stream, uint32_t *out,
                    uint32_t *scratch /* n + 8 words */) {
    uint64_t q0 = e0 >> 2;
    uint64_t q1 = (e0 + n + 3) >> 2;
    philox_words_isa(q0, (size_t)(q1 - q0), stream, (uint32_t)key, (uint32_t)(key >> 32), scratch);
    size_t skip = (size_t)(e0 & 3);
    for (size_t j = 0; j < n; j++)
        out[j] = scratch[skip + j] >> 8;
}

/* ------------------------------------------------------------------ torch's add and sub */

/* torch's add_(a, b) / sub_(a, b) run as fmadd(b, +-alpha, a) in its vectorised CPU kernels:
 * the same value as a + b (b * 1 is exact, one rounding), but where both are NaN the result
 * is b's NaN (quieted), not a's as an SSE add gives. */
SK_INLINE float t_add(float a, float b) { return sk_isnan(b) ? sk_quiet(b) : a + b; }
SK_INLINE float t_sub(float a, float b) { return sk_isnan(b) ? sk_quiet(b) : a - b; }

/* ------------------------------------------------------------------ inputs */

/* torch converts float16 to float32 in runs of a calibrated block (soupkit.kernels'
 * _Calibration); the elements of a piece from `f16_tail` on take another path, where a NaN
 * becomes the word `f16_tail_nan`. */
typedef struct {
    int64_t f16_tail;
    uint32_t f16_tail_nan;
} conv_t;

SK_INLINE void to_f32(const conv_t *cv, const void *src, int dtype, size_t off, size_t n,
                   float *dst) {
    if (dtype == SK_F32) {
        memcpy(dst, (const float *)src + off, n * sizeof(float));
    } else if (dtype == SK_BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (size_t j = 0; j < n; j++)
            dst[j] = sk_bf16_to_f32(s[j]);
    } else {
        const uint16_t *s = (const uint16_t *)src + off;
        for (size_t j = 0; j < n; j++) {
            uint16_t h = s[j];
            if ((int64_t)(off + j) >= cv->f16_tail && (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu))
                dst[j] = sk_float(cv->f16_tail_nan);
            else
                dst[j] = sk_f16_to_f32(h);
        }
    }
}

/* deltas: d = x - base (float32; torch's t.sub_(base)) */
SK_INLINE void deltas(const conv_t *cv, const void *x, int xdt, const float *base, size_t off,
                   size_t n, float *d) {
    to_f32(cv, x, xdt, off, n, d);
    for (size_t j = 0; j < n; j++)
        d[j] = t_sub(d[j], base[j]);
}

/* ------------------------------------------------------------------ per-model sparsify */

enum { SP_NONE = 0, SP_CUT = 1, SP_BAND = 2, SP_DARE = 3, SP_DELLA = 4, SP_MASK = 5 };
enum { RS_NONE = 0, RS_DIV = 1, RS_PROB = 2, RS_MUL = 3 };

/* A magnitude cut as soupkit.methods._ops.cut_mask applies it: keep |d| > t, NaN unless the
 * cut keeps nothing (ties 0 at +Inf), and the entries equal to t: all (ties < 0: None) or the
 * first `ties` of them in flat order (a running count across blocks and calls). */
typedef struct {
    float t;
    int64_t ties;  /* < 0: None (keep every tie); else the quota left */
    int keep_nan;
    int64_t used;  /* ties consumed by this call */
} cut_t;

SK_INLINE uint32_t mag_bits(float x) { return sk_bits(x) & 0x7fffffffu; }

/* keep[j] (all ones / zero) of a block under cut c: branch-free for every entry, then, in the
 * one block where the tie quota runs out, a scalar pass for the entries equal to t. */
SK_INLINE void cut_block(cut_t *c, const float *d, size_t n, uint32_t *keep) {
    const float t = c->t;
    const uint32_t nan_keep = c->keep_nan ? 0xffffffffu : 0;
    int ties_all = c->ties < 0;
    size_t eq = 0;
    if (!ties_all && c->used < c->ties) {
        for (size_t j = 0; j < n; j++)
            eq += sk_float(mag_bits(d[j])) == t;
        if (c->used + (int64_t)eq <= c->ties) { /* every tie of this block survives */
            ties_all = 1;
            c->used += (int64_t)eq;
        }
    }
    const uint32_t tie_keep = ties_all ? 0xffffffffu : 0;
    for (size_t j = 0; j < n; j++) {
        uint32_t mb = mag_bits(d[j]);
        float mag = sk_float(mb);
        uint32_t gt = mag > t ? 0xffffffffu : 0;
        uint32_t isn = mb > 0x7f800000u ? nan_keep : 0;
        uint32_t eqk = mag == t ? tie_keep : 0;
        keep[j] = gt | isn | eqk;
    }
    if (!ties_all && c->used < c->ties) { /* the boundary block: the first ties survive */
        for (size_t j = 0; j < n && c->used < c->ties; j++) {
            if (sk_float(mag_bits(d[j])) == t) {
                keep[j] = 0xffffffffu;
                c->used++;
            }
        }
    }
}

typedef struct {
    int kind;
    int rescale;
    float div;       /* RS_DIV: survivors / div; RS_MUL: survivors * div (an L1 factor) */
    cut_t cut, low;  /* SP_CUT: cut; SP_BAND: keep cut and not low (when has_low) */
    int has_low;
    uint32_t thresh; /* SP_DARE: keep when draw < thresh */
    const float *probs; /* SP_DELLA: keep probabilities (whole piece) */
    const uint8_t *mask; /* SP_MASK: keep flags 0 / 1 (whole piece), from l1_drop */
} sparsify_t;

/* where(keep, d, +0.0): the bits of d AND the mask (torch's masked_fill(~keep, 0.0)) */
SK_INLINE void apply_keep(float *d, const uint32_t *keep, size_t n) {
    for (size_t j = 0; j < n; j++)
        d[j] = sk_float(sk_bits(d[j]) & keep[j]);
}

/* d[0..n) of one model at piece offset `off`; draws for DARE / DELLA in `u`, masks in `k1`,
 * `k2` */
SK_INLINE void sparsify(sparsify_t *s, float *d, size_t n, size_t off, uint64_t key,
                            uint64_t e0, uint32_t stream, uint32_t *u, uint32_t *scratch,
                            uint32_t *k1, uint32_t *k2) {
    switch (s->kind) {
    case SP_CUT:
        cut_block(&s->cut, d, n, k1);
        apply_keep(d, k1, n);
        break;
    case SP_BAND:
        cut_block(&s->cut, d, n, k1);
        if (s->has_low) {
            cut_block(&s->low, d, n, k2);
            for (size_t j = 0; j < n; j++)
                k1[j] &= ~k2[j];
        }
        apply_keep(d, k1, n);
        break;
    case SP_DARE: {
        const uint32_t th = s->thresh;
        draws24(key, e0 + off, n, stream, u, scratch);
        for (size_t j = 0; j < n; j++)
            k1[j] = u[j] < th ? 0xffffffffu : 0;
        apply_keep(d, k1, n);
        break;
    }
    case SP_DELLA: {
        const float *pr = s->probs + off;
        draws24(key, e0 + off, n, stream, u, scratch);
        for (size_t j = 0; j < n; j++) {
            float v = (float)(int32_t)u[j] * 0x1p-24f; /* exact: 24 bits */
            k1[j] = v < pr[j] ? 0xffffffffu : 0;
        }
        apply_keep(d, k1, n);
        break;
    }
    case SP_MASK: { /* the drops l1_drop made (and recorded) for the L1 rescale's sums */
        const uint8_t *mk = s->mask + off;
        for (size_t j = 0; j < n; j++)
            k1[j] = 0u - (uint32_t)mk[j];
        apply_keep(d, k1, n);
        break;
    }
    default:
        break;
    }
    if (s->rescale == RS_DIV) {
        const float dv = s->div;
        for (size_t j = 0; j < n; j++)
            d[j] = d[j] / dv;
    } else if (s->rescale == RS_PROB) {
        const float *pr = s->probs + off;
        for (size_t j = 0; j < n; j++)
            d[j] = d[j] / pr[j];
    } else if (s->rescale == RS_MUL) { /* masked * scale; a NaN scale is left to torch */
        const float sc = s->div;
        for (size_t j = 0; j < n; j++)
            d[j] = d[j] * sc;
    }
}

/* ------------------------------------------------------------------ combine */

enum { CB_LINEAR = 0, CB_CONSENSUS = 1 };
enum { SS_UNWEIGHTED = 0, SS_WEIGHTED = 1, SS_COUNT = 2 };
enum { TIE_ZERO = 0, TIE_POSITIVE = 1 };
enum { AG_MEAN = 0, AG_WEIGHTED_MEAN = 1, AG_SUM = 2 };

typedef struct {
    int combine, sign_source, sign_tie, aggregation, normalize, has_lam;
    float divisor; /* linear with normalize: the summed weights, as torch sums them */
    float lam;
    float w[MAX_MODELS];
} combine_t;

SK_INLINE float torch_sign(float x) {
    /* torch.sign: +1, -1, 0 for zeros and NaN (branch-free: it vectorises) */
    return (float)((x > 0.0f) - (x < 0.0f));
}

/* merged delta of one block into out (d[i] are the sparsified deltas, overwritten) */
SK_INLINE void combine(const combine_t *c, int m, float **d, size_t n, float *out,
                           float *tot, float *div) {
    if (c->combine == CB_LINEAR) {
        const float w0 = c->w[0];
        for (size_t j = 0; j < n; j++)
            out[j] = d[0][j] * w0;
        for (int i = 1; i < m; i++) {
            const float w = c->w[i];
            const float *di = d[i];
            for (size_t j = 0; j < n; j++)
                out[j] = t_add(out[j], di[j] * w);
        }
        if (c->normalize) {
            const float dv = c->divisor;
            for (size_t j = 0; j < n; j++)
                out[j] = out[j] / dv;
        }
    } else {
        /* signed_i: the weighted deltas (weighted) or the deltas; products_i: w_i * delta_i,
         * which are the signed ones when weighted. A weight of 1 is the delta itself. */
        if (c->sign_source == SS_WEIGHTED)
            for (int i = 0; i < m; i++)
                if (c->w[i] != 1.0f) {
                    const float w = c->w[i];
                    float *di = d[i];
                    for (size_t j = 0; j < n; j++)
                        di[j] = di[j] * w;
                }
        if (c->sign_source == SS_COUNT) {
            for (size_t j = 0; j < n; j++)
                tot[j] = torch_sign(d[0][j]);
            for (int i = 1; i < m; i++) {
                const float *di = d[i];
                for (size_t j = 0; j < n; j++)
                    tot[j] = tot[j] + torch_sign(di[j]);
            }
        } else {
            if (m > 1) {
                const float *d0 = d[0], *d1 = d[1];
                for (size_t j = 0; j < n; j++)
                    tot[j] = t_add(d0[j], d1[j]);
            } else {
                memcpy(tot, d[0], n * sizeof(float));
            }
            for (int i = 2; i < m; i++) {
                const float *di = d[i];
                for (size_t j = 0; j < n; j++)
                    tot[j] = t_add(tot[j], di[j]);
            }
        }
        if (c->sign_tie == TIE_POSITIVE)
            for (size_t j = 0; j < n; j++)
                tot[j] = (float)(2 * (tot[j] >= 0.0f) - 1);
        else
            for (size_t j = 0; j < n; j++)
                tot[j] = torch_sign(tot[j]);
        memset(out, 0, n * sizeof(float));
        memset(div, 0, n * sizeof(float));
        for (int i = 0; i < m; i++) {
            const float w = c->w[i];
            const float *si = d[i];
            /* products: the signed tensor itself when weighted (or w == 1), else s * w */
            const float pw = (c->sign_source != SS_WEIGHTED) ? w : 1.0f;
            const int scale = pw != 1.0f;
            for (size_t j = 0; j < n; j++) {
                float s = si[j];
                float agree = (float)(torch_sign(s) == tot[j]);
                float prod = scale ? s * pw : s;
                out[j] = t_add(out[j], prod * agree);
            }
            if (c->aggregation == AG_MEAN) {
                for (size_t j = 0; j < n; j++)
                    div[j] = div[j] + (float)(torch_sign(si[j]) == tot[j]);
            } else if (c->aggregation == AG_WEIGHTED_MEAN) {
                for (size_t j = 0; j < n; j++)
                    div[j] = div[j] + (float)(torch_sign(si[j]) == tot[j]) * w;
            }
        }
        if (c->aggregation == AG_MEAN) {
            for (size_t j = 0; j < n; j++) {
                float v = div[j];
                v = v < 1.0f ? 1.0f : v; /* clamp_(min=1): never NaN here */
                out[j] = out[j] / v;
            }
        } else if (c->aggregation == AG_WEIGHTED_MEAN) {
            for (size_t j = 0; j < n; j++) {
                float v = div[j];
                v = v + (v == 0.0f ? 1.0f : 0.0f);
                out[j] = out[j] / v;
            }
        }
    }
    if (c->has_lam) {
        const float lam = c->lam;
        for (size_t j = 0; j < n; j++)
            out[j] = out[j] * lam;
    }
}

/* ------------------------------------------------------------------ argument helpers */

static int get_ptrs(PyObject *seq, int m, uintptr_t *out, const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (!fast)
        return -1;
    if (PySequence_Fast_GET_SIZE(fast) != m) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%s: expected %d entries", what, m);
        return -1;
    }
    for (int i = 0; i < m; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        out[i] = (uintptr_t)v;
    }
    Py_DECREF(fast);
    return 0;
}

/* The blocks of one gta call. */
SK_INLINE int gta_blocks_body(const conv_t *cv, int m, const void *const *xs,
                              const uintptr_t *dts, const void *base, int base_dt, size_t n,
                              float *out, uint64_t key, uint64_t e0, sparsify_t *sp,
                              const combine_t *cb, float **d, float *basebuf, float *outb,
                              float *tot, float *divb, uint32_t *u, uint32_t *scratch,
                              uint32_t *k1, uint32_t *k2) {
    for (size_t a = 0; a < n; a += BLK) {
        size_t len = n - a < BLK ? n - a : BLK;
        to_f32(cv, base, base_dt, a, len, basebuf);
        for (int i = 0; i < m; i++) {
            deltas(cv, xs[i], (int)dts[i], basebuf, a, len, d[i]);
            sparsify(&sp[i], d[i], len, a, key, e0, (uint32_t)i, u, scratch, k1, k2);
        }
        combine(cb, m, d, len, outb, tot, divb);
        for (size_t j = 0; j < len; j++)
            out[a + j] = t_add(outb[j], basebuf[j]);
    }
    return 0;
}

SK_VARIANTS(int, gta_blocks,
            (const conv_t *cv, int m, const void *const *xs, const uintptr_t *dts,
             const void *base, int base_dt, size_t n, float *out, uint64_t key, uint64_t e0,
             sparsify_t *sp, const combine_t *cb, float **d, float *basebuf, float *outb,
             float *tot, float *divb, uint32_t *u, uint32_t *scratch, uint32_t *k1,
             uint32_t *k2),
            (cv, m, xs, dts, base, base_dt, n, out, key, e0, sp, cb, d, basebuf, outb, tot, divb,
             u, scratch, k1, k2))

/* gta(xs, dtypes, base, base_dtype, n, out, key, offset, specs, combine_spec) -> used ties
 *
 * specs: one tuple per model (kind, rescale, div, t, ties, keep_nan, has_low, t_low, ties_low,
 *        keep_nan_low, thresh, probs_ptr)
 * combine_spec: (combine, sign_source, sign_tie, aggregation, normalize, divisor, has_lam,
 *        lam, weights)
 * Returns a list of (ties used by the cut, ties used by the low cut) per model. */
static PyObject *py_gta(PyObject *self, PyObject *args) {
    PyObject *xs_o, *dt_o, *specs_o, *comb_o;
    unsigned long long base_p, out_p, key, e0;
    int base_dt;
    Py_ssize_t n;
    conv_t cv;
    unsigned int tail_nan;
    int isa;
    if (!PyArg_ParseTuple(args, "OOKinKKKOOLIi", &xs_o, &dt_o, &base_p, &base_dt, &n, &out_p,
                          &key, &e0, &specs_o, &comb_o, &cv.f16_tail, &tail_nan, &isa))
        return NULL;
    cv.f16_tail_nan = tail_nan;
    Py_ssize_t m = PySequence_Size(xs_o);
    if (m < 1 || m > MAX_MODELS) {
        PyErr_Format(PyExc_ValueError, "gta: 1 to %d models, got %zd", MAX_MODELS, m);
        return NULL;
    }
    uintptr_t xs[MAX_MODELS], dts[MAX_MODELS];
    if (get_ptrs(xs_o, (int)m, xs, "xs") || get_ptrs(dt_o, (int)m, dts, "dtypes"))
        return NULL;
    int bad = n < 0 || base_dt < 0 || base_dt > SK_F16 || (n > 0 && (!base_p || !out_p));
    for (Py_ssize_t i = 0; i < m; i++)
        bad |= dts[i] > SK_F16 || (n > 0 && !xs[i]);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "gta: null address, negative size or unknown dtype");
        return NULL;
    }
    sparsify_t sp[MAX_MODELS];
    memset(sp, 0, sizeof(sp));
    PyObject *sfast = PySequence_Fast(specs_o, "specs");
    if (!sfast)
        return NULL;
    if (PySequence_Fast_GET_SIZE(sfast) != m) {
        Py_DECREF(sfast);
        PyErr_SetString(PyExc_ValueError, "gta: one spec per model");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        sparsify_t *s = &sp[i];
        double div;
        long long ties, tiesl;
        unsigned long long probs;
        unsigned int thresh;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sfast, i), "iidfLiifLiIK", &s->kind,
                              &s->rescale, &div, &s->cut.t, &ties, &s->cut.keep_nan,
                              &s->has_low, &s->low.t, &tiesl, &s->low.keep_nan, &thresh,
                              &probs)) {
            Py_DECREF(sfast);
            return NULL;
        }
        if (s->kind < SP_NONE || s->kind > SP_MASK || s->rescale < RS_NONE ||
            s->rescale > RS_MUL ||
            (n > 0 && (s->kind >= SP_DELLA || s->rescale == RS_PROB) && !probs) ||
            (s->kind == SP_MASK && s->rescale == RS_PROB)) {
            Py_DECREF(sfast);
            PyErr_SetString(PyExc_ValueError, "gta: malformed sparsify spec");
            return NULL;
        }
        s->div = (float)div;
        s->cut.ties = ties;
        s->low.ties = tiesl;
        s->thresh = thresh;
        if (s->kind == SP_MASK) /* the last field is the mask's address */
            s->mask = (const uint8_t *)(uintptr_t)probs;
        else
            s->probs = (const float *)(uintptr_t)probs;
    }
    Py_DECREF(sfast);
    combine_t cb;
    memset(&cb, 0, sizeof(cb));
    PyObject *w_o;
    if (!PyArg_ParseTuple(comb_o, "iiiiififO", &cb.combine, &cb.sign_source, &cb.sign_tie,
                          &cb.aggregation, &cb.normalize, &cb.divisor, &cb.has_lam, &cb.lam,
                          &w_o))
        return NULL;
    if (cb.combine < CB_LINEAR || cb.combine > CB_CONSENSUS || cb.sign_source < 0 ||
        cb.sign_source > SS_COUNT || cb.sign_tie < 0 || cb.sign_tie > TIE_POSITIVE ||
        cb.aggregation < 0 || cb.aggregation > AG_SUM) {
        PyErr_SetString(PyExc_ValueError, "gta: malformed combine spec");
        return NULL;
    }
    PyObject *wf = PySequence_Fast(w_o, "weights");
    if (!wf)
        return NULL;
    if (PySequence_Fast_GET_SIZE(wf) != m) {
        Py_DECREF(wf);
        PyErr_SetString(PyExc_ValueError, "gta: one weight per model");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        cb.w[i] = (float)PyFloat_AsDouble(PySequence_Fast_GET_ITEM(wf, i));
    }
    Py_DECREF(wf);
    if (PyErr_Occurred())
        return NULL;

    size_t blk = BLK;
    float *mem = (float *)malloc(sizeof(float) * blk * (size_t)(m + 4) +
                                 sizeof(uint32_t) * (4 * blk + 16));
    if (!mem)
        return PyErr_NoMemory();
    float *basebuf = mem;
    float *outb = basebuf + blk;
    float *tot = outb + blk;
    float *divb = tot + blk;
    float *dbuf = divb + blk;
    uint32_t *u = (uint32_t *)(dbuf + blk * (size_t)m);
    uint32_t *k1 = u + blk;
    uint32_t *k2 = k1 + blk;
    uint32_t *scratch = k2 + blk;
    float *d[MAX_MODELS];
    for (Py_ssize_t i = 0; i < m; i++)
        d[i] = dbuf + blk * (size_t)i;
    float *out = (float *)(uintptr_t)out_p;
    const void *base = (const void *)(uintptr_t)base_p;

    Py_BEGIN_ALLOW_THREADS
    use_isa(isa);
    gta_blocks(&cv, (int)m, (const void *const *)xs, dts, base, base_dt, (size_t)n, out, key, e0,
               sp, &cb, d, basebuf, outb, tot, divb, u, scratch, k1, k2);
    Py_END_ALLOW_THREADS
    free(mem);

    PyObject *res = PyList_New(m);
    if (!res)
        return NULL;
    for (Py_ssize_t i = 0; i < m; i++)
        PyList_SET_ITEM(res, i, Py_BuildValue("(LL)", (long long)sp[i].cut.used,
                                              (long long)sp[i].low.used));
    return res;
}

SK_INLINE long long count_equal_blocks_body(const conv_t *cv, const void *x, int xdt,
                                            const void *base, int bdt, size_t n, float t) {
    long long count = 0;
    float b[BLK], d[BLK];
    for (size_t a = 0; a < n; a += BLK) {
        size_t len = n - a < BLK ? n - a : BLK;
        to_f32(cv, base, bdt, a, len, b);
        deltas(cv, x, xdt, b, a, len, d);
        for (size_t j = 0; j < len; j++)
            count += sk_float(mag_bits(d[j])) == t;
    }
    return count;
}

SK_VARIANTS(long long, count_equal_blocks,
            (const conv_t *cv, const void *x, int xdt, const void *base, int bdt, size_t n,
             float t),
            (cv, x, xdt, base, bdt, n, t))

/* The L1 norms of mergekit's rescale, in a fixed order that does not depend on the vector
 * width, the thread count or how a caller splits its work (soupkit.methods._ops.l1_norm is the
 * torch reference): the magnitudes as float64, in rows of 8 (element j of the call in row
 * j / 8, lane j % 8; the last row padded with zeros), the rows summed pairwise as a tree over
 * a power-of-two number of rows (zero rows pad it; x + 0 is exact), then the 8 lanes as
 * ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). The tree is built as the rows stream in:
 * a binary counter whose level k holds the sum of the last complete run of 2^k rows. */
#define L1_LANES 8
#define L1_LEVELS 58

typedef struct {
    double level[L1_LEVELS][L1_LANES];
    uint64_t rows;
} l1_tree;

/* a complete run of 2^k0 rows (its tree's sum in `sum`) when t->rows is a multiple of 2^k0:
 * carried up the counter as its 2^k0 rows pushed one at a time would be */
SK_INLINE void l1_push(l1_tree *t, double *sum, int k0) {
    uint64_t i = t->rows >> k0;
    int k = k0;
    for (; i & 1u; i >>= 1, k++)
        for (int l = 0; l < L1_LANES; l++)
            sum[l] = t->level[k][l] + sum[l];
    memcpy(t->level[k], sum, sizeof(double) * L1_LANES);
    t->rows += (uint64_t)1 << k0;
}

#define L1_BLK_ROWS (BLK / L1_LANES)
#define L1_BLK_LOG 7 /* 2^7 = BLK / L1_LANES rows */
_Static_assert(L1_BLK_ROWS == 1 << L1_BLK_LOG, "a block is a complete subtree of rows");

/* the magnitudes of v[0..n) as the next rows: a whole block (n == BLK, which calls give only
 * at a multiple of BLK) reduced as one complete subtree, in place, level by level; a partial
 * block (only at the end of a call) a row at a time, its last row padded with zeros */
SK_INLINE void l1_rows(l1_tree *t, const float *v, size_t n, double *buf /* BLK */) {
    if (n == BLK) {
        for (size_t j = 0; j < BLK; j++)
            buf[j] = (double)sk_float(mag_bits(v[j]));
        for (size_t size = L1_BLK_ROWS / 2; size >= 1; size /= 2)
            for (size_t i = 0; i < size; i++)
                for (int l = 0; l < L1_LANES; l++)
                    buf[i * L1_LANES + l] = buf[2 * i * L1_LANES + l] + buf[(2 * i + 1) * L1_LANES + l];
        l1_push(t, buf, L1_BLK_LOG);
        return;
    }
    double row[L1_LANES];
    for (size_t j = 0; j < n; j += L1_LANES) {
        size_t m = n - j < L1_LANES ? n - j : L1_LANES;
        for (size_t l = 0; l < L1_LANES; l++)
            row[l] = l < m ? (double)sk_float(mag_bits(v[j + l])) : 0.0;
        l1_push(t, row, 0);
    }
}

/* the padded tree: the complete runs (set bits of rows), each added to the right of the ones
 * before it, from the smallest: S1 + (S2 + (... + Sk)); then the lanes */
SK_INLINE double l1_total(const l1_tree *t) {
    double acc[L1_LANES] = {0};
    int first = 1;
    for (int k = 0; k < L1_LEVELS; k++) {
        if (!((t->rows >> k) & 1u))
            continue;
        for (int l = 0; l < L1_LANES; l++)
            acc[l] = first ? t->level[k][l] : t->level[k][l] + acc[l];
        first = 0;
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* One model's DARE / DELLA drop (no rescale) over the call: the L1 norms of its delta and of
 * the dropped delta (sums[0], sums[1]), and the keep flag of every element (0 / 1 in mask),
 * which gta's SP_MASK then applies instead of drawing again. Nothing float32 is stored. */
SK_INLINE int l1_drop_blocks_body(const conv_t *cv, const void *x, int xdt, const void *base,
                                  int bdt, size_t n, sparsify_t *sp, uint64_t key, uint64_t e0,
                                  uint32_t stream, uint8_t *mask, double *sums, float *b,
                                  float *d, float *dd, uint32_t *u, uint32_t *scratch,
                                  uint32_t *k1, uint32_t *k2) {
    l1_tree before, after; /* 3.7 KB each */
    double rowbuf[BLK];
    before.rows = after.rows = 0;
    for (size_t a = 0; a < n; a += BLK) { /* BLK is a multiple of L1_LANES */
        size_t len = n - a < BLK ? n - a : BLK;
        to_f32(cv, base, bdt, a, len, b);
        deltas(cv, x, xdt, b, a, len, d);
        l1_rows(&before, d, len, rowbuf);
        memcpy(dd, d, len * sizeof(float));
        sparsify(sp, dd, len, a, key, e0, stream, u, scratch, k1, k2);
        for (size_t j = 0; j < len; j++)
            mask[a + j] = (uint8_t)(k1[j] & 1u);
        l1_rows(&after, dd, len, rowbuf);
    }
    sums[0] = l1_total(&before);
    sums[1] = l1_total(&after);
    return 0;
}

SK_VARIANTS(int, l1_drop_blocks,
            (const conv_t *cv, const void *x, int xdt, const void *base, int bdt, size_t n,
             sparsify_t *sp, uint64_t key, uint64_t e0, uint32_t stream, uint8_t *mask,
             double *sums, float *b, float *d, float *dd, uint32_t *u, uint32_t *scratch,
             uint32_t *k1, uint32_t *k2),
            (cv, x, xdt, base, bdt, n, sp, key, e0, stream, mask, sums, b, d, dd, u, scratch, k1,
             k2))

/* l1_drop(x, dtype, base, base_dtype, n, spec, key, offset, stream, mask, f16_tail,
 *         f16_tail_nan, isa) -> (L1 norm of the delta, L1 norm of the dropped delta), as
 * float64: one model's DARE / DELLA drop (spec as in gta, kind SP_DARE or SP_DELLA, no
 * rescale), its keep flags written to the uint8 array `mask` (n bytes). */
static PyObject *py_l1_drop(PyObject *self, PyObject *args) {
    unsigned long long xp, bp, key, e0, mp;
    int xdt, bdt, isa;
    Py_ssize_t n;
    unsigned int stream, tail_nan;
    PyObject *spec_o;
    conv_t cv;
    if (!PyArg_ParseTuple(args, "KiKinOKKIKLIi", &xp, &xdt, &bp, &bdt, &n, &spec_o, &key, &e0,
                          &stream, &mp, &cv.f16_tail, &tail_nan, &isa))
        return NULL;
    cv.f16_tail_nan = tail_nan;
    sparsify_t sp;
    memset(&sp, 0, sizeof(sp));
    double div;
    long long ties, tiesl;
    unsigned long long probs;
    unsigned int thresh;
    if (!PyArg_ParseTuple(spec_o, "iidfLiifLiIK", &sp.kind, &sp.rescale, &div, &sp.cut.t, &ties,
                          &sp.cut.keep_nan, &sp.has_low, &sp.low.t, &tiesl, &sp.low.keep_nan,
                          &thresh, &probs))
        return NULL;
    if (n < 0 || (sp.kind != SP_DARE && sp.kind != SP_DELLA) || sp.rescale != RS_NONE ||
        (n > 0 && (!xp || !bp || !mp || (sp.kind == SP_DELLA && !probs))) || xdt < 0 ||
        xdt > SK_F16 || bdt < 0 || bdt > SK_F16) {
        PyErr_SetString(PyExc_ValueError, "l1_drop: malformed arguments");
        return NULL;
    }
    sp.div = (float)div;
    sp.thresh = thresh;
    sp.probs = (const float *)(uintptr_t)probs;
    float *fmem = (float *)malloc(sizeof(float) * 3 * BLK + sizeof(uint32_t) * (4 * BLK + 16));
    if (!fmem)
        return PyErr_NoMemory();
    uint32_t *mem = (uint32_t *)(fmem + 3 * BLK);
    double sums[2];
    Py_BEGIN_ALLOW_THREADS
    use_isa(isa);
    l1_drop_blocks(&cv, (const void *)(uintptr_t)xp, xdt, (const void *)(uintptr_t)bp, bdt,
                   (size_t)n, &sp, key, e0, stream, (uint8_t *)(uintptr_t)mp, sums, fmem,
                   fmem + BLK, fmem + 2 * BLK, mem, mem + 3 * BLK, mem + BLK, mem + 2 * BLK);
    Py_END_ALLOW_THREADS
    free(fmem);
    return Py_BuildValue("(dd)", sums[0], sums[1]);
}

/* count_equal(x, dtype, base, base_dtype, n, t) -> entries with |x - base| == t */
static PyObject *py_count_equal(PyObject *self, PyObject *args) {
    unsigned long long xp, bp;
    int xdt, bdt;
    Py_ssize_t n;
    float t;
    conv_t cv;
    unsigned int tail_nan;
    int isa;
    if (!PyArg_ParseTuple(args, "KiKinfLIi", &xp, &xdt, &bp, &bdt, &n, &t, &cv.f16_tail,
                          &tail_nan, &isa))
        return NULL;
    cv.f16_tail_nan = tail_nan;
    long long count;
    Py_BEGIN_ALLOW_THREADS
    use_isa(isa);
    count = count_equal_blocks(&cv, (const void *)(uintptr_t)xp, xdt, (const void *)(uintptr_t)bp,
                               bdt, (size_t)n, t);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(count);
}

SK_INLINE int mag_hist_blocks_body(const conv_t *cv, const void *x, int xdt,
                                   const void *base, int bdt, size_t n, int64_t *hist,
                                   long bucket) {
    float b[BLK], d[BLK];
    for (size_t a = 0; a < n; a += BLK) {
        size_t len = n - a < BLK ? n - a : BLK;
        to_f32(cv, base, bdt, a, len, b);
        deltas(cv, x, xdt, b, a, len, d);
        if (bucket < 0) {
            for (size_t j = 0; j < len; j++)
                hist[mag_bits(d[j]) >> 16]++;
        } else {
            for (size_t j = 0; j < len; j++) {
                uint32_t bits = mag_bits(d[j]);
                if ((long)(bits >> 16) == bucket)
                    hist[bits & 0xffffu]++;
            }
        }
    }
    return 0;
}

SK_VARIANTS(int, mag_hist_blocks,
            (const conv_t *cv, const void *x, int xdt, const void *base, int bdt, size_t n,
             int64_t *hist, long bucket),
            (cv, x, xdt, base, bdt, n, hist, bucket))

/* mag_hist(x, dtype, base, base_dtype, n, hist, bucket): bit patterns of |x - base| counted
 * into int64 hist: bucket < 0: by their top 16 bits (32768 bins); else the low 16 bits of
 * the patterns whose top 16 bits are `bucket` (65536 bins). */
static PyObject *py_mag_hist(PyObject *self, PyObject *args) {
    unsigned long long xp, bp, hp;
    int xdt, bdt;
    Py_ssize_t n;
    long bucket;
    conv_t cv;
    unsigned int tail_nan;
    int isa;
    if (!PyArg_ParseTuple(args, "KiKinKlLIi", &xp, &xdt, &bp, &bdt, &n, &hp, &bucket,
                          &cv.f16_tail, &tail_nan, &isa))
        return NULL;
    cv.f16_tail_nan = tail_nan;
    int64_t *hist = (int64_t *)(uintptr_t)hp;
    Py_BEGIN_ALLOW_THREADS
    use_isa(isa);
    mag_hist_blocks(&cv, (const void *)(uintptr_t)xp, xdt, (const void *)(uintptr_t)bp, bdt,
                    (size_t)n, hist, bucket);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* della_probs(x, dtype, base, base_dtype, rows, cols, density, epsilon, out):
 * soupkit.methods._ops.della_keep_probs of the delta x - base viewed as [rows, cols]:
 * stable ranks by magnitude within each row (NaN above every number, ties by position),
 * p = f32(density - epsilon) + ((f32(rank) / f32(cols - 1)) * 2) * f32(epsilon). */
static PyObject *py_della_probs(PyObject *self, PyObject *args) {
    unsigned long long xp, bp, op;
    int xdt, bdt;
    Py_ssize_t rows, cols;
    double density, epsilon;
    conv_t cv;
    unsigned int tail_nan;
    if (!PyArg_ParseTuple(args, "KiKinnddKLI", &xp, &xdt, &bp, &bdt, &rows, &cols, &density,
                          &epsilon, &op, &cv.f16_tail, &tail_nan))
        return NULL;
    cv.f16_tail_nan = tail_nan;
    float *out = (float *)(uintptr_t)op;
    if (cols <= 0 || rows <= 0)
        Py_RETURN_NONE;
    uint64_t *keys = (uint64_t *)malloc(sizeof(uint64_t) * 2 * (size_t)cols);
    float *d = (float *)malloc(sizeof(float) * 2 * (size_t)cols);
    if (!keys || !d) {
        free(keys);
        free(d);
        return PyErr_NoMemory();
    }
    uint64_t *tmp = keys + cols;
    float *b = d + cols;
    const float lo = (float)(density - epsilon);
    const float eps = (float)epsilon;
    const float den = (float)(cols - 1);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        size_t off = (size_t)r * (size_t)cols;
        to_f32(&cv, (const void *)(uintptr_t)bp, bdt, off, (size_t)cols, b);
        deltas(&cv, (const void *)(uintptr_t)xp, xdt, b, off, (size_t)cols, d);
        if (cols == 1) {
            out[off] = lo + (0.5f * 2.0f) * eps;
            continue;
        }
        /* key: magnitude bits (NaN as one value above +Inf) << 32 | index: unique, so an LSD
         * radix sort on the 32 magnitude bits, stable, gives torch's stable argsort */
        for (Py_ssize_t j = 0; j < cols; j++) {
            uint32_t bits = sk_bits(d[j]) & 0x7fffffffu;
            if (bits > 0x7f800000u)
                bits = 0x7f800001u;
            keys[j] = ((uint64_t)bits << 32) | (uint64_t)j;
        }
        uint64_t *src = keys, *dst = tmp;
        for (int pass = 0; pass < 4; pass++) {
            size_t cnt[257];
            memset(cnt, 0, sizeof(cnt));
            int sh = 32 + 8 * pass;
            for (Py_ssize_t j = 0; j < cols; j++)
                cnt[((src[j] >> sh) & 0xff) + 1]++;
            for (int k = 0; k < 256; k++)
                cnt[k + 1] += cnt[k];
            for (Py_ssize_t j = 0; j < cols; j++)
                dst[cnt[(src[j] >> sh) & 0xff]++] = src[j];
            uint64_t *sw = src;
            src = dst;
            dst = sw;
        }
        for (Py_ssize_t rank = 0; rank < cols; rank++) {
            size_t j = (size_t)(src[rank] & 0xffffffffu);
            float rn = (float)rank / den;
            rn = rn * 2.0f;
            rn = rn * eps;
            out[off + j] = rn + lo;
        }
    }
    Py_END_ALLOW_THREADS
    free(keys);
    free(d);
    Py_RETURN_NONE;
}

SK_INLINE int draws_blocks_body(uint64_t key, uint64_t e0, size_t n, uint32_t stream,
                                uint32_t *out, uint32_t *scratch) {
    for (size_t a = 0; a < n; a += BLK) {
        size_t len = n - a < BLK ? n - a : BLK;
        draws24(key, e0 + a, len, stream, out + a, scratch);
    }
    return 0;
}

SK_VARIANTS(int, draws_blocks,
            (uint64_t key, uint64_t e0, size_t n, uint32_t stream, uint32_t *out,
             uint32_t *scratch),
            (key, e0, n, stream, out, scratch))

/* philox_draws(key, offset, n, stream, out uint32*, isa): the 24-bit draws (tests) */
static PyObject *py_draws(PyObject *self, PyObject *args) {
    unsigned long long key, e0, op;
    Py_ssize_t n;
    unsigned int stream;
    int isa;
    if (!PyArg_ParseTuple(args, "KKnIKi", &key, &e0, &n, &stream, &op, &isa))
        return NULL;
    uint32_t *out = (uint32_t *)(uintptr_t)op;
    uint32_t *scratch = (uint32_t *)malloc(sizeof(uint32_t) * (BLK + 16));
    if (!scratch)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    use_isa(isa);
    draws_blocks(key, e0, (size_t)n, stream, out, scratch);
    Py_END_ALLOW_THREADS
    free(scratch);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gta", py_gta, METH_VARARGS, "Fused sparsify + combine of one piece (see the module)."},
    {"l1_drop", py_l1_drop, METH_VARARGS, "One model's DARE / DELLA drop: L1 norms, keep flags."},
    {"count_equal", py_count_equal, METH_VARARGS, "Entries with |x - base| == t."},
    {"mag_hist", py_mag_hist, METH_VARARGS, "Radix-select histograms of |x - base|."},
    {"della_probs", py_della_probs, METH_VARARGS, "DELLA's per-row keep probabilities."},
    {"philox_draws", py_draws, METH_VARARGS, "24-bit Philox4x32-10 draws of a stream."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sparsify",
    "Fused kernels of TIES, DARE, DELLA and Breadcrumbs (see soupkit.kernels.sparsify).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__sparsify(void) {
    g_isa_best = soupkit_isa_detect();
    return PyModule_Create(&module);
}
