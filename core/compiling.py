"""Compiling, one part of `RepoMemory`: the compile queue (plaintext -> KV payloads, hottest first) and
re-encoding payloads to the configured encoding.

`compile_pending` first brings existing payloads to the configured `encoding` (f16 ones in C, lossy
ones compiled again from text while they keep answering), gives cubes whose text came back (a branch
switched back to) their shelved payload without a model run, then compiles queued cubes. The disk budget
holds at every step: before a payload is written, room is made by dropping shelved payloads and archiving
colder cubes; a cube for which no room can be made stays text (archived for the budget). Each step's
speed feeds the compile rate the ETA is computed from (`CompileRate`, stored for other processes).
`_promote_hot` is the MemOS lifecycle step that queues plaintext memories recalled often (hot -> KV).

Reads from the facade: `store`, `settings`, `engine`, `layout`, `fingerprint`, `fingerprint_bytes`,
`_lock`, `_turns` (one cube per background step), `_compiler`, `_compiler_options`, `_warned_encoding`,
`_rate`, `_gc_due`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import settings as settings_mod
from .chunking import estimate_tokens
from .compiler import CompileOptions, Compiler
from .cube import Cube
from .errors import CancelledError, RepomemError, StoreError
from .indexing import IndexSummary, Progress
from .memory_state import MemoryState
from .prompt import memory_text

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)

RATE_SAVE_S = 10.0  # how often the measured compile rate is written to the store
GC_EVERY_S = 600.0  # how often a compile pass looks for payload files nothing refers to (crash leftovers)


class CompileRate:
    """This process's recent compile steps: tokens per second and payload bytes per token."""

    STEPS = 32

    def __init__(self) -> None:
        self._steps: deque[tuple[int, float, int]] = deque(maxlen=self.STEPS)  # (tokens, seconds, bytes)
        self._saved = 0.0

    def add(self, tokens: int, seconds: float, nbytes: int) -> None:
        self._steps.append((tokens, seconds, nbytes))

    @property
    def tokens_per_s(self) -> float | None:
        tokens, seconds = sum(s[0] for s in self._steps), sum(s[1] for s in self._steps)
        return tokens / seconds if tokens and seconds > 0 else None

    def bytes_for(self, tokens: int) -> int:
        """The payload size `tokens` tokens are likely to compile to (0 before any step)."""
        done = sum(s[0] for s in self._steps)
        return round(tokens * sum(s[2] for s in self._steps) / done) if done else 0

    def save_due(self) -> bool:
        now = time.monotonic()
        if self.tokens_per_s is None or now - self._saved < RATE_SAVE_S:
            return False
        self._saved = now
        return True


class CompilingMixin(MemoryState):
    _compiler: Compiler | None
    _compiler_options: CompileOptions | None
    _warned_encoding: str
    _engine: Engine | None
    _rate: CompileRate
    _gc_due: float  # monotonic time of the next look for unreferenced payload files

    @property
    def payload_encoding(self) -> str:
        """The encoding new payloads get: the setting, except raw rows for a quantized cache (encodings
        quantize f16 rows) and q4 where the model's value rows do not split into Hadamard blocks."""
        s = self.settings
        if s.cache_type != "f16":
            return "raw"
        from repomem import native

        width = self.engine.info.n_embd_v_gqa
        if not native.encoding_fits(s.encoding, width):
            if self._warned_encoding != s.encoding:
                self._warned_encoding = s.encoding
                log.warning("%s needs value rows in blocks of %d; this model's are %d wide: using q4",
                            s.encoding, native.HADAMARD_BLOCK, width)
            return "q4"
        return s.encoding

    def compile_options(self) -> CompileOptions:
        s = self.settings
        return CompileOptions(policy=s.keep_policy, keep_ratio=s.keep_ratio, drop_sinks=s.drop_sinks,
                              encoding=self.payload_encoding, cache_type=s.cache_type,
                              n_threads=s.n_threads or None)

    def compile_ids(self, cube_ids: Iterable[str], *, cancel: threading.Event | None = None) -> int:
        """Compile these cubes now if they lack a payload for the current model in the configured
        encoding (e.g. the ones a set of questions will retrieve), ahead of the rest of the queue."""
        with self._lock:
            fp, enc = self.fingerprint, self.payload_encoding
        summary = IndexSummary()
        self._reuse_shelved(fp, enc, summary)
        cubes = [c for c in (self.store.get(i) for i in dict.fromkeys(cube_ids)) if c is not None]
        todo = [c for c in cubes if c.status != "archived"
                and not (c.has_payload and c.status == "active" and c.model_fingerprint == fp
                         and c.encoding == enc)]
        self._compile_cubes(todo, summary, cancel=cancel)
        return summary.compiled

    def reencode(self, encoding: str | None = None, *, limit: int | None = None,
                 cancel: threading.Event | None = None) -> dict[str, int]:
        """Bring every payload to `encoding` (default: the configured one; every compile pass does this):
        f16 sources are re-encoded in C (no model run); lossy ones are compiled again from text, in the
        configured encoding. For that one a lossy payload keeps answering until the compile queue replaces
        it; for another it is dropped to text now."""

        with self._lock:
            configured = self.payload_encoding
        target = encoding or configured
        keep_lossy = target == configured
        done = {"recoded": 0, "requeued": 0}
        for source, ids in self.store.payloads_by_encoding().items():
            if source == target:
                continue
            # A lossy tag is known without reading the payload (compile passes run this often).
            lossy = source in settings_mod.ENCODINGS and source != "f16"
            if lossy and keep_lossy:
                done["requeued"] += len(ids)
                continue
            for cid in ids:
                if (cancel is not None and cancel.is_set()) or (limit is not None and done["recoded"] >= limit):
                    return done
                with self._turns.background_step():
                    self._reencode_one(cid, source, target, lossy, keep_lossy, done)
        return done

    def _reencode_one(self, cid: str, source: str, target: str, lossy: bool, keep_lossy: bool,
                      done: dict[str, int]) -> None:
        from .recode import recode_payload

        cube = self.store.get(cid)
        if cube is None or not cube.has_payload or cube.encoding != source:
            return  # changed since the listing
        data = None
        if not lossy:
            try:
                data = recode_payload(self.store.read_payload(cube, verify=False), target)
            except (StoreError, ValueError):
                pass
        if data is None:
            # Lossy or unreadable source: compile it again from its text.
            if not keep_lossy:
                self.store.archive(cube.id, reason=f"re-encode {cube.encoding} -> {target}")
                self.store.promote(cube.id)
            done["requeued"] += 1
            return
        sha, nbytes = self.store.write_payload(data)
        if self.store.attach_payload(cube.id, cube.content_hash, sha, nbytes, cube.tokens,
                                     cube.kept_tokens, cube.model_fingerprint or "", target):
            done["recoded"] += 1

    def next_compile_path(self) -> str | None:
        """The file of the cube `compile_pending` takes next from the queue (None when it is empty)."""
        queue = self.store.compile_queue(self.fingerprint, limit=1, encoding=self.payload_encoding)
        return queue[0].path if queue else None

    def compile_pending(self, *, limit: int | None = None, progress: Progress | None = None,
                        cancel: threading.Event | None = None) -> int:
        """Compile (or re-encode) up to `limit` queued cubes, hottest first; returns how many left the queue
        (with a new payload, or as text: they failed to compile or did not fit the disk budget), so 0 means
        nothing is left."""
        summary = IndexSummary()
        self._compile_into(summary, limit=limit, progress=progress, cancel=cancel)
        return summary.compiled + summary.recoded + summary.payloads_reused + summary.kept_as_text

    def compile_backlog(self) -> dict[str, int | float | None]:
        """What is left to compile: {cubes, tokens (estimated), tokens_per_s, eta_s} (see
        `CubeStore.compile_backlog`); exact for the loaded model, and without one no model is loaded just
        to count."""
        if self._engine is None:
            backlog = self.store.compile_backlog()
        else:
            with self._lock:
                fp, enc = self.fingerprint, self.payload_encoding
            backlog = self.store.compile_backlog(fp, enc)
        rate = round(self._rate.tokens_per_s or 0.0, 1)
        if rate:  # this process's own steps are fresher than the stored rate
            backlog.update(tokens_per_s=rate, eta_s=round(backlog["tokens"] / rate, 1))
        return backlog

    def _compiler_for(self) -> Compiler:
        options = self.compile_options()
        if self._compiler is not None and self._compiler_options != options:  # settings changed
            self._compiler.close()
            self._compiler = None
        if self._compiler is None:
            self._compiler = Compiler(self.engine, self.layout, options, fingerprint=self.fingerprint_bytes)
            self._compiler_options = options
        return self._compiler

    def _compile_into(self, summary: IndexSummary, *, limit: int | None = None, progress: Progress | None = None,
                      cancel: threading.Event | None = None) -> None:
        """Re-encode, reuse shelved payloads, then compile the queue, one cube per `background_step` (a
        question goes first)."""
        # After a change of the encoding setting; a step of the watcher (limit 1) re-encodes one payload.
        recoded = self.reencode(limit=limit, cancel=cancel)["recoded"]
        summary.recoded += recoded
        left = None if limit is None else limit - recoded
        if left is None or left > 0:
            with self._lock:
                fp, enc = self.fingerprint, self.payload_encoding
            self._reuse_shelved(fp, enc, summary)
            queue = self.store.compile_queue(fp, limit=left, encoding=enc)
            self._compile_cubes(queue, summary, progress=progress, cancel=cancel)
        for cid in self.store.enforce_budget(self._budget_bytes()):  # the budget may have been lowered
            log.info("archived %s to stay within the disk budget", cid)
        if time.monotonic() >= self._gc_due:
            self._gc_due = time.monotonic() + GC_EVERY_S
            try:
                self.store.gc_payloads()
            except StoreError as exc:
                log.warning("cannot delete unreferenced payloads: %s", exc)

    def _budget_bytes(self) -> int:
        return self.settings.disk_budget_mb * 1024 * 1024

    def _reuse_shelved(self, fp: str, enc: str, summary: IndexSummary) -> None:
        reused = self.store.reuse_shelved(fp, enc)
        if reused:
            log.info("%d cube(s) got their shelved payload back (their text came back)", len(reused))
        summary.payloads_reused += len(reused)

    def _compile_cubes(self, queue: list[Cube], summary: IndexSummary, *, progress: Progress | None = None,
                       cancel: threading.Event | None = None) -> None:
        for i, cube in enumerate(queue):
            if cancel is not None and cancel.is_set():
                break
            with self._turns.background_step():
                if not self._compile_one(cube, summary, cancel):
                    break
            if progress:
                progress("compile", i + 1, len(queue))

    def _compile_one(self, cube: Cube, summary: IndexSummary, cancel: threading.Event | None) -> bool:
        """Compile one cube within the disk budget (caller holds the lock); False when cancelled."""
        text = memory_text(cube.path, cube.start_line, cube.end_line, cube.symbol, cube.text)
        held = cube.payload_bytes or 0  # a payload being replaced frees its room when the new one lands
        if not self._room_for(cube, self._rate.bytes_for(estimate_tokens(text)) - held):
            summary.kept_as_text += 1  # known before compiling: no model run for a payload that could not be kept
            return True
        compiler = self._compiler_for()  # again each step: the model may have been released meanwhile
        t0 = time.perf_counter()
        try:
            piece = compiler.compile_text(text, cancel=cancel)
        except CancelledError:
            return False  # nothing of this cube was written; it stays in the queue
        except RepomemError as exc:
            # Keep one bad cube from stalling the queue: it stays searchable as text.
            log.warning("cannot compile %s: %s", cube.location, exc)
            self.store.archive(cube.id, reason=f"compile failed: {exc}")
            summary.kept_as_text += 1
            return True
        nbytes = len(piece.payload)
        if not self._room_for(cube, nbytes - held):
            summary.kept_as_text += 1
            return True
        sha, nbytes = self.store.write_payload(piece.payload)
        if self.store.attach_payload(cube.id, cube.content_hash, sha, nbytes, tokens=piece.tokens,
                                     kept_tokens=piece.kept, fingerprint=self.fingerprint,
                                     encoding=compiler.options.encoding):
            summary.compiled += 1
            summary.tokens += piece.tokens
            summary.kept_tokens += piece.kept
            summary.payload_bytes += nbytes
        self._rate.add(piece.tokens, time.perf_counter() - t0, nbytes)
        if self._rate.save_due():
            try:
                self.store.record_compile_rate(self._rate.tokens_per_s or 0.0)
            except StoreError as exc:
                log.warning("cannot record the compile rate: %s", exc)
        return True

    def _room_for(self, cube: Cube, incoming: int) -> bool:
        """Make room for `incoming` more payload bytes for `cube` within the disk budget (archiving colder
        cubes); when there is none, the cube stays text, out of the compile queue until it is promoted."""
        fits, archived = self.store.make_room(max(0, incoming), self._budget_bytes(), for_cube=cube)
        for cid in archived:
            log.info("archived %s to make room within the disk budget", cid)
        if not fits:
            log.info("no room within the disk budget for %s: it stays text", cube.location)
            self.store.archive(cube.id, reason="budget")
        return fits

    def _promote_hot(self) -> None:
        """MemOS lifecycle: plaintext memories recalled often are queued for compilation (hot -> KV)."""
        for cube in self.store.promote_candidates(self.settings.promote_after):
            self.store.promote(cube.id)
