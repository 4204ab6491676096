"""What every part of `RepoMemory` may read from the facade (memory.py sets it up).

The parts (indexing.py, compiling.py, answering.py, notes.py) are mixins of `RepoMemory`; each names
here, by inheriting `MemoryState`, the shared state it works on, and declares its own private state
itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .conversations import ConversationStore
    from .engine import Engine
    from .prompt import Layout
    from .retrieval import BM25Index
    from .settings import Settings
    from .store import CubeStore


class ModelLock:
    """A re-entrant lock that can tell whether the calling thread holds it (`ModelTurns` refuses a
    background step there)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._depth += 1

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
        self._lock.release()

    def held(self) -> bool:
        return self._owner == threading.get_ident()


class ModelTurns:
    """One model operation at a time per repository, questions first.

    `lock` is held by every model operation. A question takes it with `question()`; background work
    (compiling, re-encoding) takes it one small step at a time with `background_step()`, which first
    waits while any question is waiting or running, so a question waits for at most the step under way,
    never for a whole compile queue.
    """

    def __init__(self) -> None:
        self.lock = ModelLock()
        self._cond = threading.Condition()
        self._questions = 0

    @contextmanager
    def question(self) -> Iterator[None]:
        with self._cond:
            self._questions += 1
        try:
            with self.lock:
                yield
        finally:
            with self._cond:
                self._questions -= 1
                self._cond.notify_all()

    @contextmanager
    def background_step(self) -> Iterator[None]:
        """Raises RuntimeError in a thread that holds `lock`: it would wait for a question that waits for it."""
        if self.lock.held():
            raise RuntimeError("a background step must not start while its thread holds the model lock "
                               "(a waiting question would deadlock)")
        with self._cond:
            self._cond.wait_for(lambda: self._questions == 0)
        with self.lock:
            yield


class MemoryState:
    root: Path
    store: CubeStore
    settings: Settings
    conversations: ConversationStore
    index_: BM25Index  # the search index over the store's active cubes
    _lock: ModelLock  # one model operation at a time per repository (`_turns.lock`)
    _turns: ModelTurns  # questions before background compile steps
    # the model, loaded on first use
    engine: Engine
    layout: Layout
    fingerprint: str  # what a payload must have been compiled with to be spliced here
    fingerprint_bytes: bytes
