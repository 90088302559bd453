/* One ISA's block passes of the elementwise kernels (included once per ISA by
 * _elementwise.c, with the SK_* vector macros defined for that ISA).
 *
 * A pass works on one block of `cnt` elements already in float32 (`m`, `b`): vectors of SK_W
 * lanes, then the last cnt % SK_W elements with the same operations in scalar C. NaN payloads
 * are not tracked here: the final pass sends every vector with a NaN in its result to the
 * scalar reference (ew_elem), which reproduces torch's NaN rules.
 */

#define SK_CAT2(a, b) a##_##b
#define SK_CAT(a, b) SK_CAT2(a, b)
#define SK_FN(name) SK_CAT(name, SK_ISA)

/* dst[0:cnt] = input x (dtype dt) as float32 */
static SK_TARGET void SK_FN(ew_load)(float *dst, const void *x, int dt, int64_t cnt) {
    int64_t i = 0;
    if (dt == SK_F32) {
        const float *p = (const float *)x;
        for (; i + SK_W <= cnt; i += SK_W)
            SK_STORE_F32(dst + i, SK_LOAD_F32(p + i));
        for (; i < cnt; i++)
            dst[i] = p[i];
    } else if (dt == SK_BF16) {
        const uint16_t *p = (const uint16_t *)x;
        for (; i + SK_W <= cnt; i += SK_W)
            SK_STORE_F32(dst + i, SK_LOAD_BF16(p + i));
        for (; i < cnt; i++)
            dst[i] = sk_bf16_to_f32(p[i]);
    } else {
        const uint16_t *p = (const uint16_t *)x;
        for (; i + SK_W <= cnt; i += SK_W)
            SK_STORE_F32(dst + i, SK_LOAD_F16(p + i));
        for (; i < cnt; i++)
            dst[i] = sk_f16_to_f32(p[i]);
    }
}

/* One input's step into the running value m (see EW_* in _elementwise.c). `b` is the block
 * of the base in float32 (used by the *_SUB_* kinds). */
#define SK_PASS_BODY(LOADV, LOADS)                                                             \
    switch (kind) {                                                                            \
    case EW_SET_MUL:                                                                           \
        for (; i + SK_W <= cnt; i += SK_W)                                                     \
            SK_STORE_F32(m + i, SK_MUL(LOADV(p + i), wv));                                     \
        for (; i < cnt; i++)                                                                   \
            m[i] = LOADS(p[i]) * w;                                                            \
        break;                                                                                 \
    case EW_FMA:                                                                               \
        for (; i + SK_W <= cnt; i += SK_W)                                                     \
            SK_STORE_F32(m + i, SK_FMADD(LOADV(p + i), wv, SK_LOAD_F32(m + i)));               \
        for (; i < cnt; i++)                                                                   \
            m[i] = fmaf(LOADS(p[i]), w, m[i]);                                                 \
        break;                                                                                 \
    case EW_MUL_ADD:                                                                           \
        for (; i + SK_W <= cnt; i += SK_W)                                                     \
            SK_STORE_F32(m + i, SK_ADD(SK_LOAD_F32(m + i), SK_MUL(LOADV(p + i), wv)));         \
        for (; i < cnt; i++)                                                                   \
            m[i] = m[i] + LOADS(p[i]) * w;                                                     \
        break;                                                                                 \
    case EW_SUB_SET_MUL:                                                                       \
        for (; i + SK_W <= cnt; i += SK_W)                                                     \
            SK_STORE_F32(m + i, SK_MUL(SK_SUB(LOADV(p + i), SK_LOAD_F32(b + i)), wv));         \
        for (; i < cnt; i++)                                                                   \
            m[i] = (LOADS(p[i]) - b[i]) * w;                                                   \
        break;                                                                                 \
    default: /* EW_SUB_MUL_ADD */                                                              \
        for (; i + SK_W <= cnt; i += SK_W)                                                     \
            SK_STORE_F32(m + i, SK_ADD(SK_LOAD_F32(m + i),                                     \
                                       SK_MUL(SK_SUB(LOADV(p + i), SK_LOAD_F32(b + i)), wv))); \
        for (; i < cnt; i++)                                                                   \
            m[i] = m[i] + (LOADS(p[i]) - b[i]) * w;                                            \
        break;                                                                                 \
    }

static SK_TARGET void SK_FN(ew_pass)(float *m, const float *b, const void *x, int dt, int kind,
                                     float w, int64_t cnt) {
    int64_t i = 0;
    SK_VF wv = SK_SET1(w);
    if (dt == SK_F32) {
        const float *p = (const float *)x;
#define SK_ID(v) (v)
        SK_PASS_BODY(SK_LOAD_F32, SK_ID)
#undef SK_ID
    } else if (dt == SK_BF16) {
        const uint16_t *p = (const uint16_t *)x;
        SK_PASS_BODY(SK_LOAD_BF16, sk_bf16_to_f32)
    } else {
        const uint16_t *p = (const uint16_t *)x;
        SK_PASS_BODY(SK_LOAD_F16, sk_f16_to_f32)
    }
}

/* The end of the program for one block: divide by the total, scale by lambda, add the base,
 * convert to the output dtype and store at out + start; returns how many stored values are
 * NaN or +-Inf in the output dtype. A vector holding a NaN is recomputed by ew_elem. */
static SK_TARGET int64_t SK_FN(ew_final)(const ew_prog *g, float *m, const float *b,
                                         int64_t start, int64_t cnt) {
    const int fl = g->flags;
    SK_VF tv = SK_SET1(g->total), lv = SK_SET1(g->lam);
    SK_VF limv = SK_SET1(g->limit);
    SK_VI absmask = SK_SET1_I(0x7fffffff);
    int64_t bad = 0, i = 0;
    for (; i + SK_W <= cnt; i += SK_W) {
        SK_VF v = SK_LOAD_F32(m + i);
        if (fl & EW_DIV)
            v = SK_DIV(v, tv);
        if (fl & EW_SCALE)
            v = SK_MUL(v, lv);
        if (fl & EW_ADD_BASE)
            v = SK_ADD(v, SK_LOAD_F32(b + i));
        if (SK_NANMASK(v)) {
            for (int l = 0; l < SK_W; l++)
                bad += ew_store(g, start + i + l, ew_elem(g, start + i + l));
            continue;
        }
        bad += SK_NLT_COUNT(SK_ABS(v, absmask), limv);
        switch (g->out_dtype) {
        case SK_F32: SK_STORE_F32((float *)g->out + start + i, v); break;
        case SK_BF16: SK_STORE_BF16((uint16_t *)g->out + start + i, v); break;
        default: SK_STORE_F16((uint16_t *)g->out + start + i, v); break;
        }
    }
    for (; i < cnt; i++) {
        float v = m[i];
        if (fl & EW_DIV)
            v = v / g->total;
        if (fl & EW_SCALE)
            v = v * g->lam;
        if (fl & EW_ADD_BASE)
            v = v + b[i];
        if (sk_isnan(v))
            v = ew_elem(g, start + i);
        bad += ew_store(g, start + i, v);
    }
    return bad;
}

/* The whole call: the program over [0, n) in blocks of EW_BLOCK elements (float32 scratch on
 * the stack, in L1). */
static SK_TARGET int64_t SK_FN(ew_run)(const ew_prog *g) {
    float m[EW_BLOCK], b[EW_BLOCK];
    int64_t bad = 0;
    for (int64_t s = 0; s < g->n; s += EW_BLOCK) {
        int64_t cnt = g->n - s < EW_BLOCK ? g->n - s : EW_BLOCK;
        if (g->base)
            SK_FN(ew_load)(b, sk_at(g->base, g->base_dtype, s), g->base_dtype, cnt);
        for (int k = 0; k < g->nsteps; k++) {
            const ew_step *st = &g->steps[k];
            SK_FN(ew_pass)(m, b, sk_at(st->x, st->dtype, s), st->dtype, st->kind, st->w, cnt);
        }
        bad += SK_FN(ew_final)(g, m, b, s, cnt);
    }
    return bad;
}

#undef SK_PASS_BODY
#undef SK_FN
#undef SK_CAT
#undef SK_CAT2
