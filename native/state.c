// state.c - reader/validator of llama.cpp sequence state blobs.
//
// Format (llama-cpp-python 0.3.36: llama-context.cpp state_seq_get_data, llama-kv-cache.cpp state_write*):
//
//   u32 magic 0xaf143cd8 | i32 seq_id | u32 n_stream
//   n_stream x {
//     u32 cell_count
//     if cell_count > 0:
//       cell_count x { i32 pos | u32 n_seq_id | i32 seq_id[n_seq_id] }      (no cell ext for text models)
//       u32 v_trans | u32 n_layer
//       n_layer x { i32 k_type | u64 k_row_bytes | cell_count rows }
//       !v_trans: n_layer x { i32 v_type | u64 v_row_bytes | cell_count rows }
//        v_trans: n_layer x { i32 v_type | u32 v_elem_bytes | u32 n_embd_v_gqa | n_embd_v_gqa x cell_count elems }
//   }
//
// Accepted here: blobs of one sequence (n_seq_id == 1 for every cell, equal to the blob's seq_id), at most
// one non-empty stream, and nothing after the last stream.

#include "kvsplice.h"

#include <stdlib.h>

void rm_state_free(rm_state * st) {
    free(st->layers);
    st->layers = NULL;
}

// free what was allocated so far and fail with a StateFormatError message
static rm_status rm_state_fail(rm_state * st, rm_status rc) {
    rm_state_free(st);
    return rc;
}
#define RM_STATE_FAIL(...) rm_state_fail(st, rm_fail(err, RM_ERR_STATE, __VA_ARGS__))

// derive the element count of a row from its byte size when the type is known (0 if not derivable)
static uint32_t rm_row_elems(int32_t type, uint64_t row_bytes) {
    uint32_t blck;
    uint32_t tsize;
    if (!rm_type_info(type, &blck, &tsize) || row_bytes % tsize != 0) {
        return 0;
    }
    const uint64_t n = row_bytes / tsize * blck;
    return n <= RM_MAX_EMBD ? (uint32_t) n : 0;
}

rm_status rm_state_parse(const uint8_t * buf, size_t n, rm_state * st, char * err) {
    memset(st, 0, sizeof(*st));
    rm_reader r = { buf, n, 0 };

    uint32_t magic;
    if (!rm_rd_u32(&r, &magic) || !rm_rd_i32(&r, &st->seq_id) || !rm_rd_u32(&r, &st->n_stream)) {
        return rm_fail(err, RM_ERR_STATE, "state blob truncated: %zu bytes, the header needs 12", n);
    }
    if (magic != RM_STATE_MAGIC) {
        return rm_fail(err, RM_ERR_STATE, "not a llama.cpp sequence state: magic 0x%08x, expected 0x%08x", magic,
                       RM_STATE_MAGIC);
    }
    if (st->n_stream == 0 || st->n_stream > RM_MAX_STREAMS) {
        return rm_fail(err, RM_ERR_STATE, "state blob has %u streams (1..%u expected)", st->n_stream,
                       RM_MAX_STREAMS);
    }

    bool found = false;
    for (uint32_t s = 0; s < st->n_stream; ++s) {
        uint32_t cell_count;
        if (!rm_rd_u32(&r, &cell_count)) {
            return RM_STATE_FAIL("state blob truncated in the cell count of stream %u of %u", s,
                                 st->n_stream);
        }
        if (cell_count == 0) {
            continue;
        }
        if (found) {
            return RM_STATE_FAIL("state blob has cells in streams %u and %u; one sequence expected",
                                 st->stream, s);
        }
        if (cell_count > RM_MAX_CELLS) {
            return RM_STATE_FAIL("state blob claims %u cells (limit %u)", cell_count, RM_MAX_CELLS);
        }
        found        = true;
        st->stream   = s;
        st->n_cells  = cell_count;

        // cell metadata: a single-sequence blob has exactly 12 bytes per cell
        st->cells_off = r.off;
        size_t meta_bytes;
        const uint8_t * meta;
        if (!rm_mul(cell_count, RM_CELL_META_BYTES, &meta_bytes) || !rm_rd_bytes(&r, meta_bytes, &meta)) {
            return RM_STATE_FAIL("state blob truncated in the metadata of %u cells", cell_count);
        }
        for (uint32_t i = 0; i < cell_count; ++i) {
            const uint8_t * c = meta + (size_t) i * RM_CELL_META_BYTES;
            const int32_t  pos      = rm_load_i32(c);
            const uint32_t n_seq_id = rm_load_u32(c + 4);
            const int32_t  seq      = rm_load_i32(c + 8);
            if (n_seq_id != 1) {
                return RM_STATE_FAIL("cell %u belongs to %u sequences; only single-sequence blobs "
                                     "(llama_state_seq_get_data) are supported",
                                     i, n_seq_id);
            }
            if (seq != st->seq_id) {
                return RM_STATE_FAIL("cell %u has seq_id %d, the blob header %d", i, seq, st->seq_id);
            }
            if (pos < 0) {
                return RM_STATE_FAIL("cell %u has a negative position %d", i, pos);
            }
        }

        if (!rm_rd_u32(&r, &st->v_trans) || !rm_rd_u32(&r, &st->n_layer)) {
            return RM_STATE_FAIL("state blob truncated before the layer data (%u cells)", cell_count);
        }
        if (st->v_trans > 1) {
            return RM_STATE_FAIL("state blob has v_trans = %u (0 or 1 expected)", st->v_trans);
        }
        if (st->n_layer == 0 || st->n_layer > RM_MAX_LAYERS) {
            return RM_STATE_FAIL("state blob has %u layers (1..%u expected)", st->n_layer, RM_MAX_LAYERS);
        }
        st->layers = (rm_layer *) calloc(st->n_layer, sizeof(rm_layer));
        if (!st->layers) {
            return rm_fail(err, RM_ERR_NOMEM, "out of memory for %u layers", st->n_layer);
        }

        const size_t remaining_cells = cell_count;
        for (uint32_t il = 0; il < st->n_layer; ++il) {
            rm_layer * L = &st->layers[il];
            uint64_t   k_row;
            if (!rm_rd_i32(&r, &L->k_type) || !rm_rd_u64(&r, &k_row)) {
                return RM_STATE_FAIL("state blob truncated in the K header of layer %u of %u", il,
                                     st->n_layer);
            }
            size_t k_bytes;
            const uint8_t * kp;
            if (k_row == 0 || k_row > SIZE_MAX || !rm_mul((size_t) k_row, remaining_cells, &k_bytes) ||
                !rm_rd_bytes(&r, k_bytes, &kp)) {
                return RM_STATE_FAIL("state blob: K rows of layer %u do not fit (row of %u bytes)", il,
                                     (uint32_t) (k_row > UINT32_MAX ? UINT32_MAX : k_row));
            }
            uint32_t blck;
            uint32_t tsize;
            if (rm_type_info(L->k_type, &blck, &tsize) && k_row % tsize != 0) {
                return RM_STATE_FAIL("state blob: K row of layer %u is not a whole number of %u-byte blocks",
                                     il, tsize);
            }
            L->k_row    = k_row;
            L->k_off    = (size_t) (kp - buf);
            L->n_embd_k = rm_row_elems(L->k_type, k_row);
        }

        for (uint32_t il = 0; il < st->n_layer; ++il) {
            rm_layer * L = &st->layers[il];
            if (!rm_rd_i32(&r, &L->v_type)) {
                return RM_STATE_FAIL("state blob truncated in the V header of layer %u of %u", il,
                                     st->n_layer);
            }
            uint32_t blck  = 0;
            uint32_t tsize = 0;
            const bool known = rm_type_info(L->v_type, &blck, &tsize);
            const uint8_t * vp;
            if (!st->v_trans) {
                uint64_t v_row;
                if (!rm_rd_u64(&r, &v_row)) {
                    return RM_STATE_FAIL("state blob truncated in the V header of layer %u of %u", il,
                                         st->n_layer);
                }
                size_t v_bytes;
                if (v_row == 0 || v_row > SIZE_MAX || !rm_mul((size_t) v_row, remaining_cells, &v_bytes) ||
                    !rm_rd_bytes(&r, v_bytes, &vp)) {
                    return RM_STATE_FAIL("state blob: V rows of layer %u do not fit (row of %u bytes)", il,
                                         (uint32_t) (v_row > UINT32_MAX ? UINT32_MAX : v_row));
                }
                if (known && v_row % tsize != 0) {
                    return RM_STATE_FAIL("state blob: V row of layer %u is not a whole number of %u-byte blocks", il,
                                         tsize);
                }
                L->v_row    = v_row;
                L->n_embd_v = rm_row_elems(L->v_type, v_row);
            } else {
                uint32_t v_el;
                uint32_t n_embd_v;
                if (!rm_rd_u32(&r, &v_el) || !rm_rd_u32(&r, &n_embd_v)) {
                    return RM_STATE_FAIL("state blob truncated in the V header of layer %u of %u", il,
                                         st->n_layer);
                }
                if (v_el == 0 || v_el > 16 || n_embd_v == 0 || n_embd_v > RM_MAX_EMBD) {
                    return RM_STATE_FAIL("state blob: transposed V of layer %u has element size %u", il, v_el);
                }
                if (known && (blck != 1 || tsize != v_el)) {
                    return RM_STATE_FAIL("state blob: transposed V of layer %u: element size %u does not match its type",
                                         il, v_el);
                }
                size_t v_bytes;
                if (!rm_mul((size_t) v_el * n_embd_v, remaining_cells, &v_bytes) || !rm_rd_bytes(&r, v_bytes, &vp)) {
                    return RM_STATE_FAIL("state blob: transposed V of layer %u does not fit (%u elements)",
                                         il, n_embd_v);
                }
                L->v_el     = v_el;
                L->n_embd_v = n_embd_v;
                L->v_row    = (uint64_t) v_el * n_embd_v;
            }
            L->v_off = (size_t) (vp - buf);
        }
    }

    if (r.off != n) {
        const size_t extra = n - r.off;
        rm_state_free(st);
        return rm_fail(err, RM_ERR_STATE, "state blob has %zu trailing bytes after the last stream", extra);
    }
    st->size = n;
    return RM_OK;
}

rm_status rm_state_check(const rm_state * st, uint32_t n_layer, const uint32_t * n_embd_k,
                         const uint32_t * n_embd_v, int32_t k_type, int32_t v_type, char * err) {
    if (st->n_cells == 0) {
        return RM_OK; // llama.cpp writes no layer data for an empty sequence: nothing to compare
    }
    if (st->n_layer != n_layer) {
        return rm_fail(err, RM_ERR_STATE, "state blob has %u layers, the model %u", st->n_layer, n_layer);
    }
    for (uint32_t il = 0; il < n_layer; ++il) {
        const rm_layer * L = &st->layers[il];
        if (k_type >= 0 && L->k_type != k_type) {
            return rm_fail(err, RM_ERR_STATE, "layer %u: K type %s (%d), expected %s (%d)", il,
                           rm_type_name(L->k_type), L->k_type, rm_type_name(k_type), k_type);
        }
        if (v_type >= 0 && L->v_type != v_type) {
            return rm_fail(err, RM_ERR_STATE, "layer %u: V type %s (%d), expected %s (%d)", il,
                           rm_type_name(L->v_type), L->v_type, rm_type_name(v_type), v_type);
        }
        uint64_t want;
        if (!rm_row_size(L->k_type, n_embd_k[il], &want)) {
            return rm_fail(err, RM_ERR_STATE, "layer %u: K type %d is unknown or does not fit %u values", il,
                           L->k_type, n_embd_k[il]);
        }
        if (want != L->k_row) {
            return rm_fail(err, RM_ERR_STATE, "layer %u: K row is %llu bytes, expected %llu (%u x %s)", il,
                           (unsigned long long) L->k_row, (unsigned long long) want, n_embd_k[il],
                           rm_type_name(L->k_type));
        }
        if (st->v_trans) {
            uint32_t blck;
            uint32_t tsize;
            if (!rm_type_info(L->v_type, &blck, &tsize) || blck != 1) {
                return rm_fail(err, RM_ERR_STATE, "layer %u: V type %d cannot be stored transposed", il, L->v_type);
            }
            if (L->n_embd_v != n_embd_v[il] || L->v_el != tsize) {
                return rm_fail(err, RM_ERR_STATE, "layer %u: V has %u x %u-byte values, expected %u x %u", il,
                               L->n_embd_v, L->v_el, n_embd_v[il], tsize);
            }
        } else {
            if (!rm_row_size(L->v_type, n_embd_v[il], &want)) {
                return rm_fail(err, RM_ERR_STATE, "layer %u: V type %d is unknown or does not fit %u values", il,
                               L->v_type, n_embd_v[il]);
            }
            if (want != L->v_row) {
                return rm_fail(err, RM_ERR_STATE, "layer %u: V row is %llu bytes, expected %llu (%u x %s)", il,
                               (unsigned long long) L->v_row, (unsigned long long) want, n_embd_v[il],
                               rm_type_name(L->v_type));
            }
        }
    }
    return RM_OK;
}
