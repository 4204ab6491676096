// capture.c - cb_eval callback that accumulates the attention each KV cell receives during a decode.
//
// With flash attention off, llama.cpp's graph (llama-graph.cpp build_attn_mha) names the softmax output
// "kq_soft_max-<il>" (cb(kq, "kq_soft_max", il) -> ggml_format_name("%s-%d")): f32,
// ne = [n_kv, n_tokens, n_head, n_stream]. Element [c, q, h, s] is how much query q of head h attends
// to KV cell c. We add up every (q, h, s) per cell c, optionally per layer.
//
// Runs on llama.cpp's decode thread with the GIL released: pure C, no Python objects.

#include "kvsplice.h"

#include <stdio.h>
#include <stdlib.h>

static rm_ggml_get_name_fn               g_get_name   = NULL;
static rm_ggml_backend_tensor_get_fn     g_tensor_get = NULL;
static rm_ggml_backend_buffer_is_host_fn g_is_host    = NULL;

#if defined(__x86_64__) || defined(__aarch64__)
_Static_assert(sizeof(struct rm_ggml_tensor) == 336, "struct ggml_tensor copy: 336 bytes on 64-bit (0.3.36)");
_Static_assert(offsetof(struct rm_ggml_tensor, data) == 248, "ggml_tensor.data offset");
_Static_assert(offsetof(struct rm_ggml_tensor, name) == 256, "ggml_tensor.name offset");
#endif

void rm_set_ggml_api(rm_ggml_get_name_fn get_name, rm_ggml_backend_tensor_get_fn tensor_get,
                     rm_ggml_backend_buffer_is_host_fn is_host) {
    g_get_name   = get_name;
    g_tensor_get = tensor_get;
    g_is_host    = is_host;
}

bool rm_ggml_api_ready(void) {
    return g_get_name && g_tensor_get && g_is_host;
}

// "kq_soft_max-<il>" -> il, or -1
static int rm_softmax_layer(const char * name) {
    static const char prefix[] = "kq_soft_max-";
    const size_t      np       = sizeof(prefix) - 1;
    if (strncmp(name, prefix, np) != 0) {
        return -1;
    }
    const char * p = name + np;
    if (*p < '0' || *p > '9') {
        return -1;
    }
    long v = 0;
    for (; *p >= '0' && *p <= '9'; ++p) {
        v = v * 10 + (*p - '0');
        if (v > 1000000) {
            return -1;
        }
    }
    return *p == '\0' ? (int) v : -1;
}

// check the copied struct layout against the library once per capture: the name pointer that
// ggml_get_name() returns must be our &t->name[0]
static bool rm_layout_ok(rm_capture * cap, struct rm_ggml_tensor * t) {
    if (cap->layout == 0) {
        if (!rm_ggml_api_ready()) {
            cap->layout = -1;
        } else {
            cap->layout = g_get_name(t) == t->name ? 1 : -1;
        }
    }
    return cap->layout == 1;
}

static bool rm_name_terminated(const struct rm_ggml_tensor * t) {
    return memchr(t->name, '\0', sizeof(t->name)) != NULL;
}

bool rm_capture_cb(struct rm_ggml_tensor * t, bool ask, void * user_data) {
    rm_capture * cap = (rm_capture *) user_data;
    if (!cap || !t || !cap->scores) {
        return ask ? false : true; // not initialised: observe nothing, never abort the graph
    }
    if (!rm_layout_ok(cap, t) || !rm_name_terminated(t)) {
        return ask ? false : true; // never ask for anything; never abort the graph
    }
    const int il = rm_softmax_layer(t->name);
    if (ask) {
        return il >= 0;
    }
    if (il < 0) {
        return true;
    }
    if (t->type != RM_GGML_TYPE_F32 || t->nb[0] != sizeof(float) || (cap->per_layer && (uint32_t) il >= cap->n_layer)) {
        cap->skipped++;
        return true;
    }
    const int64_t n_kv = t->ne[0];
    const int64_t n1   = t->ne[1];
    const int64_t n2   = t->ne[2];
    const int64_t n3   = t->ne[3];
    if (n_kv <= 0 || n1 <= 0 || n2 <= 0 || n3 <= 0) {
        cap->skipped++;
        return true;
    }

    // the bytes spanned by the tensor: last element + 1
    const size_t span = (size_t) (n_kv - 1) * t->nb[0] + (size_t) (n1 - 1) * t->nb[1] + (size_t) (n2 - 1) * t->nb[2] +
                        (size_t) (n3 - 1) * t->nb[3] + sizeof(float);
    const uint8_t * base = NULL;
    if (t->buffer == NULL || g_is_host(t->buffer)) {
        base = (const uint8_t *) t->data;
    } else {
        if (cap->tmp_n < span) {
            float * nt = (float *) realloc(cap->tmp, span);
            if (!nt) {
                cap->skipped++;
                return true;
            }
            cap->tmp   = nt;
            cap->tmp_n = span;
        }
        g_tensor_get(t, cap->tmp, 0, span);
        base = (const uint8_t *) cap->tmp;
    }
    if (!base) {
        cap->skipped++;
        return true;
    }

    float *       acc = cap->scores + (cap->per_layer ? (size_t) il * cap->n_cells : 0u);
    const int64_t nc  = n_kv < (int64_t) cap->n_cells ? n_kv : (int64_t) cap->n_cells;
    for (int64_t i3 = 0; i3 < n3; ++i3) {
        for (int64_t i2 = 0; i2 < n2; ++i2) {
            for (int64_t i1 = 0; i1 < n1; ++i1) {
                const float * row = (const float *) (const void *) (base + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3]);
                for (int64_t c = 0; c < nc; ++c) {
                    acc[c] += row[c];
                }
            }
        }
    }
    cap->calls++;
    return true;
}
