/* soupkit.kernels._elementwise: the fused elementwise merge pass (linear / weighted soups,
 * task arithmetic, WiSE-FT), bit-identical to soupkit's torch reference.
 *
 * One call computes n output elements (one piece of the engine, on the calling thread, with
 * the GIL released): it reads each input in its own dtype, converts to float32, runs a small
 * program of float32 steps, converts to the output dtype and counts the stored values that
 * are NaN or +-Inf. Every input byte is read from memory once and every output byte written
 * once: the AVX2 / AVX-512 paths (_elementwise_simd.h) run the whole program per vector in
 * registers, the portable path per block of EW_BLOCK elements in L1.
 *
 * The program (built by soupkit/kernels/__init__.py from a method's parameters) is a list of
 * steps, one per input, then optional final operations, each rounded to float32 exactly as the
 * torch reference rounds it:
 *   EW_SET_MUL      m = x * w                    (tensor.mul_(w))
 *   EW_FMA          m = fma(x, w, m)             (m.addcmul_(x, w) where torch fuses it)
 *   EW_MUL_ADD      m = m + x * w                (m += x.mul_(w))
 *   EW_SUB_SET_MUL  m = (x - base) * w           (x.sub_(base).mul_(w))
 *   EW_SUB_MUL_ADD  m = m + (x - base) * w
 *   then EW_DIV m = m / total, EW_SCALE m = m * lam, EW_ADD_BASE m = m + base.
 * -ffp-contract=off (setup.py) keeps the compiler from fusing anything else.
 *
 * NaN payloads: when a result is NaN, ew_elem recomputes that element with torch's NaN rules
 * on x86 (an arithmetic NaN result carries the quieted payload of one operand: the second of
 * add / sub, the multiplied tensor of addcmul); the conversions reproduce torch's (see
 * _common.h and the calibration in __init__.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>

#include "_common.h"

enum { EW_SET_MUL = 0, EW_FMA = 1, EW_MUL_ADD = 2, EW_SUB_SET_MUL = 3, EW_SUB_MUL_ADD = 4 };
enum { EW_DIV = 1, EW_SCALE = 2, EW_ADD_BASE = 4 };

#define EW_BLOCK 2048 /* portable path: float32 elements per block, 3 x 8 KiB of scratch in L1 */
#define EW_MAX_STEPS 4096

typedef struct {
    const void *x;
    int dtype;
    int kind;
    float w;
} ew_step;

typedef struct {
    int64_t n;
    void *out;
    int out_dtype;
    const void *base;
    int base_dtype;
    int nsteps;
    const ew_step *steps;
    int flags;
    float total, lam;
    float limit;          /* |v| >= limit is NaN or +-Inf once stored in out_dtype */
    uint16_t bf16_nan;    /* what torch stores for a NaN in bfloat16 (calibrated) */
    int64_t f16_tail;     /* torch converts float16 in runs of f16_block; the elements from */
    uint32_t f16_tail_nan; /* f16_tail on take another path: a NaN there becomes this word */
} ew_prog;

static int g_isa = SK_PORTABLE;     /* the level in use (soupkit_isa_detect() or forced lower) */
static int g_isa_best = SK_PORTABLE; /* what this CPU supports */

static inline const void *sk_at(const void *p, int dt, int64_t i) {
    return (const char *)p + i * (dt == SK_F32 ? 4 : 2);
}

/* Element i of an input as the reference's float32 (position-aware for float16: torch's
 * conversion handles the last n % f16_block elements of a piece separately). */
static inline float ew_in(const ew_prog *g, const void *x, int dt, int64_t i) {
    if (dt == SK_F32)
        return ((const float *)x)[i];
    uint16_t h = ((const uint16_t *)x)[i];
    if (dt == SK_BF16)
        return sk_bf16_to_f32(h);
    if (i >= g->f16_tail && (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu))
        return sk_float(g->f16_tail_nan);
    return sk_f16_to_f32(h);
}

/* torch's float32 operations with x86's NaN propagation (NaN operand order as in ATen). */
static inline float ew_mul(float a, float w) { return sk_isnan(a) ? sk_quiet(a) : a * w; }
static inline float ew_div(float a, float w) { return sk_isnan(a) ? sk_quiet(a) : a / w; }
static inline float ew_add(float a, float b) { /* a.add_(b): b's NaN first */
    return sk_isnan(b) ? sk_quiet(b) : sk_isnan(a) ? sk_quiet(a) : a + b;
}
static inline float ew_sub(float a, float b) { /* a.sub_(b): b's NaN first */
    return sk_isnan(b) ? sk_quiet(b) : sk_isnan(a) ? sk_quiet(a) : a - b;
}
static inline float ew_fma(float m, float x, float w) { /* m.addcmul_(x, w): x's NaN first */
    return sk_isnan(x) ? sk_quiet(x) : sk_isnan(m) ? sk_quiet(m) : fmaf(x, w, m);
}

/* The scalar reference: element i, every rounding and NaN rule of the torch reference. */
static float ew_elem(const ew_prog *g, int64_t i) {
    float b = g->base ? ew_in(g, g->base, g->base_dtype, i) : 0.0f;
    float m = 0.0f;
    for (int k = 0; k < g->nsteps; k++) {
        const ew_step *st = &g->steps[k];
        float x = ew_in(g, st->x, st->dtype, i);
        switch (st->kind) {
        case EW_SET_MUL: m = ew_mul(x, st->w); break;
        case EW_FMA: m = ew_fma(m, x, st->w); break;
        case EW_MUL_ADD: m = ew_add(m, ew_mul(x, st->w)); break;
        case EW_SUB_SET_MUL: m = ew_mul(ew_sub(x, b), st->w); break;
        default: m = ew_add(m, ew_mul(ew_sub(x, b), st->w)); break;
        }
    }
    if (g->flags & EW_DIV)
        m = ew_div(m, g->total);
    if (g->flags & EW_SCALE)
        m = ew_mul(m, g->lam);
    if (g->flags & EW_ADD_BASE)
        m = ew_add(m, b);
    return m;
}

/* Store v as element i of the output; 1 when the stored value is NaN or +-Inf. */
static inline int ew_store(const ew_prog *g, int64_t i, float v) {
    switch (g->out_dtype) {
    case SK_F32: ((float *)g->out)[i] = v; break;
    case SK_BF16: ((uint16_t *)g->out)[i] = sk_f32_to_bf16(v, g->bf16_nan); break;
    default: ((uint16_t *)g->out)[i] = sk_f32_to_f16(v); break;
    }
    return !(fabsf(v) < g->limit);
}

/* ---------------------------------------------------------------- portable C (any CPU) */
/* Blocks of EW_BLOCK elements: each step is a simple loop over a float32 block in L1, which
 * the compiler vectorises for the target (SSE2 on baseline x86-64, NEON on aarch64). */

static void ew_load_block(float *dst, const void *x, int dt, int64_t cnt) {
    if (dt == SK_F32)
        memcpy(dst, x, (size_t)cnt * 4);
    else if (dt == SK_BF16)
        for (int64_t i = 0; i < cnt; i++)
            dst[i] = sk_bf16_to_f32(((const uint16_t *)x)[i]);
    else
        for (int64_t i = 0; i < cnt; i++)
            dst[i] = sk_f16_to_f32(((const uint16_t *)x)[i]);
}

static void ew_step_block(float *m, const float *b, float *x, int kind, float w, int64_t cnt) {
    switch (kind) {
    case EW_SET_MUL:
        for (int64_t i = 0; i < cnt; i++) m[i] = x[i] * w;
        break;
    case EW_FMA:
        for (int64_t i = 0; i < cnt; i++) m[i] = fmaf(x[i], w, m[i]);
        break;
    case EW_MUL_ADD:
        for (int64_t i = 0; i < cnt; i++) m[i] = m[i] + x[i] * w;
        break;
    case EW_SUB_SET_MUL:
        for (int64_t i = 0; i < cnt; i++) m[i] = (x[i] - b[i]) * w;
        break;
    default:
        for (int64_t i = 0; i < cnt; i++) m[i] = m[i] + (x[i] - b[i]) * w;
        break;
    }
}

static int64_t ew_run_portable(const ew_prog *g) {
    float m[EW_BLOCK], b[EW_BLOCK], x[EW_BLOCK];
    int64_t bad = 0;
    for (int64_t s = 0; s < g->n; s += EW_BLOCK) {
        int64_t cnt = g->n - s < EW_BLOCK ? g->n - s : EW_BLOCK;
        if (g->base)
            ew_load_block(b, sk_at(g->base, g->base_dtype, s), g->base_dtype, cnt);
        for (int k = 0; k < g->nsteps; k++) {
            const ew_step *st = &g->steps[k];
            ew_load_block(x, sk_at(st->x, st->dtype, s), st->dtype, cnt);
            ew_step_block(m, b, x, st->kind, st->w, cnt);
        }
        for (int64_t i = 0; i < cnt; i++) {
            float v = m[i];
            if (g->flags & EW_DIV)
                v = v / g->total;
            if (g->flags & EW_SCALE)
                v = v * g->lam;
            if (g->flags & EW_ADD_BASE)
                v = v + b[i];
            if (sk_isnan(v)) /* NaN payloads: the scalar reference */
                v = ew_elem(g, s + i);
            bad += ew_store(g, s + i, v);
        }
    }
    return bad;
}

#if SOUPKIT_X86
/* ------------------------------------------------------------- AVX2 + FMA + F16C (8 lanes) */
SOUPKIT_TARGET_AVX2 static inline __m256 sk8_load_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
SOUPKIT_TARGET_AVX2 static inline void sk8_store_bf16(uint16_t *p, __m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}
#define SK_ISA avx2
#define SK_TARGET SOUPKIT_TARGET_AVX2
#define SK_W 8
#define SK_VF __m256
#define SK_VI __m256i
#define SK_SET1(x) _mm256_set1_ps(x)
#define SK_SET1_I(x) _mm256_set1_epi32(x)
#define SK_LOAD_F32(p) _mm256_loadu_ps(p)
#define SK_LOAD_BF16(p) sk8_load_bf16(p)
#define SK_LOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define SK_STORE_F32(p, v) _mm256_storeu_ps((p), (v))
#define SK_STORE_BF16(p, v) sk8_store_bf16((p), (v))
#define SK_STORE_F16(p, v) \
    _mm_storeu_si128((__m128i *)(p), _mm256_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT))
#define SK_ADD(a, b) _mm256_add_ps((a), (b))
#define SK_SUB(a, b) _mm256_sub_ps((a), (b))
#define SK_MUL(a, b) _mm256_mul_ps((a), (b))
#define SK_DIV(a, b) _mm256_div_ps((a), (b))
#define SK_FMADD(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define SK_NANMASK(v) _mm256_movemask_ps(_mm256_cmp_ps((v), (v), _CMP_UNORD_Q))
#define SK_ABS(v, mask) _mm256_and_ps((v), _mm256_castsi256_ps(mask))
#define SK_NLT_COUNT(a, lim) __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps((a), (lim), _CMP_NLT_UQ)))
#include "_elementwise_simd.h"

/* ---------------------------------------------------------------------- AVX-512F (16 lanes) */
SOUPKIT_TARGET_AVX512 static inline __m512 sk16_load_bf16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
SOUPKIT_TARGET_AVX512 static inline void sk16_store_bf16(uint16_t *p, __m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(u));
}
#define SK_ISA avx512
#define SK_TARGET SOUPKIT_TARGET_AVX512
#define SK_W 16
#define SK_VF __m512
#define SK_VI __m512i
#define SK_SET1(x) _mm512_set1_ps(x)
#define SK_SET1_I(x) _mm512_set1_epi32(x)
#define SK_LOAD_F32(p) _mm512_loadu_ps(p)
#define SK_LOAD_BF16(p) sk16_load_bf16(p)
#define SK_LOAD_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define SK_STORE_F32(p, v) _mm512_storeu_ps((p), (v))
#define SK_STORE_BF16(p, v) sk16_store_bf16((p), (v))
#define SK_STORE_F16(p, v) \
    _mm256_storeu_si256((__m256i *)(p), _mm512_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#define SK_ADD(a, b) _mm512_add_ps((a), (b))
#define SK_SUB(a, b) _mm512_sub_ps((a), (b))
#define SK_MUL(a, b) _mm512_mul_ps((a), (b))
#define SK_DIV(a, b) _mm512_div_ps((a), (b))
#define SK_FMADD(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define SK_NANMASK(v) _mm512_cmp_ps_mask((v), (v), _CMP_UNORD_Q)
#define SK_ABS(v, mask) _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), (mask)))
#define SK_NLT_COUNT(a, lim) __builtin_popcount(_mm512_cmp_ps_mask((a), (lim), _CMP_NLT_UQ))
#include "_elementwise_simd.h"
#endif

static int64_t ew_dispatch(const ew_prog *g) {
#if SOUPKIT_X86
    if (g_isa >= SK_AVX512)
        return ew_run_avx512(g);
    if (g_isa >= SK_AVX2)
        return ew_run_avx2(g);
#endif
    return ew_run_portable(g);
}

/* ------------------------------------------------------------------------- Python face */

static int parse_dtype(PyObject *o, int *out) {
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return 0;
    if (v < SK_F32 || v > SK_F16) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %ld", v);
        return 0;
    }
    *out = (int)v;
    return 1;
}

static const float k_limits[3] = {INFINITY, 3.39617752e38f /* bf16: 0x7f7f8000 */, 65520.0f};

PyDoc_STRVAR(run_doc,
"run(n, out, out_dtype, base, base_dtype, steps, flags, total, lam, bf16_nan, f16_block,\n"
"    f16_tail_nan) -> int\n\n"
"Run one elementwise program over n elements; returns the count of stored NaN/Inf values.\n"
"Addresses are ints (tensor.data_ptr()); steps is a tuple of (address, dtype, kind, weight).\n"
"Private: soupkit.kernels checks every argument before calling this.");

static PyObject *py_run(PyObject *self, PyObject *args) {
    long long n;
    unsigned long long out, base;
    int out_dtype, base_dtype, flags;
    PyObject *steps;
    float total, lam;
    unsigned int bf16_nan, f16_tail_nan;
    long long f16_block;
    if (!PyArg_ParseTuple(args, "LKiKiO!iffILI", &n, &out, &out_dtype, &base, &base_dtype,
                          &PyTuple_Type, &steps, &flags, &total, &lam, &bf16_nan, &f16_block,
                          &f16_tail_nan))
        return NULL;
    Py_ssize_t ns = PyTuple_GET_SIZE(steps);
    if (n < 0 || ns < 1 || ns > EW_MAX_STEPS || out_dtype < 0 || out_dtype > 2 || base_dtype < 0 ||
        base_dtype > 2 || f16_block < 1) {
        PyErr_SetString(PyExc_ValueError, "invalid elementwise program");
        return NULL;
    }
    ew_step *st = PyMem_Malloc(sizeof(ew_step) * (size_t)ns);
    if (!st)
        return PyErr_NoMemory();
    for (Py_ssize_t k = 0; k < ns; k++) {
        PyObject *t = PyTuple_GET_ITEM(steps, k);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 4) {
            PyMem_Free(st);
            PyErr_SetString(PyExc_TypeError, "a step is a tuple (address, dtype, kind, weight)");
            return NULL;
        }
        unsigned long long addr = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 0));
        long kind = PyErr_Occurred() ? -1 : PyLong_AsLong(PyTuple_GET_ITEM(t, 2));
        double w = PyErr_Occurred() ? 0.0 : PyFloat_AsDouble(PyTuple_GET_ITEM(t, 3));
        if (PyErr_Occurred() || !parse_dtype(PyTuple_GET_ITEM(t, 1), &st[k].dtype)) {
            PyMem_Free(st);
            return NULL;
        }
        if (kind < EW_SET_MUL || kind > EW_SUB_MUL_ADD ||
            (k == 0) != (kind == EW_SET_MUL || kind == EW_SUB_SET_MUL) ||
            (!base && (kind == EW_SUB_SET_MUL || kind == EW_SUB_MUL_ADD)) || (n > 0 && !addr)) {
            PyMem_Free(st);
            PyErr_SetString(PyExc_ValueError, "invalid elementwise step");
            return NULL;
        }
        st[k].x = (const void *)(uintptr_t)addr;
        st[k].kind = (int)kind;
        st[k].w = (float)w;
    }
    ew_prog g = {
        .n = n, .out = (void *)(uintptr_t)out, .out_dtype = out_dtype,
        .base = (const void *)(uintptr_t)base, .base_dtype = base_dtype,
        .nsteps = (int)ns, .steps = st, .flags = flags, .total = total, .lam = lam,
        .limit = k_limits[out_dtype], .bf16_nan = (uint16_t)bf16_nan,
        .f16_tail = n - n % f16_block, .f16_tail_nan = (uint32_t)f16_tail_nan,
    };
    if (((flags & EW_ADD_BASE) && !base) || (n > 0 && !out)) {
        PyMem_Free(st);
        PyErr_SetString(PyExc_ValueError, "invalid elementwise program (no base or no output)");
        return NULL;
    }
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = ew_dispatch(&g);
    Py_END_ALLOW_THREADS
    PyMem_Free(st);
    return PyLong_FromLongLong(bad);
}

static PyObject *py_isa(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(soupkit_isa_names[g_isa]);
}

static PyObject *py_best_isa(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(soupkit_isa_names[g_isa_best]);
}

static PyObject *py_set_isa(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name)
        return NULL;
    for (int i = 0; i <= SK_AVX512; i++) {
        if (strcmp(name, soupkit_isa_names[i]) == 0) {
            if (i > g_isa_best) {
                PyErr_Format(PyExc_ValueError, "this CPU cannot run the %s kernels (best: %s)",
                             name, soupkit_isa_names[g_isa_best]);
                return NULL;
            }
            g_isa = i;
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "unknown ISA %R (portable, avx2, avx512)", arg);
    return NULL;
}

static PyMethodDef methods[] = {
    {"run", py_run, METH_VARARGS, run_doc},
    {"isa", py_isa, METH_NOARGS, "The ISA level in use: 'portable', 'avx2' or 'avx512'."},
    {"best_isa", py_best_isa, METH_NOARGS, "The best ISA level this CPU runs."},
    {"set_isa", py_set_isa, METH_O, "Use this ISA level (at most best_isa()); for tests."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "soupkit.kernels._elementwise",
    "soupkit's fused elementwise merge kernels (private: use soupkit.kernels).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__elementwise(void) {
    g_isa_best = g_isa = soupkit_isa_detect();
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "SET_MUL", EW_SET_MUL) || PyModule_AddIntConstant(m, "FMA", EW_FMA) ||
        PyModule_AddIntConstant(m, "MUL_ADD", EW_MUL_ADD) ||
        PyModule_AddIntConstant(m, "SUB_SET_MUL", EW_SUB_SET_MUL) ||
        PyModule_AddIntConstant(m, "SUB_MUL_ADD", EW_SUB_MUL_ADD) ||
        PyModule_AddIntConstant(m, "DIV", EW_DIV) || PyModule_AddIntConstant(m, "SCALE", EW_SCALE) ||
        PyModule_AddIntConstant(m, "ADD_BASE", EW_ADD_BASE) ||
        PyModule_AddIntConstant(m, "BLOCK", EW_BLOCK)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
