"""The one module that talks to llama-cpp-python.

We use the low-level API because the memory design needs what the high-level `Llama` class hides:
decoding at chosen positions, one sequence's KV state as bytes (the splice surface), an eval
callback for attention capture, and the raw logits for deterministic sampling.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repomem import native

from . import amx_guard
from .errors import CancelledError, ContextOverflowError, ModelError
from .gguf import GGUFInfo, read_gguf_info
from .models import cached_sha256

_backend_lock = threading.Lock()
_backend_ready = False
_log_tail: deque[str] = deque(maxlen=40)
_log_cb = None  # kept alive for the process lifetime: llama.cpp holds the pointer

#: KV cache types a context accepts (their ggml type ids come from repomem.native.GGML_TYPES)
CACHE_TYPES = ("f16", "q8_0", "f32", "bf16", "q4_0")
ROPE_NORM, ROPE_NEOX = 0, 2


def llama():
    """Import llama_cpp lazily: loading its shared libraries takes a while that `--help` should not pay."""
    import llama_cpp

    return llama_cpp


def _init_backend() -> None:
    global _backend_ready, _log_cb
    with _backend_lock:
        if _backend_ready:
            return
        ll = llama()
        verbose = os.environ.get("REPOMEM_LLAMA_LOG") == "1"

        def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            msg = text.decode("utf-8", errors="replace") if text else ""
            _log_tail.append(msg)
            if verbose:
                os.write(2, text or b"")

        _log_cb = ll.llama_log_callback(_log)
        ll.llama_log_set(_log_cb, ctypes.c_void_p())
        ll.llama_backend_init()
        _backend_ready = True


def recent_llama_log() -> str:
    """The last lines llama.cpp logged (errors from a failed load end up here)."""
    return "".join(_log_tail).strip()


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of repomem needs to know about a loaded model."""

    path: Path
    sha256: str
    architecture: str
    name: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_embd: int
    n_ctx_train: int
    n_vocab: int
    rope_type: int
    rope_base: float
    rope_dims: int
    size_bytes: int
    desc: str

    @property
    def n_embd_v_gqa(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def rope_neox(self) -> bool:
        return self.rope_type == ROPE_NEOX

    @property
    def fingerprint(self) -> bytes:
        """32 bytes that identify the weights; payloads compiled by another model never splice in."""
        return bytes.fromhex(self.sha256)


@dataclass
class SamplingParams:
    """temperature 0 means greedy (evaluation); otherwise temperature + nucleus sampling (chat)."""

    temperature: float = 0.0
    top_p: float = 0.95
    seed: int | None = None  # None or negative (llama.cpp's clients send -1): a fresh random seed
    max_tokens: int = 512
    stop: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.seed is not None and self.seed < 0:
            self.seed = None


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    ttft_s: float = 0.0
    total_s: float = 0.0
    stop_reason: str = ""  # "eog" | "length" | "stop" | "cancelled" | "context"


class Engine:
    """A loaded GGUF model. Thread-safe to read; create one `Context` per worker thread."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int | None = None,
                 use_extra_bufts: bool | None = None, probe: bool = True):
        _init_backend()
        ll = llama()
        self.gguf: GGUFInfo = read_gguf_info(path)
        self.path = Path(path).expanduser().resolve()
        self.sha256 = cached_sha256(self.path)
        if use_extra_bufts is None:
            use_extra_bufts = amx_guard.extra_bufts_allowed(self.path, self.sha256, probe=probe)
        self.use_extra_bufts = use_extra_bufts
        if n_gpu_layers is None:
            n_gpu_layers = -1 if ll.llama_supports_gpu_offload() else 0
        self.n_gpu_layers = n_gpu_layers
        params = ll.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = use_extra_bufts
        model = ll.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            detail = recent_llama_log().splitlines()[-1:] or ["unknown error"]
            raise ModelError(f"llama.cpp could not load {self.path}: {detail[0]}")
        self._model = model
        self._vocab = ll.llama_model_get_vocab(model)
        desc = ctypes.create_string_buffer(256)
        ll.llama_model_desc(model, desc, 256)
        g = self.gguf
        self.info = ModelInfo(
            path=self.path, sha256=self.sha256, architecture=g.architecture, name=g.name,
            n_layer=ll.llama_model_n_layer(model), n_head=ll.llama_model_n_head(model),
            n_head_kv=ll.llama_model_n_head_kv(model), head_dim=g.head_dim, n_embd=ll.llama_model_n_embd(model),
            n_ctx_train=ll.llama_model_n_ctx_train(model), n_vocab=ll.llama_vocab_n_tokens(self._vocab),
            rope_type=ll.llama_model_rope_type(model), rope_base=g.rope_base, rope_dims=g.rope_dims,
            size_bytes=self.path.stat().st_size, desc=desc.value.decode(errors="replace"),
        )
        self._piece_cache: dict[int, bytes] = {}

    # -- vocabulary ---------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        ll = llama()
        raw = text.encode("utf-8", "replace")  # a lone surrogate becomes "?" rather than an error
        cap = len(raw) + 16
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        cached = self._piece_cache.get(token)
        if cached is None:
            ll = llama()
            buf = ctypes.create_string_buffer(64)
            n = ll.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            cached = buf.raw[:n]
            self._piece_cache[token] = cached
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(llama().llama_vocab_is_eog(self._vocab, token))

    def apply_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render messages with the model's own chat template (llama.cpp's built-in implementation)."""
        ll = llama()
        tmpl = ll.llama_model_chat_template(self._model, None)
        arr = (ll.llama_chat_message * len(messages))()
        keep = []
        for i, m in enumerate(messages):
            role, content = m["role"].encode(), m["content"].encode()
            keep += [role, content]
            arr[i].role, arr[i].content = role, content
        size = sum(len(m["content"]) for m in messages) * 2 + 512
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = ll.llama_chat_apply_template(tmpl, arr, len(messages), add_generation_prompt, buf, size)
            if n < 0:
                raise ModelError(f"the chat template of {self.path.name} is not supported by llama.cpp")
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n + 1
        raise ModelError("chat template output kept growing")

    # -- contexts -----------------------------------------------------------------------------
    def new_context(self, *, n_ctx: int = 8192, n_threads: int | None = None, n_batch: int = 512,
                    flash_attn: bool = False, cache_type: str = "f16",
                    cb_eval: int | None = None, cb_eval_user_data: int | None = None) -> Context:
        return Context(self, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, flash_attn=flash_attn,
                       cache_type=cache_type, cb_eval=cb_eval, cb_eval_user_data=cb_eval_user_data)

    def close(self) -> None:
        if getattr(self, "_model", None):
            llama().llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class Context:
    """One llama.cpp context: a KV cache plus the decode/sample/state operations repomem uses."""

    def __init__(self, engine: Engine, *, n_ctx: int, n_threads: int | None, n_batch: int, flash_attn: bool,
                 cache_type: str, cb_eval: int | None, cb_eval_user_data: int | None):
        ll = llama()
        if cache_type not in CACHE_TYPES:
            raise ModelError(f"unknown KV cache type {cache_type!r}; use one of {', '.join(CACHE_TYPES)}")
        if cache_type not in ("f16", "f32", "bf16") and not flash_attn:
            raise ModelError("a quantized V cache needs flash attention on (llama.cpp limitation)")
        self.engine = engine
        p = ll.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_batch
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = n_threads or default_threads()
        p.flash_attn_type = 1 if flash_attn else 0
        p.type_k = p.type_v = native.GGML_TYPES[cache_type]
        p.no_perf = True
        if cb_eval is not None:
            p.cb_eval = ctypes.cast(ctypes.c_void_p(cb_eval), ll.ggml_backend_sched_eval_callback)
            p.cb_eval_user_data = ctypes.c_void_p(cb_eval_user_data or 0)
        ctx = ll.llama_init_from_model(engine._model, p)
        if not ctx:
            detail = recent_llama_log().splitlines()[-1:] or ["unknown error"]
            raise ModelError(f"llama.cpp could not create a context (n_ctx={n_ctx}): {detail[0]}")
        self._ctx = ctx
        self._mem = ll.llama_get_memory(ctx)
        self.n_ctx = ll.llama_n_ctx(ctx)
        self.n_batch = n_batch
        self.flash_attn = flash_attn
        self.cache_type = cache_type
        self.type_k = self.type_v = native.GGML_TYPES[cache_type]
        self._batch = ll.llama_batch_init(n_batch, 0, 1)
        self.n_vocab = engine.info.n_vocab

    @property
    def v_trans(self) -> bool:
        """llama.cpp stores V transposed when flash attention is off."""
        return not self.flash_attn

    # -- decode -------------------------------------------------------------------------------
    def decode(self, tokens: Sequence[int], *, start_pos: int | None = None, positions: Sequence[int] | None = None,
               seq_id: int = 0, logits: str = "last", cancel: threading.Event | None = None) -> None:
        """Decode tokens into the KV cache at explicit positions (in n_batch pieces).

        logits: "last" keeps the logits of the final token, "all" of every token, "none" of none.
        """
        ll = llama()
        n = len(tokens)
        if n == 0:
            return
        if positions is None:
            if start_pos is None:
                start_pos = self.pos_max(seq_id) + 1
            positions = range(start_pos, start_pos + n)
        if max(positions) >= self.n_ctx:
            raise ContextOverflowError(
                f"needs position {max(positions) + 1} but the context holds {self.n_ctx} tokens")
        b = self._batch
        for lo in range(0, n, self.n_batch):
            if cancel is not None and cancel.is_set():
                raise CancelledError("cancelled")
            hi = min(n, lo + self.n_batch)
            m = hi - lo
            for j in range(m):
                b.token[j] = tokens[lo + j]
                b.pos[j] = positions[lo + j]
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = seq_id
                b.logits[j] = 1 if logits == "all" or (logits == "last" and lo + j == n - 1) else 0
            b.n_tokens = m
            rc = ll.llama_decode(self._ctx, b)
            if rc != 0:
                if rc == 1:
                    raise ContextOverflowError("the KV cache is full (no free slot for the batch)")
                raise ModelError(f"llama_decode failed with code {rc}")

    def logits(self, i: int = -1) -> np.ndarray:
        """Copy of the logits of output row i of the last decode (-1: last)."""
        ptr = llama().llama_get_logits_ith(self._ctx, i)
        if not ptr:
            raise ModelError("no logits for that row (decode with logits='last' or 'all')")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    @staticmethod
    def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None = None) -> int:
        if params.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / params.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if params.top_p < 1.0:
            order = np.argsort(-p)
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, params.top_p) + 1)]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        rng = rng or np.random.default_rng(params.seed)
        return int(rng.choice(len(p), p=p))

    def generate(self, prompt_tokens: Sequence[int], *, start_pos: int | None = None,
                 params: SamplingParams | None = None, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None, seq_id: int = 0) -> Generation:
        """Decode the prompt after what is in the cache, then sample until end-of-generation.

        on_text receives decoded text as it arrives (UTF-8 safe across token boundaries).
        """
        params = params or SamplingParams()
        if not prompt_tokens:
            raise ModelError("empty prompt")
        t0 = time.perf_counter()
        gen = Generation()
        if start_pos is None:
            start_pos = self.pos_max(seq_id) + 1
        if start_pos + len(prompt_tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"memory and question need {start_pos + len(prompt_tokens):,} tokens; "
                f"the context holds {self.n_ctx:,}. Ask a shorter question or lower the memory budget")
        self.decode(prompt_tokens, start_pos=start_pos, seq_id=seq_id, cancel=cancel)
        pos = start_pos + len(prompt_tokens)
        rng = np.random.default_rng(params.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text_parts: list[str] = []
        tail, longest_stop = "", max(map(len, params.stop), default=0)
        while True:
            if cancel is not None and cancel.is_set():
                gen.stop_reason = "cancelled"
                break
            token = self.sample(self.logits(-1), params, rng)
            if not gen.tokens:
                gen.ttft_s = time.perf_counter() - t0
            if self.engine.is_eog(token):
                gen.stop_reason = "eog"
                break
            gen.tokens.append(token)
            piece = decoder.decode(self.engine.piece(token))
            if piece:
                text_parts.append(piece)
                if on_text:
                    on_text(piece)
            if params.stop:
                # enough of the end of the text to hold the longest stop string ending in this piece
                tail = (tail + piece)[-(longest_stop + len(piece)):]
                if any(s in tail for s in params.stop):
                    gen.stop_reason = "stop"
                    break
            if len(gen.tokens) >= params.max_tokens:
                gen.stop_reason = "length"
                break
            if pos + 1 >= self.n_ctx:
                gen.stop_reason = "context"
                break
            self.decode([token], start_pos=pos, seq_id=seq_id)
            pos += 1
        tail = decoder.decode(b"", final=True)
        if tail:
            text_parts.append(tail)
            if on_text:
                on_text(tail)
        gen.text = "".join(text_parts)
        gen.total_s = time.perf_counter() - t0
        return gen

    # -- KV cache / state ---------------------------------------------------------------------
    def pos_max(self, seq_id: int = 0) -> int:
        """Largest position held for the sequence, -1 when empty."""
        return int(llama().llama_memory_seq_pos_max(self._mem, seq_id))

    def clear(self) -> None:
        llama().llama_memory_clear(self._mem, True)

    def seq_rm(self, seq_id: int = 0, p0: int = -1, p1: int = -1) -> None:
        llama().llama_memory_seq_rm(self._mem, seq_id, p0, p1)

    def state_get(self, seq_id: int = 0) -> bytes:
        """One sequence's KV cells as llama.cpp's state blob (the format `repomem.native` reads)."""
        ll = llama()
        size = ll.llama_state_seq_get_size(self._ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = ll.llama_state_seq_get_data(self._ctx, buf, size, seq_id)
        return bytes(memoryview(buf)[:n])

    def state_set(self, blob: bytes | bytearray, seq_id: int = 0) -> None:
        """Replace the sequence's cells with those in the blob (positions as stored in it). No copy."""
        ll = llama()
        if isinstance(blob, bytes):
            ptr = ctypes.cast(ctypes.c_char_p(blob), ctypes.POINTER(ctypes.c_uint8))
        else:
            ptr = (ctypes.c_uint8 * len(blob)).from_buffer(blob)
        n = ll.llama_state_seq_set_data(self._ctx, ptr, len(blob), seq_id)
        if n != len(blob):
            raise ModelError("llama.cpp rejected the spliced state (not enough free cells or a format mismatch)")

    def close(self) -> None:
        ll = llama()
        if getattr(self, "_ctx", None):
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
