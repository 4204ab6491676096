"""repomem.native: llama.cpp KV-state surgery in C (the `_kvsplice` extension).

Why native: a memory-augmented prompt is assembled from hundreds of precompiled KV fragments on every
question. Concatenating rows, de-/re-transposing V and re-rotating keys in Python costs seconds; in C it is
memory-bandwidth bound. Everything here works on two byte formats:

* a *state blob*: the bytes of ``llama_state_seq_get_data`` for one sequence (a private format of the pinned
  llama-cpp-python 0.3.36; documented in native/README.md). It is validated field by field before use, so a
  version drift shows up as :class:`StateFormatError`, never as a crash inside llama.cpp.
* a *payload*: repomem's own on-disk fragment format (header, positions, encoded K/V rows, XXH64 checksum).
  Payload functions take any buffer-protocol object (``bytes``, ``memoryview`` over an ``mmap``) and never
  copy the whole payload, so a store can mmap its files.

Heavy calls release the GIL.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import _kvsplice
from ._kvsplice import PayloadError, StateFormatError

__all__ = [
    "ENCODINGS",
    "GGML_TYPES",
    "HADAMARD_BLOCK",
    "STATE_MAGIC",
    "AttentionCapture",
    "PayloadError",
    "PayloadInfo",
    "StateFormatError",
    "StateInfo",
    "empty_state",
    "extract_fragment",
    "init_ggml_api",
    "parse_state",
    "payload_info",
    "rope_shift_keys",
    "row_size",
    "set_ggml_api",
    "splice",
    "validate_state",
    "xxh64",
    "encoding_fits",
]

Encoding = Literal["raw", "f16", "q8", "q4", "q2", "k3v3", "k4v3"]
Placement = Literal["parallel", "sequential"]

#: payload encodings and their header codes (see native/README.md); after raw, largest payload first
ENCODINGS: dict[str, int] = {"raw": 0, "f16": 1, "q8": 2, "q4": 3, "k4v3": 6, "k3v3": 5, "q2": 4}
_ENCODING_NAMES = {v: k for k, v in ENCODINGS.items()}
#: k3v3 and k4v3 rotate value rows in Hadamard blocks of this many channels
HADAMARD_BLOCK = 64


def encoding_fits(encoding: str, n_embd_v: int) -> bool:
    """Whether value rows of this width can be stored in ``encoding`` (k3v3/k4v3 need whole Hadamard blocks)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; one of {sorted(ENCODINGS)}")
    return encoding not in ("k3v3", "k4v3") or n_embd_v % HADAMARD_BLOCK == 0

#: ggml type ids (ggml.h, 0.3.36) of the types a llama.cpp KV cache can use
GGML_TYPES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "iq4_nl": 20,
    "bf16": 30,
}

STATE_MAGIC: int = _kvsplice.STATE_MAGIC
PAYLOAD_VERSION: int = _kvsplice.PAYLOAD_VERSION


@dataclass(frozen=True)
class StateInfo:
    """What a state blob holds. Per-layer values are those of layer 0 (llama.cpp uses one K/V type and,
    for the supported models, one width for all layers; :func:`validate_state` checks every layer).
    Layer fields are 0 / -1 when the blob holds no cell (llama.cpp then writes no layer data)."""

    seq_id: int
    n_stream: int
    n_cells: int
    positions: np.ndarray  # int32, one per cell, in cache order
    n_layer: int
    v_trans: bool
    k_type: int
    v_type: int
    k_row_bytes: int
    v_row_bytes: int  # bytes of one cell's V (element size x n_embd_v_gqa when transposed)
    n_embd_v_gqa: int
    size: int
    #: per layer, where in the blob its K rows start (n_cells x k_row_bytes) and its V data (n_cells x
    #: v_row_bytes; transposed when v_trans): what lets a caller view or edit the rows in place
    k_offsets: tuple[int, ...] = ()
    v_offsets: tuple[int, ...] = ()


@dataclass(frozen=True)
class PayloadInfo:
    """Header of a fragment payload, checked against its body (and checksum when verified)."""

    version: int
    fingerprint: bytes
    n_layer: int
    n_cells: int
    k_type: int  # ggml type of the cache the rows came from
    v_type: int
    encoding: str
    group: int
    positions: np.ndarray  # int32: the positions the cells were compiled at
    pos_first: int
    pos_max: int
    contiguous: bool
    user: int
    data_bytes: int
    checksum: int
    n_embd_k_gqa: tuple[int, ...]
    n_embd_v_gqa: tuple[int, ...]
    size: int


def _buf(obj: object) -> object:
    """numpy arrays are passed as their raw bytes; everything else must support the buffer protocol."""
    if isinstance(obj, np.ndarray):
        return np.ascontiguousarray(obj).view(np.uint8).reshape(-1)
    return obj


def parse_state(blob: bytes | memoryview) -> StateInfo:
    """Parse a ``llama_state_seq_get_data`` blob; raises :class:`StateFormatError` if it is malformed.

    Checks the magic, the stream count (one non-empty stream), per-cell metadata (one sequence per cell),
    v_trans, the layer count and that every section fits the buffer exactly (no trailing bytes)."""
    d = _kvsplice.parse_state(_buf(blob))
    have = d["n_layer"] > 0
    return StateInfo(
        seq_id=d["seq_id"],
        n_stream=d["n_stream"],
        n_cells=d["n_cells"],
        positions=np.frombuffer(d["positions"], dtype=np.int32),
        n_layer=d["n_layer"],
        v_trans=bool(d["v_trans"]),
        k_type=d["k_types"][0] if have else -1,
        v_type=d["v_types"][0] if have else -1,
        k_row_bytes=d["k_row_bytes"][0] if have else 0,
        v_row_bytes=d["v_row_bytes"][0] if have else 0,
        n_embd_v_gqa=d["n_embd_v_gqa"][0] if have else 0,
        size=d["size"],
        k_offsets=d["k_offsets"],
        v_offsets=d["v_offsets"],
    )


def _per_layer(v: int | Sequence[int], n_layer: int) -> list[int]:
    return [int(v)] * n_layer if isinstance(v, int | np.integer) else [int(x) for x in v]


def validate_state(
    blob: bytes | memoryview,
    n_layer: int,
    n_embd_k_gqa: int | Sequence[int],
    n_embd_v_gqa: int | Sequence[int],
    k_type: int | str | None = None,
    v_type: int | str | None = None,
) -> StateInfo:
    """Parse ``blob`` and check it against the model: layer count, K/V types and per-layer row sizes.

    Call this before handing a blob from disk (or from another process) to llama.cpp: llama.cpp's own
    reader trusts the sizes it reads. Returns the parsed info; raises :class:`StateFormatError`."""
    kt = GGML_TYPES[k_type] if isinstance(k_type, str) else (-1 if k_type is None else int(k_type))
    vt = GGML_TYPES[v_type] if isinstance(v_type, str) else (-1 if v_type is None else int(v_type))
    _kvsplice.validate_state(
        _buf(blob), int(n_layer), _per_layer(n_embd_k_gqa, n_layer), _per_layer(n_embd_v_gqa, n_layer), kt, vt
    )
    return parse_state(blob)


def empty_state(seq_id: int = 0, n_stream: int = 1) -> bytes:
    """The blob llama.cpp writes for a sequence with no cells (a valid zero-cell prefix for :func:`splice`)."""
    import struct

    return struct.pack("<Iii", STATE_MAGIC, seq_id, n_stream) + b"\0\0\0\0" * n_stream


def extract_fragment(
    blob: bytes | memoryview,
    cells: Sequence[int] | np.ndarray,
    *,
    fingerprint: bytes,
    encoding: Encoding = "f16",
    user: int = 0,
) -> bytes:
    """Cut the given cells (indices into the blob's cells, in the order given) out of a state blob into a
    self-contained payload: their positions, per-layer K rows and per-cell (non-transposed) V rows, encoded.

    ``fingerprint`` (32 bytes, e.g. sha256 of the GGUF + cache types) is stored so that a payload compiled
    for one model can never be spliced into another. ``encoding``: ``f16``/``q8``/``q4``/``q2``/``k3v3``/``k4v3``
    need an f16 cache; ``raw`` copies rows in whatever type the cache has (q8_0 caches). ``user`` is a free
    64-bit field.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; one of {sorted(ENCODINGS)}")
    fp = bytes(fingerprint)
    if len(fp) != 32:
        raise ValueError("fingerprint must be 32 bytes")
    idx = np.ascontiguousarray(np.asarray(cells, dtype=np.int64))
    if idx.ndim != 1:
        raise ValueError("cells must be one-dimensional")
    if idx.size and (idx.min() < 0 or idx.max() > np.iinfo(np.int32).max):
        raise ValueError("cell index out of range")
    idx32 = idx.astype(np.int32)
    return _kvsplice.extract(_buf(blob), idx32.view(np.uint8), fp, ENCODINGS[encoding], int(user) & (2**64 - 1))


def payload_info(buf: bytes | memoryview, verify: bool = True) -> PayloadInfo:
    """Read and check a payload header against its body; with ``verify`` also the XXH64 checksum (a full
    read of the payload). Raises :class:`PayloadError`."""
    d = _kvsplice.payload_info(_buf(buf), bool(verify))
    return PayloadInfo(
        version=d["version"],
        fingerprint=d["fingerprint"],
        n_layer=d["n_layer"],
        n_cells=d["n_cells"],
        k_type=d["k_type"],
        v_type=d["v_type"],
        encoding=_ENCODING_NAMES[d["encoding"]],
        group=d["group"],
        positions=np.frombuffer(d["positions"], dtype=np.int32),
        pos_first=d["pos_first"],
        pos_max=d["pos_max"],
        contiguous=d["contiguous"],
        user=d["user"],
        data_bytes=d["data_bytes"],
        checksum=d["checksum"],
        n_embd_k_gqa=d["n_embd_k_gqa"],
        n_embd_v_gqa=d["n_embd_v_gqa"],
        size=d["size"],
    )


def splice(
    prefix_blob: bytes | memoryview | None,
    payloads: Sequence[bytes | memoryview],
    *,
    mode: Placement = "parallel",
    start_pos: int | None = None,
    key_scale: float | Sequence[float] = 1.0,
    repeat: Sequence[int] | None = None,
    drop_first: int = 0,
    rope_base: float = 10000.0,
    rope_dims: int = 0,
    head_dim: int | None = None,
    rope_neox: bool = False,
    rope_freq_scale: float = 1.0,
    v_trans: bool | None = None,
    k_type: int | str | None = None,
    v_type: int | str | None = None,
    seq_id: int = 0,
    n_stream: int | None = None,
    fingerprint: bytes | None = None,
    verify: bool = True,
    out: bytearray | None = None,
) -> tuple[bytes | bytearray, int]:
    """Build one blob for ``llama_state_seq_set_data``: the prefix cells, then every payload's cells.

    Returns ``(blob, next_pos)`` where ``next_pos`` = largest position + 1: where the question goes.

    * ``mode='parallel'``: every fragment keeps the positions it was compiled at (all chunks compiled right
      after the same system prefix overlap in position; the causal mask is by position so they all stay
      visible). No key math.
    * ``mode='sequential'``: fragments laid one after another from ``start_pos`` (default: after the prefix;
      ignored in parallel mode),
      keeping their internal position gaps; keys re-rotated by RoPE by the shift, exactly like llama.cpp's
      K-shift (``rope_base``, ``rope_dims`` = n_rot, ``head_dim``, ``rope_neox``: NEOX for qwen2, NORMAL for
      llama; the caller reads them from the GGUF).
    * ``key_scale``: multiply fragment keys by this factor (one value or one per payload): scaling keys
      scales their attention logits, i.e. a temperature for memory attention.
    * ``repeat``: copies of each payload's cells (one count >= 1 per payload; parallel placement only). Copies
      share their positions, so a fragment spliced twice gets twice the attention weight for the same keys:
      log 2 added to its logits, a prior an untrained model can read (APE's context scaling, done with cells
      because llama.cpp's attention mask cannot carry a bias).
    * ``drop_first``: drop the first k cells of every fragment (attention sinks of a separately compiled chunk).
    * ``v_trans``/``k_type``/``v_type``: the target context's layout (flash attention off => v_trans=True).
      Taken from the prefix when it has cells (and checked against what is given); required otherwise.
    * ``fingerprint``: when given, every payload must carry it (else :class:`PayloadError`).
    * ``verify``: check payload checksums (a read of all payload bytes).
    * ``out``: a bytearray to write into (resized to the blob size and returned instead of new bytes). A
      fresh multi-hundred-MB bytes object costs the kernel a page fault + zeroing per page on every call;
      reusing one buffer across questions skips that (pass it to llama.cpp with
      ``(ctypes.c_uint8 * len(out)).from_buffer(out)``).
    """
    if mode not in ("parallel", "sequential"):
        raise ValueError(f"mode must be 'parallel' or 'sequential', not {mode!r}")
    pls = [_buf(p) for p in payloads]
    if isinstance(key_scale, int | float | np.floating):
        scales = None if float(key_scale) == 1.0 else [float(key_scale)] * len(pls)
    else:
        scales = [float(x) for x in key_scale]
        if len(scales) != len(pls):
            raise ValueError(f"key_scale has {len(scales)} values for {len(pls)} payloads")
    if repeat is not None:
        counts = [int(r) for r in repeat]
        if len(counts) != len(pls) or min(counts, default=1) < 1:
            raise ValueError(f"repeat needs one count >= 1 per payload, got {list(repeat)} for {len(pls)}")
        if mode != "parallel" and max(counts, default=1) > 1:
            raise ValueError("repeat needs parallel placement: copies must share their positions")
        pls = [p for p, r in zip(pls, counts, strict=True) for _ in range(r)]
        if scales is not None:
            scales = [x for x, r in zip(scales, counts, strict=True) for _ in range(r)]
    if start_pos is not None and start_pos < 0:
        raise ValueError("start_pos must be >= 0 (None: right after the prefix)")
    if mode == "sequential" and rope_dims <= 0:
        raise ValueError("sequential placement needs rope_dims (n_rot) > 0")
    hd = int(head_dim) if head_dim is not None else int(rope_dims)
    for name, value in (("drop_first", drop_first), ("rope_dims", rope_dims), ("head_dim", hd),
                        ("n_stream", n_stream or 0)):
        if not 0 <= int(value) < 2**31:  # the C side takes 32-bit counts: a larger one would wrap silently
            raise ValueError(f"{name} must be >= 0 and < 2**31, not {value}")
    kt = GGML_TYPES[k_type] if isinstance(k_type, str) else (-1 if k_type is None else int(k_type))
    vt = GGML_TYPES[v_type] if isinstance(v_type, str) else (-1 if v_type is None else int(v_type))
    if fingerprint is not None and len(bytes(fingerprint)) != 32:
        raise ValueError("fingerprint must be 32 bytes")
    return _kvsplice.splice(
        None if prefix_blob is None else _buf(prefix_blob),
        pls,
        1 if mode == "sequential" else 0,
        -1 if start_pos is None else int(start_pos),
        scales,
        int(drop_first),
        float(rope_base),
        float(rope_freq_scale),
        int(rope_dims),
        hd,
        bool(rope_neox),
        -1 if v_trans is None else int(bool(v_trans)),
        kt,
        vt,
        int(seq_id),
        0 if n_stream is None else int(n_stream),
        None if fingerprint is None else bytes(fingerprint),
        bool(verify),
        out,
    )


def rope_shift_keys(
    k_rows: np.ndarray,
    delta: int,
    *,
    head_dim: int,
    rope_dims: int | None = None,
    rope_base: float = 10000.0,
    rope_neox: bool = False,
    rope_freq_scale: float = 1.0,
    scale: float = 1.0,
) -> np.ndarray:
    """Rotate f16 key rows ``[n_cells, n_embd_k_gqa]`` by ``delta`` positions (and multiply by ``scale``);
    returns a new array. The same C code :func:`splice` uses; exposed for tests and experiments."""
    a = np.array(k_rows, dtype=np.float16, order="C", copy=True)
    if a.ndim != 2:
        raise ValueError("k_rows must be 2-D [n_cells, n_embd]")
    rd = int(rope_dims) if rope_dims is not None else int(head_dim)
    _kvsplice.rope_shift(
        a.view(np.uint8).reshape(-1),
        a.shape[1],
        int(delta),
        int(head_dim),
        rd,
        float(rope_base),
        float(rope_freq_scale),
        bool(rope_neox),
        float(scale),
    )
    return a


def row_size(ggml_type: int | str, n: int) -> int:
    """``ggml_row_size``: bytes of ``n`` values of a ggml type."""
    t = GGML_TYPES[ggml_type] if isinstance(ggml_type, str) else int(ggml_type)
    return _kvsplice.row_size(t, int(n))


def xxh64(buf: bytes | memoryview, seed: int = 0) -> int:
    """XXH64 as used for payload checksums."""
    return _kvsplice.xxh64(_buf(buf), seed)


# ---------------------------------------------------------------------------------------------------------
# attention capture


def set_ggml_api(get_name: int, backend_tensor_get: int, backend_buffer_is_host: int) -> None:
    """Give the extension the addresses of ``ggml_get_name``, ``ggml_backend_tensor_get`` and
    ``ggml_backend_buffer_is_host``. The extension does not link against llama.cpp (it builds with no
    llama.cpp present); it calls these through the library llama_cpp already loaded."""
    _kvsplice.set_ggml_api(int(get_name), int(backend_tensor_get), int(backend_buffer_is_host))


def init_ggml_api() -> None:
    """Resolve the ggml functions from the libraries that ``llama_cpp`` loaded and pass them to C.
    Idempotent. Raises ImportError when llama_cpp is missing, AttributeError when a symbol is."""
    if _kvsplice.ggml_api_ready():
        return
    from llama_cpp import llama_cpp as _ll  # loads libllama and, as its dependency, libggml-base

    libs = [_ll._lib]
    try:
        from llama_cpp import _ggml

        libs.append(_ggml.libggml)
    except Exception:  # noqa: BLE001 - the ggml wrapper module is optional; libllama's deps suffice
        pass

    def addr(name: str) -> int:
        for lib in libs:
            try:
                return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0
            except AttributeError:
                continue
        raise AttributeError(f"{name} not found in the llama_cpp libraries")

    set_ggml_api(addr("ggml_get_name"), addr("ggml_backend_tensor_get"), addr("ggml_backend_buffer_is_host"))


class AttentionCapture:
    """Attention received per KV cell during decoding, summed over heads and query tokens (and per layer
    when ``per_layer``), for compile-time token selection (keep the cells the model actually reads).

    Use with flash attention OFF (the softmax is fused away otherwise)::

        cap = AttentionCapture(n_cells=n_ctx, n_layer=n_layer)
        cparams.cb_eval = llama_cpp.ggml_backend_sched_eval_callback(cap.callback_address)
        cparams.cb_eval_user_data = ctypes.c_void_p(cap.user_data_address)

    The callback is C: it runs on llama.cpp's thread without the GIL. Keep this object alive as long as the
    context may decode. Cell index = KV cache slot (equal to token order for a fresh context)."""

    def __init__(self, n_cells: int, n_layer: int, per_layer: bool = False) -> None:
        init_ggml_api()
        shape = (n_layer, n_cells) if per_layer else (n_cells,)
        self._scores = np.zeros(shape, dtype=np.float32)
        self._cap = _kvsplice.Capture(self._scores, int(n_cells), int(n_layer), bool(per_layer))
        self.n_cells = int(n_cells)
        self.n_layer = int(n_layer)
        self.per_layer = bool(per_layer)

    @property
    def scores(self) -> np.ndarray:
        """float32 view (not a copy) of the accumulated attention: [n_cells] or [n_layer, n_cells]."""
        return self._scores

    @property
    def callback_address(self) -> int:
        return self._cap.callback_address

    @property
    def user_data_address(self) -> int:
        return self._cap.user_data_address

    @property
    def calls(self) -> int:
        """Number of ``kq_soft_max`` tensors accumulated (layers x ubatches)."""
        return self._cap.calls

    @property
    def skipped(self) -> int:
        """``kq_soft_max`` tensors that could not be read (not f32, layer out of range)."""
        return self._cap.skipped

    @property
    def layout_ok(self) -> bool | None:
        """None until the first tensor; then whether the ggml_tensor layout check passed (if False the
        capture stays off rather than read a struct it does not understand)."""
        return self._cap.layout_ok

    def reset(self) -> None:
        """Zero the scores and counters (e.g. before compiling the next chunk)."""
        self._cap.reset()
