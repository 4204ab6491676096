// kvsplice.h - shared declarations of the _kvsplice C core (no Python API in here).
//
// Conventions (llama.cpp style): flat C11, every read from a caller buffer goes through a bounds-checked
// reader, every size product is checked for overflow before use, functions return an rm_status and
// write a one-line message into a caller-provided char[RM_ERR_LEN].

#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ggml_abi.h"

#define RM_ERR_LEN 256

// llama.cpp sequence state (llama-context.cpp: io_magic)
#define RM_STATE_MAGIC 0xaf143cd8u

// sanity limits: anything larger is treated as a corrupt blob, not as a request for a huge allocation
#define RM_MAX_LAYERS  4096u
#define RM_MAX_EMBD    (1u << 20)
#define RM_MAX_STREAMS 1024u
#define RM_MAX_CELLS   (1u << 28)

typedef enum {
    RM_OK          = 0,
    RM_ERR_STATE   = 1, // bad llama.cpp state blob    -> StateFormatError
    RM_ERR_PAYLOAD = 2, // bad repomem payload         -> PayloadError
    RM_ERR_ARG     = 3, // bad argument from the caller -> ValueError
    RM_ERR_NOMEM   = 4, // allocation failed            -> MemoryError
} rm_status;

rm_status rm_fail(char * err, rm_status code, const char * fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

// ---------------------------------------------------------------------------------------------------------
// bounded little-endian reader (the host is assumed little-endian, like llama.cpp's state format itself)

typedef struct {
    const uint8_t * p;
    size_t          n;
    size_t          off;
} rm_reader;

static inline bool rm_rd_bytes(rm_reader * r, size_t k, const uint8_t ** out) {
    if (k > r->n - r->off) {
        return false;
    }
    *out = r->p + r->off;
    r->off += k;
    return true;
}

static inline bool rm_rd_u32(rm_reader * r, uint32_t * v) {
    const uint8_t * p;
    if (!rm_rd_bytes(r, sizeof(*v), &p)) {
        return false;
    }
    memcpy(v, p, sizeof(*v));
    return true;
}

static inline bool rm_rd_i32(rm_reader * r, int32_t * v) {
    const uint8_t * p;
    if (!rm_rd_bytes(r, sizeof(*v), &p)) {
        return false;
    }
    memcpy(v, p, sizeof(*v));
    return true;
}

static inline bool rm_rd_u64(rm_reader * r, uint64_t * v) {
    const uint8_t * p;
    if (!rm_rd_bytes(r, sizeof(*v), &p)) {
        return false;
    }
    memcpy(v, p, sizeof(*v));
    return true;
}

static inline int32_t rm_load_i32(const uint8_t * p) {
    int32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline uint32_t rm_load_u32(const uint8_t * p) {
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline uint64_t rm_load_u64(const uint8_t * p) {
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

// overflow-checked size arithmetic
static inline bool rm_mul(size_t a, size_t b, size_t * out) {
    if (a != 0 && b > SIZE_MAX / a) {
        return false;
    }
    *out = a * b;
    return true;
}

static inline bool rm_add(size_t a, size_t b, size_t * out) {
    if (b > SIZE_MAX - a) {
        return false;
    }
    *out = a + b;
    return true;
}

// sequential writer into a buffer whose exact size was computed beforehand (overrun = programming error,
// checked anyway so that a size bug cannot turn into a heap overflow)
typedef struct {
    uint8_t * p;
    size_t    n;
    size_t    off;
    bool      overflow;
} rm_writer;

static inline uint8_t * rm_wr_take(rm_writer * w, size_t k) {
    if (w->overflow || k > w->n - w->off) {
        w->overflow = true;
        return NULL;
    }
    uint8_t * p = w->p + w->off;
    w->off += k;
    return p;
}

static inline void rm_wr_put(rm_writer * w, const void * src, size_t k) {
    uint8_t * p = rm_wr_take(w, k);
    if (p && k) {
        memcpy(p, src, k);
    }
}

static inline void rm_wr_u32(rm_writer * w, uint32_t v) { rm_wr_put(w, &v, sizeof(v)); }
static inline void rm_wr_i32(rm_writer * w, int32_t v)  { rm_wr_put(w, &v, sizeof(v)); }
static inline void rm_wr_u64(rm_writer * w, uint64_t v) { rm_wr_put(w, &v, sizeof(v)); }

// ---------------------------------------------------------------------------------------------------------
// ggml types, fp16

// block size and bytes per block of the ggml types a KV cache can use; false for anything else
bool rm_type_info(int32_t type, uint32_t * blck, uint32_t * tsize);
// ggml_row_size(type, n); false for unknown types, n not a multiple of the block size, or overflow
bool rm_row_size(int32_t type, uint64_t n, uint64_t * out);
const char * rm_type_name(int32_t type);

void     rm_init_tables(void); // fp16 -> fp32 table and CPU feature dispatch; call once at module init
float    rm_f16_to_f32(uint16_t h);

// an f16 stored at p (any alignment), as float: the scales and minimums of encoded payload blocks
static inline float rm_load_f16(const uint8_t * p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return rm_f16_to_f32(h);
}
uint16_t rm_f32_to_f16(float f); // round to nearest even, same as ggml / F16C
void     rm_f16_to_f32_row(const uint16_t * x, float * y, size_t n);
void     rm_f32_to_f16_row(const float * x, uint16_t * y, size_t n);

uint64_t rm_xxh64(const uint8_t * p, size_t n, uint64_t seed);

// ---------------------------------------------------------------------------------------------------------
// llama.cpp sequence state blob (llama_state_seq_get_data, llama-cpp-python 0.3.36)

typedef struct {
    int32_t  k_type;
    int32_t  v_type;
    uint64_t k_row;     // bytes of one cell's K row
    uint64_t v_row;     // bytes of one cell's V (v_trans: v_el * n_embd_v)
    uint32_t v_el;      // v_trans: bytes per element; else 0
    uint32_t n_embd_v;  // v_trans: from the blob; else derived from v_row when the type is known (0 if not)
    uint32_t n_embd_k;  // derived from k_row when the type is known (0 if not)
    size_t   k_off;     // blob offset of the K rows (n_cells * k_row bytes)
    size_t   v_off;     // blob offset of the V data
} rm_layer;

typedef struct {
    int32_t    seq_id;
    uint32_t   n_stream;
    uint32_t   stream;    // the non-empty stream (0 when the blob holds no cell)
    uint32_t   n_cells;
    size_t     cells_off; // blob offset of the cell metadata, 12 bytes per cell: i32 pos, u32 1, i32 seq
    uint32_t   v_trans;
    uint32_t   n_layer;   // 0 when n_cells == 0 (llama.cpp writes nothing after a zero cell count)
    rm_layer * layers;    // malloc'd, n_layer entries
    size_t     size;
} rm_state;

#define RM_CELL_META_BYTES 12u

rm_status rm_state_parse(const uint8_t * buf, size_t n, rm_state * st, char * err);
void      rm_state_free(rm_state * st);
// expectations from the model: n_embd_k/v per layer; k_type/v_type < 0 = any
rm_status rm_state_check(const rm_state * st, uint32_t n_layer, const uint32_t * n_embd_k,
                         const uint32_t * n_embd_v, int32_t k_type, int32_t v_type, char * err);

static inline int32_t rm_state_pos(const uint8_t * buf, const rm_state * st, uint32_t i) {
    return rm_load_i32(buf + st->cells_off + (size_t) i * RM_CELL_META_BYTES);
}

// ---------------------------------------------------------------------------------------------------------
// repomem fragment payload (format: native/README.md)

#define RM_PAYLOAD_MAGIC       "RMKVFRAG"
#define RM_PAYLOAD_VERSION     1u
#define RM_PAYLOAD_HEADER      128u
#define RM_PAYLOAD_LAYER_ENTRY 8u
#define RM_GROUP               32u
#define RM_NF_GROUP            64u // K3V3/K4V3 value group: one Walsh-Hadamard block
#define RM_FLAG_CONTIGUOUS     1u

typedef enum {
    RM_ENC_RAW = 0, // rows in the cache's own type (any type, e.g. q8_0 caches)
    RM_ENC_F16 = 1, // f16 rows as they were
    RM_ENC_Q8  = 2, // per cell, blocks of 32 channels: f16 scale + 32 x int8 (symmetric)
    RM_ENC_Q4  = 3, // KIVI: K per channel over groups of 32 cells, V per cell over 32 channels; f16 scale+min
    RM_ENC_Q2  = 4, // as Q4 with 2-bit codes
    RM_ENC_K3V3 = 5, // K as Q4 with 3-bit codes; V per cell over 64 channels: Hadamard, 3-bit normal-float
    RM_ENC_K4V3 = 6, // K 4-bit per channel over 32 cells around a per-channel center, V as K3V3; 8-bit block stats
    RM_ENC_COUNT
} rm_encoding;

typedef struct {
    const uint8_t * base;
    size_t          size;
    uint32_t        version;
    uint32_t        header_bytes;
    const uint8_t * fingerprint; // 32 bytes
    uint32_t        n_layer;
    uint32_t        n_cells;
    int32_t         k_type;
    int32_t         v_type;
    uint32_t        encoding;
    uint32_t        group;
    int32_t         pos_first;
    int32_t         pos_max;
    uint32_t        flags;
    uint64_t        user;
    uint64_t        data_bytes;
    uint64_t        checksum;
    const uint8_t * layer_table; // n_layer x {u32 n_embd_k, u32 n_embd_v}
    const uint8_t * positions;   // n_cells x i32
    const uint8_t * data;
    size_t *        k_off;       // malloc'd: per layer offsets into data (K block, V block)
    size_t *        v_off;
} rm_payload;

rm_status rm_payload_open(const uint8_t * buf, size_t n, bool verify, rm_payload * pl, char * err);
void      rm_payload_close(rm_payload * pl);

static inline uint32_t rm_payload_embd_k(const rm_payload * pl, uint32_t il) {
    return rm_load_u32(pl->layer_table + (size_t) il * RM_PAYLOAD_LAYER_ENTRY);
}
static inline uint32_t rm_payload_embd_v(const rm_payload * pl, uint32_t il) {
    return rm_load_u32(pl->layer_table + (size_t) il * RM_PAYLOAD_LAYER_ENTRY + 4);
}
static inline int32_t rm_payload_pos(const rm_payload * pl, uint32_t i) {
    return rm_load_i32(pl->positions + (size_t) i * 4);
}

// encoded bytes of a K block / V block (n_cells rows of n_embd values); false on overflow / unknown type
bool rm_enc_k_bytes(uint32_t enc, int32_t type, uint32_t n_cells, uint32_t n_embd, size_t * out);
bool rm_enc_v_bytes(uint32_t enc, int32_t type, uint32_t n_cells, uint32_t n_embd, size_t * out);

// fragment extraction: cells are indices into the blob's cells
rm_status rm_extract_size(const uint8_t * blob, const rm_state * st, uint32_t n_sel, uint32_t enc,
                          size_t * out_size, char * err);
rm_status rm_extract(const uint8_t * blob, const rm_state * st, const int32_t * cells, uint32_t n_sel,
                     const uint8_t fingerprint[32], uint32_t enc, uint64_t user, uint8_t * out,
                     size_t out_size, char * err);

// decode rows [c0, c0 + n) of one layer's K (is_v = false) or V block into f16 (enc != RAW) or the raw type
// (enc == RAW); dst rows are dst_row_bytes apart. tmp: scratch of n_embd floats.
void rm_decode_rows(const rm_payload * pl, uint32_t il, bool is_v, uint32_t c0, uint32_t n, uint8_t * dst,
                    size_t dst_row_bytes, float * tmp);

// ---------------------------------------------------------------------------------------------------------
// splice

typedef enum { RM_PLACE_PARALLEL = 0, RM_PLACE_SEQUENTIAL = 1 } rm_placement;

typedef struct {
    uint32_t        mode;
    int64_t         start_pos;   // sequential: first position; < 0 = right after the prefix
    const float *   key_scale;   // per fragment
    uint32_t        drop_first;  // cells dropped at the start of every fragment
    float           rope_base;
    float           rope_freq_scale;
    uint32_t        rope_dims;
    uint32_t        head_dim;
    bool            rope_neox;
    int32_t         v_trans;     // < 0 = from the prefix
    int32_t         k_type;      // < 0 = from the prefix / payloads
    int32_t         v_type;
    int32_t         seq_id;
    uint32_t        n_stream;    // 0 = from the prefix (1 when there is none)
    const uint8_t * fingerprint; // NULL = do not check
} rm_splice_params;

typedef struct rm_splice_plan rm_splice_plan;

// plan: validates everything and computes the output size; run: writes the blob (no allocation besides
// scratch, no Python, safe without the GIL)
rm_status rm_splice_plan_make(const uint8_t * prefix, size_t prefix_n, const rm_payload * pls, uint32_t n_pl,
                              const rm_splice_params * prm, rm_splice_plan ** out_plan, size_t * out_size,
                              int64_t * next_pos, char * err);
rm_status rm_splice_run(rm_splice_plan * plan, uint8_t * out, size_t out_size, char * err);
void      rm_splice_plan_free(rm_splice_plan * plan);

// rotate n rows of f16 keys (n_embd values each, heads of head_dim with the first rope_dims rotated) by
// delta positions and multiply by scale; the same math as ggml's CPU rope (ggml_rope_cache_init)
typedef struct {
    float *  cs;       // rope_dims/2 cosines, then rope_dims/2 sines
    uint32_t rope_dims;
    uint32_t head_dim;
    bool     neox;
} rm_rope;

void rm_rope_table(float * cs, uint32_t rope_dims, int64_t delta, float base, float freq_scale);
void rm_rope_rows_f16(uint16_t * rows, size_t row_stride_elems, uint32_t n, uint32_t n_embd, const rm_rope * rope,
                      float scale, float * tmp);
void rm_rope_rows_f32(float * rows, size_t row_stride_elems, uint32_t n, uint32_t n_embd, const rm_rope * rope,
                      float scale);

// ---------------------------------------------------------------------------------------------------------
// attention capture (capture.c)

typedef struct {
    float *  scores;     // n_layer * n_cells when per_layer, else n_cells
    uint32_t n_cells;
    uint32_t n_layer;
    bool     per_layer;
    int32_t  layout;     // 0 unknown, 1 verified, -1 mismatch (capture disabled)
    uint64_t calls;      // kq_soft_max tensors accumulated
    uint64_t skipped;    // tensors seen that could not be read (wrong type, no api, bad layer)
    float *  tmp;        // scratch for non-host tensors
    size_t   tmp_n;
} rm_capture;

bool rm_capture_cb(struct rm_ggml_tensor * t, bool ask, void * user_data);
void rm_set_ggml_api(rm_ggml_get_name_fn get_name, rm_ggml_backend_tensor_get_fn tensor_get,
                     rm_ggml_backend_buffer_is_host_fn is_host);
bool rm_ggml_api_ready(void);
