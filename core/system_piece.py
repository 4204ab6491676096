"""A client's own system message, compiled once and spliced after the memory.

Editors and agents (Aider, Continue) send the same long system message with every request. Decoding it
after the memory at every question takes back most of what splicing the memory saves, so in kv mode it
is compiled like a memory piece: decoded once right after the shared prefix, its cells kept in process
memory, and spliced at every later request *after* the memory pieces (sequential placement, keys
re-rotated to their new positions), where text mode reads it. Like a memory piece it attends to the
prefix but not to the memory before it. Nothing of it is written to disk: it is the client's text.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from repomem import native

from .engine import Context

#: distinct system messages kept compiled (one per client style in use, typically)
MAX_PIECES = 4


class SystemPieces:
    """Compiled client system messages, by content, model and encoding; least recently used go first."""

    def __init__(self, max_pieces: int = MAX_PIECES) -> None:
        self.max_pieces = max_pieces
        self._pieces: OrderedDict[str, bytes] = OrderedDict()
        self.compiles = 0  # model runs spent on system messages (the rest were spliced from here)

    def __len__(self) -> int:
        return len(self._pieces)

    def payload(self, ctx: Context, prefix_blob: bytes, prefix_len: int, tokens: list[int], *,
                fingerprint: bytes, encoding: str) -> bytes:
        """The payload of `tokens` (the system turn as the question turn would decode it) compiled after
        the prefix in `ctx`, from the cache when it was compiled before. Leaves `ctx` cleared."""
        key = hashlib.sha256(fingerprint + encoding.encode() + np.asarray(tokens, np.int32).tobytes()).hexdigest()
        buf = self._pieces.get(key)
        if buf is not None:
            self._pieces.move_to_end(key)
            return buf
        ctx.clear()
        ctx.state_set(prefix_blob)
        ctx.decode(tokens, start_pos=prefix_len, logits="none")
        cells = np.arange(prefix_len, prefix_len + len(tokens), dtype=np.int32)
        buf = native.extract_fragment(ctx.state_get(), cells, fingerprint=fingerprint, encoding=encoding)
        ctx.clear()
        self.compiles += 1
        self._pieces[key] = buf
        while len(self._pieces) > self.max_pieces:
            self._pieces.popitem(last=False)
        return buf

    def clear(self) -> None:
        self._pieces.clear()
