"""The one background thread that owns every open `RepoMemory` and runs jobs on them.

Why one thread for all repositories: llama.cpp contexts and sqlite connections belong to the thread
that made them, and the machine may have two cores: two repositories compiling at once only slow
each other and the answer the user waits for. Jobs run in priority order: interactive work (ask,
inspector queries, pin/forget) comes before background compiles, and submitting interactive work
cancels a running background compile, which the GUI re-queues once the worker is free again.
"""

from __future__ import annotations

import itertools
import logging
import queue
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import QThread, QTimer

from .jobs import Job

log = logging.getLogger(__name__)

INTERACTIVE, BACKGROUND, CONTROL = 1, 5, 0


class MemoryWorker(QThread):
    """Serial executor of `Job`s; `fn(mem, job)` gets the repository's `RepoMemory` (opened lazily)."""

    def __init__(self, settings: Any) -> None:
        super().__init__()
        self.setObjectName("repomem-memory")
        self._settings = settings
        self._queue: queue.PriorityQueue[tuple[int, int, Job | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._mems: dict[str, Any] = {}  # touched only on the worker thread
        self._current: Job | None = None

    # -- GUI thread ---------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue `job` once control returns to the event loop; interactive jobs pre-empt a background compile.

        Deferred on purpose: the caller connects to the job's signals right after this returns, and
        a job that fails at once (no model) would otherwise emit before anyone listens.
        """
        self._enqueue_later(BACKGROUND if job.background else INTERACTIVE, job)
        return job

    def _enqueue_later(self, priority: int, job: Job) -> None:
        seq = next(self._seq)  # taken now: jobs keep the order in which they were submitted

        def put() -> None:
            self._queue.put((priority, seq, job))
            current = self._current
            if priority < BACKGROUND and current is not None and current.background:
                current.cancel.set()

        QTimer.singleShot(0, put)

    def _interactive_waiting(self) -> bool:
        with self._queue.mutex:
            return bool(self._queue.queue) and self._queue.queue[0][0] < BACKGROUND

    def call(self, root: str | Path | None, fn: Callable[..., Any], *, name: str = "",
             background: bool = False) -> Job:
        """Shorthand: submit `fn(mem, job)` for repository `root` (None: no repository)."""
        return self.submit(Job(fn, name=name, root=str(root) if root else None, background=background))

    def call_across(self, roots: Sequence[str], fn: Callable[..., Any], *, name: str = "") -> Job:
        """Submit `fn(mems, job)` with the memories of `roots`, in that order (a question across repositories)."""
        keys = [str(r) for r in roots]
        return self.submit(Job(lambda _mem, job: fn([self._open(k) for k in keys], job), name=name))

    def reconfigure(self, settings: Any) -> Job:
        """New settings: close every open memory so the next job reopens it with them."""
        def swap(_mem: Any, _job: Job) -> None:
            self._settings = settings
            self._close_all()

        job = Job(swap, name="reconfigure")
        self._enqueue_later(CONTROL, job)
        return job

    def forget_repo(self, root: str | Path) -> Job:
        """Close one repository's memory (it was removed from the sidebar)."""
        key = str(root)

        def close(_mem: Any, _job: Job) -> None:
            mem = self._mems.pop(key, None)
            if mem is not None:
                mem.close()

        return self.call(None, close, name="close")

    def cancel_all(self) -> None:
        current = self._current
        if current is not None:
            current.cancel.set()

    def stop(self, timeout_ms: int = 5000) -> bool:
        """Cancel what runs, drop what waits, close memories, end the thread."""
        self.cancel_all()
        try:
            while True:
                _, _, job = self._queue.get_nowait()
                if job is not None:
                    job.cancel.set()
        except queue.Empty:
            pass
        self._queue.put((-1, next(self._seq), None))
        return self.wait(timeout_ms)

    # -- worker thread ------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                break
            self._current = job
            if job.background and self._interactive_waiting():
                job.cancel.set()  # queued while this was being taken: let the question go first
            if job.cancel.is_set():
                self._current = None
                job._finish_cancelled()
                continue
            log.debug("job %s (%s) starts", job.name, job.root)
            try:
                mem = self._open(job.root) if job.root else None
            except Exception as exc:  # noqa: BLE001 - opening failed: the job fails with the reason
                job._finish_failed(str(exc) or type(exc).__name__)
            else:
                job.execute(mem)
            finally:
                log.debug("job %s ends", job.name)
                self._current = None
        self._close_all()

    def _open(self, root: str) -> Any:
        mem = self._mems.get(root)
        if mem is None:
            from repomem.core import RepoMemory

            mem = RepoMemory.open(Path(root), settings=self._settings)
            self._mems[root] = mem
        return mem

    def _close_all(self) -> None:
        for mem in self._mems.values():
            try:
                mem.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.exception("closing a repository memory failed")
        self._mems.clear()
