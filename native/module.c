// module.c - CPython bindings of the _kvsplice core. Thin: argument conversion, buffer handling, the GIL.
// Every heavy loop runs with the GIL released on buffers that stay exported (so an mmap cannot be closed
// under us) and on output bytes objects that nobody else can see yet.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "kvsplice.h"

#include <stdlib.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

static PyObject * StateFormatError = NULL;
static PyObject * PayloadError     = NULL;

// a fresh multi-hundred-MB output is mostly page-fault cost with 4 KiB pages; ask Linux for transparent huge
// pages on the page-aligned interior before the first write (a hint: errors are ignored)
static void rm_hint_hugepages(void * p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t) 2u << 20;
    if (n < 4u * huge) {
        return;
    }
    const uintptr_t lo = ((uintptr_t) p + huge - 1u) & ~(huge - 1u);
    const uintptr_t hi = ((uintptr_t) p + n) & ~(huge - 1u);
    if (hi > lo) {
        (void) madvise((void *) lo, hi - lo, MADV_HUGEPAGE);
    }
#else
    (void) p;
    (void) n;
#endif
}

static PyObject * rm_raise(rm_status rc, const char * err) {
    switch (rc) {
        case RM_ERR_STATE:   PyErr_SetString(StateFormatError, err); break;
        case RM_ERR_PAYLOAD: PyErr_SetString(PayloadError, err); break;
        case RM_ERR_NOMEM:   PyErr_SetString(PyExc_MemoryError, err); break;
        default:             PyErr_SetString(PyExc_ValueError, err); break;
    }
    return NULL;
}

static PyObject * rm_u32_tuple(const uint32_t * v, uint32_t n) {
    PyObject * t = PyTuple_New(n);
    if (!t) {
        return NULL;
    }
    for (uint32_t i = 0; i < n; ++i) {
        PyObject * x = PyLong_FromUnsignedLong(v[i]);
        if (!x) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

// sequence of ints -> malloc'd uint32 array of exactly n entries
static uint32_t * rm_u32_array(PyObject * seq, uint32_t n, const char * what) {
    PyObject * fast = PySequence_Fast(seq, what);
    if (!fast) {
        return NULL;
    }
    if ((size_t) PySequence_Fast_GET_SIZE(fast) != n) {
        PyErr_Format(PyExc_ValueError, "%s: %zd values given, %u layers expected", what,
                     PySequence_Fast_GET_SIZE(fast), n);
        Py_DECREF(fast);
        return NULL;
    }
    uint32_t * out = (uint32_t *) malloc(sizeof(uint32_t) * (n ? n : 1u));
    if (!out) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (uint32_t i = 0; i < n; ++i) {
        const unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(fast, i));
        if (PyErr_Occurred() || v > RM_MAX_EMBD) {
            if (!PyErr_Occurred()) {
                PyErr_Format(PyExc_ValueError, "%s: value %lu too large", what, v);
            }
            free(out);
            Py_DECREF(fast);
            return NULL;
        }
        out[i] = (uint32_t) v;
    }
    Py_DECREF(fast);
    return out;
}

// Blob offsets where each layer's K rows (v: V data) start.
static PyObject * rm_offset_tuple(const rm_state * st, bool v) {
    PyObject * t = PyTuple_New(st->n_layer);
    if (!t) {
        return NULL;
    }
    for (uint32_t il = 0; il < st->n_layer; ++il) {
        PyObject * x = PyLong_FromSize_t(v ? st->layers[il].v_off : st->layers[il].k_off);
        if (!x) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, il, x);
    }
    return t;
}

// ---------------------------------------------------------------------------------------------------------

static PyObject * py_parse_state(PyObject * self, PyObject * args) {
    (void) self;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "y*:parse_state", &buf)) {
        return NULL;
    }
    char     err[RM_ERR_LEN];
    rm_state st;
    const rm_status rc = rm_state_parse((const uint8_t *) buf.buf, (size_t) buf.len, &st, err);
    if (rc != RM_OK) {
        PyBuffer_Release(&buf);
        return rm_raise(rc, err);
    }
    PyObject * result = NULL;
    PyObject * pos    = PyBytes_FromStringAndSize(NULL, (Py_ssize_t) st.n_cells * 4);
    uint32_t * k_type = (uint32_t *) malloc(sizeof(uint32_t) * 5u * (st.n_layer ? st.n_layer : 1u));
    if (pos && k_type) {
        uint8_t * pp = (uint8_t *) PyBytes_AS_STRING(pos);
        for (uint32_t i = 0; i < st.n_cells; ++i) {
            const int32_t p = rm_state_pos((const uint8_t *) buf.buf, &st, i);
            memcpy(pp + (size_t) i * 4, &p, 4);
        }
        uint32_t * v_type = k_type + st.n_layer;
        uint32_t * k_row  = v_type + st.n_layer;
        uint32_t * v_row  = k_row + st.n_layer;
        uint32_t * e_v    = v_row + st.n_layer;
        uint32_t   v_el   = 0;
        for (uint32_t il = 0; il < st.n_layer; ++il) {
            k_type[il] = (uint32_t) st.layers[il].k_type;
            v_type[il] = (uint32_t) st.layers[il].v_type;
            k_row[il]  = (uint32_t) st.layers[il].k_row; // < RM_MAX_EMBD * 4 in any real model
            v_row[il]  = (uint32_t) st.layers[il].v_row;
            e_v[il]    = st.layers[il].n_embd_v;
            v_el       = st.layers[il].v_el;
        }
        PyObject * tk = rm_u32_tuple(k_type, st.n_layer);
        PyObject * tv = rm_u32_tuple(v_type, st.n_layer);
        PyObject * rk = rm_u32_tuple(k_row, st.n_layer);
        PyObject * rv = rm_u32_tuple(v_row, st.n_layer);
        PyObject * ev = rm_u32_tuple(e_v, st.n_layer);
        PyObject * ko = rm_offset_tuple(&st, false);
        PyObject * vo = rm_offset_tuple(&st, true);
        if (tk && tv && rk && rv && ev && ko && vo) {
            // ggml type ids are small non-negative ints; tuples of u32 are fine for them
            result = Py_BuildValue("{s:i,s:I,s:I,s:I,s:O,s:I,s:I,s:O,s:O,s:O,s:O,s:O,s:I,s:O,s:O,s:n}", "seq_id",
                                   st.seq_id, "n_stream", st.n_stream, "stream", st.stream, "n_cells", st.n_cells,
                                   "positions", pos, "n_layer", st.n_layer, "v_trans", st.v_trans, "k_types", tk,
                                   "v_types", tv, "k_row_bytes", rk, "v_row_bytes", rv, "n_embd_v_gqa", ev,
                                   "v_elem_bytes", v_el, "k_offsets", ko, "v_offsets", vo, "size",
                                   (Py_ssize_t) st.size);
        }
        Py_XDECREF(tk);
        Py_XDECREF(tv);
        Py_XDECREF(rk);
        Py_XDECREF(rv);
        Py_XDECREF(ev);
        Py_XDECREF(ko);
        Py_XDECREF(vo);
    } else if (!PyErr_Occurred()) {
        PyErr_NoMemory();
    }
    free(k_type);
    Py_XDECREF(pos);
    rm_state_free(&st);
    PyBuffer_Release(&buf);
    return result;
}

static PyObject * py_validate_state(PyObject * self, PyObject * args) {
    (void) self;
    Py_buffer    buf;
    unsigned int n_layer;
    PyObject *   ek_obj;
    PyObject *   ev_obj;
    int          k_type;
    int          v_type;
    if (!PyArg_ParseTuple(args, "y*IOOii:validate_state", &buf, &n_layer, &ek_obj, &ev_obj, &k_type, &v_type)) {
        return NULL;
    }
    if (n_layer == 0 || n_layer > RM_MAX_LAYERS) {
        PyBuffer_Release(&buf);
        PyErr_Format(PyExc_ValueError, "n_layer %u out of range", n_layer);
        return NULL;
    }
    uint32_t * ek = rm_u32_array(ek_obj, n_layer, "n_embd_k_gqa");
    uint32_t * ev = ek ? rm_u32_array(ev_obj, n_layer, "n_embd_v_gqa") : NULL;
    if (!ek || !ev) {
        free(ek);
        PyBuffer_Release(&buf);
        return NULL;
    }
    char     err[RM_ERR_LEN];
    rm_state st;
    rm_status rc = rm_state_parse((const uint8_t *) buf.buf, (size_t) buf.len, &st, err);
    if (rc == RM_OK) {
        rc = rm_state_check(&st, n_layer, ek, ev, k_type, v_type, err);
        rm_state_free(&st);
    }
    free(ek);
    free(ev);
    PyBuffer_Release(&buf);
    if (rc != RM_OK) {
        return rm_raise(rc, err);
    }
    Py_RETURN_NONE;
}

static PyObject * py_extract(PyObject * self, PyObject * args) {
    (void) self;
    Py_buffer          blob;
    Py_buffer          cells;
    Py_buffer          fp;
    unsigned int       enc;
    unsigned long long user;
    if (!PyArg_ParseTuple(args, "y*y*y*IK:extract", &blob, &cells, &fp, &enc, &user)) {
        return NULL;
    }
    PyObject * out = NULL;
    char       err[RM_ERR_LEN];
    rm_state   st;
    bool       parsed = false;
    rm_status  rc;
    if (fp.len != 32) {
        PyErr_SetString(PyExc_ValueError, "fingerprint must be 32 bytes");
        goto done;
    }
    if (cells.len % 4 != 0 || cells.len / 4 > (Py_ssize_t) RM_MAX_CELLS) {
        PyErr_SetString(PyExc_ValueError, "cells must be an int32 buffer");
        goto done;
    }
    rc = rm_state_parse((const uint8_t *) blob.buf, (size_t) blob.len, &st, err);
    if (rc != RM_OK) {
        rm_raise(rc, err);
        goto done;
    }
    parsed = true;
    const uint32_t n_sel = (uint32_t) (cells.len / 4);
    size_t size;
    rc = rm_extract_size((const uint8_t *) blob.buf, &st, n_sel, enc, &size, err);
    if (rc != RM_OK) {
        rm_raise(rc, err);
        goto done;
    }
    if (size > (size_t) PY_SSIZE_T_MAX) {
        PyErr_NoMemory();
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t) size);
    if (!out) {
        goto done;
    }
    // cells may be unaligned in an arbitrary buffer: copy them (small)
    int32_t * idx = (int32_t *) malloc(sizeof(int32_t) * (n_sel ? n_sel : 1u));
    if (!idx) {
        Py_CLEAR(out);
        PyErr_NoMemory();
        goto done;
    }
    if (n_sel) {
        memcpy(idx, cells.buf, (size_t) n_sel * 4);
    }
    Py_BEGIN_ALLOW_THREADS
    rc = rm_extract((const uint8_t *) blob.buf, &st, idx, n_sel, (const uint8_t *) fp.buf, enc, (uint64_t) user,
                    (uint8_t *) PyBytes_AS_STRING(out), size, err);
    Py_END_ALLOW_THREADS
    free(idx);
    if (rc != RM_OK) {
        Py_CLEAR(out);
        rm_raise(rc, err);
    }
done:
    if (parsed) {
        rm_state_free(&st);
    }
    PyBuffer_Release(&blob);
    PyBuffer_Release(&cells);
    PyBuffer_Release(&fp);
    return out;
}

static PyObject * py_payload_info(PyObject * self, PyObject * args) {
    (void) self;
    Py_buffer buf;
    int       verify = 1;
    if (!PyArg_ParseTuple(args, "y*|p:payload_info", &buf, &verify)) {
        return NULL;
    }
    char       err[RM_ERR_LEN];
    rm_payload pl;
    rm_status  rc;
    Py_BEGIN_ALLOW_THREADS
    rc = rm_payload_open((const uint8_t *) buf.buf, (size_t) buf.len, verify != 0, &pl, err);
    Py_END_ALLOW_THREADS
    if (rc != RM_OK) {
        PyBuffer_Release(&buf);
        return rm_raise(rc, err);
    }
    PyObject * result = NULL;
    PyObject * pos    = PyBytes_FromStringAndSize((const char *) pl.positions, (Py_ssize_t) pl.n_cells * 4);
    uint32_t * e      = (uint32_t *) malloc(sizeof(uint32_t) * 2u * pl.n_layer);
    if (pos && e) {
        for (uint32_t il = 0; il < pl.n_layer; ++il) {
            e[il]              = rm_payload_embd_k(&pl, il);
            e[pl.n_layer + il] = rm_payload_embd_v(&pl, il);
        }
        PyObject * ek = rm_u32_tuple(e, pl.n_layer);
        PyObject * ev = rm_u32_tuple(e + pl.n_layer, pl.n_layer);
        if (ek && ev) {
            result = Py_BuildValue("{s:I,s:y#,s:I,s:I,s:i,s:i,s:I,s:I,s:i,s:i,s:O,s:K,s:K,s:K,s:O,s:O,s:O,s:n}",
                                   "version", pl.version, "fingerprint", (const char *) pl.fingerprint,
                                   (Py_ssize_t) 32, "n_layer", pl.n_layer, "n_cells", pl.n_cells, "k_type",
                                   pl.k_type, "v_type", pl.v_type, "encoding", pl.encoding, "group", pl.group,
                                   "pos_first", pl.pos_first, "pos_max", pl.pos_max, "contiguous",
                                   (pl.flags & RM_FLAG_CONTIGUOUS) ? Py_True : Py_False, "user",
                                   (unsigned long long) pl.user, "data_bytes", (unsigned long long) pl.data_bytes,
                                   "checksum", (unsigned long long) pl.checksum, "positions", pos, "n_embd_k_gqa", ek,
                                   "n_embd_v_gqa", ev, "size", (Py_ssize_t) pl.size);
        }
        Py_XDECREF(ek);
        Py_XDECREF(ev);
    } else if (!PyErr_Occurred()) {
        PyErr_NoMemory();
    }
    free(e);
    Py_XDECREF(pos);
    rm_payload_close(&pl);
    PyBuffer_Release(&buf);
    return result;
}

static PyObject * py_splice(PyObject * self, PyObject * args) {
    (void) self;
    PyObject *   prefix_obj;
    PyObject *   payloads_obj;
    unsigned int mode;
    long long    start_pos;
    PyObject *   scales_obj;
    unsigned int drop_first;
    float        rope_base;
    float        rope_freq_scale;
    unsigned int rope_dims;
    unsigned int head_dim;
    int          rope_neox;
    int          v_trans;
    int          k_type;
    int          v_type;
    int          seq_id;
    unsigned int n_stream;
    PyObject *   fp_obj;
    int          verify;
    PyObject *   out_obj = Py_None;
    if (!PyArg_ParseTuple(args, "OOILOIffIIpiiiiIOp|O:splice", &prefix_obj, &payloads_obj, &mode, &start_pos,
                          &scales_obj, &drop_first, &rope_base, &rope_freq_scale, &rope_dims, &head_dim, &rope_neox,
                          &v_trans, &k_type, &v_type, &seq_id, &n_stream, &fp_obj, &verify, &out_obj)) {
        return NULL;
    }
    if (out_obj != Py_None && !PyByteArray_Check(out_obj)) {
        PyErr_SetString(PyExc_TypeError, "out must be a bytearray (reused and resized to the blob size)");
        return NULL;
    }

    PyObject *     result    = NULL;
    PyObject *     out       = NULL;
    PyObject *     fast      = NULL;
    Py_buffer      prefix    = { 0 };
    Py_buffer      fp        = { 0 };
    Py_buffer      outview   = { 0 };
    bool           have_out  = false;
    bool           have_pre  = false;
    bool           have_fp   = false;
    Py_buffer *    views     = NULL;
    rm_payload *   pls       = NULL;
    float *        scales    = NULL;
    uint32_t       n_views   = 0;
    uint32_t       n_open    = 0;
    rm_splice_plan * plan    = NULL;
    char           err[RM_ERR_LEN];
    rm_status      rc;

    if (prefix_obj != Py_None) {
        if (PyObject_GetBuffer(prefix_obj, &prefix, PyBUF_SIMPLE) != 0) {
            goto done;
        }
        have_pre = true;
    }
    if (fp_obj != Py_None) {
        if (PyObject_GetBuffer(fp_obj, &fp, PyBUF_SIMPLE) != 0) {
            goto done;
        }
        have_fp = true;
        if (fp.len != 32) {
            PyErr_SetString(PyExc_ValueError, "fingerprint must be 32 bytes");
            goto done;
        }
    }
    fast = PySequence_Fast(payloads_obj, "payloads must be a sequence of buffers");
    if (!fast) {
        goto done;
    }
    const Py_ssize_t n_pl = PySequence_Fast_GET_SIZE(fast);
    if (n_pl > 1000000) {
        PyErr_SetString(PyExc_ValueError, "too many payloads");
        goto done;
    }
    views  = (Py_buffer *) calloc((size_t) n_pl + 1u, sizeof(Py_buffer));
    pls    = (rm_payload *) calloc((size_t) n_pl + 1u, sizeof(rm_payload));
    scales = (float *) calloc((size_t) n_pl + 1u, sizeof(float));
    if (!views || !pls || !scales) {
        PyErr_NoMemory();
        goto done;
    }
    bool any_scale = false;
    if (scales_obj != Py_None) {
        PyObject * sf = PySequence_Fast(scales_obj, "key_scale must be a sequence of floats");
        if (!sf) {
            goto done;
        }
        if (PySequence_Fast_GET_SIZE(sf) != n_pl) {
            Py_DECREF(sf);
            PyErr_Format(PyExc_ValueError, "key_scale has %zd values for %zd payloads", PySequence_Fast_GET_SIZE(sf),
                         n_pl);
            goto done;
        }
        for (Py_ssize_t i = 0; i < n_pl; ++i) {
            const double v = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(sf, i));
            if (v == -1.0 && PyErr_Occurred()) {
                Py_DECREF(sf);
                goto done;
            }
            scales[i] = (float) v;
            any_scale = any_scale || scales[i] != 1.0f;
        }
        Py_DECREF(sf);
    }
    for (Py_ssize_t i = 0; i < n_pl; ++i) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &views[i], PyBUF_SIMPLE) != 0) {
            goto done;
        }
        n_views++;
    }

    Py_BEGIN_ALLOW_THREADS
    rc = RM_OK;
    for (uint32_t i = 0; i < n_views && rc == RM_OK; ++i) {
        rc = rm_payload_open((const uint8_t *) views[i].buf, (size_t) views[i].len, verify != 0, &pls[i], err);
        if (rc == RM_OK) {
            n_open++;
        } else {
            char tmp[RM_ERR_LEN];
            memcpy(tmp, err, sizeof(tmp));
            snprintf(err, RM_ERR_LEN, "payload %u: %.230s", i, tmp);
        }
    }
    Py_END_ALLOW_THREADS
    if (rc != RM_OK) {
        rm_raise(rc, err);
        goto done;
    }

    rm_splice_params prm;
    memset(&prm, 0, sizeof(prm));
    prm.mode            = mode;
    prm.start_pos       = start_pos;
    prm.key_scale       = any_scale ? scales : NULL;
    prm.drop_first      = drop_first;
    prm.rope_base       = rope_base;
    prm.rope_freq_scale = rope_freq_scale;
    prm.rope_dims       = rope_dims;
    prm.head_dim        = head_dim;
    prm.rope_neox       = rope_neox != 0;
    prm.v_trans         = v_trans;
    prm.k_type          = k_type;
    prm.v_type          = v_type;
    prm.seq_id          = seq_id;
    prm.n_stream        = n_stream;
    prm.fingerprint     = have_fp ? (const uint8_t *) fp.buf : NULL;

    size_t  size     = 0;
    int64_t next_pos = 0;
    rc = rm_splice_plan_make(have_pre ? (const uint8_t *) prefix.buf : NULL, have_pre ? (size_t) prefix.len : 0u, pls,
                             n_open, &prm, &plan, &size, &next_pos, err);
    if (rc != RM_OK) {
        rm_raise(rc, err);
        goto done;
    }
    if (size > (size_t) PY_SSIZE_T_MAX) {
        PyErr_NoMemory();
        goto done;
    }
    uint8_t * dst;
    if (out_obj == Py_None) {
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t) size);
        if (!out) {
            goto done;
        }
        dst = (uint8_t *) PyBytes_AS_STRING(out);
    } else {
        // resize (fails with BufferError while someone holds a view), then hold a view ourselves so nobody
        // can resize it while we write without the GIL
        if (PyByteArray_GET_SIZE(out_obj) != (Py_ssize_t) size && PyByteArray_Resize(out_obj, (Py_ssize_t) size) < 0) {
            goto done;
        }
        if (PyObject_GetBuffer(out_obj, &outview, PyBUF_WRITABLE) != 0) {
            goto done;
        }
        have_out = true;
        out      = Py_NewRef(out_obj);
        dst      = (uint8_t *) outview.buf;
    }
    rm_hint_hugepages(dst, size);
    Py_BEGIN_ALLOW_THREADS
    rc = rm_splice_run(plan, dst, size, err);
    Py_END_ALLOW_THREADS
    if (rc != RM_OK) {
        rm_raise(rc, err);
        goto done;
    }
    result = Py_BuildValue("(OL)", out, (long long) next_pos);

done:
    if (have_out) {
        PyBuffer_Release(&outview);
    }
    rm_splice_plan_free(plan);
    Py_XDECREF(out);
    for (uint32_t i = 0; i < n_open; ++i) {
        rm_payload_close(&pls[i]);
    }
    for (uint32_t i = 0; i < n_views; ++i) {
        PyBuffer_Release(&views[i]);
    }
    free(views);
    free(pls);
    free(scales);
    Py_XDECREF(fast);
    if (have_pre) {
        PyBuffer_Release(&prefix);
    }
    if (have_fp) {
        PyBuffer_Release(&fp);
    }
    return result;
}

static PyObject * py_rope_shift(PyObject * self, PyObject * args) {
    (void) self;
    Py_buffer    buf;
    unsigned int n_embd;
    long long    delta;
    unsigned int head_dim;
    unsigned int rope_dims;
    float        base;
    float        freq_scale;
    int          neox;
    float        scale;
    if (!PyArg_ParseTuple(args, "w*ILIIffpf:rope_shift", &buf, &n_embd, &delta, &head_dim, &rope_dims, &base,
                          &freq_scale, &neox, &scale)) {
        return NULL;
    }
    if (n_embd == 0 || n_embd > RM_MAX_EMBD || head_dim == 0 || n_embd % head_dim != 0 || rope_dims == 0 ||
        rope_dims % 2 != 0 || rope_dims > head_dim || !(base > 0.0f) || buf.len % ((Py_ssize_t) n_embd * 2) != 0 ||
        ((uintptr_t) buf.buf) % 2 != 0) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "rope_shift: bad geometry (n_embd, head_dim, rope_dims, base, buffer size)");
        return NULL;
    }
    const uint32_t n  = (uint32_t) (buf.len / ((Py_ssize_t) n_embd * 2));
    float *        cs = (float *) malloc(sizeof(float) * rope_dims);
    float *        tmp = (float *) malloc(sizeof(float) * n_embd);
    if (!cs || !tmp) {
        free(cs);
        free(tmp);
        PyBuffer_Release(&buf);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    rm_rope_table(cs, rope_dims, delta, base, freq_scale);
    rm_rope rope = { cs, rope_dims, head_dim, neox != 0 };
    rm_rope_rows_f16((uint16_t *) buf.buf, n_embd, n, n_embd, &rope, scale, tmp);
    Py_END_ALLOW_THREADS
    free(cs);
    free(tmp);
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

static PyObject * py_xxh64(PyObject * self, PyObject * args) {
    (void) self;
    Py_buffer          buf;
    unsigned long long seed = 0;
    if (!PyArg_ParseTuple(args, "y*|K:xxh64", &buf, &seed)) {
        return NULL;
    }
    uint64_t h;
    Py_BEGIN_ALLOW_THREADS
    h = rm_xxh64((const uint8_t *) buf.buf, (size_t) buf.len, seed);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLongLong(h);
}

static PyObject * py_row_size(PyObject * self, PyObject * args) {
    (void) self;
    int                type;
    unsigned long long n;
    if (!PyArg_ParseTuple(args, "iK:row_size", &type, &n)) {
        return NULL;
    }
    uint64_t out;
    if (!rm_row_size(type, n, &out)) {
        PyErr_Format(PyExc_ValueError, "ggml type %d: unknown, or %llu values are not whole blocks", type, n);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(out);
}

static PyObject * py_set_ggml_api(PyObject * self, PyObject * args) {
    (void) self;
    unsigned long long get_name;
    unsigned long long tensor_get;
    unsigned long long is_host;
    if (!PyArg_ParseTuple(args, "KKK:set_ggml_api", &get_name, &tensor_get, &is_host)) {
        return NULL;
    }
    if (!get_name || !tensor_get || !is_host) {
        PyErr_SetString(PyExc_ValueError, "set_ggml_api: null function pointer");
        return NULL;
    }
    rm_set_ggml_api((rm_ggml_get_name_fn) (uintptr_t) get_name, (rm_ggml_backend_tensor_get_fn) (uintptr_t) tensor_get,
                    (rm_ggml_backend_buffer_is_host_fn) (uintptr_t) is_host);
    Py_RETURN_NONE;
}

static PyObject * py_ggml_api_ready(PyObject * self, PyObject * args) {
    (void) self;
    (void) args;
    return PyBool_FromLong(rm_ggml_api_ready());
}

// ---------------------------------------------------------------------------------------------------------
// Capture type: owns the C state the callback writes to; scores live in a caller-provided float32 buffer

typedef struct {
    PyObject_HEAD
    rm_capture cap;
    Py_buffer  view;
    bool       has_view;
} CaptureObject;

static void Capture_dealloc(CaptureObject * self) {
    if (self->has_view) {
        PyBuffer_Release(&self->view);
    }
    free(self->cap.tmp);
    Py_TYPE(self)->tp_free((PyObject *) self);
}

static int Capture_init(CaptureObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "scores", "n_cells", "n_layer", "per_layer", NULL };
    PyObject *    scores;
    unsigned int  n_cells;
    unsigned int  n_layer;
    int           per_layer = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OII|p:Capture", kwlist, &scores, &n_cells, &n_layer, &per_layer)) {
        return -1;
    }
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "Capture already initialised");
        return -1;
    }
    if (n_cells == 0 || n_cells > RM_MAX_CELLS || n_layer == 0 || n_layer > RM_MAX_LAYERS) {
        PyErr_SetString(PyExc_ValueError, "Capture: n_cells and n_layer must be positive");
        return -1;
    }
    if (PyObject_GetBuffer(scores, &self->view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0) {
        return -1;
    }
    self->has_view = true;
    const size_t want = (size_t) n_cells * (per_layer ? n_layer : 1u);
    if (self->view.itemsize != 4 || !self->view.format || strcmp(self->view.format, "f") != 0 ||
        (size_t) self->view.len != want * 4u || ((uintptr_t) self->view.buf) % 4 != 0) {
        PyErr_Format(PyExc_ValueError, "Capture: scores must be a C-contiguous float32 buffer of %zu values", want);
        return -1;
    }
    memset(&self->cap, 0, sizeof(self->cap));
    self->cap.scores    = (float *) self->view.buf;
    self->cap.n_cells   = n_cells;
    self->cap.n_layer   = n_layer;
    self->cap.per_layer = per_layer != 0;
    return 0;
}

static PyObject * Capture_reset(CaptureObject * self, PyObject * noargs) {
    (void) noargs;
    if (self->has_view) {
        memset(self->view.buf, 0, (size_t) self->view.len);
    }
    self->cap.calls   = 0;
    self->cap.skipped = 0;
    Py_RETURN_NONE;
}

static PyObject * Capture_get_callback(CaptureObject * self, void * closure) {
    (void) self;
    (void) closure;
    return PyLong_FromVoidPtr((void *) (uintptr_t) &rm_capture_cb);
}

static PyObject * Capture_get_user_data(CaptureObject * self, void * closure) {
    (void) closure;
    return PyLong_FromVoidPtr((void *) &self->cap);
}

static PyObject * Capture_get_calls(CaptureObject * self, void * closure) {
    (void) closure;
    return PyLong_FromUnsignedLongLong(self->cap.calls);
}

static PyObject * Capture_get_skipped(CaptureObject * self, void * closure) {
    (void) closure;
    return PyLong_FromUnsignedLongLong(self->cap.skipped);
}

static PyObject * Capture_get_layout(CaptureObject * self, void * closure) {
    (void) closure;
    if (self->cap.layout == 0) {
        Py_RETURN_NONE;
    }
    return PyBool_FromLong(self->cap.layout == 1);
}

static PyMethodDef Capture_methods[] = {
    { "reset", (PyCFunction) Capture_reset, METH_NOARGS, "Zero the scores and counters." },
    { NULL, NULL, 0, NULL },
};

static PyGetSetDef Capture_getset[] = {
    { "callback_address", (getter) Capture_get_callback, NULL, "address of the C cb_eval function", NULL },
    { "user_data_address", (getter) Capture_get_user_data, NULL, "address to pass as cb_eval_user_data", NULL },
    { "calls", (getter) Capture_get_calls, NULL, "kq_soft_max tensors accumulated", NULL },
    { "skipped", (getter) Capture_get_skipped, NULL, "kq_soft_max tensors that could not be read", NULL },
    { "layout_ok", (getter) Capture_get_layout, NULL, "None before the first tensor, then whether the ggml_tensor "
      "layout check passed", NULL },
    { NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject CaptureType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name      = "repomem.native._kvsplice.Capture",
    .tp_basicsize = sizeof(CaptureObject),
    .tp_flags     = Py_TPFLAGS_DEFAULT,
    .tp_doc       = "C state of an attention capture (use repomem.native.AttentionCapture).",
    .tp_new       = PyType_GenericNew,
    .tp_init      = (initproc) Capture_init,
    .tp_dealloc   = (destructor) Capture_dealloc,
    .tp_methods   = Capture_methods,
    .tp_getset    = Capture_getset,
};

// ---------------------------------------------------------------------------------------------------------

static PyMethodDef kvsplice_methods[] = {
    { "parse_state", py_parse_state, METH_VARARGS, "parse_state(blob) -> dict" },
    { "validate_state", py_validate_state, METH_VARARGS,
      "validate_state(blob, n_layer, n_embd_k, n_embd_v, k_type, v_type) -> None" },
    { "extract", py_extract, METH_VARARGS, "extract(blob, cells_i32, fingerprint32, encoding, user) -> bytes" },
    { "payload_info", py_payload_info, METH_VARARGS, "payload_info(buf, verify=True) -> dict" },
    { "splice", py_splice, METH_VARARGS, "splice(...) -> (bytes, next_pos); see repomem.native.splice" },
    { "rope_shift", py_rope_shift, METH_VARARGS,
      "rope_shift(f16_rows_writable, n_embd, delta, head_dim, rope_dims, base, freq_scale, neox, scale)" },
    { "xxh64", py_xxh64, METH_VARARGS, "xxh64(buf, seed=0) -> int" },
    { "row_size", py_row_size, METH_VARARGS, "row_size(ggml_type, n) -> bytes" },
    { "set_ggml_api", py_set_ggml_api, METH_VARARGS, "set_ggml_api(ggml_get_name, ggml_backend_tensor_get, "
      "ggml_backend_buffer_is_host) (addresses)" },
    { "ggml_api_ready", py_ggml_api_ready, METH_NOARGS, "ggml_api_ready() -> bool" },
    { NULL, NULL, 0, NULL },
};

static struct PyModuleDef kvsplice_module = {
    PyModuleDef_HEAD_INIT, "_kvsplice", "llama.cpp KV state splicing (repomem.native).", -1, kvsplice_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kvsplice(void) {
    rm_init_tables();
    if (PyType_Ready(&CaptureType) < 0) {
        return NULL;
    }
    PyObject * m = PyModule_Create(&kvsplice_module);
    if (!m) {
        return NULL;
    }
    StateFormatError = PyErr_NewExceptionWithDoc("repomem.native.StateFormatError",
                                                 "A llama.cpp state blob is malformed or does not fit the model.",
                                                 PyExc_ValueError, NULL);
    PayloadError = PyErr_NewExceptionWithDoc("repomem.native.PayloadError",
                                             "A repomem KV payload is malformed, corrupt or incompatible.",
                                             PyExc_ValueError, NULL);
    if (!StateFormatError || !PayloadError || PyModule_AddObjectRef(m, "StateFormatError", StateFormatError) < 0 ||
        PyModule_AddObjectRef(m, "PayloadError", PayloadError) < 0 ||
        PyModule_AddObjectRef(m, "Capture", (PyObject *) &CaptureType) < 0 ||
        PyModule_AddIntConstant(m, "PAYLOAD_VERSION", RM_PAYLOAD_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "STATE_MAGIC", (long) RM_STATE_MAGIC) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
