// util.c - errors, ggml type table, fp16 conversion, XXH64.

#include "kvsplice.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define RM_X86_DISPATCH 1
#include <immintrin.h>
#endif

rm_status rm_fail(char * err, rm_status code, const char * fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, RM_ERR_LEN, fmt, ap);
        va_end(ap);
    }
    return code;
}

// ---------------------------------------------------------------------------------------------------------
// ggml types (ggml.c type_traits, 0.3.36): block size, bytes per block

bool rm_type_info(int32_t type, uint32_t * blck, uint32_t * tsize) {
    uint32_t b = 0;
    uint32_t s = 0;
    switch (type) {
        case RM_GGML_TYPE_F32:    b = 1;  s = 4;  break;
        case RM_GGML_TYPE_F16:    b = 1;  s = 2;  break;
        case RM_GGML_TYPE_BF16:   b = 1;  s = 2;  break;
        case RM_GGML_TYPE_Q4_0:   b = 32; s = 18; break;
        case RM_GGML_TYPE_Q4_1:   b = 32; s = 20; break;
        case RM_GGML_TYPE_Q5_0:   b = 32; s = 22; break;
        case RM_GGML_TYPE_Q5_1:   b = 32; s = 24; break;
        case RM_GGML_TYPE_Q8_0:   b = 32; s = 34; break;
        case RM_GGML_TYPE_IQ4_NL: b = 32; s = 18; break;
        default: return false;
    }
    if (blck) {
        *blck = b;
    }
    if (tsize) {
        *tsize = s;
    }
    return true;
}

bool rm_row_size(int32_t type, uint64_t n, uint64_t * out) {
    uint32_t blck;
    uint32_t tsize;
    if (!rm_type_info(type, &blck, &tsize)) {
        return false;
    }
    if (n % blck != 0) {
        return false;
    }
    const uint64_t nb = n / blck;
    if (nb > UINT64_MAX / tsize) {
        return false;
    }
    *out = nb * tsize;
    return true;
}

const char * rm_type_name(int32_t type) {
    switch (type) {
        case RM_GGML_TYPE_F32:    return "f32";
        case RM_GGML_TYPE_F16:    return "f16";
        case RM_GGML_TYPE_BF16:   return "bf16";
        case RM_GGML_TYPE_Q4_0:   return "q4_0";
        case RM_GGML_TYPE_Q4_1:   return "q4_1";
        case RM_GGML_TYPE_Q5_0:   return "q5_0";
        case RM_GGML_TYPE_Q5_1:   return "q5_1";
        case RM_GGML_TYPE_Q8_0:   return "q8_0";
        case RM_GGML_TYPE_IQ4_NL: return "iq4_nl";
        default:                  return "unknown";
    }
}

// ---------------------------------------------------------------------------------------------------------
// fp16 (bit tricks from ggml-impl.h / the FP16 library: exact, round to nearest even)

static inline float rm_bits_f32(uint32_t w) {
    float f;
    memcpy(&f, &w, sizeof(f));
    return f;
}

static inline uint32_t rm_f32_bits(float f) {
    uint32_t w;
    memcpy(&w, &f, sizeof(w));
    return w;
}

static float rm_f16_to_f32_soft(uint16_t h) {
    const uint32_t w     = (uint32_t) h << 16;
    const uint32_t sign  = w & 0x80000000u;
    const uint32_t two_w = w + w;

    const uint32_t exp_offset       = 0xE0u << 23;
    const float    exp_scale        = 0x1.0p-112f;
    const float    normalized_value = rm_bits_f32((two_w >> 4) + exp_offset) * exp_scale;

    const uint32_t magic_mask         = 126u << 23;
    const float    magic_bias         = 0.5f;
    const float    denormalized_value = rm_bits_f32((two_w >> 17) | magic_mask) - magic_bias;

    const uint32_t denormalized_cutoff = 1u << 27;
    const uint32_t result =
        sign | (two_w < denormalized_cutoff ? rm_f32_bits(denormalized_value) : rm_f32_bits(normalized_value));
    return rm_bits_f32(result);
}

static uint16_t rm_f32_to_f16_soft(float f) {
    const float scale_to_inf  = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float       base          = (fabsf(f) * scale_to_inf) * scale_to_zero;

    const uint32_t w      = rm_f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign   = w & 0x80000000u;
    uint32_t       bias   = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) {
        bias = 0x71000000u;
    }

    base = rm_bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits          = rm_f32_bits(base);
    const uint32_t exp_bits      = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign       = exp_bits + mantissa_bits;
    return (uint16_t) ((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static float rm_f16_table[1 << 16];

float rm_f16_to_f32(uint16_t h) {
    return rm_f16_table[h];
}

uint16_t rm_f32_to_f16(float f) {
    return rm_f32_to_f16_soft(f);
}

static void rm_f16_to_f32_row_soft(const uint16_t * x, float * y, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        y[i] = rm_f16_table[x[i]];
    }
}

static void rm_f32_to_f16_row_soft(const float * x, uint16_t * y, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        y[i] = rm_f32_to_f16_soft(x[i]);
    }
}

#ifdef RM_X86_DISPATCH
__attribute__((target("avx,f16c"))) static void rm_f16_to_f32_row_f16c(const uint16_t * x, float * y, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128((const __m128i *) (const void *) (x + i));
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; ++i) {
        y[i] = rm_f16_table[x[i]];
    }
}

__attribute__((target("avx,f16c"))) static void rm_f32_to_f16_row_f16c(const float * x, uint16_t * y, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256  v = _mm256_loadu_ps(x + i);
        const __m128i h = _mm256_cvtps_ph(v, 0); // 0 = _MM_FROUND_TO_NEAREST_INT, like ggml
        _mm_storeu_si128((__m128i *) (void *) (y + i), h);
    }
    for (; i < n; ++i) {
        y[i] = rm_f32_to_f16_soft(x[i]);
    }
}
#endif

static void (*rm_h2f_row)(const uint16_t *, float *, size_t) = rm_f16_to_f32_row_soft;
static void (*rm_f2h_row)(const float *, uint16_t *, size_t) = rm_f32_to_f16_row_soft;

void rm_f16_to_f32_row(const uint16_t * x, float * y, size_t n) {
    rm_h2f_row(x, y, n);
}

void rm_f32_to_f16_row(const float * x, uint16_t * y, size_t n) {
    rm_f2h_row(x, y, n);
}

void rm_init_tables(void) {
    for (uint32_t i = 0; i < (1u << 16); ++i) {
        rm_f16_table[i] = rm_f16_to_f32_soft((uint16_t) i);
    }
#ifdef RM_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c")) {
        rm_h2f_row = rm_f16_to_f32_row_f16c;
        rm_f2h_row = rm_f32_to_f16_row_f16c;
    }
#endif
}

// ---------------------------------------------------------------------------------------------------------
// XXH64 (Yann Collet's algorithm, written from its public specification; seed 0 in payloads)

#define RM_P64_1 0x9E3779B185EBCA87ull
#define RM_P64_2 0xC2B2AE3D27D4EB4Full
#define RM_P64_3 0x165667B19E3779F9ull
#define RM_P64_4 0x85EBCA77C2B2AE63ull
#define RM_P64_5 0x27D4EB2F165667C5ull

static inline uint64_t rm_rotl64(uint64_t x, int r) {
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t rm_xxh_round(uint64_t acc, uint64_t input) {
    acc += input * RM_P64_2;
    acc  = rm_rotl64(acc, 31);
    acc *= RM_P64_1;
    return acc;
}

static inline uint64_t rm_xxh_merge(uint64_t acc, uint64_t val) {
    val  = rm_xxh_round(0, val);
    acc ^= val;
    acc  = acc * RM_P64_1 + RM_P64_4;
    return acc;
}

uint64_t rm_xxh64(const uint8_t * p, size_t n, uint64_t seed) {
    const uint8_t * const end = p + n;
    uint64_t h;

    if (n >= 32) {
        const uint8_t * const limit = end - 32;
        uint64_t v1 = seed + RM_P64_1 + RM_P64_2;
        uint64_t v2 = seed + RM_P64_2;
        uint64_t v3 = seed + 0;
        uint64_t v4 = seed - RM_P64_1;
        do {
            v1 = rm_xxh_round(v1, rm_load_u64(p));      p += 8;
            v2 = rm_xxh_round(v2, rm_load_u64(p));      p += 8;
            v3 = rm_xxh_round(v3, rm_load_u64(p));      p += 8;
            v4 = rm_xxh_round(v4, rm_load_u64(p));      p += 8;
        } while (p <= limit);
        h = rm_rotl64(v1, 1) + rm_rotl64(v2, 7) + rm_rotl64(v3, 12) + rm_rotl64(v4, 18);
        h = rm_xxh_merge(h, v1);
        h = rm_xxh_merge(h, v2);
        h = rm_xxh_merge(h, v3);
        h = rm_xxh_merge(h, v4);
    } else {
        h = seed + RM_P64_5;
    }

    h += (uint64_t) n;

    while (end - p >= 8) {
        const uint64_t k1 = rm_xxh_round(0, rm_load_u64(p));
        h ^= k1;
        h  = rm_rotl64(h, 27) * RM_P64_1 + RM_P64_4;
        p += 8;
    }
    if (end - p >= 4) {
        h ^= (uint64_t) rm_load_u32(p) * RM_P64_1;
        h  = rm_rotl64(h, 23) * RM_P64_2 + RM_P64_3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t) (*p) * RM_P64_5;
        h  = rm_rotl64(h, 11) * RM_P64_1;
        p++;
    }

    h ^= h >> 33;
    h *= RM_P64_2;
    h ^= h >> 29;
    h *= RM_P64_3;
    h ^= h >> 32;
    return h;
}
