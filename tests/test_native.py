"""repomem.native on the real small test model (SmolLM2-135M, llama arch) through llama_cpp's low-level API.

What must hold: blobs round-trip byte for byte and give bit-identical logits; sequential placement equals
llama.cpp's own K-shift within f16 rounding; payload encodings stay within their stated error; malformed
input raises ValueError subclasses and never crashes the process; the attention capture sees every
softmax row.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import llama_cpp as L
import native_reference as R
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repomem import native as N
from repomem.bench import splice as B

FP = bytes(range(32))
TEXT = (
    "def fibonacci(n: int) -> int:\n"
    "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n"
)

_NO_LOG = L.llama_log_callback(lambda level, text, user: None)  # keep a reference: C holds the pointer


@pytest.fixture(scope="module")
def model(test_model_path: Path) -> Iterator[Model]:
    L.llama_log_set(_NO_LOG, None)
    L.llama_backend_init()
    m = Model(test_model_path)
    yield m
    m.close()


@pytest.fixture(scope="module")
def code_state(model: Model) -> tuple[list[int], bytes]:
    """96 tokens of code decoded once (flash attention off => v_trans), and the state blob of seq 0."""
    toks = model.tokenize(TEXT * 2)[:96]
    with model.context() as ctx:
        ctx.decode(toks, 0)
        return toks, ctx.get_state()


class Model:
    """SmolLM2 loaded with use_extra_bufts=False (the AMX weight repacking of this CPU crashes llama_decode)."""

    def __init__(self, path: Path) -> None:
        mp = L.llama_model_default_params()
        mp.use_extra_bufts = False
        self.ptr = L.llama_model_load_from_file(str(path).encode(), mp)
        assert self.ptr
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_layer = L.llama_model_n_layer(self.ptr)
        self.n_head = L.llama_model_n_head(self.ptr)
        self.n_head_kv = L.llama_model_n_head_kv(self.ptr)
        self.head_dim = L.llama_model_n_embd(self.ptr) // self.n_head
        self.n_embd_gqa = self.n_head_kv * self.head_dim
        arch = self.meta("general.architecture")
        self.rope_base = float(self.meta(f"{arch}.rope.freq_base") or 10000.0)  # the core reads it from the GGUF
        self.neox = L.llama_model_rope_type(self.ptr) == 2  # LLAMA_ROPE_TYPE_NEOX; llama arch = NORMAL (0)

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(128)
        n = L.llama_model_meta_val_str(self.ptr, key.encode(), buf, 128)
        return buf.value.decode() if n >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        toks = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self.vocab, raw, len(raw), toks, len(toks), True, False)
        assert n > 0
        return list(toks[:n])

    def context(self, *, flash: bool = False, n_ctx: int = 512, n_seq_max: int = 1, kv_unified: bool = False,
                type_k: int = 1, type_v: int = 1, capture: N.AttentionCapture | None = None) -> Ctx:
        return Ctx(self, flash=flash, n_ctx=n_ctx, n_seq_max=n_seq_max, kv_unified=kv_unified, type_k=type_k,
                   type_v=type_v, capture=capture)

    def close(self) -> None:
        L.llama_model_free(self.ptr)


class Ctx:
    def __init__(self, model: Model, *, flash: bool, n_ctx: int, n_seq_max: int, kv_unified: bool, type_k: int,
                 type_v: int, capture: N.AttentionCapture | None) -> None:
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = n_ctx
        cp.n_seq_max = n_seq_max
        cp.kv_unified = kv_unified
        cp.n_threads = cp.n_threads_batch = 1  # the test machine is shared: 1 thread avoids barrier spinning
        cp.flash_attn_type = 1 if flash else 0
        cp.type_k = type_k
        cp.type_v = type_v
        if capture is not None:
            cp.cb_eval = L.ggml_backend_sched_eval_callback(capture.callback_address)
            cp.cb_eval_user_data = ctypes.c_void_p(capture.user_data_address)
        self.model = model
        self.ptr = L.llama_init_from_model(model.ptr, cp)
        assert self.ptr
        self.n_vocab = L.llama_vocab_n_tokens(model.vocab)

    def __enter__(self) -> Ctx:
        return self

    def __exit__(self, *exc: object) -> None:
        L.llama_free(self.ptr)

    def decode(self, tokens: list[int], pos0: int, seq: int = 0) -> np.ndarray:
        """Decode tokens at pos0.. in seq; returns the logits of the last one."""
        n = len(tokens)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i] = t
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = i == n - 1
            batch.n_tokens = n
            assert L.llama_decode(self.ptr, batch) == 0
            return np.ctypeslib.as_array(L.llama_get_logits_ith(self.ptr, n - 1), shape=(self.n_vocab,)).copy()
        finally:
            L.llama_batch_free(batch)

    def get_state(self, seq: int = 0) -> bytes:
        size = L.llama_state_seq_get_size(self.ptr, seq)
        buf = (ctypes.c_uint8 * size)()
        got = L.llama_state_seq_get_data(self.ptr, buf, size, seq)
        assert got == size
        return bytes(buf)

    def set_state(self, blob: bytes | bytearray, seq: int = 0) -> None:
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        assert L.llama_state_seq_set_data(self.ptr, buf, len(blob), seq) == len(blob)

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        L.llama_memory_seq_add(L.llama_get_memory(self.ptr), seq, p0, p1, delta)


def _k_rows(blob: bytes, layer: int) -> np.ndarray:
    return R.parse_state(blob).k[layer].view(np.float16)


def _v_rows(blob: bytes, layer: int) -> np.ndarray:
    s = R.parse_state(blob)
    v = s.v[layer]
    return v.view(np.float16).T.copy() if s.v_trans else v.view(np.float16)


# ---------------------------------------------------------------------------------------------------------
# blob parsing against the real format


def test_parse_and_validate_real_state(model: Model) -> None:
    toks = model.tokenize(TEXT)
    with model.context() as ctx:
        ctx.decode(toks, 0)
        blob = ctx.get_state()
    info = N.validate_state(blob, model.n_layer, model.n_embd_gqa, model.n_embd_gqa, "f16", "f16")
    assert info.n_cells == len(toks) and info.n_layer == 30 and info.v_trans
    assert np.array_equal(info.positions, np.arange(len(toks)))
    assert info.k_row_bytes == info.v_row_bytes == 2 * model.n_embd_gqa == 384
    with pytest.raises(N.StateFormatError, match="layers"):
        N.validate_state(blob, 24, model.n_embd_gqa, model.n_embd_gqa)
    with pytest.raises(N.StateFormatError, match="K row"):
        N.validate_state(blob, model.n_layer, 128, model.n_embd_gqa)
    with pytest.raises(N.StateFormatError, match="K type"):
        N.validate_state(blob, model.n_layer, model.n_embd_gqa, model.n_embd_gqa, k_type="q8_0")
    with pytest.raises(N.StateFormatError, match="trailing"):
        N.parse_state(blob + b"\0")
    with pytest.raises(N.StateFormatError, match="truncated|fit"):
        N.parse_state(blob[:-1])
    assert N.parse_state(N.empty_state()).n_cells == 0


# ---------------------------------------------------------------------------------------------------------
# round trip: extract -> splice -> set -> get is the identity, and logits are bit-identical


@pytest.mark.parametrize("flash", [False, True], ids=["v_trans", "flash_attn"])
def test_round_trip_bytes_and_logits(model: Model, flash: bool) -> None:
    toks = model.tokenize(TEXT)
    head, last = toks[:-1], toks[-1]
    with model.context(flash=flash) as ctx:
        ctx.decode(head, 0)
        blob = ctx.get_state()
        want = ctx.decode([last], len(head))
    info = N.parse_state(blob)
    assert info.v_trans == (not flash)

    # all cells as one fragment onto an empty prefix
    frag = N.extract_fragment(blob, np.arange(info.n_cells), fingerprint=FP)
    spliced, next_pos = N.splice(N.empty_state(), [frag], v_trans=not flash, fingerprint=FP)
    assert spliced == blob and next_pos == len(head)

    # the first part as the prefix blob, the rest as two fragments
    prefix, _ = N.splice(None, [N.extract_fragment(blob, range(7), fingerprint=FP)], v_trans=not flash)
    parts = [N.extract_fragment(blob, range(7, 20), fingerprint=FP),
             N.extract_fragment(blob, range(20, info.n_cells), fingerprint=FP)]
    spliced2, _ = N.splice(prefix, parts)
    assert spliced2 == blob

    with model.context(flash=flash) as ctx2:
        ctx2.set_state(spliced2)
        assert ctx2.get_state() == blob
        got = ctx2.decode([last], len(head))
    assert np.array_equal(got, want)  # exact: same cells, same slots, same graph


def test_round_trip_into_other_sequence(model: Model) -> None:
    """seq_id field and stream layout of a 2-sequence context (kv_unified off => one stream per sequence)."""
    toks = model.tokenize(TEXT)[:16]
    with model.context(n_seq_max=2) as ctx:
        ctx.decode(toks, 0, seq=1)
        blob = ctx.get_state(1)
        info = N.parse_state(blob)
        assert info.seq_id == 1 and info.n_stream == 2
        frag = N.extract_fragment(blob, range(info.n_cells), fingerprint=FP)
        out, _ = N.splice(None, [frag], v_trans=True, seq_id=1, n_stream=2)
        assert out == blob
        ctx.set_state(out, 1)
        assert ctx.get_state(1) == blob


# ---------------------------------------------------------------------------------------------------------
# sequential placement == llama.cpp's K-shift


# Tolerance: ours and llama.cpp's K-shift do the same float32 math (ggml_rope_cache_init: theta *= theta_scale,
# cosf/sinf; x0*cos - x1*sin) on the same f16 inputs and round to f16 to nearest even. They can still differ by
# one f16 ulp where ggml (built with -march=native) contracts a multiply-add into an FMA or its vectorized
# conversion rounds differently; so: every element within 1 f16 ulp of llama.cpp's, and almost all identical.
F16_ULPS = 1


def _ulp_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in f16 ulps (monotonic integer mapping of f16 bit patterns)."""
    def key(x: np.ndarray) -> np.ndarray:
        i = x.astype(np.float16).view(np.int16).astype(np.int32)
        return np.where(i < 0, -32768 - i, i)
    return np.abs(key(a) - key(b))


@pytest.mark.parametrize(("compiled_at", "moved_to"), [(10, 110), (50, 10), (3000, 7)],
                         ids=["forward", "close_gap", "far_back"])
def test_sequential_matches_llama_kshift(model: Model, compiled_at: int, moved_to: int) -> None:
    """Tokens 0..9 at positions 0..9 (the prefix), tokens 10..39 compiled at ``compiled_at``.. and moved to
    ``moved_to``.. by llama.cpp's K-shift (llama_memory_seq_add) and by our sequential splice."""
    # SmolLM2 is llama arch: NORMAL RoPE (pairs 2i, 2i+1). NEOX (pairs i, i+n_rot/2) is Qwen2, the default
    # model: covered against the numpy reference below and against llama.cpp in the default_model test.
    assert not model.neox
    toks = model.tokenize(TEXT)[:40]
    n_pre, n = 10, 40
    nxt = model.tokenize(" x")[-1]
    # two sequences in one unified cache (one stream): decoding a token in seq 1 applies the pending K-shift
    # of seq 0 without adding a cell to it (llama.cpp only accepts a batch at seq_pos_max + 1 of its sequence)
    with model.context(n_seq_max=2, kv_unified=True) as ctx:
        ctx.decode(toks[:n_pre], 0)
        if compiled_at != n_pre:  # make room: the prefix moves to just before compiled_at (not compared)
            ctx.seq_add(0, 0, n_pre, compiled_at - n_pre)
        ctx.decode(toks[n_pre:], compiled_at)
        blob = ctx.get_state(0)
        ctx.seq_add(0, compiled_at, compiled_at + n - n_pre, moved_to - compiled_at)
        ctx.decode([nxt], 0, seq=1)
        shifted = ctx.get_state(0)

    prefix, _ = N.splice(None, [N.extract_fragment(blob, range(n_pre), fingerprint=FP)], v_trans=True)
    frag = N.extract_fragment(blob, range(n_pre, n), fingerprint=FP)
    ours, next_pos = N.splice(prefix, [frag], mode="sequential", start_pos=moved_to, rope_base=model.rope_base,
                              rope_dims=model.head_dim, head_dim=model.head_dim, rope_neox=model.neox)
    a, b = N.parse_state(ours), N.parse_state(shifted)
    assert np.array_equal(a.positions, b.positions) and a.n_cells == n
    assert next_pos == max(compiled_at, moved_to + n - n_pre)
    exact = total = 0
    for il in range(model.n_layer):
        d = _ulp_diff(_k_rows(ours, il), _k_rows(shifted, il))
        assert d.max() <= F16_ULPS, f"layer {il}: {d.max()} ulps"
        exact += int((d == 0).sum())
        total += d.size
        assert np.array_equal(_v_rows(ours, il), _v_rows(shifted, il))
    assert exact / total > 0.999  # measured 99.99%

    logits = []
    for state in (shifted, ours):
        with model.context() as ctx2:
            ctx2.set_state(state)
            logits.append(ctx2.decode([nxt], next_pos))
    want, got = logits
    assert np.argmax(got) == np.argmax(want)
    assert np.max(np.abs(got - want)) < 0.05 * np.std(want)


@pytest.mark.default_model
def test_sequential_matches_llama_kshift_neox(default_model_path: Path) -> None:
    """The same check on Qwen2.5-Coder (qwen2 arch: NEOX RoPE, base 1e6), the model the app uses."""
    L.llama_log_set(_NO_LOG, None)
    m = Model(default_model_path)
    try:
        assert m.neox and m.rope_base == 1e6
        toks = m.tokenize(TEXT)[:24]
        with m.context() as ctx:
            ctx.decode(toks, 0)
            blob = ctx.get_state()
            ctx.seq_add(0, 4, len(toks), 37)
            ctx.decode(m.tokenize(" x")[-1:], len(toks) + 37)
            shifted = ctx.get_state()
        prefix, _ = N.splice(None, [N.extract_fragment(blob, range(4), fingerprint=FP)], v_trans=True)
        ours, _ = N.splice(prefix, [N.extract_fragment(blob, range(4, len(toks)), fingerprint=FP)],
                           mode="sequential", start_pos=41, rope_base=m.rope_base, rope_dims=m.head_dim,
                           rope_neox=True)
        for il in range(m.n_layer):
            assert _ulp_diff(_k_rows(ours, il), _k_rows(shifted, il)[: len(toks)]).max() <= F16_ULPS
    finally:
        m.close()


def test_rope_neox_and_normal_match_reference() -> None:
    rng = np.random.default_rng(3)
    k = (rng.standard_normal((50, 128)) * 3).astype(np.float16)
    for neox in (False, True):
        for delta in (1, -7, 1000, 32000):
            ours = N.rope_shift_keys(k, delta, head_dim=64, rope_base=1e6 if neox else 1e4, rope_neox=neox)
            ref = R.rope_shift(k, delta, 64, 64, 1e6 if neox else 1e4, neox)
            assert _ulp_diff(ours, ref).max() <= 1
        # rotations compose and invert (each step rounds to f16: a few ulps)
        there = N.rope_shift_keys(k, 123, head_dim=64, rope_neox=neox)
        back = N.rope_shift_keys(there, -123, head_dim=64, rope_neox=neox)
        assert np.allclose(back.astype(np.float32), k.astype(np.float32), atol=4e-3 * 3)
        # partial rotary: dims past rope_dims untouched
        part = N.rope_shift_keys(k, 5, head_dim=64, rope_dims=32, rope_neox=neox)
        assert np.array_equal(part.reshape(50, 2, 64)[:, :, 32:], k.reshape(50, 2, 64)[:, :, 32:])


@pytest.mark.parametrize("v_trans", [True, False])
def test_parse_state_gives_where_the_rows_are(v_trans: bool) -> None:
    blob = B.make_state_blob(7, n_layer=3, n_embd_k=64, n_embd_v=96, v_trans=v_trans, rng=np.random.default_rng(2))
    info, ref = N.parse_state(blob), R.parse_state(blob)
    assert len(info.k_offsets) == len(info.v_offsets) == 3
    for il in range(3):
        k0, v0 = info.k_offsets[il], info.v_offsets[il]
        assert blob[k0:k0 + info.n_cells * info.k_row_bytes] == ref.k[il].tobytes()
        assert blob[v0:v0 + info.n_cells * info.v_row_bytes] == ref.v[il].tobytes()
    assert N.parse_state(N.empty_state()).k_offsets == ()


# ---------------------------------------------------------------------------------------------------------
# options: key scale, attention sinks, placement metadata; native == numpy reference


@pytest.mark.parametrize("v_trans", [True, False])
@pytest.mark.parametrize("encoding", ["f16", "q8", "q4", "q2", "k3v3", "k4v3"])
def test_native_matches_numpy_reference(v_trans: bool, encoding: str) -> None:
    rng = np.random.default_rng(5)
    # widths that are not multiples of 8 or 32 exercise the ragged transpose and the partial quant groups
    # (k3v3/k4v3 values come in whole 64-channel Hadamard blocks)
    n_embd_v = 128 if encoding in ("k3v3", "k4v3") else 100
    blob = B.make_state_blob(45, n_layer=3, n_embd_k=128, n_embd_v=n_embd_v, v_trans=v_trans, rng=rng)
    prefix, _ = N.splice(None, [N.extract_fragment(blob, range(5), fingerprint=FP)], v_trans=v_trans)
    frags = [N.extract_fragment(blob, range(5, 42), fingerprint=FP, encoding=encoding),  # one full group + 5
             N.extract_fragment(blob, [40, 44, 31, 33], fingerprint=FP, encoding=encoding)]
    for mode in ("parallel", "sequential"):
        kw = dict(mode=mode, rope_dims=64, head_dim=64, rope_base=1e4, rope_neox=True, key_scale=[0.5, 1.25],
                  drop_first=2, start_pos=300)
        a, na = N.splice(prefix, frags, **kw)
        b, nb = R.splice(prefix, frags, **kw)
        assert na == nb and len(a) == len(b)
        if mode == "parallel":
            assert a == b
        sa, sb = R.parse_state(a), R.parse_state(b)
        assert np.array_equal(sa.positions, sb.positions)
        for il in range(3):
            assert _ulp_diff(sa.k[il].view(np.float16), sb.k[il].view(np.float16)).max() <= 1
            assert np.array_equal(sa.v[il], sb.v[il])


@pytest.mark.parametrize("encoding", [e for e in N.ENCODINGS if e not in ("raw", "f16")])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_value_stays_where_it_is(encoding: str, bad: float) -> None:
    """An f16 cache can hold inf (past 65504) or NaN: the lossy encodings must keep it from spreading into
    every cell of its layer (a shared scale or center of inf would) and never feed it to a float-to-int cast."""
    blob = bytearray(B.make_state_blob(40, n_layer=2, n_embd_k=64, n_embd_v=64, v_trans=False))
    state = N.parse_state(bytes(blob))
    rows = 40 * 64 * 2
    for off in (state.k_offsets[0], state.v_offsets[0]):
        vals = np.frombuffer(bytes(blob[off:off + rows]), np.float16).copy()
        vals[5] = bad
        blob[off:off + rows] = vals.tobytes()
    frag = N.extract_fragment(bytes(blob), range(40), fingerprint=bytes(32), encoding=encoding)
    out, _ = N.splice(None, [frag], v_trans=False)
    back = N.parse_state(out)
    for off in (back.k_offsets[0], back.v_offsets[0], back.k_offsets[1], back.v_offsets[1]):
        assert np.isfinite(np.frombuffer(out[off:off + rows], np.float16)).all(), (encoding, off)


@pytest.mark.parametrize("arg", [{"drop_first": 2**32 + 3}, {"drop_first": -1}, {"n_stream": 2**32 + 1},
                                 {"head_dim": 2**32 + 64}])
def test_splice_refuses_counts_the_c_side_would_wrap(arg: dict) -> None:
    blob = B.make_state_blob(10, n_layer=1, n_embd_k=64, n_embd_v=64, v_trans=True)
    frag = N.extract_fragment(blob, range(10), fingerprint=bytes(32), encoding="f16")
    with pytest.raises(ValueError, match="must be >= 0"):
        N.splice(None, [frag], v_trans=True, **arg)


def test_encoding_fits_value_width() -> None:
    assert N.encoding_fits("k4v3", 192) and N.encoding_fits("k3v3", 128)  # SmolLM2, the default model
    assert not N.encoding_fits("k4v3", 100) and N.encoding_fits("q4", 100) and N.encoding_fits("f16", 7)
    with pytest.raises(ValueError, match="unknown encoding"):
        N.encoding_fits("q3", 128)


@pytest.mark.parametrize("encoding", ["k3v3", "k4v3"])
def test_hadamard_values_need_whole_blocks(encoding: str) -> None:
    blob = B.make_state_blob(8, n_layer=1, n_embd_k=64, n_embd_v=96, rng=np.random.default_rng(3))
    with pytest.raises(ValueError, match="multiples of 64"):
        N.extract_fragment(blob, range(8), fingerprint=FP, encoding=encoding)
    # the Hadamard rotation is undone exactly: a constant block (all energy in one rotated channel) and a
    # one-hot block decode to within the 2-bit levels' error, not to a rotated (scrambled) vector
    blob = B.make_state_blob(1, n_layer=1, n_embd_k=64, n_embd_v=64, rng=np.random.default_rng(4))
    v = np.zeros(64, dtype=np.float16)
    v[5] = 1.0
    st = R.parse_state(blob)
    data = bytearray(blob)
    off = blob.index(st.v[0].tobytes()) if st.v[0].size else -1
    assert off > 0
    data[off:off + 128] = v.tobytes()
    frag = N.extract_fragment(bytes(data), [0], fingerprint=FP, encoding=encoding)
    out, _ = N.splice(None, [frag], v_trans=False)
    got = R.parse_state(out).v[0].view(np.float16).astype(np.float32).ravel()
    assert int(np.argmax(np.abs(got))) == 5 and got[5] > 0.5


def test_k4v3_offsets_and_zero_layers() -> None:
    """Blocks that the one-byte statistics find hard: a channel with a large constant offset (RoPE's slow
    channels; the channel center takes it), blocks far from their channel's center (the zero point needs a
    coarser step), a value row whose rotated block is constant (the std is widened to carry the mean), and an
    all-zero layer (base 0)."""
    n, rng = 64, np.random.default_rng(8)
    blob = B.make_state_blob(n, n_layer=2, n_embd_k=64, n_embd_v=64, v_trans=False, rng=rng)
    st = R.parse_state(blob)
    data = bytearray(blob)
    k = st.k[0].view(np.float16).astype(np.float32)
    k[:, 0] = 500 + rng.normal(size=n) * 0.5
    k[:32, 1] = 1000 + rng.normal(size=32) * 0.01
    k[32:, 1] = -1000 + rng.normal(size=32) * 0.01
    v = st.v[0].view(np.float16).astype(np.float32)
    v[3] = 0.0
    v[3, 0] = 1.0  # one-hot on channel 0: the rotated block is constant (mean 1/8, std 0)
    for rows, new in ((st.k[0], k), (st.v[0], v), (st.k[1], np.zeros((n, 64))), (st.v[1], np.zeros((n, 64)))):
        off = bytes(data).index(rows.tobytes())
        data[off:off + rows.nbytes] = new.astype(np.float16).tobytes()
    frag = N.extract_fragment(bytes(data), range(n), fingerprint=FP, encoding="k4v3")
    out, _ = N.splice(None, [frag], v_trans=False)
    got_k = _k_rows(out, 0).astype(np.float32)
    want_k = k.astype(np.float16).astype(np.float32)
    # channel 0: a step of ~range/15 around its center; an int8 zero point from 0 would need 500/127 = 3.9
    assert np.abs(got_k[:, 0] - want_k[:, 0]).max() < 0.5
    # channel 1: half of a step just coarse enough to reach +-1000 in 127 steps (scale codes 6.25% apart)
    assert np.abs(got_k[:, 1] - want_k[:, 1]).max() < 1000 / 127 * 1.0625 / 2 + 0.5
    assert np.abs(got_k[:, 2:] - want_k[:, 2:]).max() < 0.5  # N(0, 1) channels
    got_v = _v_rows(out, 0).astype(np.float32)
    assert abs(got_v[3, 0] - 1.0) < 0.1 and np.abs(got_v[3, 1:]).max() < 0.1
    assert not _k_rows(out, 1).any() and not _v_rows(out, 1).any()


def test_key_scale_drop_first_and_placement() -> None:
    rng = np.random.default_rng(7)
    blob = B.make_state_blob(20, n_layer=2, n_embd_k=64, n_embd_v=64, positions=np.arange(50, 70), rng=rng)
    f1 = N.extract_fragment(blob, range(0, 10), fingerprint=FP, user=11)
    f2 = N.extract_fragment(blob, [10, 12, 14, 19], fingerprint=FP)
    i1, i2 = N.payload_info(f1), N.payload_info(f2)
    assert (i1.pos_first, i1.pos_max, i1.contiguous, i1.user) == (50, 59, True, 11)
    assert (i2.pos_first, i2.pos_max, i2.contiguous) == (60, 69, False)

    out, nxt = N.splice(None, [f1, f2], v_trans=True, key_scale=[2.0, 1.0], drop_first=1)
    s = N.parse_state(out)
    assert list(s.positions) == [*range(51, 60), 62, 64, 69] and nxt == 70
    k_src, k_out = _k_rows(blob, 1), _k_rows(out, 1)
    assert np.array_equal(k_out[:9], (k_src[1:10].astype(np.float32) * 2).astype(np.float16))
    assert np.array_equal(k_out[9:], k_src[[12, 14, 19]])
    assert np.array_equal(_v_rows(out, 0)[9:], _v_rows(blob, 0)[[12, 14, 19]])

    # sequential: fragments follow each other from start_pos, gaps inside a fragment kept
    out, nxt = N.splice(N.empty_state(), [f1, f2], mode="sequential", start_pos=3, rope_dims=64, v_trans=True)
    assert list(N.parse_state(out).positions) == [*range(3, 13), 13, 15, 17, 22] and nxt == 23
    # default start: right after the prefix
    pre, _ = N.splice(None, [N.extract_fragment(blob, [0, 1], fingerprint=FP)], v_trans=True)
    out, nxt = N.splice(pre, [f2], mode="sequential", rope_dims=64)
    assert list(N.parse_state(out).positions)[2:] == [52, 54, 56, 61] and nxt == 62
    # nothing at all
    out, nxt = N.splice(None, [], v_trans=True)
    assert out == N.empty_state() and nxt == 0


def test_repeat_splices_copies_at_the_same_positions() -> None:
    rng = np.random.default_rng(8)
    blob = B.make_state_blob(12, n_layer=2, n_embd_k=64, n_embd_v=64, positions=np.arange(40, 52), rng=rng)
    f1 = N.extract_fragment(blob, range(0, 8), fingerprint=FP)
    f2 = N.extract_fragment(blob, range(8, 12), fingerprint=FP)
    out, nxt = N.splice(None, [f1, f2], v_trans=True, repeat=[2, 1], key_scale=[0.5, 1.0])
    same, _ = N.splice(None, [f1, f1, f2], v_trans=True, key_scale=[0.5, 0.5, 1.0])
    assert out == same and nxt == 52
    assert list(N.parse_state(out).positions) == [*range(40, 48), *range(40, 48), *range(48, 52)]
    assert np.array_equal(_v_rows(out, 1)[8:16], _v_rows(out, 1)[:8])
    assert N.splice(None, [f1, f2], v_trans=True, repeat=[1, 1])[0] == N.splice(None, [f1, f2], v_trans=True)[0]
    # sequential placement is fine with single copies, refuses more (copies would move apart)
    N.splice(None, [f1, f2], v_trans=True, mode="sequential", rope_dims=64, repeat=[1, 1])
    with pytest.raises(ValueError, match="parallel placement"):
        N.splice(None, [f1, f2], v_trans=True, mode="sequential", rope_dims=64, repeat=[2, 1])
    for bad in ([2], [0, 1], [1, -1]):
        with pytest.raises(ValueError, match="one count >= 1 per payload"):
            N.splice(None, [f1, f2], v_trans=True, repeat=bad)


def test_splice_rejects_mismatches() -> None:
    rng = np.random.default_rng(9)
    blob = B.make_state_blob(8, n_layer=2, n_embd_k=64, n_embd_v=64, rng=rng)
    other = B.make_state_blob(8, n_layer=3, n_embd_k=64, n_embd_v=64, rng=rng)
    f = N.extract_fragment(blob, range(8), fingerprint=FP)
    g = N.extract_fragment(other, range(8), fingerprint=FP)
    with pytest.raises(N.PayloadError, match="layers"):
        N.splice(None, [f, g], v_trans=True)
    with pytest.raises(N.PayloadError, match="another model"):
        N.splice(None, [f], v_trans=True, fingerprint=bytes(32))
    with pytest.raises(ValueError, match="v_trans"):
        N.splice(None, [f])
    with pytest.raises(ValueError, match="v_trans"):
        N.splice(blob, [f], v_trans=False)
    with pytest.raises(ValueError, match="rope_dims"):
        N.splice(blob, [f], mode="sequential")
    with pytest.raises(ValueError, match="position range"):
        N.splice(blob, [f], mode="sequential", start_pos=2**31 - 4, rope_dims=64)
    bad = bytearray(f)
    bad[-100] ^= 1
    with pytest.raises(N.PayloadError, match="checksum"):
        N.splice(None, [bytes(bad)], v_trans=True)
    N.splice(None, [bytes(bad)], v_trans=True, verify=False)  # structure still valid
    with pytest.raises(ValueError, match="cell index"):
        N.extract_fragment(blob, [8], fingerprint=FP)
    with pytest.raises(ValueError, match="no cells"):
        N.extract_fragment(N.empty_state(), [], fingerprint=FP)
    assert N.xxh64(b"") == 0xEF46DB3751D8E999  # XXH64 test vector


def test_payload_from_mmap_and_reused_output(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    blob = B.make_state_blob(30, n_layer=2, n_embd_k=64, n_embd_v=64, rng=rng)
    p = tmp_path / "frag.kv"
    p.write_bytes(N.extract_fragment(blob, range(30), fingerprint=FP, encoding="q4"))
    with p.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        info = N.payload_info(view)
        assert info.encoding == "q4" and info.n_cells == 30 and info.size == p.stat().st_size
        out = bytearray()
        res, nxt = N.splice(None, [view], v_trans=True, out=out)
        assert res is out and nxt == 30 and N.parse_state(out).n_cells == 30
        fresh, _ = N.splice(None, [view], v_trans=True)
        assert fresh == out
        view.release()


def test_raw_encoding_on_q8_0_cache(model: Model) -> None:
    """A quantized cache (q8_0 K and V, which needs flash attention => v_trans 0) round-trips with 'raw'."""
    toks = model.tokenize(TEXT)[:20]
    q8 = N.GGML_TYPES["q8_0"]
    with model.context(flash=True, type_k=q8, type_v=q8) as ctx:
        ctx.decode(toks, 0)
        blob = ctx.get_state()
    info = N.validate_state(blob, model.n_layer, model.n_embd_gqa, model.n_embd_gqa, "q8_0", "q8_0")
    assert not info.v_trans and info.k_row_bytes == N.row_size("q8_0", model.n_embd_gqa)
    with pytest.raises(ValueError, match="f16"):
        N.extract_fragment(blob, range(20), fingerprint=FP, encoding="f16")
    frag = N.extract_fragment(blob, range(20), fingerprint=FP, encoding="raw")
    out, _ = N.splice(None, [frag], v_trans=False, k_type="q8_0", v_type="q8_0")
    assert out == blob
    with pytest.raises(ValueError, match="f16 or f32"):
        N.splice(None, [frag], v_trans=False, key_scale=0.5)


# ---------------------------------------------------------------------------------------------------------
# encodings on real KV rows

# Bounds on real SmolLM2 K/V (96 tokens of code, every layer), relative to the layer's max |x| / mean |x|.
# Max: theory. q8 is symmetric, error <= half a step = amax/254 of its block (+ f16 rounding) -> 0.006. q4/q2
# are asymmetric over a group (K: one channel x 32 cells; V: one cell x 32 channels), error <= half a step =
# range/(2*(2^b - 1)), range <= 2 x max -> 1/15 = 0.067 (q4), 1/3 = 0.33 (q2), + f16 rounding of scale/min.
# Mean: measured worst layer (q8 0.011, q4 K 0.05 / V 0.12, q2 K 0.26 / V 0.66) with ~1.5x headroom. 2-bit V
# per token is coarse (KIVI keeps a full-precision window of recent tokens for that reason); k3v3's 3-bit
# values (Hadamard-rotated, normal-float levels) have a third of q2's mean error at 3/4 of q4's size.
ENCODING_BOUNDS = {  # encoding: (max error / layer max |x|, mean error / layer mean |x|)
    "f16": (0.0, 0.0),
    "q8": (0.006, 0.02),
    "q4": (0.08, 0.2),
    "q2": (0.4, 1.0),
    "k3v3": (0.3, 0.3),  # 3-bit K (theory 1/7 + rounding; measured 0.08 / 0.11), normal-float V: 0.21 / 0.22
    # 4-bit K around channel centers, the extremes of a block clipped where that lowers its total error
    # (measured 0.06 / 0.05), k3v3's values with one-byte statistics (measured 0.23 / 0.21)
    "k4v3": (0.3, 0.3),
}


@pytest.mark.parametrize("encoding", list(ENCODING_BOUNDS))
def test_encoding_error_on_real_kv(model: Model, code_state: tuple[list[int], bytes], encoding: str) -> None:
    toks, blob = code_state
    frag = N.extract_fragment(blob, range(len(toks)), fingerprint=FP, encoding=encoding)
    out, _ = N.splice(None, [frag], v_trans=True)
    max_rel, mean_rel = ENCODING_BOUNDS[encoding]
    for il in range(model.n_layer):
        for get in (_k_rows, _v_rows):
            x = get(blob, il).astype(np.float32)
            y = get(out, il).astype(np.float32)
            err = np.abs(x - y)
            assert err.max() <= max_rel * np.abs(x).max() + 1e-6, (encoding, il, get.__name__, err.max())
            assert err.mean() <= mean_rel * np.abs(x).mean() + 1e-6, (encoding, il, get.__name__, err.mean())
    sizes = len(frag) / (len(toks) * model.n_layer * 2 * model.n_embd_gqa * 2)
    assert sizes < {"f16": 1.01, "q8": 0.55, "q4": 0.33, "q2": 0.2, "k3v3": 0.25, "k4v3": 0.25}[encoding]


# ---------------------------------------------------------------------------------------------------------
# attention capture


def test_attention_capture(model: Model) -> None:
    toks = model.tokenize(TEXT)[:32]
    n = len(toks)
    total = N.AttentionCapture(n_cells=64, n_layer=model.n_layer)
    per = N.AttentionCapture(n_cells=64, n_layer=model.n_layer, per_layer=True)
    for cap in (total, per):
        with model.context(capture=cap, n_ctx=256) as ctx:
            ctx.decode(toks, 0)
        assert cap.layout_ok is True and cap.skipped == 0
        assert cap.calls == model.n_layer  # one ubatch: one kq_soft_max tensor per layer
    # every softmax row sums to 1: total attention = queries x heads (x layers)
    assert np.isclose(total.scores.sum(), n * model.n_head * model.n_layer, rtol=1e-3)
    assert np.allclose(per.scores.sum(axis=1), n * model.n_head, rtol=1e-3)
    assert np.allclose(per.scores.sum(axis=0), total.scores, rtol=1e-4, atol=1e-3)
    assert np.all(total.scores[n:] == 0)  # cells past the decoded tokens are masked
    # causal: the last cell is only seen by itself (one query per head per layer)
    assert total.scores[n - 1] <= model.n_head * model.n_layer + 1e-3
    assert np.argmax(total.scores) == 0  # the first token is the attention sink
    total.reset()
    assert total.scores.sum() == 0 and total.calls == 0


# ---------------------------------------------------------------------------------------------------------
# fuzzing: malformed input raises ValueError (StateFormatError / PayloadError), never crashes

_RNG = np.random.default_rng(13)
_BLOB = B.make_state_blob(6, n_layer=2, n_embd_k=64, n_embd_v=64, v_trans=True, rng=_RNG)
_BLOB_NT = B.make_state_blob(5, n_layer=2, n_embd_k=64, n_embd_v=64, v_trans=False, rng=_RNG)
_PAYLOADS = [N.extract_fragment(_BLOB, [0, 2, 3, 5], fingerprint=FP, encoding=e) for e in N.ENCODINGS if e != "raw"]
_SEEDS = [_BLOB, _BLOB_NT, *_PAYLOADS]


def _exercise(data: bytes) -> None:
    try:
        N.parse_state(data)
        N.splice(data, _PAYLOADS[:1], mode="sequential", rope_dims=64)
    except ValueError:
        pass
    try:
        N.payload_info(data, verify=False)
        N.splice(N.empty_state(), [data], v_trans=True, verify=False, key_scale=0.5, drop_first=1)
    except ValueError:
        pass


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    _exercise(data)
    _exercise(struct.pack("<IiI", 0xAF143CD8, 0, 1) + data)  # past the magic
    _exercise(b"RMKVFRAG" + data)


@_FUZZ
@given(st.integers(0, len(_SEEDS) - 1), st.data())
def test_fuzz_truncated_and_mutated(which: int, data: st.DataObject) -> None:
    seed = bytearray(_SEEDS[which])
    cut = data.draw(st.integers(0, len(seed)))
    _exercise(bytes(seed[:cut]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(seed) - 1))
        seed[i] = data.draw(st.integers(0, 255))
    _exercise(bytes(seed))
    # extreme values in 4-byte fields (counts, sizes)
    j = data.draw(st.integers(0, len(seed) - 4))
    seed[j : j + 4] = struct.pack("<I", data.draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000])))
    _exercise(bytes(seed))


def test_fuzz_function_runs() -> None:
    r = B.fuzz(300, seed=1)
    assert r["cases"] == 300 and r["accepted"] + r["rejected"] == 300 and r["rejected"] > 0


def test_bench_splice_small() -> None:
    r = B.bench_splice(fragments=4, cells_per_fragment=64, repeat=1)
    assert r["native_s"] > 0 and r["native_verify_s"] > 0 and r["native_reuse_s"] > 0 and r["gb_per_s"] > 0
    # 4 payloads of 64 cells after a 32-cell prefix, laid one after another
    assert r["next_pos"] == 32 + 4 * 64 and r["output_bytes"] > 4 * 64 * 24 * 2 * 2 * 128
