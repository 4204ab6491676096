"""A unit of background work whose results come back to the GUI thread as Qt signals.

Why: core calls block (model load, compile, generation) and report progress through plain Python
callbacks on the calling thread. A `Job` is created on the GUI thread, so its signals, emitted from
a worker thread, are queued and delivered on the GUI thread: widgets never see a foreign thread.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

log = logging.getLogger(__name__)


class Job(QObject):
    """Work for a worker thread: `fn(job)` (or `fn(mem, job)` on the memory worker).

    Signals: `progress(stage, done, total)`, `text(piece)` for streamed tokens, then exactly one of
    `succeeded(result)`, `cancelled()` or `failed(one-line message)`, then `finished()`.
    """

    progress = Signal(str, int, int)
    text = Signal(str)
    succeeded = Signal(object)
    cancelled = Signal()
    failed = Signal(str)
    finished = Signal()
    _retire = Signal()  # emitted after `finished`, so every slot of `finished` has run before release

    _alive: set[Job] = set()  # a queued signal to a collected Job would be dropped silently

    def __init__(self, fn: Callable[..., Any], *, name: str = "", root: str | None = None,
                 background: bool = False) -> None:
        super().__init__()
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "job")
        self.root = root
        self.background = background
        self.cancel = threading.Event()
        self.done = False
        self.result: Any = None
        self.error: str | None = None
        Job._alive.add(self)
        self._retire.connect(self._release)

    @Slot()
    def _release(self) -> None:
        """Runs on the GUI thread after every outcome signal (and every slot of `finished`) was delivered."""
        Job._alive.discard(self)

    def _end(self) -> None:
        self.finished.emit()
        self._retire.emit()

    # -- callbacks handed to core (they run on the worker thread) ------------------------------
    def report(self, stage: str, done: int, total: int) -> None:
        self.progress.emit(str(stage), int(done), int(total))

    def stream(self, piece: str) -> None:
        self.text.emit(piece)

    # -- run on the worker thread -------------------------------------------------------------
    def execute(self, *args: Any) -> None:
        """Run fn and emit the outcome; never raises (a worker thread must survive any job)."""
        from repomem.core import CancelledError, RepomemError

        try:
            self.result = self.fn(*args, self)
        except CancelledError:
            self._finish_cancelled()
            return
        except RepomemError as exc:
            self._finish_failed(str(exc) or type(exc).__name__)
            return
        except Exception as exc:  # noqa: BLE001 - reported to the user, logged with traceback
            log.error("job %s failed:\n%s", self.name, traceback.format_exc())
            self._finish_failed(f"{type(exc).__name__}: {exc}")
            return
        self.done = True
        if self.cancel.is_set() and self.result is None:
            self.cancelled.emit()
        else:
            self.succeeded.emit(self.result)
        self._end()

    def _finish_cancelled(self) -> None:
        self.done = True
        self.cancelled.emit()
        self._end()

    def _finish_failed(self, message: str) -> None:
        self.done = True
        self.error = message.strip().splitlines()[0] if message.strip() else "failed"
        self.failed.emit(self.error)
        self._end()


class _OneShot(QThread):
    def __init__(self, job: Job) -> None:
        super().__init__()
        self.job = job

    def run(self) -> None:
        self.job.execute()


_running: set[_OneShot] = set()


def run_detached(job: Job) -> Job:
    """Run a job that needs no repository memory (a model download) on a thread of its own."""
    for old in [t for t in _running if t.isFinished()]:
        _running.discard(old)  # pruned here, not from a signal: a QThread must not die while running
    thread = _OneShot(job)
    _running.add(thread)
    # Started from the event loop, after the caller has connected to the job's signals.
    QTimer.singleShot(0, thread.start)
    return job


def wait_all_detached(timeout_ms: int = 2000) -> None:
    """Let one-shot threads end before the application object goes away."""
    for thread in list(_running):
        thread.job.cancel.set()
        if thread.isRunning():
            thread.wait(timeout_ms)
