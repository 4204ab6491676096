"""RepoMemory: one repository's memory, the facade the CLI, the GUI, the servers and the watcher share.

files -> chunks -> cubes (store) -> retrieval -> spliced context -> answer. The facade owns the state
(store, settings, the shared engine, contexts) and the model; its behaviour comes in parts that each
read alone:

* indexing.py: files -> plaintext cubes and the search index (`index`, `sync_paths`, `refresh`);
* compiling.py: the compile queue and re-encoding (`compile_pending`, `compile_ids`, `reencode`);
* answering.py: retrieval and answers (`search`, `ask`, `score_answer`);
* notes.py: change notes and conversation memory.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import threading
from pathlib import Path

from . import engine_pool, paths
from . import settings as settings_mod
from .answering import Answer, AnsweringMixin, AnswerScore, Source
from .compiler import CompileOptions, Compiler
from .compiling import CompileRate, CompilingMixin
from .conversations import ConversationStore
from .engine import Context, Engine
from .errors import RepomemError, StoreDamagedError, StoreError, storage_error
from .indexing import IndexingMixin, IndexSummary
from .memory_state import ModelTurns
from .models import resolve_model
from .notes import NotesMixin, UnsavedExchange
from .prompt import Layout, make_layout
from .retrieval import BM25Index
from .search_index import OpenReport, SearchIndex
from .store import CubeStore
from .system_piece import SystemPieces
from .walk import IgnoreRules

__all__ = ["Answer", "AnswerScore", "IndexSummary", "RepoMemory", "Source"]

log = logging.getLogger(__name__)


class RepoMemory(IndexingMixin, CompilingMixin, AnsweringMixin, NotesMixin):
    """Everything repomem knows about one repository. One instance per process and repository."""

    def __init__(self, root: Path, store: CubeStore, settings: settings_mod.Settings,
                 model: str | None = None):
        self.root = root
        self.store = store
        self.settings = settings
        self.model_choice = model or settings.model or None
        try:
            self.conversations = ConversationStore.in_folder(paths.repo_dir(root))
        except StoreDamagedError as exc:
            store.close()
            raise StoreDamagedError(str(exc).replace("<repository>", shlex.quote(str(root)))) from exc
        self._search = SearchIndex.open(store)  # the saved index, brought up to date with the store
        self._turns = ModelTurns()  # questions first; compiles go one cube at a time
        self._lock = self._turns.lock  # one model operation at a time per repository
        self._engine: Engine | None = None
        self._ready_engine: Engine | None = None  # set once the payloads were checked against it
        self._engine_lock = threading.RLock()
        self._compiler: Compiler | None = None
        self._compiler_options: CompileOptions | None = None
        self._warned_encoding = ""
        self._rate = CompileRate()
        self._gc_due = 0.0  # the first compile pass looks for payload files nothing refers to
        self._answer_ctx: Context | None = None
        self._layout: Layout | None = None
        self._prefix_blob: bytes | None = None
        self._splice_buf = bytearray()  # reused: a fresh few-hundred-MB buffer per question costs page faults
        self._system_pieces = SystemPieces()  # clients' system messages, compiled for this model
        self._system_splice_buf = bytearray()
        self._rules: IgnoreRules | None = None
        self._unsaved_exchanges: list[UnsavedExchange] = []
        self._hashes: dict[str, tuple[tuple[int, int], str]] = {}  # rel -> ((mtime_ns, size), sha256)

    @property
    def index_(self) -> BM25Index:
        """The BM25 index over the live cubes (see `search_index.SearchIndex`)."""
        return self._search.bm25

    @property
    def index_report(self) -> OpenReport:
        """How this process got its search index: opened from the saved file or rebuilt, and why."""
        return self._search.report

    @classmethod
    def open(cls, root: str | Path, settings: settings_mod.Settings | None = None,
             model: str | None = None) -> RepoMemory:
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise RepomemError(f"not a folder: {root}")
        try:
            store_dir = paths.repo_dir(root)
        except OSError as exc:
            raise storage_error(exc, "cannot create this repository's memory folder", paths.home()) from exc
        try:
            store = CubeStore.open(store_dir)
        except StoreDamagedError as exc:
            raise StoreDamagedError(str(exc).replace("<repository>", shlex.quote(str(root)))) from exc
        return cls(root, store, settings or settings_mod.load(), model)

    # -- model ----------------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        ready = self._ready_engine
        if ready is not None:
            return ready
        # The watcher asks outside the model lock: one thread loads, the others wait until the payloads
        # are checked against the model (re-entrant: the checks below read the engine themselves).
        with self._engine_lock:
            if self._engine is None:
                self._load_engine()
            return self._engine

    def _load_engine(self) -> None:
        """Caller holds `_engine_lock`."""
        path = resolve_model(self.model_choice)
        self._engine = engine_pool.acquire(path, None if self.settings.n_gpu_layers < 0
                                           else self.settings.n_gpu_layers)
        try:
            stale = self.store.mark_stale_for_model(self.fingerprint)
        except StoreError as exc:  # read-only or full: payloads are checked against the model anyway
            log.warning("cannot mark other models' payloads stale: %s", exc)
            stale = 0
        if stale:
            log.info("%d compiled cubes belong to another model: marked stale", stale)
        prefix_sha = hashlib.sha256(self.layout.prefix.encode()).hexdigest()
        try:
            dropped = self.store.check_prefix(self.fingerprint, prefix_sha)
        except StoreError as exc:
            log.warning("cannot check the payloads' prompt prefix: %s", exc)
            dropped = 0
        if dropped:
            log.info("%d compiled cubes were compiled after other instructions: compiling them again", dropped)
        self._ready_engine = self._engine

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
            self._system_pieces.clear()
            with self._engine_lock:
                if self._engine is not None:
                    engine_pool.release(self._engine)
                    self._engine = self._ready_engine = None

    def close(self) -> None:
        self.release_model()
        if not self._save_exchanges([]):
            for ex in self._unsaved_exchanges:  # the last place they can still be read
                log.error("exchange not saved (the data home cannot be written): Q: %s A: %s",
                          ex.question, ex.answer.answer)
        self._search.close()
        self.conversations.close()
        self.store.close()
