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
import threading
from pathlib import Path

from . import engine_pool, paths
from . import settings as settings_mod
from .answering import Answer, AnsweringMixin, AnswerScore, Source
from .compiler import CompileOptions, Compiler
from .compiling import CompilingMixin
from .conversations import ConversationStore
from .engine import Context, Engine
from .errors import RepomemError
from .indexing import IndexingMixin, IndexSummary
from .models import resolve_model
from .notes import NotesMixin
from .prompt import Layout, make_layout
from .retrieval import BM25Index
from .store import CubeStore
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
        self.conversations = ConversationStore.in_folder(paths.repo_dir(root))
        self.index_ = BM25Index()
        self._lock = threading.RLock()  # one model operation at a time per repository
        self._engine: Engine | None = None
        self._compiler: Compiler | None = None
        self._compiler_options: CompileOptions | None = None
        self._warned_encoding = ""
        self._answer_ctx: Context | None = None
        self._layout: Layout | None = None
        self._prefix_blob: bytes | None = None
        self._splice_buf = bytearray()  # reused: a fresh few-hundred-MB buffer per question costs page faults
        self._rules: IgnoreRules | None = None
        self._stamps: dict[str, tuple[float, str, int]] = {}
        self._data_version = -1
        self.refresh()

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
