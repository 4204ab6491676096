"""The memory compiler: text -> KV payload (Memory3's "explicit memory").

Each memory piece is decoded once by the model right after the shared system prefix; the KV cells of
its tokens (all of them, or those a selection policy keeps) become the cube's payload. At question
time these cells are spliced back instead of re-reading the text.

Two ways to compile, compared by `repomem bench compile`:
- `chunk` (default): every piece alone after the prefix, so it fits any question ("parallel" positions).
- `file`: Memory3's "encode the whole file, then cut": pieces carry their file's context.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from repomem import native

from .engine import Context, Engine
from .errors import CancelledError, ContextOverflowError, ModelError
from .prompt import Layout, memory_tokens

_STRUCTURAL_DROP = re.compile(r"^[\s\W_]*$", re.UNICODE)  # whitespace- or punctuation-only pieces


@dataclass(frozen=True)
class CompileOptions:
    policy: str = "all"  # all | uniform | attention | structural
    keep_ratio: float = 1.0  # for uniform / attention
    drop_sinks: int = 0  # drop the first k cells of each piece (attention sinks)
    encoding: str = "f16"  # payload encoding of K/V rows (repomem.native)
    cache_type: str = "f16"  # KV cache type; q8_0 needs flash attention and stores rows raw
    n_ctx: int = 2048  # pieces are <= chunk_tokens; a bigger cache only slows every decode
    n_threads: int | None = None
    n_batch: int = 512


@dataclass
class CompiledPiece:
    payload: bytes
    tokens: int  # tokens of the piece's text
    kept: int  # cells kept in the payload


class Compiler:
    """Owns one compile context with the system prefix decoded once at positions 0..P-1."""

    def __init__(self, engine: Engine, layout: Layout, options: CompileOptions | None = None,
                 fingerprint: bytes | None = None):
        self.engine, self.layout = engine, layout
        self.fingerprint = fingerprint or engine.info.fingerprint
        self.options = options or CompileOptions()
        info = engine.info
        self._capture = None
        cb = ud = None
        if self.options.policy == "attention" and self.options.cache_type != "f16":
            raise ModelError("the attention policy reads attention weights, which flash attention (needed by a "
                             "quantized cache) never materializes: use an f16 cache or another policy")
        if self.options.policy == "attention":
            self._capture = native.AttentionCapture(self.options.n_ctx, info.n_layer)
            cb, ud = self._capture.callback_address, self._capture.user_data_address
        quantized_cache = self.options.cache_type != "f16"
        if quantized_cache:
            # Encodings quantize from f16 rows; a quantized cache's rows are kept as they are.
            self.options = replace(self.options, encoding="raw")
        self.ctx: Context = engine.new_context(n_ctx=self.options.n_ctx, n_threads=self.options.n_threads,
                                               n_batch=self.options.n_batch, flash_attn=quantized_cache,
                                               cache_type=self.options.cache_type, cb_eval=cb, cb_eval_user_data=ud)
        self.prefix_tokens = engine.tokenize(layout.prefix, add_special=False, parse_special=True)
        self.P = len(self.prefix_tokens)
        self.ctx.decode(self.prefix_tokens, start_pos=0, logits="none")

    def close(self) -> None:
        self.ctx.close()

    def _reset_to_prefix(self) -> None:
        self.ctx.seq_rm(0, self.P, -1)

    def _select(self, tokens: Sequence[int], scores: np.ndarray | None) -> np.ndarray:
        """Indices (into the piece's tokens) of the cells to keep, in order."""
        n = len(tokens)
        o = self.options
        idx = np.arange(n, dtype=np.int32)
        if o.drop_sinks:
            idx = idx[min(o.drop_sinks, n - 1):]
        if o.policy == "structural":
            pieces = [self.engine.piece(tokens[i]).decode("utf-8", "replace") for i in idx]
            keep = [i for i, p in zip(idx, pieces, strict=True) if not _STRUCTURAL_DROP.match(p)]
            idx = np.asarray(keep or idx[:1], dtype=np.int32)
        elif o.policy in ("uniform", "attention") and o.keep_ratio < 1.0:
            k = max(1, int(round(len(idx) * o.keep_ratio)))
            if o.policy == "uniform":
                idx = idx[np.unique(np.linspace(0, len(idx) - 1, k).round().astype(np.int64))]
            else:
                assert scores is not None
                top = np.argsort(-scores[idx], kind="stable")[:k]
                idx = np.sort(idx[top])
        return idx

    def compile_text(self, text: str, cancel: threading.Event | None = None) -> CompiledPiece:
        """Compile one piece alone after the prefix."""
        tokens = memory_tokens(self.engine, text)
        if not tokens:
            tokens = self.engine.tokenize(" ")
        if self.P + len(tokens) > self.ctx.n_ctx:
            raise ContextOverflowError(f"piece of {len(tokens)} tokens exceeds the compile context")
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled")
        self._reset_to_prefix()
        if self._capture is not None:
            self._capture.reset()
        self.ctx.decode(tokens, start_pos=self.P, logits="none", cancel=cancel)
        blob = self.ctx.state_get()
        scores = None
        if self._capture is not None:
            scores = np.asarray(self._capture.scores[self.P:self.P + len(tokens)], dtype=np.float32)
        keep = self._select(tokens, scores)
        payload = native.extract_fragment(blob, (keep + self.P).astype(np.int32),
                                          fingerprint=self.fingerprint,
                                          encoding=self.options.encoding)
        self._reset_to_prefix()
        return CompiledPiece(payload=payload, tokens=len(tokens), kept=int(len(keep)))

    def compile_file(self, texts: Sequence[str], cancel: threading.Event | None = None) -> list[CompiledPiece]:
        """Memory3's whole-file mode: decode all pieces in one run after the prefix, then cut per piece."""
        pieces = [memory_tokens(self.engine, t) or [0] for t in texts]
        total = sum(map(len, pieces))
        if self.P + total > self.ctx.n_ctx:
            # Too long for one run: fall back to compiling each piece on its own.
            return [self.compile_text(t, cancel) for t in texts]
        self._reset_to_prefix()
        if self._capture is not None:
            self._capture.reset()
        flat = [t for p in pieces for t in p]
        self.ctx.decode(flat, start_pos=self.P, logits="none", cancel=cancel)
        blob = self.ctx.state_get()
        out, start = [], self.P
        for toks in pieces:
            scores = None
            if self._capture is not None:
                scores = np.asarray(self._capture.scores[start:start + len(toks)], dtype=np.float32)
            keep = self._select(toks, scores)
            payload = native.extract_fragment(blob, (keep + start).astype(np.int32),
                                              fingerprint=self.fingerprint,
                                              encoding=self.options.encoding)
            out.append(CompiledPiece(payload=payload, tokens=len(toks), kept=int(len(keep))))
            start += len(toks)
        self._reset_to_prefix()
        return out
