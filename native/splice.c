// splice.c - prefix state blob + N fragment payloads -> one llama.cpp sequence state blob; RoPE re-rotation.

#include "kvsplice.h"

#include <math.h>
#include <stdlib.h>

struct rm_splice_plan {
    const uint8_t *    prefix;
    rm_state           pst;         // parsed prefix (n_cells may be 0)
    const rm_payload * pls;
    uint32_t           n_pl;
    rm_splice_params   prm;

    uint32_t n_stream;
    uint32_t data_stream;            // the stream index that holds the cells
    uint32_t n_layer;                // 0 when the output holds no cell
    int32_t  k_type;
    int32_t  v_type;
    uint32_t v_trans;
    uint32_t v_el;                   // element size of V (v_trans)
    uint32_t * n_embd_k;             // per layer
    uint32_t * n_embd_v;
    uint64_t * k_row;                // per layer output row bytes
    uint64_t * v_row;
    uint32_t max_e;

    uint32_t n_total;                // output cells
    uint32_t * frag_c0;              // first kept cell per fragment
    uint32_t * frag_n;               // kept cells per fragment
    int64_t *  frag_delta;           // position shift per fragment
    float *    frag_scale;           // key scale per fragment
    float *    rope_cs;              // n_pl x rope_dims floats, filled where frag_delta != 0
    uint32_t   max_frag_n;
};

void rm_splice_plan_free(rm_splice_plan * plan) {
    if (!plan) {
        return;
    }
    rm_state_free(&plan->pst);
    free(plan->n_embd_k);
    free(plan->n_embd_v);
    free(plan->k_row);
    free(plan->v_row);
    free(plan->frag_c0);
    free(plan->frag_n);
    free(plan->frag_delta);
    free(plan->frag_scale);
    free(plan->rope_cs);
    free(plan);
}

// ---------------------------------------------------------------------------------------------------------
// RoPE (same arithmetic as ggml-cpu ops.cpp: ggml_rope_cache_init + rotate_pairs, ext_factor 0, mscale 1)

void rm_rope_table(float * cs, uint32_t rope_dims, int64_t delta, float base, float freq_scale) {
    // cs = [cos_0 .. cos_{h-1}, sin_0 .. sin_{h-1}], h = rope_dims / 2 (split so the apply loops vectorize)
    const uint32_t h           = rope_dims / 2;
    const float    theta_scale = powf(base, -2.0f / (float) rope_dims);
    float          theta       = (float) delta;
    for (uint32_t i = 0; i < h; ++i) {
        const float t = freq_scale * theta;
        cs[i]     = cosf(t);
        cs[h + i] = sinf(t);
        theta *= theta_scale;
    }
}

static void rm_rope_apply(float * x, uint32_t n_embd, const rm_rope * rope) {
    const uint32_t n_head = n_embd / rope->head_dim;
    const uint32_t h      = rope->rope_dims / 2;
    const float *  cs     = rope->cs;
    const float *  sn     = rope->cs + h;
    for (uint32_t hd = 0; hd < n_head; ++hd) {
        float * xh = x + (size_t) hd * rope->head_dim;
        if (rope->neox) {
            // pairs (i, i + h), as ggml rotate_pairs<T>(n_dims, n_dims/2, ...)
            for (uint32_t i = 0; i < h; ++i) {
                const float x0 = xh[i];
                const float x1 = xh[i + h];
                xh[i]     = x0 * cs[i] - x1 * sn[i];
                xh[i + h] = x0 * sn[i] + x1 * cs[i];
            }
        } else {
            // pairs (2i, 2i + 1), as ggml rotate_pairs<T>(n_dims, 1, ..., scale 1)
            for (uint32_t i = 0; i < h; ++i) {
                const float x0 = xh[2 * i];
                const float x1 = xh[2 * i + 1];
                xh[2 * i]     = x0 * cs[i] - x1 * sn[i];
                xh[2 * i + 1] = x0 * sn[i] + x1 * cs[i];
            }
        }
    }
}

void rm_rope_rows_f16(uint16_t * rows, size_t row_stride_elems, uint32_t n, uint32_t n_embd, const rm_rope * rope,
                      float scale, float * tmp) {
    for (uint32_t i = 0; i < n; ++i) {
        uint16_t * r = rows + (size_t) i * row_stride_elems;
        rm_f16_to_f32_row(r, tmp, n_embd);
        if (rope) {
            rm_rope_apply(tmp, n_embd, rope);
        }
        if (scale != 1.0f) {
            for (uint32_t c = 0; c < n_embd; ++c) {
                tmp[c] *= scale;
            }
        }
        rm_f32_to_f16_row(tmp, r, n_embd);
    }
}

void rm_rope_rows_f32(float * rows, size_t row_stride_elems, uint32_t n, uint32_t n_embd, const rm_rope * rope,
                      float scale) {
    for (uint32_t i = 0; i < n; ++i) {
        float * r = rows + (size_t) i * row_stride_elems;
        if (rope) {
            rm_rope_apply(r, n_embd, rope);
        }
        if (scale != 1.0f) {
            for (uint32_t c = 0; c < n_embd; ++c) {
                r[c] *= scale;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// plan

// the message is formatted (it may read plan fields) before the plan is freed
static rm_status rm_plan_fail(rm_splice_plan * plan, rm_status rc) {
    rm_splice_plan_free(plan);
    return rc;
}
#define RM_PLAN_FAIL(code, ...) rm_plan_fail(plan, rm_fail(err, (code), __VA_ARGS__))

static bool rm_alloc_arrays(rm_splice_plan * plan, uint32_t n_layer) {
    plan->n_embd_k = (uint32_t *) calloc(n_layer ? n_layer : 1u, sizeof(uint32_t));
    plan->n_embd_v = (uint32_t *) calloc(n_layer ? n_layer : 1u, sizeof(uint32_t));
    plan->k_row    = (uint64_t *) calloc(n_layer ? n_layer : 1u, sizeof(uint64_t));
    plan->v_row    = (uint64_t *) calloc(n_layer ? n_layer : 1u, sizeof(uint64_t));
    return plan->n_embd_k && plan->n_embd_v && plan->k_row && plan->v_row;
}

rm_status rm_splice_plan_make(const uint8_t * prefix, size_t prefix_n, const rm_payload * pls, uint32_t n_pl,
                              const rm_splice_params * prm, rm_splice_plan ** out_plan, size_t * out_size,
                              int64_t * next_pos, char * err) {
    *out_plan = NULL;
    rm_splice_plan * plan = (rm_splice_plan *) calloc(1, sizeof(rm_splice_plan));
    if (!plan) {
        return rm_fail(err, RM_ERR_NOMEM, "out of memory");
    }
    plan->prefix = prefix;
    plan->pls    = pls;
    plan->n_pl   = n_pl;
    plan->prm    = *prm;

    if (prm->mode != RM_PLACE_PARALLEL && prm->mode != RM_PLACE_SEQUENTIAL) {
        return RM_PLAN_FAIL(RM_ERR_ARG, "unknown placement mode %u", prm->mode);
    }

    // prefix
    if (prefix) {
        const rm_status rc = rm_state_parse(prefix, prefix_n, &plan->pst, err);
        if (rc != RM_OK) {
            rm_splice_plan_free(plan);
            return rc;
        }
    } else {
        plan->pst.n_stream = 1;
    }
    const rm_state * pst = &plan->pst;
    if (prm->n_stream && prefix && prm->n_stream != pst->n_stream) {
        return RM_PLAN_FAIL(RM_ERR_ARG, "n_stream %u requested, the prefix blob has %u", prm->n_stream, pst->n_stream);
    }
    plan->n_stream = prm->n_stream ? prm->n_stream : pst->n_stream;
    if (plan->n_stream == 0 || plan->n_stream > RM_MAX_STREAMS) {
        return RM_PLAN_FAIL(RM_ERR_ARG, "n_stream %u out of range", plan->n_stream);
    }
    if (pst->n_cells) {
        plan->data_stream = pst->stream;
    } else {
        plan->data_stream = (plan->n_stream > 1 && prm->seq_id >= 0 && (uint32_t) prm->seq_id < plan->n_stream)
                                ? (uint32_t) prm->seq_id
                                : 0u;
    }

    // fragments: kept cells
    plan->frag_c0    = (uint32_t *) calloc(n_pl ? n_pl : 1u, sizeof(uint32_t));
    plan->frag_n     = (uint32_t *) calloc(n_pl ? n_pl : 1u, sizeof(uint32_t));
    plan->frag_delta = (int64_t *) calloc(n_pl ? n_pl : 1u, sizeof(int64_t));
    plan->frag_scale = (float *) calloc(n_pl ? n_pl : 1u, sizeof(float));
    if (!plan->frag_c0 || !plan->frag_n || !plan->frag_delta || !plan->frag_scale) {
        return RM_PLAN_FAIL(RM_ERR_NOMEM, "out of memory for %u fragments", n_pl);
    }
    uint64_t total = pst->n_cells;
    for (uint32_t f = 0; f < n_pl; ++f) {
        const uint32_t nc   = pls[f].n_cells;
        plan->frag_c0[f]    = prm->drop_first < nc ? prm->drop_first : nc;
        plan->frag_n[f]     = nc - plan->frag_c0[f];
        plan->frag_scale[f] = prm->key_scale ? prm->key_scale[f] : 1.0f;
        if (!isfinite(plan->frag_scale[f])) {
            return RM_PLAN_FAIL(RM_ERR_ARG, "key scale of fragment %u is not finite", f);
        }
        total += plan->frag_n[f];
        plan->max_frag_n = plan->frag_n[f] > plan->max_frag_n ? plan->frag_n[f] : plan->max_frag_n;
    }
    if (total > RM_MAX_CELLS) {
        return RM_PLAN_FAIL(RM_ERR_ARG, "the spliced state would hold %llu cells (limit %u)",
                            (unsigned long long) total, RM_MAX_CELLS);
    }
    plan->n_total = (uint32_t) total;

    // geometry reference: the prefix when it has cells, else the first payload
    const rm_payload * ref = n_pl ? &pls[0] : NULL;
    if (pst->n_cells) {
        plan->n_layer = pst->n_layer;
        plan->k_type  = pst->layers[0].k_type;
        plan->v_type  = pst->layers[0].v_type;
        plan->v_trans = pst->v_trans;
        if (prm->v_trans >= 0 && (uint32_t) prm->v_trans != pst->v_trans) {
            return RM_PLAN_FAIL(RM_ERR_ARG, "v_trans=%d requested, the prefix blob has v_trans=%u (flash attention "
                                "setting of its context)", prm->v_trans, pst->v_trans);
        }
        if ((prm->k_type >= 0 && prm->k_type != plan->k_type) || (prm->v_type >= 0 && prm->v_type != plan->v_type)) {
            return RM_PLAN_FAIL(RM_ERR_ARG, "K/V types %d/%d requested, the prefix blob has %d/%d", prm->k_type,
                                prm->v_type, plan->k_type, plan->v_type);
        }
        if (!rm_alloc_arrays(plan, plan->n_layer)) {
            return RM_PLAN_FAIL(RM_ERR_NOMEM, "out of memory%s", "");
        }
        for (uint32_t il = 0; il < plan->n_layer; ++il) {
            const rm_layer * L = &pst->layers[il];
            if (L->k_type != plan->k_type || L->v_type != plan->v_type) {
                return RM_PLAN_FAIL(RM_ERR_STATE, "prefix layer %u has other K/V types than layer 0", il);
            }
            if (L->n_embd_k == 0 || L->n_embd_v == 0) {
                return RM_PLAN_FAIL(RM_ERR_STATE, "prefix layer %u: unknown K/V types %d/%d", il, L->k_type,
                                    L->v_type);
            }
            plan->n_embd_k[il] = L->n_embd_k;
            plan->n_embd_v[il] = L->n_embd_v;
        }
    } else if (plan->n_total > 0) {
        // some payload has cells; fragments with zero kept cells still must agree, so use the first one
        plan->n_layer = ref->n_layer;
        if (prm->v_trans < 0) {
            return RM_PLAN_FAIL(RM_ERR_ARG, "v_trans must be given when the prefix holds no cells%s", "");
        }
        plan->v_trans = (uint32_t) (prm->v_trans != 0);
        plan->k_type  = prm->k_type >= 0 ? prm->k_type
                                         : (ref->encoding == RM_ENC_RAW ? ref->k_type : (int32_t) RM_GGML_TYPE_F16);
        plan->v_type  = prm->v_type >= 0 ? prm->v_type
                                         : (ref->encoding == RM_ENC_RAW ? ref->v_type : (int32_t) RM_GGML_TYPE_F16);
        if (!rm_alloc_arrays(plan, plan->n_layer)) {
            return RM_PLAN_FAIL(RM_ERR_NOMEM, "out of memory%s", "");
        }
        for (uint32_t il = 0; il < plan->n_layer; ++il) {
            plan->n_embd_k[il] = rm_payload_embd_k(ref, il);
            plan->n_embd_v[il] = rm_payload_embd_v(ref, il);
        }
    }

    if (plan->n_total > 0) {
        uint32_t vblck;
        uint32_t vsize;
        if (!rm_type_info(plan->k_type, NULL, NULL) || !rm_type_info(plan->v_type, &vblck, &vsize)) {
            return RM_PLAN_FAIL(RM_ERR_ARG, "unsupported output K/V types %d/%d", plan->k_type, plan->v_type);
        }
        if (plan->v_trans && vblck != 1) {
            return RM_PLAN_FAIL(RM_ERR_ARG, "V type %s cannot be stored transposed (v_trans needs flash attention off "
                                "and a non-quantized V cache)", rm_type_name(plan->v_type));
        }
        plan->v_el = vsize;
        for (uint32_t il = 0; il < plan->n_layer; ++il) {
            if (!rm_row_size(plan->k_type, plan->n_embd_k[il], &plan->k_row[il]) ||
                !rm_row_size(plan->v_type, plan->n_embd_v[il], &plan->v_row[il])) {
                return RM_PLAN_FAIL(RM_ERR_ARG, "layer %u: %u/%u values do not fit the K/V types", il,
                                    plan->n_embd_k[il], plan->n_embd_v[il]);
            }
            if (pst->n_cells) {
                const rm_layer * L = &pst->layers[il];
                if (L->k_row != plan->k_row[il] || (!pst->v_trans && L->v_row != plan->v_row[il]) ||
                    (pst->v_trans && L->v_el != vsize)) {
                    return RM_PLAN_FAIL(RM_ERR_STATE, "prefix layer %u has inconsistent row sizes%s", il, "");
                }
            }
            plan->max_e = plan->n_embd_k[il] > plan->max_e ? plan->n_embd_k[il] : plan->max_e;
            plan->max_e = plan->n_embd_v[il] > plan->max_e ? plan->n_embd_v[il] : plan->max_e;
        }
    }

    // every payload must match the output geometry and types
    const bool kv_math = prm->mode == RM_PLACE_SEQUENTIAL || prm->key_scale != NULL;
    for (uint32_t f = 0; f < n_pl; ++f) {
        const rm_payload * pl = &pls[f];
        if (prm->fingerprint && memcmp(pl->fingerprint, prm->fingerprint, 32) != 0) {
            return RM_PLAN_FAIL(RM_ERR_PAYLOAD, "payload %u was compiled for another model (fingerprint differs)", f);
        }
        if (plan->n_total == 0) {
            continue;
        }
        if (pl->n_layer != plan->n_layer) {
            return RM_PLAN_FAIL(RM_ERR_PAYLOAD, "payload %u has %u layers, the context %u", f, pl->n_layer,
                                plan->n_layer);
        }
        for (uint32_t il = 0; il < plan->n_layer; ++il) {
            if (rm_payload_embd_k(pl, il) != plan->n_embd_k[il] || rm_payload_embd_v(pl, il) != plan->n_embd_v[il]) {
                return RM_PLAN_FAIL(RM_ERR_PAYLOAD, "payload %u layer %u: row widths differ from the context", f, il);
            }
        }
        if (pl->encoding == RM_ENC_RAW) {
            if (pl->k_type != plan->k_type || pl->v_type != plan->v_type) {
                return RM_PLAN_FAIL(RM_ERR_PAYLOAD, "raw payload %u holds K/V types %s/%s, the cache is %s/%s", f,
                                    rm_type_name(pl->k_type), rm_type_name(pl->v_type), rm_type_name(plan->k_type),
                                    rm_type_name(plan->v_type));
            }
        } else if (plan->k_type != RM_GGML_TYPE_F16 || plan->v_type != RM_GGML_TYPE_F16) {
            return RM_PLAN_FAIL(RM_ERR_PAYLOAD, "payload %u decodes to f16, the cache is %s/%s", f,
                                rm_type_name(plan->k_type), rm_type_name(plan->v_type));
        }
    }
    if (kv_math && plan->n_total > 0 && plan->k_type != RM_GGML_TYPE_F16 && plan->k_type != RM_GGML_TYPE_F32) {
        return RM_PLAN_FAIL(RM_ERR_ARG, "re-rotating or scaling keys needs an f16 or f32 K cache, not %s",
                            rm_type_name(plan->k_type));
    }

    // positions
    int64_t pmax = -1;
    for (uint32_t i = 0; i < pst->n_cells; ++i) {
        const int64_t p = rm_state_pos(prefix, pst, i);
        pmax = p > pmax ? p : pmax;
    }
    int64_t cursor = 0;
    if (prm->mode == RM_PLACE_SEQUENTIAL) {
        if (prm->rope_dims == 0 || prm->rope_dims % 2 != 0 || prm->head_dim == 0 || prm->rope_dims > prm->head_dim ||
            !(prm->rope_base > 0.0f) || !isfinite(prm->rope_base) || !(prm->rope_freq_scale > 0.0f)) {
            return RM_PLAN_FAIL(RM_ERR_ARG, "sequential placement needs rope_dims (even, <= head_dim %u), head_dim "
                                "and rope_base > 0 (got rope_dims %u)", prm->head_dim, prm->rope_dims);
        }
        for (uint32_t il = 0; il < plan->n_layer; ++il) {
            if (plan->n_embd_k[il] % prm->head_dim != 0) {
                return RM_PLAN_FAIL(RM_ERR_ARG, "layer %u: %u K values are not whole heads of %u", il,
                                    plan->n_embd_k[il], prm->head_dim);
            }
        }
        if (prm->start_pos > INT32_MAX) {
            return RM_PLAN_FAIL(RM_ERR_ARG, "start_pos is too large%s", "");
        }
        cursor = prm->start_pos >= 0 ? prm->start_pos : pmax + 1;
    }
    for (uint32_t f = 0; f < n_pl; ++f) {
        const rm_payload * pl = &pls[f];
        if (plan->frag_n[f] == 0) {
            continue;
        }
        int64_t lo = INT64_MAX;
        int64_t hi = INT64_MIN;
        for (uint32_t i = plan->frag_c0[f]; i < pl->n_cells; ++i) {
            const int64_t p = rm_payload_pos(pl, i);
            lo = p < lo ? p : lo;
            hi = p > hi ? p : hi;
        }
        int64_t delta = 0;
        if (prm->mode == RM_PLACE_SEQUENTIAL) {
            delta = cursor - (int64_t) rm_payload_pos(pl, plan->frag_c0[f]);
        }
        if (lo + delta < 0 || hi + delta > INT32_MAX) {
            return RM_PLAN_FAIL(RM_ERR_ARG, "fragment %u would land outside the position range%s", f, "");
        }
        plan->frag_delta[f] = delta;
        pmax   = hi + delta > pmax ? hi + delta : pmax;
        cursor = hi + delta + 1;
    }
    *next_pos = pmax + 1;

    if (prm->mode == RM_PLACE_SEQUENTIAL && n_pl > 0) {
        plan->rope_cs = (float *) calloc((size_t) n_pl * prm->rope_dims, sizeof(float));
        if (!plan->rope_cs) {
            return RM_PLAN_FAIL(RM_ERR_NOMEM, "out of memory for rope tables%s", "");
        }
        for (uint32_t f = 0; f < n_pl; ++f) {
            if (plan->frag_delta[f] != 0) {
                rm_rope_table(plan->rope_cs + (size_t) f * prm->rope_dims, prm->rope_dims, plan->frag_delta[f],
                              prm->rope_base, prm->rope_freq_scale);
            }
        }
    }

    // output size
    size_t size = 12u + 4u * (size_t) plan->n_stream;
    if (plan->n_total > 0) {
        const size_t N = plan->n_total;
        size_t       part;
        bool         ok = rm_mul(N, RM_CELL_META_BYTES, &part) && rm_add(size, part, &size) && rm_add(size, 8u, &size);
        for (uint32_t il = 0; ok && il < plan->n_layer; ++il) {
            ok = plan->k_row[il] <= SIZE_MAX && rm_mul(N, (size_t) plan->k_row[il], &part) &&
                 rm_add(size, 12u + part, &size);
            ok = ok && plan->v_row[il] <= SIZE_MAX && rm_mul(N, (size_t) plan->v_row[il], &part) &&
                 rm_add(size, 12u + part, &size);
        }
        if (!ok) {
            return RM_PLAN_FAIL(RM_ERR_ARG, "the spliced state size overflows%s", "");
        }
    }
    *out_size = size;
    *out_plan = plan;
    return RM_OK;
}

// ---------------------------------------------------------------------------------------------------------
// run

#if defined(__SSE2__)
#include <emmintrin.h>

// 8 rows x 8 channels of 16-bit values -> 8 column runs of 8 cells (three rounds of unpacks)
static inline void rm_transpose8x8_u16(const uint8_t * src, size_t src_stride, uint8_t * dst, size_t dst_stride) {
    const __m128i a0 = _mm_loadu_si128((const __m128i *) (const void *) (src + 0 * src_stride));
    const __m128i a1 = _mm_loadu_si128((const __m128i *) (const void *) (src + 1 * src_stride));
    const __m128i a2 = _mm_loadu_si128((const __m128i *) (const void *) (src + 2 * src_stride));
    const __m128i a3 = _mm_loadu_si128((const __m128i *) (const void *) (src + 3 * src_stride));
    const __m128i a4 = _mm_loadu_si128((const __m128i *) (const void *) (src + 4 * src_stride));
    const __m128i a5 = _mm_loadu_si128((const __m128i *) (const void *) (src + 5 * src_stride));
    const __m128i a6 = _mm_loadu_si128((const __m128i *) (const void *) (src + 6 * src_stride));
    const __m128i a7 = _mm_loadu_si128((const __m128i *) (const void *) (src + 7 * src_stride));
    const __m128i t0 = _mm_unpacklo_epi16(a0, a1);
    const __m128i t1 = _mm_unpackhi_epi16(a0, a1);
    const __m128i t2 = _mm_unpacklo_epi16(a2, a3);
    const __m128i t3 = _mm_unpackhi_epi16(a2, a3);
    const __m128i t4 = _mm_unpacklo_epi16(a4, a5);
    const __m128i t5 = _mm_unpackhi_epi16(a4, a5);
    const __m128i t6 = _mm_unpacklo_epi16(a6, a7);
    const __m128i t7 = _mm_unpackhi_epi16(a6, a7);
    const __m128i u0 = _mm_unpacklo_epi32(t0, t2);
    const __m128i u1 = _mm_unpackhi_epi32(t0, t2);
    const __m128i u2 = _mm_unpacklo_epi32(t1, t3);
    const __m128i u3 = _mm_unpackhi_epi32(t1, t3);
    const __m128i u4 = _mm_unpacklo_epi32(t4, t6);
    const __m128i u5 = _mm_unpackhi_epi32(t4, t6);
    const __m128i u6 = _mm_unpacklo_epi32(t5, t7);
    const __m128i u7 = _mm_unpackhi_epi32(t5, t7);
    _mm_storeu_si128((__m128i *) (void *) (dst + 0 * dst_stride), _mm_unpacklo_epi64(u0, u4));
    _mm_storeu_si128((__m128i *) (void *) (dst + 1 * dst_stride), _mm_unpackhi_epi64(u0, u4));
    _mm_storeu_si128((__m128i *) (void *) (dst + 2 * dst_stride), _mm_unpacklo_epi64(u1, u5));
    _mm_storeu_si128((__m128i *) (void *) (dst + 3 * dst_stride), _mm_unpackhi_epi64(u1, u5));
    _mm_storeu_si128((__m128i *) (void *) (dst + 4 * dst_stride), _mm_unpacklo_epi64(u2, u6));
    _mm_storeu_si128((__m128i *) (void *) (dst + 5 * dst_stride), _mm_unpackhi_epi64(u2, u6));
    _mm_storeu_si128((__m128i *) (void *) (dst + 6 * dst_stride), _mm_unpacklo_epi64(u3, u7));
    _mm_storeu_si128((__m128i *) (void *) (dst + 7 * dst_stride), _mm_unpackhi_epi64(u3, u7));
}
#endif

// rows [n][E] of el-byte elements -> columns of a transposed V block: dst[(j * N + off + i) * el]
static void rm_transpose_into(const uint8_t * src, uint32_t n, uint32_t E, uint32_t el, uint8_t * dst, size_t N,
                              size_t off) {
#if defined(__SSE2__)
    if (el == 2 && n >= 8 && E >= 8) {
        // strips of 8 channels: 8x8 SSE2 tiles down all cells, so every output column is written as one
        // sequential run (the source of one fragment-layer is small and stays in cache)
        const uint32_t n8 = n & ~7u;
        const uint32_t E8 = E & ~7u;
        for (uint32_t j = 0; j < E8; j += 8) {
            for (uint32_t i = 0; i < n8; i += 8) {
                rm_transpose8x8_u16(src + ((size_t) i * E + j) * 2u, (size_t) E * 2u, dst + ((size_t) j * N + off + i) * 2u,
                                    N * 2u);
            }
            for (uint32_t jj = j; jj < j + 8; ++jj) {
                uint8_t * d = dst + ((size_t) jj * N + off) * 2u;
                for (uint32_t i = n8; i < n; ++i) {
                    memcpy(d + (size_t) i * 2u, src + ((size_t) i * E + jj) * 2u, 2);
                }
            }
        }
        for (uint32_t jj = E8; jj < E; ++jj) {
            uint8_t * d = dst + ((size_t) jj * N + off) * 2u;
            for (uint32_t i = 0; i < n; ++i) {
                memcpy(d + (size_t) i * 2u, src + ((size_t) i * E + jj) * 2u, 2);
            }
        }
        return;
    }
#endif
    const uint32_t T = 64;
    for (uint32_t i0 = 0; i0 < n; i0 += T) {
        const uint32_t i1 = i0 + T < n ? i0 + T : n;
        for (uint32_t j0 = 0; j0 < E; j0 += T) {
            const uint32_t j1 = j0 + T < E ? j0 + T : E;
            if (el == 2) {
                for (uint32_t j = j0; j < j1; ++j) {
                    uint8_t * d = dst + ((size_t) j * N + off) * 2u;
                    for (uint32_t i = i0; i < i1; ++i) {
                        memcpy(d + (size_t) i * 2u, src + ((size_t) i * E + j) * 2u, 2);
                    }
                }
            } else if (el == 4) {
                for (uint32_t j = j0; j < j1; ++j) {
                    uint8_t * d = dst + ((size_t) j * N + off) * 4u;
                    for (uint32_t i = i0; i < i1; ++i) {
                        memcpy(d + (size_t) i * 4u, src + ((size_t) i * E + j) * 4u, 4);
                    }
                }
            } else {
                for (uint32_t j = j0; j < j1; ++j) {
                    uint8_t * d = dst + ((size_t) j * N + off) * el;
                    for (uint32_t i = i0; i < i1; ++i) {
                        memcpy(d + (size_t) i * el, src + ((size_t) i * E + j) * el, el);
                    }
                }
            }
        }
    }
}

rm_status rm_splice_run(rm_splice_plan * plan, uint8_t * out, size_t out_size, char * err) {
    const rm_state *         pst = &plan->pst;
    const rm_splice_params * prm = &plan->prm;
    const size_t             N   = plan->n_total;
    const size_t             NP  = pst->n_cells;

    rm_writer w = { out, out_size, 0, false };
    rm_wr_u32(&w, RM_STATE_MAGIC);
    rm_wr_i32(&w, prm->seq_id);
    rm_wr_u32(&w, plan->n_stream);
    for (uint32_t s = 0; s < plan->n_stream; ++s) {
        if (s != plan->data_stream || N == 0) {
            rm_wr_u32(&w, 0);
            continue;
        }
        rm_wr_u32(&w, (uint32_t) N);

        // cell metadata
        for (uint32_t i = 0; i < NP; ++i) {
            rm_wr_i32(&w, rm_state_pos(plan->prefix, pst, i));
            rm_wr_u32(&w, 1);
            rm_wr_i32(&w, prm->seq_id);
        }
        for (uint32_t f = 0; f < plan->n_pl; ++f) {
            const rm_payload * pl = &plan->pls[f];
            for (uint32_t i = plan->frag_c0[f]; i < pl->n_cells; ++i) {
                rm_wr_i32(&w, (int32_t) (rm_payload_pos(pl, i) + plan->frag_delta[f]));
                rm_wr_u32(&w, 1);
                rm_wr_i32(&w, prm->seq_id);
            }
        }
        rm_wr_u32(&w, plan->v_trans);
        rm_wr_u32(&w, plan->n_layer);
        if (w.overflow) {
            break;
        }

        // scratch: one row of floats (decode / rope) and, for transposed V, the decoded rows of a fragment
        float *   tmp   = (float *) malloc(sizeof(float) * (size_t) (plan->max_e ? plan->max_e : 1u));
        uint8_t * vrows = NULL;
        if (plan->v_trans && plan->max_frag_n > 0) {
            vrows = (uint8_t *) malloc((size_t) plan->max_frag_n * plan->max_e * plan->v_el);
        }
        if (!tmp || (plan->v_trans && plan->max_frag_n > 0 && !vrows)) {
            free(tmp);
            free(vrows);
            return rm_fail(err, RM_ERR_NOMEM, "out of memory for splice scratch");
        }

        // keys
        for (uint32_t il = 0; il < plan->n_layer; ++il) {
            const size_t krow = (size_t) plan->k_row[il];
            rm_wr_i32(&w, plan->k_type);
            rm_wr_u64(&w, plan->k_row[il]);
            uint8_t * R = rm_wr_take(&w, N * krow);
            if (!R) {
                break;
            }
            if (NP) {
                memcpy(R, plan->prefix + pst->layers[il].k_off, NP * krow);
            }
            size_t off = NP;
            for (uint32_t f = 0; f < plan->n_pl; ++f) {
                const uint32_t n = plan->frag_n[f];
                if (n == 0) {
                    continue;
                }
                uint8_t * dst = R + off * krow;
                rm_decode_rows(&plan->pls[f], il, false, plan->frag_c0[f], n, dst, krow, tmp);
                const bool  rot   = plan->frag_delta[f] != 0 && prm->mode == RM_PLACE_SEQUENTIAL;
                const float scale = plan->frag_scale[f];
                if (rot || scale != 1.0f) {
                    rm_rope rope = { rot ? plan->rope_cs + (size_t) f * prm->rope_dims : NULL, prm->rope_dims,
                                     prm->head_dim, prm->rope_neox };
                    if (plan->k_type == RM_GGML_TYPE_F16) {
                        rm_rope_rows_f16((uint16_t *) (void *) dst, krow / 2u, n, plan->n_embd_k[il],
                                         rot ? &rope : NULL, scale, tmp);
                    } else {
                        rm_rope_rows_f32((float *) (void *) dst, krow / 4u, n, plan->n_embd_k[il], rot ? &rope : NULL,
                                         scale);
                    }
                }
                off += n;
            }
        }

        // values
        for (uint32_t il = 0; il < plan->n_layer && !w.overflow; ++il) {
            rm_wr_i32(&w, plan->v_type);
            if (!plan->v_trans) {
                const size_t vrow = (size_t) plan->v_row[il];
                rm_wr_u64(&w, plan->v_row[il]);
                uint8_t * R = rm_wr_take(&w, N * vrow);
                if (!R) {
                    break;
                }
                if (NP) {
                    memcpy(R, plan->prefix + pst->layers[il].v_off, NP * vrow);
                }
                size_t off = NP;
                for (uint32_t f = 0; f < plan->n_pl; ++f) {
                    const uint32_t n = plan->frag_n[f];
                    if (n) {
                        rm_decode_rows(&plan->pls[f], il, true, plan->frag_c0[f], n, R + off * vrow, vrow, tmp);
                    }
                    off += n;
                }
            } else {
                const uint32_t E  = plan->n_embd_v[il];
                const uint32_t el = plan->v_el;
                rm_wr_u32(&w, el);
                rm_wr_u32(&w, E);
                uint8_t * R = rm_wr_take(&w, N * E * el);
                if (!R) {
                    break;
                }
                if (NP) {
                    const uint8_t * src = plan->prefix + pst->layers[il].v_off;
                    for (uint32_t j = 0; j < E; ++j) {
                        memcpy(R + (size_t) j * N * el, src + (size_t) j * NP * el, NP * el);
                    }
                }
                size_t off = NP;
                for (uint32_t f = 0; f < plan->n_pl; ++f) {
                    const rm_payload * pl = &plan->pls[f];
                    const uint32_t     n  = plan->frag_n[f];
                    if (n == 0) {
                        continue;
                    }
                    const uint8_t * rows;
                    if (pl->encoding == RM_ENC_RAW || pl->encoding == RM_ENC_F16) {
                        rows = pl->data + pl->v_off[il] + (size_t) plan->frag_c0[f] * E * el;
                    } else {
                        rm_decode_rows(pl, il, true, plan->frag_c0[f], n, vrows, (size_t) E * el, tmp);
                        rows = vrows;
                    }
                    rm_transpose_into(rows, n, E, el, R, N, off);
                    off += n;
                }
            }
        }
        free(tmp);
        free(vrows);
    }

    if (w.overflow || w.off != out_size) {
        return rm_fail(err, RM_ERR_ARG, "internal error: spliced size mismatch (%zu of %zu bytes)", w.off, out_size);
    }
    return RM_OK;
}
