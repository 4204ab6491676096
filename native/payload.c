// payload.c - repomem fragment payloads: layout, validation, extraction (encode) and decoding.
// The byte layout is documented in native/README.md; keep both in sync.

#include "kvsplice.h"

#include <math.h>
#include <stdlib.h>

// header field offsets
#define OFF_MAGIC        0
#define OFF_VERSION      8
#define OFF_HEADER_BYTES 12
#define OFF_FINGERPRINT  16
#define OFF_N_LAYER      48
#define OFF_N_CELLS      52
#define OFF_K_TYPE       56
#define OFF_V_TYPE       60
#define OFF_ENCODING     64
#define OFF_GROUP        68
#define OFF_POS_FIRST    72
#define OFF_POS_MAX      76
#define OFF_FLAGS        80
#define OFF_RESERVED0    84
#define OFF_USER         88
#define OFF_DATA_BYTES   96
#define OFF_RESERVED1    104 // 3 x u64 zero, up to 128

#define RM_Q8_BLOCK   34u // f16 scale + 32 x int8
#define RM_NF3_BLOCK  28u // f16 mean + f16 std + 24 bytes of 3-bit codes (64 values)
#define RM_NF3C_BLOCK 26u // K4V3 values: u8 std code + i8 mean code + 24 bytes of 3-bit codes
#define RM_K4_BLOCK   18u // K4V3 keys, one channel of a full group: u8 scale code + i8 zero point + 16 bytes

static size_t rm_pad8(size_t n) {
    return (n + 7u) & ~(size_t) 7u;
}

// uniform KIVI blocks (Q4, Q2, and the keys of K3V3): f16 scale + f16 min + 32 codes
static uint32_t rm_kivi_bits(uint32_t enc) {
    return enc == RM_ENC_Q2 ? 2u : (enc == RM_ENC_K3V3 ? 3u : 4u);
}

static uint32_t rm_kivi_block(uint32_t enc) {
    return 4u + RM_GROUP * rm_kivi_bits(enc) / 8u;
}

// bytes of one key block (one channel of one group of cells). K3V3 stores the last, partial group of cells
// tight (codes for the cells it has); Q4/Q2 keep the padded block of their first format.
static uint32_t rm_kivi_k_block(uint32_t enc, uint32_t cells_in_group) {
    if (enc == RM_ENC_K3V3 && cells_in_group < RM_GROUP) {
        return 4u + (cells_in_group * rm_kivi_bits(enc) + 7u) / 8u;
    }
    return rm_kivi_block(enc);
}

// K4V3 keys: bytes of one channel's block in a group of cells (the last, partial group is stored tight)
static uint32_t rm_k4_block(uint32_t cells_in_group) {
    return 2u + (cells_in_group * 4u + 7u) / 8u;
}

// the header's group field: 32 for the one-group encodings, K group | V group << 16 for K3V3 and K4V3
static uint32_t rm_enc_group(uint32_t enc) {
    switch (enc) {
        case RM_ENC_Q8:
        case RM_ENC_Q4:
        case RM_ENC_Q2:
            return RM_GROUP;
        case RM_ENC_K3V3:
        case RM_ENC_K4V3:
            return RM_GROUP | (RM_NF_GROUP << 16);
        default:
            return 0u;
    }
}

// code k of a block's codes (nbytes long) at bit k * bits, little-end first; a code may straddle two bytes
static inline uint32_t rm_code_get(const uint8_t * codes, uint32_t nbytes, uint32_t k, uint32_t bits) {
    const uint32_t bit  = k * bits;
    const uint32_t byte = bit / 8u;
    uint32_t       w    = codes[byte];
    if (byte + 1u < nbytes) {
        w |= (uint32_t) codes[byte + 1u] << 8;
    }
    return (w >> (bit % 8u)) & ((1u << bits) - 1u);
}

static inline void rm_code_put(uint8_t * codes, uint32_t nbytes, uint32_t k, uint32_t bits, uint32_t q) {
    const uint32_t bit  = k * bits;
    const uint32_t byte = bit / 8u;
    codes[byte] |= (uint8_t) (q << (bit % 8u));
    if (bit % 8u + bits > 8u && byte + 1u < nbytes) {
        codes[byte + 1u] |= (uint8_t) (q >> (8u - bit % 8u));
    }
}

bool rm_enc_k_bytes(uint32_t enc, int32_t type, uint32_t n_cells, uint32_t n_embd, size_t * out) {
    size_t   row;
    uint64_t r64;
    size_t   groups;
    switch (enc) {
        case RM_ENC_RAW:
            if (!rm_row_size(type, n_embd, &r64) || r64 > SIZE_MAX) {
                return false;
            }
            return rm_mul((size_t) r64, n_cells, out);
        case RM_ENC_F16:
            return rm_mul((size_t) n_embd * 2u, n_cells, out);
        case RM_ENC_Q8:
            row = (size_t) ((n_embd + RM_GROUP - 1) / RM_GROUP) * RM_Q8_BLOCK;
            return rm_mul(row, n_cells, out);
        case RM_ENC_Q4:
        case RM_ENC_Q2:
        case RM_ENC_K3V3: {
            // keys: per channel, groups of 32 cells along the token axis
            size_t full;
            size_t last = 0;
            groups = (size_t) n_cells / RM_GROUP;
            if (n_cells % RM_GROUP != 0) {
                last = (size_t) n_embd * rm_kivi_k_block(enc, n_cells % RM_GROUP);
            }
            return rm_mul(groups, (size_t) n_embd * rm_kivi_block(enc), &full) && rm_add(full, last, out);
        }
        case RM_ENC_K4V3: {
            // f16 base + n_embd f16 channel centers, then per group of 32 cells one block per channel
            size_t full;
            size_t head = 2u + 2u * (size_t) n_embd;
            groups = (size_t) n_cells / RM_GROUP;
            if (n_cells % RM_GROUP != 0) {
                head += (size_t) n_embd * rm_k4_block(n_cells % RM_GROUP);
            }
            return rm_mul(groups, (size_t) n_embd * RM_K4_BLOCK, &full) && rm_add(full, head, out);
        }
        default:
            return false;
    }
}

bool rm_enc_v_bytes(uint32_t enc, int32_t type, uint32_t n_cells, uint32_t n_embd, size_t * out) {
    size_t row;
    switch (enc) {
        case RM_ENC_RAW:
        case RM_ENC_F16:
        case RM_ENC_Q8:
            return rm_enc_k_bytes(enc, type, n_cells, n_embd, out);
        case RM_ENC_Q4:
        case RM_ENC_Q2:
            // values: per cell, groups of 32 channels
            row = (size_t) ((n_embd + RM_GROUP - 1) / RM_GROUP) * rm_kivi_block(enc);
            return rm_mul(row, n_cells, out);
        case RM_ENC_K3V3:
            // values: per cell, whole Hadamard blocks of 64 channels (no partial block)
            if (n_embd % RM_NF_GROUP != 0) {
                return false;
            }
            row = (size_t) (n_embd / RM_NF_GROUP) * RM_NF3_BLOCK;
            return rm_mul(row, n_cells, out);
        case RM_ENC_K4V3:
            // f16 base, then per cell the whole Hadamard blocks with 8-bit statistics
            if (n_embd % RM_NF_GROUP != 0) {
                return false;
            }
            row = (size_t) (n_embd / RM_NF_GROUP) * RM_NF3C_BLOCK;
            return rm_mul(row, n_cells, out) && rm_add(*out, 2u, out);
        default:
            return false;
    }
}

// ---------------------------------------------------------------------------------------------------------
// open / validate

void rm_payload_close(rm_payload * pl) {
    free(pl->k_off);
    free(pl->v_off);
    pl->k_off = NULL;
    pl->v_off = NULL;
}

static rm_status rm_payload_fail(rm_payload * pl, rm_status rc) {
    rm_payload_close(pl);
    return rc;
}
#define RM_PAYLOAD_FAIL(...) rm_payload_fail(pl, rm_fail(err, RM_ERR_PAYLOAD, __VA_ARGS__))

rm_status rm_payload_open(const uint8_t * buf, size_t n, bool verify, rm_payload * pl, char * err) {
    memset(pl, 0, sizeof(*pl));
    if (n < RM_PAYLOAD_HEADER + 8u) {
        return rm_fail(err, RM_ERR_PAYLOAD, "payload truncated: %zu bytes, the header alone needs %u", n,
                       RM_PAYLOAD_HEADER + 8u);
    }
    if (memcmp(buf + OFF_MAGIC, RM_PAYLOAD_MAGIC, 8) != 0) {
        return rm_fail(err, RM_ERR_PAYLOAD, "not a repomem KV payload (bad magic)");
    }
    pl->base         = buf;
    pl->size         = n;
    pl->version      = rm_load_u32(buf + OFF_VERSION);
    pl->header_bytes = rm_load_u32(buf + OFF_HEADER_BYTES);
    pl->fingerprint  = buf + OFF_FINGERPRINT;
    pl->n_layer      = rm_load_u32(buf + OFF_N_LAYER);
    pl->n_cells      = rm_load_u32(buf + OFF_N_CELLS);
    pl->k_type       = rm_load_i32(buf + OFF_K_TYPE);
    pl->v_type       = rm_load_i32(buf + OFF_V_TYPE);
    pl->encoding     = rm_load_u32(buf + OFF_ENCODING);
    pl->group        = rm_load_u32(buf + OFF_GROUP);
    pl->pos_first    = rm_load_i32(buf + OFF_POS_FIRST);
    pl->pos_max      = rm_load_i32(buf + OFF_POS_MAX);
    pl->flags        = rm_load_u32(buf + OFF_FLAGS);
    pl->user         = rm_load_u64(buf + OFF_USER);
    pl->data_bytes   = rm_load_u64(buf + OFF_DATA_BYTES);
    pl->checksum     = rm_load_u64(buf + n - 8);

    if (pl->version != RM_PAYLOAD_VERSION) {
        return rm_fail(err, RM_ERR_PAYLOAD, "payload format version %u, this build reads %u", pl->version,
                       RM_PAYLOAD_VERSION);
    }
    if (pl->n_layer == 0 || pl->n_layer > RM_MAX_LAYERS) {
        return rm_fail(err, RM_ERR_PAYLOAD, "payload has %u layers (1..%u expected)", pl->n_layer, RM_MAX_LAYERS);
    }
    if (pl->header_bytes != RM_PAYLOAD_HEADER + RM_PAYLOAD_LAYER_ENTRY * pl->n_layer) {
        return rm_fail(err, RM_ERR_PAYLOAD, "payload header size %u does not match %u layers", pl->header_bytes,
                       pl->n_layer);
    }
    if (pl->n_cells > RM_MAX_CELLS) {
        return rm_fail(err, RM_ERR_PAYLOAD, "payload claims %u cells (limit %u)", pl->n_cells, RM_MAX_CELLS);
    }
    if (pl->encoding >= RM_ENC_COUNT) {
        return rm_fail(err, RM_ERR_PAYLOAD, "payload has unknown encoding %u", pl->encoding);
    }
    if (pl->group != rm_enc_group(pl->encoding)) {
        return rm_fail(err, RM_ERR_PAYLOAD, "payload group size %u is wrong for encoding %u", pl->group,
                       pl->encoding);
    }
    if (pl->flags & ~RM_FLAG_CONTIGUOUS) {
        return rm_fail(err, RM_ERR_PAYLOAD, "payload has unknown flags 0x%x", pl->flags);
    }
    if (rm_load_u32(buf + OFF_RESERVED0) != 0 || rm_load_u64(buf + OFF_RESERVED1) != 0 ||
        rm_load_u64(buf + OFF_RESERVED1 + 8) != 0 || rm_load_u64(buf + OFF_RESERVED1 + 16) != 0) {
        return rm_fail(err, RM_ERR_PAYLOAD, "payload reserved header fields are not zero");
    }
    if (pl->encoding == RM_ENC_RAW) {
        if (!rm_type_info(pl->k_type, NULL, NULL) || !rm_type_info(pl->v_type, NULL, NULL)) {
            return rm_fail(err, RM_ERR_PAYLOAD, "raw payload has unknown K/V types %d/%d", pl->k_type, pl->v_type);
        }
    } else if (pl->k_type != RM_GGML_TYPE_F16 || pl->v_type != RM_GGML_TYPE_F16) {
        return rm_fail(err, RM_ERR_PAYLOAD, "encoded payload must come from an f16 cache (K/V types %d/%d)",
                       pl->k_type, pl->v_type);
    }

    // sections: header + layer table | positions (padded to 8) | data | u64 checksum
    size_t pos_bytes = rm_pad8((size_t) pl->n_cells * 4u);
    size_t need;
    if (!rm_add(pl->header_bytes, pos_bytes, &need) || pl->data_bytes > SIZE_MAX ||
        !rm_add(need, (size_t) pl->data_bytes, &need) || !rm_add(need, 8u, &need)) {
        return rm_fail(err, RM_ERR_PAYLOAD, "payload sizes overflow");
    }
    if (need != n) {
        return rm_fail(err, RM_ERR_PAYLOAD, "payload is %zu bytes, its header describes %zu", n, need);
    }
    pl->layer_table = buf + RM_PAYLOAD_HEADER;
    pl->positions   = buf + pl->header_bytes;
    pl->data        = pl->positions + pos_bytes;

    for (size_t i = (size_t) pl->n_cells * 4u; i < pos_bytes; ++i) {
        if (pl->positions[i] != 0) {
            return rm_fail(err, RM_ERR_PAYLOAD, "payload position padding is not zero");
        }
    }

    pl->k_off = (size_t *) malloc(sizeof(size_t) * pl->n_layer);
    pl->v_off = (size_t *) malloc(sizeof(size_t) * pl->n_layer);
    if (!pl->k_off || !pl->v_off) {
        rm_payload_close(pl);
        return rm_fail(err, RM_ERR_NOMEM, "out of memory");
    }
    size_t off = 0;
    for (uint32_t il = 0; il < pl->n_layer; ++il) {
        const uint32_t ek = rm_payload_embd_k(pl, il);
        const uint32_t ev = rm_payload_embd_v(pl, il);
        if (ek == 0 || ek > RM_MAX_EMBD || ev == 0 || ev > RM_MAX_EMBD) {
            return RM_PAYLOAD_FAIL("payload layer %u has %u K / %u V values per cell", il, ek, ev);
        }
        size_t kb;
        size_t vb;
        if (!rm_enc_k_bytes(pl->encoding, pl->k_type, pl->n_cells, ek, &kb) ||
            !rm_enc_v_bytes(pl->encoding, pl->v_type, pl->n_cells, ev, &vb)) {
            return RM_PAYLOAD_FAIL("payload layer %u: %u K / %u V values do not fit the cache types", il, ek, ev);
        }
        pl->k_off[il] = off;
        if (!rm_add(off, kb, &off)) {
            return RM_PAYLOAD_FAIL("payload sizes overflow in layer %u%s", il, "");
        }
        pl->v_off[il] = off;
        if (!rm_add(off, vb, &off)) {
            return RM_PAYLOAD_FAIL("payload sizes overflow in layer %u%s", il, "");
        }
    }
    if (off != pl->data_bytes) {
        return RM_PAYLOAD_FAIL("payload data section is %llu bytes, its layers need %zu",
                               (unsigned long long) pl->data_bytes, off);
    }

    // placement info must agree with the positions
    int32_t  pmax       = -1;
    bool     contiguous = true;
    for (uint32_t i = 0; i < pl->n_cells; ++i) {
        const int32_t p = rm_payload_pos(pl, i);
        if (p < 0) {
            return RM_PAYLOAD_FAIL("payload cell %u has negative position %d", i, p);
        }
        if (p > pmax) {
            pmax = p;
        }
        if ((int64_t) p != (int64_t) rm_payload_pos(pl, 0) + i) {
            contiguous = false;
        }
    }
    const int32_t pfirst = pl->n_cells ? rm_payload_pos(pl, 0) : 0;
    if (pl->pos_first != pfirst || pl->pos_max != pmax) {
        return RM_PAYLOAD_FAIL("payload placement header (first %d, max %d) disagrees with its positions",
                               pl->pos_first, pl->pos_max);
    }
    if (((pl->flags & RM_FLAG_CONTIGUOUS) != 0) != contiguous) {
        return RM_PAYLOAD_FAIL("payload contiguity flag disagrees with its positions%s", "");
    }

    if (verify) {
        const uint64_t h = rm_xxh64(buf, n - 8, 0);
        if (h != pl->checksum) {
            return RM_PAYLOAD_FAIL("payload checksum mismatch (stored %016llx, computed %016llx): corrupt file",
                                   (unsigned long long) pl->checksum, (unsigned long long) h);
        }
    }
    return RM_OK;
}

// ---------------------------------------------------------------------------------------------------------
// encoders (input: row-major f16 rows)

// An f16 cache can hold inf (a value past 65504) or NaN. No scale, center or integer cast of an encoder may
// see one (a shared scale of inf spoils every cell of the layer): inf becomes the largest finite f16 of its
// sign, NaN becomes 0.
static void rm_enc_row(const uint16_t * x, float * y, uint32_t n) {
    rm_f16_to_f32_row(x, y, n);
    for (uint32_t i = 0; i < n; ++i) {
        if (!isfinite(y[i])) {
            y[i] = isnan(y[i]) ? 0.0f : copysignf(65504.0f, y[i]);
        }
    }
}

static void rm_enc_q8_rows(const uint16_t * rows, uint32_t n, uint32_t E, uint8_t * out, float * tmp) {
    const uint32_t nb = (E + RM_GROUP - 1) / RM_GROUP;
    for (uint32_t i = 0; i < n; ++i) {
        rm_enc_row(rows + (size_t) i * E, tmp, E);
        for (uint32_t b = 0; b < nb; ++b) {
            const uint32_t c0 = b * RM_GROUP;
            const uint32_t c1 = c0 + RM_GROUP < E ? c0 + RM_GROUP : E;
            float amax = 0.0f;
            for (uint32_t c = c0; c < c1; ++c) {
                const float a = fabsf(tmp[c]);
                amax = a > amax ? a : amax;
            }
            uint16_t d16 = rm_f32_to_f16(amax / 127.0f);
            if (127.0f * rm_f16_to_f32(d16) > 65504.0f) {
                --d16;  // rounded up past what code 127 can decode to in f16: one step down, the code clamps
            }
            const float d  = rm_f16_to_f32(d16);
            const float id = d > 0.0f ? 1.0f / d : 0.0f;
            uint8_t * blk = out + ((size_t) i * nb + b) * RM_Q8_BLOCK;
            memcpy(blk, &d16, 2);
            int8_t * q = (int8_t *) (blk + 2);
            for (uint32_t c = 0; c < RM_GROUP; ++c) {
                int v = 0;
                if (c0 + c < c1) {
                    v = (int) roundf(tmp[c0 + c] * id);
                    v = v < -127 ? -127 : (v > 127 ? 127 : v);
                }
                q[c] = (int8_t) v;
            }
        }
    }
}

// asymmetric block: codes for vals[0..cnt) (cnt <= 32), rest zero
static void rm_enc_kivi_block(const float * vals, uint32_t cnt, uint32_t bits, uint32_t blk_bytes, uint8_t * blk) {
    float mn = vals[0];
    float mx = vals[0];
    for (uint32_t k = 1; k < cnt; ++k) {
        mn = vals[k] < mn ? vals[k] : mn;
        mx = vals[k] > mx ? vals[k] : mx;
    }
    const uint32_t levels = (1u << bits) - 1u;
    const uint16_t m16    = rm_f32_to_f16(mn);
    const float    m      = rm_f16_to_f32(m16);
    const uint16_t s16    = rm_f32_to_f16((mx - m) / (float) levels);
    const float    s      = rm_f16_to_f32(s16);
    const float    is     = s > 0.0f ? 1.0f / s : 0.0f;
    memcpy(blk, &s16, 2);
    memcpy(blk + 2, &m16, 2);
    uint8_t * codes = blk + 4;
    memset(codes, 0, blk_bytes - 4u);
    for (uint32_t k = 0; k < cnt; ++k) {
        int q = (int) floorf((vals[k] - m) * is + 0.5f);
        q = q < 0 ? 0 : (q > (int) levels ? (int) levels : q);
        rm_code_put(codes, blk_bytes - 4u, k, bits, (uint32_t) q);
    }
}

// keys: per channel over groups of 32 cells; tmp holds 32 * E floats
static void rm_enc_kivi_k(const uint16_t * rows, uint32_t n, uint32_t E, uint32_t enc, uint8_t * out, float * tmp) {
    const uint32_t bits    = rm_kivi_bits(enc);
    const uint32_t blk     = rm_kivi_block(enc);
    const uint32_t ngroups = (n + RM_GROUP - 1) / RM_GROUP;
    float vals[RM_GROUP];
    for (uint32_t g = 0; g < ngroups; ++g) {
        const uint32_t i0  = g * RM_GROUP;
        const uint32_t cnt = n - i0 < RM_GROUP ? n - i0 : RM_GROUP;
        const uint32_t kb  = rm_kivi_k_block(enc, cnt);
        for (uint32_t k = 0; k < cnt; ++k) {
            rm_enc_row(rows + (size_t) (i0 + k) * E, tmp + (size_t) k * E, E);
        }
        for (uint32_t c = 0; c < E; ++c) {
            for (uint32_t k = 0; k < cnt; ++k) {
                vals[k] = tmp[(size_t) k * E + c];
            }
            rm_enc_kivi_block(vals, cnt, bits, kb, out + (size_t) g * E * blk + (size_t) c * kb);
        }
    }
}

// values: per cell over groups of 32 channels
static void rm_enc_kivi_v(const uint16_t * rows, uint32_t n, uint32_t E, uint32_t enc, uint8_t * out, float * tmp) {
    const uint32_t bits = rm_kivi_bits(enc);
    const uint32_t blk  = rm_kivi_block(enc);
    const uint32_t nb   = (E + RM_GROUP - 1) / RM_GROUP;
    for (uint32_t i = 0; i < n; ++i) {
        rm_enc_row(rows + (size_t) i * E, tmp, E);
        for (uint32_t b = 0; b < nb; ++b) {
            const uint32_t c0  = b * RM_GROUP;
            const uint32_t cnt = E - c0 < RM_GROUP ? E - c0 : RM_GROUP;
            rm_enc_kivi_block(tmp + c0, cnt, bits, blk, out + ((size_t) i * nb + b) * blk);
        }
    }
}

// K3V3 values. A normalized Walsh-Hadamard transform over 64 channels spreads outlier channels across the
// block, so the rotated values are close to Gaussian; 3-bit codes then take the Lloyd-Max levels of a normal
// distribution (scaled by the block's std around its mean), which cuts the error of uniform codes several
// times on real values. The transform is its own inverse (H = H^T, H H = I), applied again after decoding.
static const float rm_nf3_level[8] = { -2.1520f, -1.3439f, -0.7560f, -0.2451f, 0.2451f, 0.7560f, 1.3439f, 2.1520f };
static const float rm_nf3_edge[7]  = { -1.7480f, -1.0500f, -0.5006f, 0.0f, 0.5006f, 1.0500f, 1.7480f };
#define RM_NF3_CODE_BYTES (RM_NF_GROUP * 3u / 8u)

static void rm_fwht64(float * x) {
    for (uint32_t h = 1; h < RM_NF_GROUP; h <<= 1) {
        for (uint32_t i = 0; i < RM_NF_GROUP; i += h << 1) {
            for (uint32_t j = i; j < i + h; ++j) {
                const float a = x[j];
                const float b = x[j + h];
                x[j]     = a + b;
                x[j + h] = a - b;
            }
        }
    }
    for (uint32_t i = 0; i < RM_NF_GROUP; ++i) {
        x[i] *= 0.125f; // 1 / sqrt(64)
    }
}

static float rm_block_mean(const float * x) {
    float m = 0.0f;
    for (uint32_t i = 0; i < RM_NF_GROUP; ++i) {
        m += x[i];
    }
    return m / (float) RM_NF_GROUP;
}

// root mean square deviation of a block from mu
static float rm_block_sd(const float * x, float mu) {
    float var = 0.0f;
    for (uint32_t i = 0; i < RM_NF_GROUP; ++i) {
        var += (x[i] - mu) * (x[i] - mu);
    }
    return sqrtf(var / (float) RM_NF_GROUP);
}

static void rm_nf3_put_codes(const float * x, float mu, float sd, uint8_t * codes) {
    memset(codes, 0, RM_NF3_CODE_BYTES);
    for (uint32_t i = 0; i < RM_NF_GROUP; ++i) {
        const float d = x[i] - mu;
        uint32_t    q = 0;
        for (uint32_t e = 0; e < 7u; ++e) {
            q += d >= rm_nf3_edge[e] * sd;
        }
        rm_code_put(codes, RM_NF3_CODE_BYTES, i, 3u, q);
    }
}

// squared error of coding the rotated block x around mu with std sd (what rm_nf3_get_block would give back)
static float rm_nf3_sse(const float * x, float mu, float sd) {
    float sse = 0.0f;
    for (uint32_t i = 0; i < RM_NF_GROUP; ++i) {
        const float d = x[i] - mu;
        uint32_t    q = 0;
        for (uint32_t e = 0; e < 7u; ++e) {
            q += d >= rm_nf3_edge[e] * sd;
        }
        const float r = mu + sd * rm_nf3_level[q] - x[i];
        sse += r * r;
    }
    return sse;
}

static void rm_nf3_get_block(const uint8_t * codes, float mu, float sd, float * out) {
    for (uint32_t i = 0; i < RM_NF_GROUP; ++i) {
        out[i] = mu + sd * rm_nf3_level[rm_code_get(codes, RM_NF3_CODE_BYTES, i, 3u)];
    }
    rm_fwht64(out);
}

static void rm_enc_nf3_block(const float * in, uint8_t * blk) {
    float x[RM_NF_GROUP];
    memcpy(x, in, sizeof(x));
    rm_fwht64(x);
    const uint16_t mu16 = rm_f32_to_f16(rm_block_mean(x));
    const float    mu   = rm_f16_to_f32(mu16);
    const uint16_t sd16 = rm_f32_to_f16(rm_block_sd(x, mu));
    memcpy(blk, &mu16, 2);
    memcpy(blk + 2, &sd16, 2);
    rm_nf3_put_codes(x, mu, rm_f16_to_f32(sd16), blk + 4);
}

static void rm_dec_nf3_block(const uint8_t * blk, float * out) {
    rm_nf3_get_block(blk + 4, rm_load_f16(blk), rm_load_f16(blk + 2), out);
}

static void rm_enc_nf3_v(const uint16_t * rows, uint32_t n, uint32_t E, uint8_t * out, float * tmp) {
    const uint32_t nb = E / RM_NF_GROUP;
    for (uint32_t i = 0; i < n; ++i) {
        rm_enc_row(rows + (size_t) i * E, tmp, E);
        for (uint32_t b = 0; b < nb; ++b) {
            rm_enc_nf3_block(tmp + (size_t) b * RM_NF_GROUP, out + ((size_t) i * nb + b) * RM_NF3_BLOCK);
        }
    }
}

// K4V3: every block statistic is one byte. A scale is a code c on a per-layer f16 base,
// s = base * (16 + c % 16) * 2^(c / 16 - 4): 16 octaves in steps of at most 6.25%, exact in float32, so the
// numpy reference decodes bit-identically. Keys get a 4-bit code per (cell, channel) around a per-layer
// channel center (the f16 mean of the channel over the payload's cells) with an int8 zero point in steps:
// x = center + s (q + z). Without the center, RoPE's slow channels (large, nearly constant values) would
// need a coarse step to reach their offset. Values are K3V3's Hadamard blocks with the std as a scale code
// and the mean as an int8 count of std/32 (the mean of a rotated block is one channel over 8, within +-4 std
// on real rows).
#define RM_SCALE_CODES 256u
#define RM_SCALE_MAX   63488.0f // the largest factor: (16 + 15) * 2^11

static float rm_scale_factor(uint32_t c) {
    return ldexpf((float) (16u + c % 16u), (int) (c / 16u) - 4);
}

static void rm_scale_table(float base, float * tab) {
    for (uint32_t c = 0; c < RM_SCALE_CODES; ++c) {
        tab[c] = base * rm_scale_factor(c);
    }
}

// the smallest f16 >= v (v >= 0): a base that lets the top code reach the largest scale asked for
static uint16_t rm_f16_ceil(float v) {
    uint16_t h = rm_f32_to_f16(v);
    if (rm_f16_to_f32(h) < v) {
        ++h;
    }
    return h;
}

// a K4V3 block's f16 base, written at out, that lets code 255 reach `need` (the largest scale the block's
// statistics ask for); tab gets the scale of every code on it
static void rm_put_scale_base(float need, uint8_t * out, float * tab) {
    const uint16_t b16 = rm_f16_ceil(need / RM_SCALE_MAX);
    memcpy(out, &b16, 2);
    rm_scale_table(rm_f16_to_f32(b16), tab);
}

// the smallest code whose scale is >= s (the largest code when none is)
static uint32_t rm_scale_code_ceil(const float * tab, float s) {
    uint32_t lo = 0;
    uint32_t hi = RM_SCALE_CODES - 1u;
    while (lo < hi) {
        const uint32_t mid = (lo + hi) / 2u;
        if (tab[mid] >= s) {
            hi = mid;
        } else {
            lo = mid + 1u;
        }
    }
    return lo;
}

// round to nearest, clamped to [lo, hi]; NaN goes to lo (a cast of NaN to int is undefined)
static int rm_round_clamp(float v, int lo, int hi) {
    const float r = floorf(v + 0.5f);
    if (!(r >= (float) lo)) {
        return lo;
    }
    return r > (float) hi ? hi : (int) r;
}

// squared error of coding cnt values (stride apart) as s (q + z), q in 0..15
static float rm_k4_sse(const float * v, size_t stride, uint32_t cnt, float s, int z) {
    const float is  = s > 0.0f ? 1.0f / s : 0.0f;
    float       sse = 0.0f;
    for (uint32_t k = 0; k < cnt; ++k) {
        const float x = v[(size_t) k * stride];
        const int   q = rm_round_clamp(x * is - (float) z, 0, 15);
        const float r = s * (float) (q + z) - x;
        sse += r * r;
    }
    return sse;
}

// keys: tmp holds (RM_GROUP + 3) * E floats
static void rm_enc_k4_k(const uint16_t * rows, uint32_t n, uint32_t E, uint8_t * out, float * tmp) {
    float * vals   = tmp;                          // one group of rows, minus the centers
    float * center = tmp + (size_t) RM_GROUP * E;
    float * lo     = center + E;
    float * hi     = lo + E;
    uint8_t * mu16 = out + 2;

    memset(center, 0, sizeof(float) * E);
    for (uint32_t i = 0; i < n; ++i) {
        rm_enc_row(rows + (size_t) i * E, vals, E);
        for (uint32_t c = 0; c < E; ++c) {
            center[c] += vals[c];
        }
    }
    for (uint32_t c = 0; c < E; ++c) {
        const uint16_t h = rm_f32_to_f16(n ? center[c] / (float) n : 0.0f);
        memcpy(mu16 + 2u * c, &h, 2);
        center[c] = rm_f16_to_f32(h);
    }

    // pass 1: the largest scale any block needs: its range in 15 steps, its offset in 127
    const uint32_t ngroups = (n + RM_GROUP - 1) / RM_GROUP;
    float          need    = 0.0f;
    for (uint32_t pass = 0; pass < 2; ++pass) {
        float tab[RM_SCALE_CODES];
        if (pass == 1) {
            rm_put_scale_base(need, out, tab);
        }
        uint8_t * gp = mu16 + 2u * (size_t) E;
        for (uint32_t g = 0; g < ngroups; ++g) {
            const uint32_t i0  = g * RM_GROUP;
            const uint32_t cnt = n - i0 < RM_GROUP ? n - i0 : RM_GROUP;
            const uint32_t kb  = rm_k4_block(cnt);
            for (uint32_t k = 0; k < cnt; ++k) {
                float * v = vals + (size_t) k * E;
                rm_enc_row(rows + (size_t) (i0 + k) * E, v, E);
                for (uint32_t c = 0; c < E; ++c) {
                    v[c] -= center[c];
                    lo[c] = k == 0 || v[c] < lo[c] ? v[c] : lo[c];
                    hi[c] = k == 0 || v[c] > hi[c] ? v[c] : hi[c];
                }
            }
            for (uint32_t c = 0; c < E; ++c) {
                if (pass == 0) {
                    const float r = (hi[c] - lo[c]) / 15.0f;
                    const float z = fabsf(lo[c]) / 127.0f;
                    need = r > need ? r : need;
                    need = z > need ? z : need;
                    continue;
                }
                // pass 2: the scale that spans the block in 15 steps, or one or two codes finer with the
                // extremes clipped (zero point at the low end or centred), whichever codes the block with
                // the least error (what this gains on real keys: native/README.md, k4v3)
                const float * col  = vals + c;
                const uint32_t span = rm_scale_code_ceil(tab, (hi[c] - lo[c]) / 15.0f);
                uint32_t       code = span;
                int            z    = 0;
                float          best = INFINITY;
                for (uint32_t d = 0; d < 3u && d <= span; ++d) {
                    const float st    = tab[span - d];
                    const float mid   = (lo[c] + hi[c]) * 0.5f;
                    const int   zs[2] = { st > 0.0f ? rm_round_clamp(lo[c] / st, -129, 128) : 0,
                                          st > 0.0f ? rm_round_clamp(mid / st - 7.5f, -129, 128) : 0 };
                    for (uint32_t j = 0; j < 2u; ++j) {
                        if (zs[j] < -128 || zs[j] > 127) {
                            continue;
                        }
                        const float sse = rm_k4_sse(col, E, cnt, st, zs[j]);
                        if (sse < best) {
                            best = sse;
                            code = span - d;
                            z    = zs[j];
                        }
                    }
                }
                if (!(best < INFINITY)) {
                    // no candidate puts the zero point in int8: coarser codes until one does
                    for (;; ++code) {
                        z = tab[code] > 0.0f ? rm_round_clamp(lo[c] / tab[code], -129, 128) : 0;
                        if ((z >= -128 && z <= 127) || code == RM_SCALE_CODES - 1u) {
                            break;
                        }
                    }
                    z = z < -128 ? -128 : (z > 127 ? 127 : z);
                }
                const float s  = tab[code];
                const float is = s > 0.0f ? 1.0f / s : 0.0f;
                uint8_t *   bp = gp + (size_t) c * kb;
                bp[0]          = (uint8_t) code;
                bp[1]          = (uint8_t) (int8_t) z;
                memset(bp + 2, 0, kb - 2u);
                for (uint32_t k = 0; k < cnt; ++k) {
                    const int q = rm_round_clamp(vals[(size_t) k * E + c] * is - (float) z, 0, 15);
                    rm_code_put(bp + 2, kb - 2u, k, 4u, (uint32_t) q);
                }
            }
            gp += (size_t) E * kb;
        }
    }
}

// values: f16 base, then per cell and 64-channel block: std code, mean code, 3-bit normal-float codes
static void rm_enc_nf3c_v(const uint16_t * rows, uint32_t n, uint32_t E, uint8_t * out, float * tmp) {
    const uint32_t nb   = E / RM_NF_GROUP;
    float          need = 0.0f;
    for (uint32_t pass = 0; pass < 2; ++pass) {
        float tab[RM_SCALE_CODES];
        if (pass == 1) {
            rm_put_scale_base(need, out, tab);
        }
        for (uint32_t i = 0; i < n; ++i) {
            rm_enc_row(rows + (size_t) i * E, tmp, E);
            for (uint32_t b = 0; b < nb; ++b) {
                float * x = tmp + (size_t) b * RM_NF_GROUP;
                rm_fwht64(x);
                const float mean = rm_block_mean(x);
                const float sd   = rm_block_sd(x, mean);
                if (pass == 0) {
                    // a std that also keeps the mean within the int8 code's +-4 std
                    const float m = fabsf(mean) / 3.9f;
                    need = sd > need ? sd : need;
                    need = m > need ? m : need;
                    continue;
                }
                // five std codes from two below sd's ceiling code (moved up while the mean code does not fit
                // int8): keep the one that codes the block with the least error, since a block of 64 values
                // is not quite Gaussian (what this gains on real rows: native/README.md, k4v3)
                uint32_t code = rm_scale_code_ceil(tab, sd);
                code          = code >= 2u ? code - 2u : 0u;
                for (;; ++code) {
                    const int m = tab[code] > 0.0f ? rm_round_clamp(mean * 32.0f / tab[code], -129, 128) : 0;
                    if ((m >= -128 && m <= 127) || code == RM_SCALE_CODES - 1u) {
                        break;
                    }
                }
                uint32_t best     = code;
                float    best_sse = INFINITY;
                for (uint32_t c = code; c <= code + 4u && c < RM_SCALE_CODES; ++c) {
                    const int   m   = tab[c] > 0.0f ? rm_round_clamp(mean * 32.0f / tab[c], -128, 127) : 0;
                    const float sse = rm_nf3_sse(x, tab[c] * (float) m * 0.03125f, tab[c]);
                    if (sse < best_sse) {
                        best     = c;
                        best_sse = sse;
                    }
                }
                const int m   = tab[best] > 0.0f ? rm_round_clamp(mean * 32.0f / tab[best], -128, 127) : 0;
                uint8_t * blk = out + 2u + ((size_t) i * nb + b) * RM_NF3C_BLOCK;
                blk[0]        = (uint8_t) best;
                blk[1]        = (uint8_t) (int8_t) m;
                rm_nf3_put_codes(x, tab[best] * (float) m * 0.03125f, tab[best], blk + 2);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// extraction

rm_status rm_extract_size(const uint8_t * blob, const rm_state * st, uint32_t n_sel, uint32_t enc,
                          size_t * out_size, char * err) {
    (void) blob;
    if (st->n_cells == 0 || st->n_layer == 0) {
        return rm_fail(err, RM_ERR_ARG, "the state blob holds no cells to extract");
    }
    if (enc >= RM_ENC_COUNT) {
        return rm_fail(err, RM_ERR_ARG, "unknown encoding %u", enc);
    }
    if (n_sel > RM_MAX_CELLS) {
        return rm_fail(err, RM_ERR_ARG, "too many cells (%u)", n_sel);
    }
    size_t data = 0;
    for (uint32_t il = 0; il < st->n_layer; ++il) {
        const rm_layer * L = &st->layers[il];
        if (enc == RM_ENC_RAW) {
            if (!rm_type_info(L->k_type, NULL, NULL) || !rm_type_info(L->v_type, NULL, NULL)) {
                return rm_fail(err, RM_ERR_ARG, "layer %u: K/V types %d/%d are not supported", il, L->k_type,
                               L->v_type);
            }
        } else if (L->k_type != RM_GGML_TYPE_F16 || L->v_type != RM_GGML_TYPE_F16) {
            return rm_fail(err, RM_ERR_ARG,
                           "encoding %u needs an f16 KV cache, layer %u has K %s / V %s (use encoding 'raw')", enc,
                           il, rm_type_name(L->k_type), rm_type_name(L->v_type));
        }
        if (L->n_embd_k == 0 || L->n_embd_v == 0) {
            return rm_fail(err, RM_ERR_ARG, "layer %u: cannot derive the row widths", il);
        }
        if ((enc == RM_ENC_K3V3 || enc == RM_ENC_K4V3) && L->n_embd_v % RM_NF_GROUP != 0) {
            return rm_fail(err, RM_ERR_ARG, "encoding %s needs V rows in multiples of %u values, layer %u has %u",
                           enc == RM_ENC_K3V3 ? "k3v3" : "k4v3", RM_NF_GROUP, il, L->n_embd_v);
        }
        size_t kb;
        size_t vb;
        if (!rm_enc_k_bytes(enc, L->k_type, n_sel, L->n_embd_k, &kb) ||
            !rm_enc_v_bytes(enc, L->v_type, n_sel, L->n_embd_v, &vb) || !rm_add(data, kb, &data) ||
            !rm_add(data, vb, &data)) {
            return rm_fail(err, RM_ERR_ARG, "payload size overflows at layer %u", il);
        }
    }
    size_t total = RM_PAYLOAD_HEADER + (size_t) RM_PAYLOAD_LAYER_ENTRY * st->n_layer;
    if (!rm_add(total, rm_pad8((size_t) n_sel * 4u), &total) || !rm_add(total, data, &total) ||
        !rm_add(total, 8u, &total)) {
        return rm_fail(err, RM_ERR_ARG, "payload size overflows");
    }
    *out_size = total;
    return RM_OK;
}

rm_status rm_extract(const uint8_t * blob, const rm_state * st, const int32_t * cells, uint32_t n_sel,
                     const uint8_t fingerprint[32], uint32_t enc, uint64_t user, uint8_t * out, size_t out_size,
                     char * err) {
    for (uint32_t k = 0; k < n_sel; ++k) {
        if (cells[k] < 0 || (uint32_t) cells[k] >= st->n_cells) {
            return rm_fail(err, RM_ERR_ARG, "cell index %d out of range (the blob has %u cells)", cells[k],
                           st->n_cells);
        }
    }

    // scratch: row-major gathered rows of one layer (K or V) and 32 rows of floats
    size_t max_row = 0;
    uint32_t max_e = 0;
    for (uint32_t il = 0; il < st->n_layer; ++il) {
        const rm_layer * L = &st->layers[il];
        max_row = L->k_row > max_row ? (size_t) L->k_row : max_row;
        max_row = L->v_row > max_row ? (size_t) L->v_row : max_row;
        max_e   = L->n_embd_k > max_e ? L->n_embd_k : max_e;
        max_e   = L->n_embd_v > max_e ? L->n_embd_v : max_e;
    }
    size_t gather_bytes;
    if (!rm_mul(max_row, n_sel ? n_sel : 1u, &gather_bytes)) {
        return rm_fail(err, RM_ERR_ARG, "extraction scratch overflows");
    }
    uint8_t * gather = (uint8_t *) malloc(gather_bytes);
    float *   tmp    = (float *) malloc(sizeof(float) * (RM_GROUP + 3u) * (size_t) max_e);
    if (!gather || !tmp) {
        free(gather);
        free(tmp);
        return rm_fail(err, RM_ERR_NOMEM, "out of memory for extraction scratch");
    }

    rm_writer w = { out, out_size, 0, false };

    // positions and placement
    int32_t pmax       = -1;
    bool    contiguous = true;
    const int32_t pfirst = n_sel ? rm_state_pos(blob, st, (uint32_t) cells[0]) : 0;
    for (uint32_t k = 0; k < n_sel; ++k) {
        const int32_t p = rm_state_pos(blob, st, (uint32_t) cells[k]);
        pmax = p > pmax ? p : pmax;
        if ((int64_t) p != (int64_t) pfirst + k) {
            contiguous = false;
        }
    }

    const uint32_t header_bytes = RM_PAYLOAD_HEADER + RM_PAYLOAD_LAYER_ENTRY * st->n_layer;
    const size_t   pos_bytes    = rm_pad8((size_t) n_sel * 4u);
    const size_t   data_bytes   = out_size - header_bytes - pos_bytes - 8u;

    rm_wr_put(&w, RM_PAYLOAD_MAGIC, 8);
    rm_wr_u32(&w, RM_PAYLOAD_VERSION);
    rm_wr_u32(&w, header_bytes);
    rm_wr_put(&w, fingerprint, 32);
    rm_wr_u32(&w, st->n_layer);
    rm_wr_u32(&w, n_sel);
    rm_wr_i32(&w, st->layers[0].k_type);
    rm_wr_i32(&w, st->layers[0].v_type);
    rm_wr_u32(&w, enc);
    rm_wr_u32(&w, rm_enc_group(enc));
    rm_wr_i32(&w, pfirst);
    rm_wr_i32(&w, pmax);
    rm_wr_u32(&w, contiguous ? RM_FLAG_CONTIGUOUS : 0u);
    rm_wr_u32(&w, 0);
    rm_wr_u64(&w, user);
    rm_wr_u64(&w, data_bytes);
    rm_wr_u64(&w, 0);
    rm_wr_u64(&w, 0);
    rm_wr_u64(&w, 0);
    for (uint32_t il = 0; il < st->n_layer; ++il) {
        rm_wr_u32(&w, st->layers[il].n_embd_k);
        rm_wr_u32(&w, st->layers[il].n_embd_v);
    }
    for (uint32_t k = 0; k < n_sel; ++k) {
        rm_wr_i32(&w, rm_state_pos(blob, st, (uint32_t) cells[k]));
    }
    if (pos_bytes > (size_t) n_sel * 4u) {
        uint8_t * pad = rm_wr_take(&w, pos_bytes - (size_t) n_sel * 4u);
        if (pad) {
            memset(pad, 0, pos_bytes - (size_t) n_sel * 4u);
        }
    }

    rm_status rc = RM_OK;
    for (uint32_t il = 0; il < st->n_layer && rc == RM_OK; ++il) {
        const rm_layer * L = &st->layers[il];
        // mixed per-layer types would need a per-layer type table; llama.cpp uses one type for all layers
        if (L->k_type != st->layers[0].k_type || L->v_type != st->layers[0].v_type) {
            rc = rm_fail(err, RM_ERR_ARG, "layer %u has other K/V types than layer 0", il);
            break;
        }

        for (int part = 0; part < 2; ++part) {
            const bool     is_v = part == 1;
            const size_t   row  = (size_t) (is_v ? L->v_row : L->k_row);
            const uint32_t E    = is_v ? L->n_embd_v : L->n_embd_k;

            // gather the selected rows, row-major (V de-transposed when the blob stores it transposed)
            if (is_v && st->v_trans) {
                const size_t   el  = L->v_el;
                const uint8_t * src = blob + L->v_off;
                for (uint32_t j = 0; j < E; ++j) {
                    const uint8_t * col = src + (size_t) j * st->n_cells * el;
                    for (uint32_t k = 0; k < n_sel; ++k) {
                        memcpy(gather + (size_t) k * row + (size_t) j * el, col + (size_t) cells[k] * el, el);
                    }
                }
            } else {
                const uint8_t * src = blob + (is_v ? L->v_off : L->k_off);
                for (uint32_t k = 0; k < n_sel; ++k) {
                    memcpy(gather + (size_t) k * row, src + (size_t) cells[k] * row, row);
                }
            }

            size_t nbytes = 0;
            if (is_v) {
                rm_enc_v_bytes(enc, L->v_type, n_sel, E, &nbytes);
            } else {
                rm_enc_k_bytes(enc, L->k_type, n_sel, E, &nbytes);
            }
            uint8_t * dst = rm_wr_take(&w, nbytes);
            if (!dst) {
                break;
            }
            const uint16_t * rows16 = (const uint16_t *) (const void *) gather;
            switch (enc) {
                case RM_ENC_RAW:
                case RM_ENC_F16:
                    memcpy(dst, gather, nbytes);
                    break;
                case RM_ENC_Q8:
                    rm_enc_q8_rows(rows16, n_sel, E, dst, tmp);
                    break;
                case RM_ENC_K3V3:
                    if (is_v) {
                        rm_enc_nf3_v(rows16, n_sel, E, dst, tmp);
                    } else {
                        rm_enc_kivi_k(rows16, n_sel, E, enc, dst, tmp);
                    }
                    break;
                case RM_ENC_K4V3:
                    if (is_v) {
                        rm_enc_nf3c_v(rows16, n_sel, E, dst, tmp);
                    } else {
                        rm_enc_k4_k(rows16, n_sel, E, dst, tmp);
                    }
                    break;
                case RM_ENC_Q4:
                case RM_ENC_Q2:
                    if (is_v) {
                        rm_enc_kivi_v(rows16, n_sel, E, enc, dst, tmp);
                    } else {
                        rm_enc_kivi_k(rows16, n_sel, E, enc, dst, tmp);
                    }
                    break;
                default:
                    break;
            }
        }
    }
    free(gather);
    free(tmp);
    if (rc != RM_OK) {
        return rc;
    }

    if (w.overflow || w.off != out_size - 8u) {
        return rm_fail(err, RM_ERR_ARG, "internal error: payload size mismatch (%zu of %zu)", w.off, out_size);
    }
    const uint64_t h = rm_xxh64(out, out_size - 8u, 0);
    rm_wr_u64(&w, h);
    return RM_OK;
}

// ---------------------------------------------------------------------------------------------------------
// decoding (splice): rows [c0, c0 + n) of one layer into f16 rows (or raw rows for RAW)

void rm_decode_rows(const rm_payload * pl, uint32_t il, bool is_v, uint32_t c0, uint32_t n, uint8_t * dst,
                    size_t dst_row_bytes, float * tmp) {
    const uint32_t  E   = is_v ? rm_payload_embd_v(pl, il) : rm_payload_embd_k(pl, il);
    const uint8_t * src = pl->data + (is_v ? pl->v_off[il] : pl->k_off[il]);
    const uint32_t  enc = pl->encoding;

    if (enc == RM_ENC_RAW || enc == RM_ENC_F16) {
        uint64_t row = (uint64_t) E * 2u;
        if (enc == RM_ENC_RAW) {
            rm_row_size(is_v ? pl->v_type : pl->k_type, E, &row); // validated in rm_payload_open
        }
        if (row == dst_row_bytes) {
            memcpy(dst, src + (size_t) c0 * row, (size_t) n * row);
        } else {
            for (uint32_t i = 0; i < n; ++i) {
                memcpy(dst + (size_t) i * dst_row_bytes, src + (size_t) (c0 + i) * row, (size_t) row);
            }
        }
        return;
    }

    if (enc == RM_ENC_Q8) {
        const uint32_t nb = (E + RM_GROUP - 1) / RM_GROUP;
        for (uint32_t i = 0; i < n; ++i) {
            uint16_t * out = (uint16_t *) (void *) (dst + (size_t) i * dst_row_bytes);
            for (uint32_t b = 0; b < nb; ++b) {
                const uint8_t * blk = src + ((size_t) (c0 + i) * nb + b) * RM_Q8_BLOCK;
                const float    d  = rm_load_f16(blk);
                const int8_t * q  = (const int8_t *) (blk + 2);
                const uint32_t cb = b * RM_GROUP;
                const uint32_t ce = cb + RM_GROUP < E ? cb + RM_GROUP : E;
                float vals[RM_GROUP];
                for (uint32_t c = cb; c < ce; ++c) {
                    vals[c - cb] = d * (float) q[c - cb];
                }
                rm_f32_to_f16_row(vals, out + cb, ce - cb);
            }
        }
        return;
    }

    if (enc == RM_ENC_K4V3) {
        float tab[RM_SCALE_CODES];
        rm_scale_table(rm_load_f16(src), tab);
        if (is_v) {
            const uint32_t nb = E / RM_NF_GROUP;
            for (uint32_t i = 0; i < n; ++i) {
                for (uint32_t b = 0; b < nb; ++b) {
                    const uint8_t * blk = src + 2u + ((size_t) (c0 + i) * nb + b) * RM_NF3C_BLOCK;
                    const float     sd  = tab[blk[0]];
                    rm_nf3_get_block(blk + 2, sd * (float) (int8_t) blk[1] * 0.03125f, sd,
                                     tmp + (size_t) b * RM_NF_GROUP);
                }
                rm_f32_to_f16_row(tmp, (uint16_t *) (void *) (dst + (size_t) i * dst_row_bytes), E);
            }
            return;
        }
        const uint8_t * center = src + 2;
        const uint8_t * groups = center + 2u * (size_t) E;
        for (uint32_t i = 0; i < n; ++i) {
            const uint32_t  cell = c0 + i;
            const uint32_t  g    = cell / RM_GROUP;
            const uint32_t  k    = cell % RM_GROUP;
            const uint32_t  left = pl->n_cells - g * RM_GROUP;
            const uint32_t  kb   = rm_k4_block(left < RM_GROUP ? left : RM_GROUP);
            const uint8_t * gp   = groups + (size_t) g * E * RM_K4_BLOCK;
            for (uint32_t c = 0; c < E; ++c) {
                const uint8_t * bp = gp + (size_t) c * kb;
                const int       q  = (int) rm_code_get(bp + 2, kb - 2u, k, 4u) + (int8_t) bp[1];
                tmp[c] = rm_load_f16(center + 2u * c) + tab[bp[0]] * (float) q;
            }
            rm_f32_to_f16_row(tmp, (uint16_t *) (void *) (dst + (size_t) i * dst_row_bytes), E);
        }
        return;
    }

    // Q4 / Q2 / K3V3
    const uint32_t bits = rm_kivi_bits(enc);
    const uint32_t blk  = rm_kivi_block(enc);
    if (is_v && enc == RM_ENC_K3V3) {
        const uint32_t nb = E / RM_NF_GROUP;
        for (uint32_t i = 0; i < n; ++i) {
            for (uint32_t b = 0; b < nb; ++b) {
                rm_dec_nf3_block(src + ((size_t) (c0 + i) * nb + b) * RM_NF3_BLOCK, tmp + (size_t) b * RM_NF_GROUP);
            }
            rm_f32_to_f16_row(tmp, (uint16_t *) (void *) (dst + (size_t) i * dst_row_bytes), E);
        }
        return;
    }
    if (is_v) {
        const uint32_t nb = (E + RM_GROUP - 1) / RM_GROUP;
        for (uint32_t i = 0; i < n; ++i) {
            uint16_t * out = (uint16_t *) (void *) (dst + (size_t) i * dst_row_bytes);
            for (uint32_t b = 0; b < nb; ++b) {
                const uint8_t * bp = src + ((size_t) (c0 + i) * nb + b) * blk;
                const float    s  = rm_load_f16(bp);
                const float    m  = rm_load_f16(bp + 2);
                const uint32_t cb = b * RM_GROUP;
                const uint32_t ce = cb + RM_GROUP < E ? cb + RM_GROUP : E;
                float vals[RM_GROUP];
                for (uint32_t c = cb; c < ce; ++c) {
                    vals[c - cb] = m + s * (float) rm_code_get(bp + 4, blk - 4u, c - cb, bits);
                }
                rm_f32_to_f16_row(vals, out + cb, ce - cb);
            }
        }
        return;
    }

    // keys, per channel: walk the groups that hold [c0, c0 + n); one value per (cell, channel)
    for (uint32_t i = 0; i < n; ++i) {
        const uint32_t cell = c0 + i;
        const uint32_t g    = cell / RM_GROUP;
        const uint32_t k    = cell % RM_GROUP;
        const uint32_t left = pl->n_cells - g * RM_GROUP;
        const uint32_t kb   = rm_kivi_k_block(enc, left < RM_GROUP ? left : RM_GROUP);
        uint16_t *     out  = (uint16_t *) (void *) (dst + (size_t) i * dst_row_bytes);
        const uint8_t * gp  = src + (size_t) g * E * blk;
        for (uint32_t c = 0; c < E; ++c) {
            const uint8_t * bp = gp + (size_t) c * kb;
            tmp[c] = rm_load_f16(bp + 2) + rm_load_f16(bp) * (float) rm_code_get(bp + 4, kb - 4u, k, bits);
        }
        rm_f32_to_f16_row(tmp, out, E);
    }
}
