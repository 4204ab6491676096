// ggml_abi.h - the few pieces of the ggml ABI that _kvsplice needs, copied by hand.
//
// Source: llama-cpp-python 0.3.36 sdist, vendor/llama.cpp/ggml/include/ggml.h and ggml-backend.h.
// The extension must build with no llama.cpp headers or libraries present, so the struct layout is
// copied here and checked once at run time (see capture.c: the name pointer returned by ggml_get_name()
// must equal &t->name[0] computed from this copy). If llama-cpp-python is upgraded, re-check this file.

#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RM_GGML_MAX_DIMS      4
#define RM_GGML_MAX_SRC       10
#define RM_GGML_MAX_OP_PARAMS 64
#define RM_GGML_MAX_NAME      64

// enum ggml_type values used by llama.cpp KV caches (ggml.h, 0.3.36)
enum {
    RM_GGML_TYPE_F32    = 0,
    RM_GGML_TYPE_F16    = 1,
    RM_GGML_TYPE_Q4_0   = 2,
    RM_GGML_TYPE_Q4_1   = 3,
    RM_GGML_TYPE_Q5_0   = 6,
    RM_GGML_TYPE_Q5_1   = 7,
    RM_GGML_TYPE_Q8_0   = 8,
    RM_GGML_TYPE_IQ4_NL = 20,
    RM_GGML_TYPE_BF16   = 30,
};

// struct ggml_tensor, field for field (ggml.h line 685 in 0.3.36). Only the fields up to `name` are read.
struct rm_ggml_tensor {
    int32_t type;                                  // enum ggml_type (an int-sized enum)
    void *  buffer;                                // struct ggml_backend_buffer *
    int64_t ne[RM_GGML_MAX_DIMS];                  // number of elements
    size_t  nb[RM_GGML_MAX_DIMS];                  // stride in bytes
    int32_t op;                                    // enum ggml_op
    int32_t op_params[RM_GGML_MAX_OP_PARAMS / sizeof(int32_t)];
    int32_t flags;
    struct rm_ggml_tensor * src[RM_GGML_MAX_SRC];
    struct rm_ggml_tensor * view_src;
    size_t  view_offs;
    void *  data;
    char    name[RM_GGML_MAX_NAME];
    void *  extra;
    char    padding[8];
};

// function pointer types resolved at run time from the libggml that llama_cpp loaded
typedef const char * (*rm_ggml_get_name_fn)(const struct rm_ggml_tensor * t);
typedef void (*rm_ggml_backend_tensor_get_fn)(const struct rm_ggml_tensor * t, void * data, size_t offset, size_t size);
typedef bool (*rm_ggml_backend_buffer_is_host_fn)(void * buffer);
