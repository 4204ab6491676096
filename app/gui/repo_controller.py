"""Keeps each repository's memory current and its state visible: index, compile, watcher, counters.

Why this lives apart from the window: it is the app's background life. Adding a repository indexes
it as plaintext at once (searchable in seconds), then compiles to KV in the background: by the
repository's watcher process when one runs (it survives the window), else by the app's own memory
worker at background priority, where any question pre-empts it. Counters come from the store on
short-lived threads, watcher state from its status file, so nothing here waits on the model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from . import memory_ops as ops
from . import watch_control
from .jobs import Job, run_detached
from .memory_worker import MemoryWorker
from .repo_sidebar import RepoSidebar, RepoState

POLL_MS = 2000
STATS_MIN_INTERVAL_S = 1.5


class RepoController(QObject):
    ready = Signal(str)  # plaintext index done: the repository can be asked
    compile_idle = Signal(str)  # nothing left to compile (by this app)
    stats_changed = Signal(str)
    error = Signal(str)

    def __init__(self, worker: MemoryWorker, stores: ops.StoreAccess, sidebar: RepoSidebar, *,
                 watch: bool = True, background_compile: bool = True, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.worker, self.stores, self.sidebar = worker, stores, sidebar
        self.watch = watch
        self.background_compile = background_compile
        self.ready_roots: set[str] = set()
        self._compile_jobs: dict[str, Job] = {}
        self._index_jobs: dict[str, Job] = {}
        self._watchers: dict[str, dict[str, Any]] = {}
        self._stats_at: dict[str, float] = {}
        self._closing = False
        self._poll = QTimer(self)
        self._poll.setInterval(POLL_MS)
        self._poll.timeout.connect(self._poll_watchers)
        self._poll.start()

    # -- repositories --------------------------------------------------------------------------
    def add(self, path: str | Path) -> str:
        """Show the repository, index it (plaintext first), then compile and watch. Returns its root."""
        root = str(Path(path).expanduser().resolve())
        if not Path(root).is_dir():
            raise NotADirectoryError(f"not a folder: {root}")
        if root not in self.sidebar.states:
            self.sidebar.set_state(RepoState(root))
        self.refresh_stats(root, force=True)
        self.index(root)
        if self.watch:
            self._start_watcher(root)
        return root

    def remove(self, root: str) -> None:
        for jobs in (self._compile_jobs, self._index_jobs):
            job = jobs.pop(root, None)
            if job is not None:
                job.cancel.set()
        self.ready_roots.discard(root)
        if self.watch and self._watcher_running(root):
            run_detached(Job(lambda _job, r=root: watch_control.stop(r), name="stop watcher", root=root))
        self._watchers.pop(root, None)
        self.sidebar.remove(root)
        self.worker.forget_repo(root)
        self.stores.close(root)

    def index(self, root: str) -> Job:
        if root in self._index_jobs:
            return self._index_jobs[root]
        self._set(root, activity="indexing", done=0, total=0, error="")
        job = self.worker.call(root, ops.index_plaintext, name="index")
        self._index_jobs[root] = job
        job.progress.connect(lambda stage, d, t, r=root: self._progress(r, "indexing", d, t))
        job.succeeded.connect(lambda _summary, r=root: self._indexed(r))
        job.failed.connect(lambda msg, r=root: self._failed(r, msg))
        job.cancelled.connect(lambda r=root: self._set(r, activity=""))
        job.finished.connect(lambda r=root: self._index_jobs.pop(r, None))
        return job

    def shutdown(self) -> None:
        self._closing = True
        self._poll.stop()
        for job in (*self._compile_jobs.values(), *self._index_jobs.values()):
            job.cancel.set()

    # -- compile -------------------------------------------------------------------------------
    def schedule_compile(self, root: str) -> Job | None:
        """Compile pending cubes on the app's worker unless the repository's watcher does it."""
        if self._closing or not self.background_compile or root not in self.sidebar.states:
            return None
        if self._watcher_running(root):
            return None
        if root in self._compile_jobs:
            return self._compile_jobs[root]
        job = self.worker.call(root, ops.compile_pending, name="compile", background=True)
        self._compile_jobs[root] = job
        job.progress.connect(lambda stage, d, t, r=root: self._progress(r, "compiling", d, t))
        job.succeeded.connect(lambda _n, r=root: self._compiled(r))
        job.failed.connect(lambda msg, r=root: self._failed(r, f"compile: {msg}"))
        job.cancelled.connect(lambda r=root: self._preempted(r))
        job.finished.connect(lambda r=root, j=job: self._compile_jobs.pop(r, None)
                             if self._compile_jobs.get(r) is j else None)
        return job

    def _preempted(self, root: str) -> None:
        """A question pre-empted the compile: queue the rest again (it runs once the worker is free)."""
        self._compile_jobs.pop(root, None)
        self._set(root, activity="")
        if not self._closing and root in self.sidebar.states:
            QTimer.singleShot(0, lambda r=root: self.schedule_compile(r))

    def _compiled(self, root: str) -> None:
        if self._closing:
            return
        self._set(root, activity="")
        self.refresh_stats(root, force=True)
        self.compile_idle.emit(root)

    # -- state -----------------------------------------------------------------------------------
    def _indexed(self, root: str) -> None:
        if self._closing:
            return
        self.ready_roots.add(root)
        self._set(root, activity="")
        self.refresh_stats(root, force=True)
        self.ready.emit(root)
        self.schedule_compile(root)

    def _failed(self, root: str, message: str) -> None:
        if self._closing:
            return
        self._set(root, activity="", error=message)
        self.error.emit(f"{Path(root).name}: {message}")

    def _progress(self, root: str, activity: str, done: int, total: int) -> None:
        self._set(root, activity=activity, done=done, total=total)
        self.refresh_stats(root)

    def _set(self, root: str, **changes: Any) -> None:
        state = None if self._closing else self.sidebar.states.get(root)
        if state is None:
            return
        for k, v in changes.items():
            setattr(state, k, v)
        self.sidebar.set_state(state)

    def refresh_stats(self, root: str, force: bool = False) -> Job | None:
        """Re-read the store's counters (throttled: progress callbacks come many times a second)."""
        now = time.monotonic()
        if not force and now - self._stats_at.get(root, 0.0) < STATS_MIN_INTERVAL_S:
            return None
        self._stats_at[root] = now
        job = self.stores.run(root, ops.repo_stats, "stats")
        job.succeeded.connect(lambda st, r=root: self._apply_stats(r, st))
        return job

    def _apply_stats(self, root: str, st: dict[str, Any]) -> None:
        if self._closing or root not in self.sidebar.states:
            return
        by_kind, by_status = st.get("by_kind", {}), st.get("by_status", {})
        self._set(root, files=int(st.get("files", 0)), cubes=int(st.get("cubes", 0)),
                  compiled=int(by_kind.get("activation", 0)), stale=int(by_status.get("stale", 0)),
                  archived=int(by_status.get("archived", 0)), backlog=st.get("compile_backlog"))
        self.stats_changed.emit(root)

    # -- watchers ------------------------------------------------------------------------------
    def _start_watcher(self, root: str) -> None:
        job = run_detached(Job(lambda _job, r=root: watch_control.ensure_running(r), name="watcher", root=root))
        job.succeeded.connect(lambda _pid, r=root: self._poll_one(r))
        job.failed.connect(lambda msg, r=root: self._failed(r, f"watcher: {msg}"))

    def _watcher_running(self, root: str) -> bool:
        return bool(self._watchers.get(root, {}).get("running"))

    def _poll_watchers(self) -> None:
        for root in list(self.sidebar.states):
            self._poll_one(root)

    def _poll_one(self, root: str) -> None:
        if self._closing or not self.watch or root not in self.sidebar.states:
            return
        st = watch_control.status(root)
        before = self._watchers.get(root, {})
        self._watchers[root] = st
        changes: dict[str, Any] = {"watcher": watch_control.describe(st)}
        own_work = root in self._compile_jobs or root in self._index_jobs
        prog = st.get("progress") if st.get("running") else None
        if prog and not own_work:
            changes.update(activity=f"watcher {prog.get('stage', 'working')}", done=int(prog.get("done") or 0),
                           total=int(prog.get("total") or 0))
        elif not own_work and self.sidebar.states[root].activity.startswith("watcher"):
            changes["activity"] = ""
        errors = st.get("error_count", 0)
        if errors and errors != before.get("error_count", 0) and st.get("errors"):
            last = st["errors"][-1]
            self.error.emit(f"watcher {Path(root).name}: {last.get('path') or ''} {last.get('message', '')}".strip())
        self._set(root, **changes)
        if st.get("updated") != before.get("updated") or st.get("last_update") != before.get("last_update"):
            self.refresh_stats(root)
        if before and st.get("last_update") and st.get("last_update") != before.get("last_update"):
            # the watcher changed the store: this process's retrieval index must catch up
            self.worker.call(root, ops.refresh_from_store, name="refresh")
        if before.get("running") and not st.get("running"):
            self.schedule_compile(root)  # the watcher went away: the app takes over compiling
        if st.get("running") and root in self._compile_jobs:
            self._compile_jobs[root].cancel.set()  # the watcher compiles now; don't do it twice
