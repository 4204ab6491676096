"""RepoMemory: one repository's memory, the facade the CLI, the GUI and the watcher share.

files -> chunks -> cubes (store) -> retrieval -> spliced context -> answer. Indexing makes every
chunk searchable as a plaintext cube at once (no model run); compilation to KV follows, hottest
first, and can stop and resume at any cube. Asking retrieves cubes with BM25 and either splices
their compiled KV (`kv`), reads their text (`text`, also the path for remote endpoints), or uses
no memory (`none`).
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import engine_pool, paths
from . import settings as settings_mod
from .chunking import chunk_text
from .compiler import CompileOptions, Compiler
from .conversations import ConversationStore
from .engine import Context, Engine, SamplingParams
from .errors import CancelledError, ContextOverflowError, RepomemError, StoreError
from .models import resolve_model
from .prompt import Layout, make_layout, memory_text
from .retrieval import BM25Index
from .store import Cube, CubeStore
from .walk import IgnoreRules, RepoFile, load_file, secret_in_text, walk_repo

log = logging.getLogger(__name__)
_PAST = re.compile(r"\b(we|us|our|decid\w*|agree\w*|discuss\w*|earlier|before|last (time|week|month)|yesterday|"
                   r"today|changed?|changes|recent\w*|said|conversation|remember)\b", re.IGNORECASE)
Progress = Callable[[str, int, int], None]  # (stage, done, total)
MAX_NOTE_CHARS = 4000


@dataclass
class Source:
    path: str
    start_line: int
    end_line: int
    symbol: str | None
    cube_id: str
    kind: str = "plaintext"
    source: str = "code"

    def as_dict(self) -> dict:
        return {"path": self.path, "start_line": self.start_line, "end_line": self.end_line,
                "symbol": self.symbol, "cube_id": self.cube_id}


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

    def as_dict(self) -> dict:
        return {"answer": self.answer, "mode": self.mode, "ttft_s": round(self.ttft_s, 4),
                "total_s": round(self.total_s, 4), "memory_tokens": self.memory_tokens,
                "sources": [s.as_dict() for s in self.sources], "spliced": self.spliced,
                "as_text": self.as_text, "conversation_id": self.conversation_id,
                "stop_reason": self.stop_reason, "warnings": self.warnings, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "spliced_tokens": self.spliced_tokens,
                "completion_tokens": self.completion_tokens}


@dataclass
class AnswerScore:
    """Teacher-forced view of one answer: log-probability of each of its tokens, and whether it was the top one."""

    logprobs: list[float]
    top1: list[bool]

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs)


@dataclass
class _Prepared:
    ctx: Context
    prompt: list[int]
    start: int
    chosen: list[Cube]
    memory_tokens: int
    spliced: int = 0
    text_parts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    splice_s: float = 0.0
    cached: int = 0  # cells restored from KV (prefix + spliced memory), not decoded
    spliced_tokens: int = 0


@dataclass
class IndexSummary:
    files: int = 0
    chunks: int = 0
    compiled: int = 0
    recoded: int = 0  # payloads brought to the configured encoding in C, without a model run
    reused: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    kept_tokens: int = 0
    payload_bytes: int = 0
    seconds: float = 0.0
    changed_paths: list[str] = field(default_factory=list)
    removed_paths: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class RepoMemory:
    """Everything repomem knows about one repository. One instance per process and repository."""

    def __init__(self, root: Path, store: CubeStore, settings: settings_mod.Settings,
                 model: str | None = None):
        self.root = root
        self.store = store
        self.settings = settings
        self.model_choice = model or settings.model or None
        self.conversations = ConversationStore(paths.repo_dir(root) / "conversations.db")
        self.index_ = BM25Index()
        self._lock = threading.RLock()  # one model operation at a time per repository
        self._engine: Engine | None = None
        self._compiler: Compiler | None = None
        self._compiler_options: CompileOptions | None = None
        self._warned_encoding = ""
        self._answer_ctx: Context | None = None
        self._layout: Layout | None = None
        self._prefix_blob: bytes | None = None
        self._splice_buf = bytearray()  # reused: a fresh few-hundred-MB buffer per question costs ~0.1 s
        self._rules: IgnoreRules | None = None
        self._stamps: dict[str, tuple[float, str, int]] = {}
        self._hashes: dict[str, tuple[tuple[int, int], str]] = {}  # rel -> ((mtime_ns, size), sha256)
        self._data_version = -1
        self.refresh()

    def refresh(self) -> int:
        """Bring the search index up to date with cubes other processes (the watcher) changed.

        A no-op unless the database changed under another connection; then only changed cubes are
        re-indexed. Returns how many were.
        """
        version = self.store.data_version()
        if version == self._data_version:
            return 0
        self._data_version = version
        stamps = self.store.cube_stamps()
        changed = 0
        for cid in set(self._stamps) - set(stamps):
            self._unindex(cid)
            changed += 1
        for cid, stamp in stamps.items():
            if self._stamps.get(cid) == stamp:
                continue
            changed += 1
            cube = self.store.get(cid)
            if cube is None or cube.status == "archived":
                self._unindex(cid)
            else:
                self._index_cube(cube)
        self._stamps = stamps
        return changed

    @classmethod
    def open(cls, root: str | Path, settings: settings_mod.Settings | None = None,
             model: str | None = None) -> RepoMemory:
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise RepomemError(f"not a folder: {root}")
        store = CubeStore.open(paths.repo_dir(root))
        return cls(root, store, settings or settings_mod.load(), model)

    # -- model ----------------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            path = resolve_model(self.model_choice)
            self._engine = engine_pool.acquire(path, None if self.settings.n_gpu_layers < 0
                                               else self.settings.n_gpu_layers)
            stale = self.store.mark_stale_for_model(self.fingerprint)
            if stale:
                log.info("%d compiled cubes belong to another model: marked stale", stale)
        return self._engine

    @property
    def fingerprint(self) -> str:
        """What a payload must have been compiled with to be spliced here: the model, and the cache type
        when it is not f16 (a q8_0 payload does not fit an f16 cache)."""
        sha = self.engine.info.sha256
        return sha if self.settings.cache_type == "f16" else f"{sha}+{self.settings.cache_type}"

    @property
    def fingerprint_bytes(self) -> bytes:
        fp = self.fingerprint
        return bytes.fromhex(fp) if len(fp) == 64 else hashlib.sha256(fp.encode()).digest()

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = make_layout(self.engine)
        return self._layout

    def release_model(self) -> None:
        """Free contexts and let the shared engine go (the watcher does this when idle)."""
        with self._lock:
            if self._compiler:
                self._compiler.close()
                self._compiler = None
            if self._answer_ctx:
                self._answer_ctx.close()
                self._answer_ctx = None
            self._prefix_blob = None
            if self._engine is not None:
                engine_pool.release(self._engine)
                self._engine = None

    def close(self) -> None:
        self.release_model()
        self.conversations.close()
        self.store.close()

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

    # -- indexing -------------------------------------------------------------------------------
    def _index_cube(self, cube: Cube) -> None:
        self.index_.update(cube.id, cube.text, cube.path, cube.symbol or "",
                           start_line=cube.start_line, end_line=cube.end_line)

    def _unindex(self, cube_id: str) -> None:
        if cube_id in self.index_:
            self.index_.remove(cube_id)

    def _visibility(self, rel: str) -> str:
        return "local" if self.is_private(rel) else "shared"

    def is_private(self, rel: str) -> bool:
        """Whether a path matches the `private_paths` setting: its memories never leave the machine."""
        return any(fnmatch.fnmatch(rel, pat) for pat in self.settings.private_paths)

    def _file_sha(self, rel: str) -> str | None:
        rec = self.store.get_file(rel)
        return rec.sha256 if rec else None

    def _ingest(self, rel: str, text: str, language: str | None, file_sha: str, summary: IndexSummary,
                record_change: bool) -> None:
        old = {c.id: c for c in self.store.cubes(path=rel, source="code")} if record_change else {}
        chunks = chunk_text(rel, text, language, max_tokens=self.settings.chunk_tokens)
        res = self.store.upsert_chunks(rel, chunks, repo=str(self.root), file_sha=file_sha,
                                       visibility=self._visibility(rel))
        summary.chunks += len(chunks)
        for cid in (*res.created, *res.updated):
            cube = self.store.get(cid)
            if cube:
                self._index_cube(cube)
        for cid in res.removed:
            self._unindex(cid)
        if res.created or res.updated or res.removed:
            summary.changed_paths.append(rel)
            if record_change and old:
                self._record_change(rel, old, res)

    def _record_change(self, rel: str, old: dict[str, Cube], res) -> None:
        """A plaintext change cube: which symbols changed and a short unified diff."""
        lines, symbols = [], []
        for cid in (*res.updated, *res.created, *res.removed):
            before = old.get(cid)
            after = self.store.get(cid)
            sym = (after or before).symbol if (after or before) else None
            symbols.append(sym or "(module)")
            a = before.text.splitlines() if before else []
            b = after.text.splitlines() if (after and cid not in res.removed) else []
            diff = list(difflib.unified_diff(a, b, lineterm="", n=1))[2:40]
            lines += diff
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
        text = (f"Change to {rel} at {when}: modified {', '.join(sorted(set(symbols)))}.\n"
                + "\n".join(lines)[:3000])
        cube = self.store.add_note_cube(text, source="change", path=f"change:{rel}",
                                        symbol=", ".join(sorted(set(symbols)))[:200], repo=str(self.root),
                                        visibility=self._visibility(rel))
        self._index_cube(cube)

    def index(self, *, compile: bool = True, progress: Progress | None = None,
              cancel: threading.Event | None = None) -> IndexSummary:
        """Walk the repository, refresh plaintext cubes of changed files, then compile what is pending."""
        t0 = time.perf_counter()
        summary = IndexSummary()
        with self._lock:
            result = walk_repo(self.root, extra_ignores=())
            summary.skipped = result.counts_by_reason()
            self.store.set_skips(result.skipped)
            seen = set()
            total = len(result.files)
            for i, f in enumerate(result.files):
                if cancel is not None and cancel.is_set():
                    raise CancelledError("indexing cancelled")
                seen.add(f.rel)
                summary.files += 1
                if self._file_sha(f.rel) == f.sha256:
                    summary.reused += 1
                    continue
                self._ingest(f.rel, f.text, f.language, f.sha256, summary, record_change=False)
                if progress:
                    progress("read", i + 1, total)
            for rel in list(self.store.files()):
                if rel not in seen:
                    for cid in self.store.remove_file(rel):
                        self._unindex(cid)
                    summary.removed_paths.append(rel)
        if compile:
            self._compile_into(summary, progress=progress, cancel=cancel)
        summary.seconds = round(time.perf_counter() - t0, 3)
        return summary

    def sync_paths(self, rel_paths: Iterable[str], *, compile: bool = True,
                   cancel: threading.Event | None = None, progress: Progress | None = None) -> IndexSummary:
        """Re-read exactly these files (changed, created or deleted), as the watcher reports them."""
        t0 = time.perf_counter()
        summary = IndexSummary()
        with self._lock:
            if self._rules is None:
                self._rules = IgnoreRules(self.root)
            for rel in dict.fromkeys(rel_paths):
                if cancel is not None and cancel.is_set():
                    break
                got = load_file(self.root, rel, rules=self._rules)
                if not isinstance(got, RepoFile):
                    # Deleted, now ignored, or no longer text: its cubes leave the memory.
                    removed = self.store.remove_file(rel)
                    for cid in removed:
                        self._unindex(cid)
                    if removed:
                        summary.removed_paths.append(rel)
                    if (self.root / rel).exists():
                        summary.skipped[got.reason] = summary.skipped.get(got.reason, 0) + 1
                    continue
                summary.files += 1
                if self._file_sha(rel) == got.sha256:
                    continue
                self._ingest(rel, got.text, got.language, got.sha256, summary, record_change=True)
        if compile and summary.changed_paths:
            self._compile_into(summary, progress=progress, cancel=cancel)
        summary.seconds = round(time.perf_counter() - t0, 3)
        return summary

    def reload_ignores(self) -> None:
        self._rules = None

    def compile_ids(self, cube_ids: Iterable[str], *, cancel: threading.Event | None = None) -> int:
        """Compile these cubes now if they lack a payload for the current model in the configured
        encoding (e.g. the ones a set of questions will retrieve), ahead of the rest of the queue."""
        with self._lock:
            fp, enc = self.fingerprint, self.payload_encoding
            cubes = [c for c in (self.store.get(i) for i in dict.fromkeys(cube_ids)) if c is not None]
            todo = [c for c in cubes if c.status != "archived"
                    and not (c.has_payload and c.status == "active" and c.model_fingerprint == fp
                             and c.encoding == enc)]
            summary = IndexSummary()
            self._compile_cubes(todo, summary, cancel=cancel)
            return summary.compiled

    def reencode(self, encoding: str | None = None, *, limit: int | None = None,
                 cancel: threading.Event | None = None) -> dict[str, int]:
        """Bring every payload to `encoding` (default: the configured one; every compile pass does this):
        f16 sources are re-encoded in C (no model run); lossy ones are compiled again from text, in the
        configured encoding. For that one a lossy payload keeps answering until the compile queue replaces
        it; for another it is dropped to text now."""
        from .recode import recode_payload

        configured = self.payload_encoding
        target = encoding or configured
        keep_lossy = target == configured
        done = {"recoded": 0, "requeued": 0}
        with self._lock:
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
                    cube = self.store.get(cid)
                    if cube is None or not cube.has_payload or cube.encoding != source:
                        continue  # changed since the listing
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
                        continue
                    rel, sha, nbytes = self.store.write_payload(data)
                    if self.store.attach_payload(cube.id, cube.content_hash, rel, sha, nbytes, cube.tokens,
                                                 cube.kept_tokens, cube.model_fingerprint or "", target):
                        done["recoded"] += 1
        return done

    def compile_pending(self, *, limit: int | None = None, progress: Progress | None = None,
                        cancel: threading.Event | None = None) -> int:
        """Compile (or re-encode) up to `limit` queued cubes, hottest first; returns how many got a new
        payload, so 0 means nothing is left."""
        summary = IndexSummary()
        self._compile_into(summary, limit=limit, progress=progress, cancel=cancel)
        return summary.compiled + summary.recoded

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
        with self._lock:
            # After a change of the encoding setting; a step of the watcher (limit 1) re-encodes one payload.
            recoded = self.reencode(limit=limit, cancel=cancel)["recoded"]
            summary.recoded += recoded
            left = None if limit is None else limit - recoded
            if left is None or left > 0:
                queue = self.store.compile_queue(self.fingerprint, limit=left, encoding=self.payload_encoding)
                self._compile_cubes(queue, summary, progress=progress, cancel=cancel)
            budget = self.settings.disk_budget_mb * 1024 * 1024
            for cid in self.store.enforce_budget(budget):
                log.info("archived %s to stay within the disk budget", cid)

    def _compile_cubes(self, queue: list[Cube], summary: IndexSummary, *, progress: Progress | None = None,
                       cancel: threading.Event | None = None) -> None:
        with self._lock:
            fp = self.fingerprint
            compiler = self._compiler_for()
            for i, cube in enumerate(queue):
                if cancel is not None and cancel.is_set():
                    break
                try:
                    piece = compiler.compile_text(memory_text(cube.path, cube.start_line, cube.end_line,
                                                              cube.symbol, cube.text), cancel=cancel)
                except CancelledError:
                    break  # nothing of this cube was written; it stays in the queue
                except RepomemError as exc:
                    # Keep one bad cube from stalling the queue: it stays searchable as text.
                    log.warning("cannot compile %s: %s", cube.location, exc)
                    self.store.archive(cube.id, reason=f"compile failed: {exc}")
                    continue
                rel, sha, nbytes = self.store.write_payload(piece.payload)
                if self.store.attach_payload(cube.id, cube.content_hash, rel, sha, nbytes, tokens=piece.tokens,
                                             kept_tokens=piece.kept, fingerprint=fp,
                                             encoding=compiler.options.encoding):
                    summary.compiled += 1
                    summary.tokens += piece.tokens
                    summary.kept_tokens += piece.kept
                    summary.payload_bytes += nbytes
                if progress:
                    progress("compile", i + 1, len(queue))

    # -- notes, change memory, freshness ----------------------------------------------------------
    def remember(self, note: str, paths: Sequence[str] = (), *, owner: str = "agent") -> Cube:
        """Keep a fact or decision as a note cube (MemOS: agents write memory too), searchable at once.

        `paths`: the files it is about (named in its text, so a question about them finds it). A note
        that looks like it holds a secret is refused, as the walk refuses such files; a note about a
        private path stays on this machine."""
        note = note.strip()
        rels = [p.strip().lstrip("./") for p in paths if p and p.strip()]
        if not note:
            raise RepomemError("the note is empty")
        if len(note) > MAX_NOTE_CHARS:
            raise RepomemError(f"the note has {len(note):,} characters; keep it under {MAX_NOTE_CHARS:,} "
                               "(a decision or a fact, not a file)")
        text = note + ("\nFiles: " + ", ".join(rels) if rels else "")
        self._refuse_secret(text)
        private = any(self.is_private(r) for r in rels)
        cube = self.store.add_note_cube(text, source="note", symbol=note.splitlines()[0][:80], repo=str(self.root),
                                        owner=owner, visibility="local" if private else "shared")
        self._index_cube(cube)
        return cube

    def edit_note(self, cube_id: str, text: str) -> Cube:
        """Replace a note's text (the memory inspector); the same secret check as `remember`."""
        if not text.strip():
            raise RepomemError("a note cannot be empty; forget it instead")
        self._refuse_secret(text)
        cube = self.store.edit_note(cube_id, text)
        if cube is None:
            raise RepomemError(f"no note with id {cube_id}")
        self._index_cube(cube)
        return cube

    def forget_note(self, cube_id: str) -> None:
        """Delete a note cube now. Memories of code come and go with their files, so only notes go here."""
        cube = self.store.get(cube_id)
        if cube is None:
            raise RepomemError(f"no memory with id {cube_id}")
        if cube.source != "note":
            raise RepomemError(f"{cube_id} is a {cube.source} memory, not a note; only notes can be forgotten "
                               "here (exclude a file with .repomemignore)")
        self.store.forget(cube_id)
        self._unindex(cube_id)

    @staticmethod
    def _refuse_secret(text: str) -> None:
        kind = secret_in_text(text)
        if kind:
            raise RepomemError(f"the note looks like it holds a secret ({kind}); secrets never become memory: "
                               "remove it and try again")

    def changes_since(self, since: float, *, limit: int = 50, allow_local: bool = True) -> list[Cube]:
        """Change notes (which file, which symbols, a short diff) recorded at or after `since` (Unix
        seconds), newest first; `allow_local=False` leaves out changes to private paths."""
        out = []
        for cube in self.store.notes_since("change", since):
            rel = cube.path.removeprefix("change:")
            if not allow_local and (cube.visibility == "local" or self.is_private(rel)):
                continue
            out.append(cube)
            if len(out) >= limit:
                break
        return out

    def file_is_current(self, rel: str) -> bool:
        """Whether a file still has the content it was indexed with (False: edited since, deleted, or
        never indexed). A stat per call; the file is hashed again only when its size or mtime moved."""
        rec = self.store.get_file(rel)
        if rec is None:
            return False
        path = self.root / rel
        try:
            st = path.stat()
            key = (st.st_mtime_ns, st.st_size)
            seen = self._hashes.get(rel)
            if seen is None or seen[0] != key:
                seen = (key, hashlib.sha256(path.read_bytes()).hexdigest())
                self._hashes[rel] = seen
        except OSError:
            return False
        return seen[1] == rec.sha256

    def stale_files(self) -> list[str]:
        """Indexed files whose content changed since (the watcher has not synced them yet)."""
        return [rel for rel in self.store.files() if not self.file_is_current(rel)]

    # -- asking ---------------------------------------------------------------------------------
    def search(self, query: str, k: int = 5, *, allow_local: bool = True) -> list[Cube]:
        """Top-k active cubes. Conversation and change notes rank below code and notes unless the question
        asks about the past ("what did we decide", "what changed"): an old answer, right or wrong, should
        not crowd out the code it was about. `allow_local=False` leaves out cubes under private paths."""
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
        return [c for _, c in scored[:k]]

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
            self.store.archive(cube.id, reason=f"unusable payload: {exc}")
            self.store.promote(cube.id)
            return None

    def _prepare(self, question: str, mode: str, history: list[tuple[str, str]], extra_tokens: int, *,
                 touch: bool = True, system: str = "", allow_local: bool = True) -> _Prepared:
        """Retrieve, then lay out the memory in the answer context: spliced KV (kv) or decoded text (text).

        Returns the context and the tokens still to decode at `start`. `extra_tokens`: room to leave after
        them (the answer). `touch`: count this as a recall of the chosen cubes (their hotness). The oldest
        history turns are left out when they do not fit. Caller holds self._lock."""
        s = self.settings
        engine = self.engine
        q_tokens = engine.tokenize(self.layout.question_text(question, history, system))
        n_prefix = len(engine.tokenize(self.layout.prefix))
        dropped = 0
        while history and s.n_ctx - n_prefix - len(q_tokens) - extra_tokens < 0:
            history, dropped = history[1:], dropped + 1
            q_tokens = engine.tokenize(self.layout.question_text(question, history, system))
        room = s.n_ctx - n_prefix - len(q_tokens) - extra_tokens
        if room < 0:
            raise ContextOverflowError(
                f"the question needs {len(q_tokens):,} tokens and the context holds {s.n_ctx:,}; "
                "shorten it or raise the context size")
        cubes = self.search(question, k=s.top_k, allow_local=allow_local) if mode != "none" else []
        budget = min(s.memory_tokens, room)
        # Boosted memories take their cells twice in the context, not twice from the memory budget.
        boost = s.boost_top if mode == "kv" and s.placement == "parallel" else 0
        chosen: list[tuple[Cube, str, int, int]] = []  # cube, its text, its tokens, copies if spliced
        used = cells = 0
        for cube in cubes:
            text = memory_text(cube.path, cube.start_line, cube.end_line, cube.symbol, cube.text)
            n = cube.tokens or len(engine.tokenize(text))
            copies = 2 if len(chosen) < boost and cells + 2 * n <= room else 1
            if used + n > budget or cells + copies * n > room:
                continue
            chosen.append((cube, text, n, copies))
            used += n
            cells += copies * n
        if touch:
            self.store.touch([c.id for c, _, _, _ in chosen])
        ctx = self._answer_context(n_prefix + cells + len(q_tokens) + extra_tokens)
        prep = _Prepared(ctx=ctx, prompt=[], start=0, chosen=[c for c, _, _, _ in chosen], memory_tokens=used)
        if dropped:
            prep.warnings.append(f"{dropped} earliest turn(s) of the conversation left out to fit the context")
        ctx.clear()
        if mode == "kv":
            from repomem import native

            prefix_blob, _ = self._prefix_state(ctx)
            payloads, repeat = [], []
            for cube, text, n, copies in chosen:
                buf = None
                if cube.kind == "activation" and cube.model_fingerprint == self.fingerprint:
                    buf = self._load_payload(cube, prep.warnings)
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
            ctx.state_set(blob)
            prep.splice_s = time.perf_counter() - t_splice
            prep.prompt = (engine.tokenize("".join(prep.text_parts)) + q_tokens) if prep.text_parts else q_tokens
            prep.start = prep.cached = next_pos
            if prep.text_parts:
                prep.warnings.append(f"{len(prep.text_parts)} of {len(chosen)} memories are not compiled yet: "
                                     "placed as text (mixed)")
        else:
            prep.text_parts = [t for _, t, _, _ in chosen]
            prep.prompt = engine.tokenize(self.layout.prefix + "".join(prep.text_parts)) + q_tokens
        return prep

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
        with self._lock:
            if history is None:
                history = self.conversations.exchanges(conversation_id)[-3:] if conversation_id else []
            params = sampling or SamplingParams(temperature=s.temperature, max_tokens=s.max_answer_tokens)
            prep = self._prepare(question, mode, list(history), params.max_tokens, system=system,
                                 allow_local=allow_local)
            gen = prep.ctx.generate(prep.prompt, start_pos=prep.start, params=params, on_text=on_text,
                                    cancel=cancel)
            sources = [Source(c.path, c.start_line, c.end_line, c.symbol, c.id, c.kind, c.source)
                       for c in prep.chosen]
            ans = Answer(answer=gen.text.strip(), mode=mode, ttft_s=gen.ttft_s + prep.splice_s,
                         total_s=gen.total_s + prep.splice_s, memory_tokens=prep.memory_tokens, sources=sources,
                         spliced=prep.spliced, as_text=len(prep.text_parts), conversation_id=conversation_id,
                         stop_reason=gen.stop_reason, warnings=prep.warnings, prompt_tokens=len(prep.prompt),
                         cached_tokens=prep.cached, spliced_tokens=prep.spliced_tokens,
                         completion_tokens=len(gen.tokens))
            if record and gen.stop_reason != "cancelled":
                self._remember_exchange(question, ans)
            self._promote_hot()
            return ans

    def score_answer(self, question: str, answer: str, *, mode: str | None = None) -> AnswerScore:
        """How the model, given this question's memory, predicts a known answer token by token (teacher forcing).

        Benchmarks use it to compare memory representations (payload encodings, placements) on the same
        answer: greedy answers flip on tiny perturbations, the per-token log-probabilities move smoothly."""
        question, mode = self._check_question(question, mode)
        with self._lock:
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
        question = question.strip()
        if not question:
            raise RepomemError("the question is empty")
        mode = mode or self.settings.mode
        if mode not in settings_mod.MODES:
            raise RepomemError(f"unknown mode {mode!r}; use kv, text or none")
        return question, mode

    def _remember_exchange(self, question: str, ans: Answer) -> None:
        """Conversation memory: the exchange becomes a plaintext cube a later session can retrieve."""
        if ans.conversation_id is None:
            ans.conversation_id = self.conversations.create(question[:60]).id
        cid = ans.conversation_id
        self.conversations.add(cid, "user", question)
        self.conversations.add(cid, "assistant", ans.answer,
                               {"sources": [s.as_dict() for s in ans.sources], "mode": ans.mode,
                                "ttft_s": ans.ttft_s})
        files = sorted({s.path for s in ans.sources if s.source == "code"})
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
        text = f"Conversation on {when}.\nQuestion: {question}\nAnswer: {ans.answer}\n"
        if files:
            text += "Files: " + ", ".join(files) + "\n"
        cube = self.store.add_note_cube(text, source="conversation", path=f"conversation:{cid}",
                                        symbol=question[:80], repo=str(self.root))
        self._index_cube(cube)

    def _promote_hot(self) -> None:
        """MemOS lifecycle: plaintext memories recalled often are queued for compilation (hot -> KV)."""
        for cube in self.store.promote_candidates(self.settings.promote_after):
            self.store.promote(cube.id)
