"""Answering, one part of `RepoMemory`: retrieval, placing the memory in the answer context (spliced KV
or text), generation, and teacher-forced answer scores.

Asking retrieves cubes with BM25 and either splices their compiled KV (`kv`), reads their text (`text`,
also the path for remote endpoints), or uses no memory (`none`). The prompt layout is the same in every
mode (prompt.py), so a compiled payload stands in exactly for its text.

Reads from the facade: `store`, `settings`, `engine`, `layout`, `fingerprint`, `fingerprint_bytes`,
`conversations`, `index_`, `_lock`, `_answer_ctx`, `_prefix_blob`, `_prefix_len`, `_splice_buf`,
`_system_pieces`, `_system_splice_buf`, `payload_encoding`; calls
`refresh` (indexing), `_save_exchanges` (notes) and `_promote_hot` (compiling).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import settings as settings_mod
from .cube import Cube
from .engine import Context, SamplingParams
from .errors import ContextOverflowError, RepomemError, StoreError
from .evidence import Evidence, EvidencePiece, find_evidence
from .memory_state import MemoryState
from .notes import UnsavedExchange
from .prompt import memory_text, memory_tokens
from .system_piece import SystemPieces
from .text import whole_text

log = logging.getLogger(__name__)

_PAST = re.compile(r"\b(we|us|our|decid\w*|agree\w*|discuss\w*|earlier|before|last (time|week|month)|yesterday|"
                   r"today|changed?|changes|recent\w*|said|conversation|remember)\b", re.IGNORECASE)


@dataclass
class Source:
    path: str
    start_line: int
    end_line: int
    symbol: str | None
    cube_id: str
    kind: str = "plaintext"
    source: str = "code"
    repo: str = ""  # the root of the repository whose memory it is

    @classmethod
    def of(cls, cube: Cube, repo: str) -> Source:
        return cls(cube.path, cube.start_line, cube.end_line, cube.symbol, cube.id, cube.kind, cube.source, repo)

    def as_dict(self) -> dict:
        return {"path": self.path, "start_line": self.start_line, "end_line": self.end_line,
                "symbol": self.symbol, "cube_id": self.cube_id, "repo": self.repo}


@dataclass
class Answer:
    answer: str
    mode: str
    ttft_s: float
    total_s: float
    memory_tokens: int
    sources: list[Source]
    spliced: int = 0
    as_text: int = 0
    conversation_id: str | None = None
    stop_reason: str = ""
    warnings: list[str] = field(default_factory=list)
    prompt_tokens: int = 0  # decoded at question time (question, history, memories placed as text)
    cached_tokens: int = 0  # taken from KV instead of decoded: the system prefix and the spliced memory cells
    spliced_tokens: int = 0  # memory tokens spliced as KV (memory_tokens less those placed as text)
    completion_tokens: int = 0
    evidence: Evidence | None = None  # the exact lines of its memories the answer's content stands in

    def as_dict(self) -> dict:
        return {"answer": self.answer, "mode": self.mode, "ttft_s": round(self.ttft_s, 4),
                "total_s": round(self.total_s, 4), "memory_tokens": self.memory_tokens,
                "sources": [s.as_dict() for s in self.sources], "spliced": self.spliced,
                "as_text": self.as_text, "conversation_id": self.conversation_id,
                "stop_reason": self.stop_reason, "warnings": self.warnings, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "spliced_tokens": self.spliced_tokens,
                "completion_tokens": self.completion_tokens,
                "evidence": self.evidence.as_dict() if self.evidence else None}


@dataclass
class AnswerScore:
    """Teacher-forced view of one answer: log-probability of each of its tokens, and whether it was the top one."""

    logprobs: list[float]
    top1: list[bool]

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs)


@dataclass
class _Turn:
    """The question turn as decoded after the memory, and the room it leaves for the memory."""

    tokens: list[int]
    n_prefix: int
    room: int
    dropped: int  # earliest history turns left out to fit
    # The client's system message as its own turn (`system` tokens) and the rest of the turn (`bare`), where
    # the template gives it a turn of its own: kv mode splices the first (system_piece.py) and decodes `bare`.
    system: list[int] = field(default_factory=list)
    bare: list[int] = field(default_factory=list)


@dataclass
class _Prepared:
    ctx: Context
    prompt: list[int]
    start: int
    chosen: list[Cube]
    memory_tokens: int
    sources: list[Source] = field(default_factory=list)  # the chosen cubes, each naming its repository
    spliced: int = 0
    text_parts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    splice_s: float = 0.0
    cached: int = 0  # cells restored from KV (prefix + spliced memory), not decoded
    spliced_tokens: int = 0


class AnsweringMixin(MemoryState):
    _answer_ctx: Context | None
    _prefix_blob: bytes | None
    _prefix_len: int
    _splice_buf: bytearray
    _system_pieces: SystemPieces
    _system_splice_buf: bytearray

    def search(self, query: str, k: int = 5, *, allow_local: bool = True) -> list[Cube]:
        """Top-k active cubes. Conversation and change notes rank below code and notes unless the question
        asks about the past ("what did we decide", "what changed"): an old answer, right or wrong, should
        not crowd out the code it was about. `allow_local=False` leaves out cubes under private paths."""
        return [c for _, c in self._scored_search(query, k, allow_local=allow_local)]

    def _scored_search(self, query: str, k: int, *, allow_local: bool) -> list[tuple[float, Cube]]:
        """`search` with each cube's score, best first."""
        self.refresh()
        hits = self.index_.search(query, k=k * 3 + 6)
        about_past = bool(_PAST.search(query))
        scored: list[tuple[float, Cube]] = []
        for h in hits:
            cube = self.store.get(h.doc_id)
            if cube is None or cube.status == "archived":
                continue
            if not allow_local and (cube.visibility == "local" or self.is_private(cube.path)):
                continue
            weight = 1.0 if cube.source in ("code", "note") or about_past else 0.5
            scored.append((h.score * weight, cube))
        scored.sort(key=lambda sc: -sc[0])
        return scored[:k]

    def _answer_context(self, need: int) -> Context:
        """A context just big enough: llama.cpp's per-token cost grows with the cache size, not its use."""
        size = min(self.settings.n_ctx, max(2048, -(-need // 1024) * 1024))
        if self._answer_ctx is not None and self._answer_ctx.n_ctx != size:
            self._answer_ctx.close()
            self._answer_ctx = None
        if self._answer_ctx is None:
            cache = self.settings.cache_type
            self._answer_ctx = self.engine.new_context(n_ctx=size, n_threads=self.settings.n_threads or None,
                                                       flash_attn=cache != "f16", cache_type=cache)
        return self._answer_ctx

    def _prefix_state(self, ctx: Context) -> tuple[bytes, int]:
        if self._prefix_blob is None:
            ctx.clear()
            toks = self.engine.tokenize(self.layout.prefix)
            ctx.decode(toks, start_pos=0, logits="none")
            self._prefix_blob = ctx.state_get()
            self._prefix_len = len(toks)
        return self._prefix_blob, self._prefix_len

    def _load_payload(self, cube: Cube, warnings: list[str]) -> bytes | None:
        from repomem import native

        try:
            buf = self.store.read_payload(cube)
            native.payload_info(buf, verify=True)
            return buf
        except (StoreError, ValueError) as exc:
            warnings.append(f"{cube.path}:{cube.start_line}: compiled memory unusable ({exc}); used its text "
                            "and queued a recompile")
            # Drop the payload and let the cube back into the compile queue at once.
            reason = f"unusable payload: {exc}"
            self._try_write(lambda: (self.store.archive(cube.id, reason=reason), self.store.promote(cube.id)),
                            warnings)
            return None

    def _prepare(self, question: str, mode: str, history: list[tuple[str, str]], extra_tokens: int, *,
                 touch: bool = True, system: str = "", allow_local: bool = True) -> _Prepared:
        """Retrieve, then lay out the memory in the answer context: spliced KV (kv) or decoded text (text).

        Returns the context and the tokens still to decode at `start`. `extra_tokens`: room to leave after
        them (the answer). `touch`: count this as a recall of the chosen cubes (their hotness). The oldest
        history turns are left out when they do not fit. Caller holds self._lock."""
        turn = self._question_turn(question, history, extra_tokens, system)
        cubes = self.search(question, k=self.settings.top_k, allow_local=allow_local) if mode != "none" else []
        return self._place([(c, self) for c in cubes], mode, turn, extra_tokens, touch=touch)

    def _question_turn(self, question: str, history: list[tuple[str, str]], extra_tokens: int,
                       system: str) -> _Turn:
        s = self.settings
        engine = self.engine
        n_prefix = len(engine.tokenize(self.layout.prefix))

        def turn_tokens(dropped: int) -> list[int]:
            return self.layout.question_tokens(engine, question, history[dropped:], system)

        def fits(tokens: list[int]) -> bool:
            return s.n_ctx - n_prefix - len(tokens) - extra_tokens >= 0

        q_tokens, dropped = turn_tokens(0), 0
        if history and not fits(q_tokens):
            # The fewest oldest turns to leave out, found in a few tokenizations rather than one per turn
            # (an agent's transcript runs to hundreds); when none fits, every turn goes.
            lo, hi = 1, len(history)
            while lo < hi:
                mid = (lo + hi) // 2
                if fits(turn_tokens(mid)):
                    hi = mid
                else:
                    lo = mid + 1
            q_tokens, dropped = turn_tokens(lo), lo
        room = s.n_ctx - n_prefix - len(q_tokens) - extra_tokens
        if room < 0:
            raise ContextOverflowError(
                f"the question needs {len(q_tokens):,} tokens and the answer up to {extra_tokens:,}; the context "
                f"holds {s.n_ctx:,}: shorten the question, ask for a shorter answer or raise the context size")
        turn = _Turn(q_tokens, n_prefix, room, dropped)
        if system.strip() and self.layout.system_turn:
            turn.system = self.layout.system_tokens(engine, system)
            turn.bare = self.layout.question_tokens(engine, question, history[dropped:])
        return turn

    def _place(self, cubes: Sequence[tuple[Cube, AnsweringMixin]], mode: str, turn: _Turn, extra_tokens: int, *,
               touch: bool = True) -> _Prepared:
        """Lay out retrieved cubes (best first, each with the memory it comes from) in this memory's answer
        context. The memory each comes from reads its payload and counts its recall, so the cubes of several
        repositories that share this model can go into one context. Caller holds the lock of every memory."""
        s = self.settings
        engine = self.engine
        q_tokens, n_prefix, room = turn.tokens, turn.n_prefix, turn.room
        budget = min(s.memory_tokens, room)
        # Boosted memories take their cells twice in the context, not twice from the memory budget.
        boost = s.boost_top if mode == "kv" and s.placement == "parallel" else 0
        chosen: list[tuple[Cube, AnsweringMixin, str, int, int]] = []  # cube, its memory, text, tokens, copies
        used = cells = 0
        for cube, owner in cubes:
            text = memory_text(cube.path, cube.start_line, cube.end_line, cube.symbol, cube.text)
            # a count from compile time holds in the tokens of the model that compiled it, and no other
            n = cube.tokens if cube.tokens and cube.model_fingerprint == self.fingerprint else \
                len(memory_tokens(engine, text))
            copies = 2 if len(chosen) < boost and cells + 2 * n <= room else 1
            if used + n > budget or cells + copies * n > room:
                continue
            chosen.append((cube, owner, text, n, copies))
            used += n
            cells += copies * n
        ctx = self._answer_context(n_prefix + cells + len(q_tokens) + extra_tokens)
        prep = _Prepared(ctx=ctx, prompt=[], start=0, chosen=[c for c, _, _, _, _ in chosen], memory_tokens=used,
                         sources=[Source.of(c, str(o.root)) for c, o, _, _, _ in chosen])
        if turn.dropped:
            prep.warnings.append(f"{turn.dropped} earliest turn(s) of the conversation left out to fit the context")
        if touch:
            for owner in {id(o): o for _, o, _, _, _ in chosen}.values():
                ids = [c.id for c, o, _, _, _ in chosen if o is owner]
                owner._try_write(lambda o=owner, i=ids: o.store.touch(i), prep.warnings)
        ctx.clear()
        if mode == "kv":
            from repomem import native

            prefix_blob, _ = self._prefix_state(ctx)
            payloads, repeat = [], []
            for cube, owner, text, n, copies in chosen:
                buf = None
                if cube.kind == "activation" and cube.model_fingerprint == self.fingerprint:
                    buf = owner._load_payload(cube, prep.warnings)
                if buf is None:
                    prep.text_parts.append(text)
                else:
                    payloads.append(buf)
                    repeat.append(copies)
                    prep.spliced_tokens += n
            prep.spliced = len(payloads)
            t_splice = time.perf_counter()
            # Each payload was checksummed by _load_payload; the splice need not read them twice.
            blob, next_pos = native.splice(
                prefix_blob, payloads, mode=s.placement, key_scale=s.key_scale, repeat=repeat, drop_first=0,
                rope_base=engine.info.rope_base, rope_dims=engine.info.rope_dims,
                head_dim=engine.info.head_dim, rope_neox=engine.info.rope_neox, v_trans=ctx.v_trans,
                fingerprint=self.fingerprint_bytes, verify=False, out=self._splice_buf)
            if turn.system and not prep.text_parts and s.cache_type == "f16":  # re-rotating keys needs f16
                blob, next_pos = self._splice_system(ctx, blob, turn.system)
                q_tokens = turn.bare
            ctx.state_set(blob)
            prep.splice_s = time.perf_counter() - t_splice
            prep.prompt = self._text_tokens(prep.text_parts) + q_tokens
            prep.start = prep.cached = next_pos
            if prep.text_parts:
                prep.warnings.append(f"{len(prep.text_parts)} of {len(chosen)} memories are not compiled yet: "
                                     "placed as text (mixed)")
        else:
            prep.text_parts = [t for _, _, t, _, _ in chosen]
            prep.prompt = engine.tokenize(self.layout.prefix) + self._text_tokens(prep.text_parts) + q_tokens
        return prep

    def _text_tokens(self, parts: Sequence[str]) -> list[int]:
        """Memories placed as text, each tokenized as the compiler tokenizes it."""
        return [t for part in parts for t in memory_tokens(self.engine, part)]

    def _splice_system(self, ctx: Context, blob: bytes | bytearray, system: list[int]) -> tuple[bytearray, int]:
        """The client's system turn spliced after the memory in `blob`, compiled on its first use; the time
        of that compile counts in the answer's TTFT (the caller times this call)."""
        from repomem import native

        engine = self.engine
        prefix_blob, prefix_len = self._prefix_state(ctx)
        piece = self._system_pieces.payload(ctx, prefix_blob, prefix_len, system, fingerprint=self.fingerprint_bytes,
                                            encoding=self.payload_encoding)
        return native.splice(blob, [piece], mode="sequential", rope_base=engine.info.rope_base,
                             rope_dims=engine.info.rope_dims, head_dim=engine.info.head_dim,
                             rope_neox=engine.info.rope_neox, v_trans=ctx.v_trans, fingerprint=self.fingerprint_bytes,
                             verify=False, out=self._system_splice_buf)

    def ask(self, question: str, *, mode: str | None = None, conversation_id: str | None = None,
            on_text: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
            record: bool = True, sampling: SamplingParams | None = None,
            history: Sequence[tuple[str, str]] | None = None, system: str = "", allow_local: bool = True) -> Answer:
        """Answer a question from the memory.

        `history`: earlier (question, answer) turns given by the caller (an editor's chat), instead of the
        last exchanges of `conversation_id`; the oldest are left out when they do not fit. `system`: the
        caller's own instructions, read after the memory. `allow_local=False` keeps cubes under private
        paths out of retrieval (what leaves the machine through a server)."""
        question, mode = self._check_question(question, mode)
        s = self.settings
        with self._turns.question():
            if history is None:
                history = self.conversations.recent_exchanges(conversation_id) if conversation_id else []
            params = sampling or SamplingParams(temperature=s.temperature, max_tokens=s.max_answer_tokens)
            prep = self._prepare(question, mode, list(history), params.max_tokens, system=system,
                                 allow_local=allow_local)
            ans = self._generate(prep, question, mode, params, conversation_id, on_text, cancel)
            self._keep(question, ans, record=record)
            return ans

    def _generate(self, prep: _Prepared, question: str, mode: str, params: SamplingParams,
                  conversation_id: str | None, on_text: Callable[[str], None] | None,
                  cancel: threading.Event | None) -> Answer:
        gen = prep.ctx.generate(prep.prompt, start_pos=prep.start, params=params, on_text=on_text, cancel=cancel)
        return Answer(answer=gen.text.strip(), mode=mode, ttft_s=gen.ttft_s + prep.splice_s,
                      total_s=gen.total_s + prep.splice_s, memory_tokens=prep.memory_tokens, sources=prep.sources,
                      spliced=prep.spliced, as_text=len(prep.text_parts), conversation_id=conversation_id,
                      stop_reason=gen.stop_reason, warnings=prep.warnings, prompt_tokens=len(prep.prompt),
                      cached_tokens=prep.cached, spliced_tokens=prep.spliced_tokens,
                      completion_tokens=len(gen.tokens),
                      evidence=find_evidence(gen.text, question, [EvidencePiece(c.id, c.path, c.start_line, c.text)
                                                                  for c in prep.chosen], self.index_.idf))

    def _keep(self, question: str, ans: Answer, *, record: bool) -> None:
        """After an answer: its exchange into this memory's conversation (unless `record` is False or it was
        cancelled), then the promotion of what became hot."""
        if record and ans.stop_reason != "cancelled":
            self._unsaved_exchanges.append(UnsavedExchange(question, ans))
        self._save_exchanges(ans.warnings)
        self._promote_hot_quietly()

    def _promote_hot_quietly(self) -> None:
        try:
            self._promote_hot()
        except StoreError as exc:  # read-only or full: hotness waits for a writable store
            log.info("cannot promote hot memories: %s", exc)

    def score_answer(self, question: str, answer: str, *, mode: str | None = None) -> AnswerScore:
        """How the model, given this question's memory, predicts a known answer token by token (teacher forcing).

        Benchmarks use it to compare memory representations (payload encodings, placements) on the same
        answer: greedy answers flip on tiny perturbations, the per-token log-probabilities move smoothly."""
        question, mode = self._check_question(question, mode)
        with self._turns.question():
            targets = self.engine.tokenize(answer) if answer.strip() else []
            if not targets:
                raise RepomemError("the answer to score is empty")
            prep = self._prepare(question, mode, [], len(targets), touch=False)  # a measurement, not a recall
            ctx, prompt = prep.ctx, prep.prompt
            if len(targets) > ctx.n_batch:
                raise RepomemError(f"answers longer than {ctx.n_batch} tokens cannot be scored")
            ctx.decode(prompt[:-1], start_pos=prep.start, logits="none")
            # one batch from the last prompt token: output row j predicts answer token j
            ctx.decode(prompt[-1:] + targets[:-1], start_pos=prep.start + len(prompt) - 1, logits="all")
            logprobs, top1 = [], []
            for j, tok in enumerate(targets):
                z = ctx.logits(j).astype(np.float64)
                z -= z.max()
                logprobs.append(float(z[tok] - np.log(np.exp(z).sum())))
                top1.append(int(np.argmax(z)) == tok)
            return AnswerScore(logprobs=logprobs, top1=top1)

    def _check_question(self, question: str, mode: str | None) -> tuple[str, str]:
        question = whole_text(question).strip()
        if not question:
            raise RepomemError("the question is empty")
        mode = mode or self.settings.mode
        if mode not in settings_mod.MODES:
            raise RepomemError(f"unknown mode {mode!r}; use kv, text or none")
        return question, mode

    def _try_write(self, write: Callable[[], object], warnings: list[str]) -> None:
        """A bookkeeping write (usage counts, dropping a bad payload) that must not cost the user an answer."""
        try:
            write()
        except StoreError as exc:
            if str(exc) not in warnings:
                warnings.append(str(exc))
