"""Repo-watch: keep one repository's memory current while the user edits, asleep when nothing happens.

How it works, and why:

* A watchdog observer (inotify, FSEvents, ReadDirectoryChangesW) reports events on its own thread;
  the handler only files the path into a pending map (path -> time of its latest event) and wakes
  the worker. Name-only ignore rules (`walk.IgnoreRules`: .gitignore, .repomemignore, secrets by
  name, vendored, `.git/`) drop noise there, so a build writing into `dist/` never wakes the model.
* The worker blocks on a condition variable. Its only timeouts are deadlines: the debounce (a batch
  is taken once no event arrived for `debounce_s`, or `max_delay_s` after its first event so a
  file written continuously cannot starve the rest) and the idle-unload deadline. A `git checkout`
  touching a thousand files therefore becomes one batch: while git holds `.git/index.lock` the batch
  is held (up to `GIT_BUSY_MAX_S`), no compile step starts, and the batch ends only after
  `GIT_SETTLE_S` without events, so a checkout slower than the debounce, or events delivered late, do not
  cut it into pieces. An idle watcher sleeps in the kernel,
  waking every `SETTINGS_CHECK_S` only to stat settings.json while a memory is open: an edit of the
  settings (model, cache type, payload encoding) reopens the memory and queues a compile pass, which
  re-encodes the existing payloads one per step like any other compile job.
* A batch goes to `RepoMemory.sync_paths(..., compile=False)` most recently edited first; the memory
  hashes each file and compares with the store, so a touched-but-unchanged file costs a stat + read +
  hash and never a compile. Changed chunks are searchable as plaintext cubes (new version) as soon as
  that returns. KV compilation follows as separate jobs of one cube each
  (`compile_pending(limit=1)`, hottest = recently edited first), and a newer debounced batch is taken
  between two cubes, so a fresh edit never waits behind a checkout's backlog. Cubes whose text came
  back (switching back to a branch) get their shelved payload again without a model run. Large batches
  are cut into slices; between slices newer edits jump the queue too.
* The status carries the compile backlog (cubes, estimated tokens), the measured compile rate and the
  ETA (`compile`), refreshed after each batch and every `BACKLOG_REFRESH_S` while compiling.
* The watcher asks its memory only for what `WatchedMemory` declares; `RepoMemory` implements it.
* Shutdown (SIGINT/SIGTERM -> `stop()`) sets the same Event the memory receives as `cancel`: the cube
  being compiled finishes or is dropped (the store writes a cube in one transaction), nothing is
  left half-written, and what was not synced is picked up by the next start's catch-up.
* One watcher per repository: an OS lock in the repository's store folder (see `locks.py`).
  Other processes read `watch_status.watcher_status(root)`.
* After `idle_unload_s` without work the model is released (`RepoMemory.release_model` and the
  engine pool), and loaded again on the next change.

Robustness choices (each is logged and shown in the status' `errors`, none stops the watcher):
  - deletes, renames and moved folders: both sides of a move are synced; a folder deleted or moved
    away is expanded to the files the store knows under it; a folder created or moved in is scanned.
  - editors that save via temp file + rename: the temp file is usually ignored or gone by the time
    the batch runs (a vanished path is simply a delete, so nothing is stored); the target is synced.
  - a file that fails to sync (permissions, vanished mid-read): the batch is retried file by file
    so one bad file cannot block the others; the failure is recorded.
  - `.gitignore`, `.repomemignore`, `.git/info/exclude` or the root `package.json` (its entry points
    make folders such as `dist/` code) changed: rules are reloaded and the repository is re-indexed (a
    walk with hash checks) so newly un-ignored files come in and newly ignored ones lose their cubes.
  - the repository folder deleted, moved away or emptied (an unmounted drive): the watcher does
    **not** sync the disappearance (that would wipe the memory of a drive that is merely unplugged;
    a batch deleting most of the repository waits `mass_delete_grace_s` for the folder to go too);
    it reports `waiting_for_repo` and waits for the folder to come back (a watch on the parent
    folder, plus a `missing_check_s` stat while in that state only), then catches up. It never exits
    on its own; stop it with SIGINT/SIGTERM.
  - symlinks are not followed (no loops); a link's target inside the repository is indexed at its
    real path by the walk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import paths
from .errors import CancelledError, RepomemError, storage_error
from .locks import LockHeld, ProcessLock
from .watch_status import (
    STATUS_VERSION,
    lock_path,
    log_path,
    read_status,
    spawn_watcher,
    stop_watcher,
    watcher_status,
    write_status,
)

if TYPE_CHECKING:
    from .cube import Cube
    from .memory import IndexSummary

__all__ = ["WatchedMemory", "Watcher", "open_memory", "run_watch", "setup_logging", "spawn_watcher", "stop_watcher",
           "watcher_status", "watcher_threads"]

log = logging.getLogger(__name__)

IGNORE_FILES = (".gitignore", ".repomemignore")
# Files at the root whose change reloads the rules like an ignore file: the root package.json names the
# folders (entry points, e.g. dist/) that count as code rather than vendored output.
ROOT_RULE_FILES = (".git/info/exclude", "package.json")
MAX_ERRORS = 20
_COMPILE = object()  # worker job: compile one pending cube
SETTINGS_CHECK_S = 2.0  # how soon a running watcher follows an edit of settings.json
BACKLOG_REFRESH_S = 5.0  # how often the compile backlog and ETA in the status are counted again
GIT_BUSY_MAX_S = 60.0  # longest a batch waits for git to let go of .git/index.lock (a crashed git leaves it)
GIT_POLL_S = 0.1  # events under .git/ are ignored, so the lock's removal is noticed by a stat this often
# After git let go of its lock, the quiet time that ends the batch: the observer thread may still be
# delivering the checkout's events (late on a busy machine, e.g. while the watcher compiles).
GIT_SETTLE_S = 1.0
# One sync at a time per process: two repositories watched by one process must not compile at once
# on a laptop's few cores (the engine is shared anyway).
_SYNC_GATE = threading.Lock()


Progress = Callable[[str, int, int], None]  # (stage, done, total)


class WatchedMemory(Protocol):
    """Everything the watcher asks of one repository's memory. `RepoMemory` implements it, and so does
    the recording double in tests/test_watch.py. The watcher syncs plaintext with `compile=False` and
    compiles later, one `compile_pending(limit=1)` step at a time."""

    def index(self, *, compile: bool = True, progress: Progress | None = None,
              cancel: threading.Event | None = None) -> IndexSummary:
        """Walk the whole repository (hash checks make unchanged files cheap)."""
        ...

    def sync_paths(self, rel_paths: Iterable[str], *, compile: bool = True, cancel: threading.Event | None = None,
                   progress: Progress | None = None) -> IndexSummary:
        """Re-read exactly these files: changed, created, deleted or newly ignored."""
        ...

    def compile_pending(self, *, limit: int | None = None, progress: Progress | None = None,
                        cancel: threading.Event | None = None) -> int:
        """Compile up to `limit` queued cubes, hottest first; 0 means nothing is left."""
        ...

    def next_compile_path(self) -> str | None:
        """The file of the cube `compile_pending` would take next (for the status), None when none is queued."""
        ...

    def compile_backlog(self) -> dict[str, Any]:
        """What is left to compile: {cubes, tokens, tokens_per_s, eta_s} (tokens estimated, rate measured)."""
        ...

    def indexed_paths(self) -> list[str]:
        """The files the memory holds cubes of (what a deleted folder held)."""
        ...

    def reload_ignores(self) -> None:
        """.gitignore or .repomemignore changed: read the rules again before the next sync."""
        ...

    def search(self, query: str, k: int = 5) -> list[Cube]: ...

    def release_model(self) -> None:
        """Let the model go (idle); the memory stays open and loads it again when needed."""
        ...

    def close(self) -> None: ...


@dataclass
class _Pending:
    """Everything that arrived since the last batch was taken (guarded by Watcher._cond)."""

    paths: dict[str, float] = field(default_factory=dict)  # rel path -> monotonic time of latest event
    gone_dirs: dict[str, float] = field(default_factory=dict)
    new_dirs: dict[str, float] = field(default_factory=dict)
    rules_changed: bool = False
    first: float = 0.0
    last: float = 0.0
    git_seen: float = 0.0  # last time git was seen changing the tree while this batch gathered

    def __bool__(self) -> bool:
        return bool(self.paths or self.gone_dirs or self.new_dirs or self.rules_changed)

    def count(self) -> int:
        return len(self.paths) + len(self.gone_dirs) + len(self.new_dirs) + int(self.rules_changed)


def watcher_threads() -> int:
    """Compile threads of a background watcher when the settings say "automatic": half the cores.

    Why not all: the watcher runs beside the editor and the GUI. And on a busy machine llama.cpp's
    threads spin at barriers when the cores are oversubscribed, so more threads can make a decode
    slower, not faster (docs/benchmarks.md, "Watcher threads").
    """
    return max(1, (os.cpu_count() or 2) // 2)


def open_memory(root: Path, model: str | None = None) -> WatchedMemory:
    """The RepoMemory a watcher uses (the default `memory_factory`)."""
    from . import settings as settings_mod
    from .memory import RepoMemory

    s = settings_mod.load()
    if not s.n_threads:
        s.n_threads = watcher_threads()
    return RepoMemory.open(root, settings=s, model=model)


def _settings_stamp() -> tuple[int, int] | None:
    from . import settings as settings_mod

    try:
        st = settings_mod.settings_path().stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Watcher:
    """Watch one repository and keep its memory in sync. `start()`, then `stop()`/`join()`."""

    def __init__(self, root: str | Path, *, memory_factory: Callable[[Path], WatchedMemory] | None = None,
                 debounce_s: float = 0.25, max_delay_s: float = 3.0, idle_unload_s: float | None = None,
                 max_batch: int = 256, missing_check_s: float = 5.0, mass_delete_grace_s: float = 2.0,
                 catch_up: bool = True,
                 on_batch: Callable[[list[str], IndexSummary], None] | None = None):
        self.root = Path(root).expanduser().resolve()
        self._factory = memory_factory or open_memory
        self.debounce_s, self.max_delay_s = debounce_s, max_delay_s
        if idle_unload_s is None:
            from . import settings as settings_mod

            idle_unload_s = float(settings_mod.load().watcher_idle_unload_s)
        self.idle_unload_s = idle_unload_s  # < 0: never unload
        self.max_batch, self.missing_check_s, self.catch_up = max_batch, missing_check_s, catch_up
        self.mass_delete_grace_s = mass_delete_grace_s
        self.on_batch = on_batch
        self.failed: str | None = None  # set when the worker died of a bug (the CLI exits non-zero)
        self._cond = threading.Condition()
        self._pending = _Pending()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = ProcessLock(lock_path(self.root))
        self._mem: WatchedMemory | None = None
        self._mem_lock = threading.RLock()  # the worker's sync vs. search() from other threads
        self._settings_seen = _settings_stamp()  # settings.json as the open memory read it
        self._model_loaded = False
        self._compile_owed = False  # plaintext is in, KV compilation is not done yet
        self._compile_run = (0, 0.0)  # cubes compiled in the current run, its start (perf_counter)
        self._missing = self._missing_reported = False
        self._root_back = False
        self._observer: Any = None
        self._root_watch: Any = None
        self._event_filter: list[type] = []  # the watchdog event classes observed (set with the observer)
        self._thread: threading.Thread | None = None
        self._rules: Any = None
        self._own_dirs = self._own_prefixes()
        self._last_work = time.monotonic()
        self._status_written = 0.0
        self._backlog_at = 0.0  # monotonic time the compile backlog was last counted
        self._status: dict[str, Any] = {
            "version": STATUS_VERSION, "root": str(self.root), "pid": os.getpid(), "state": "starting", "queue": 0,
            "current": None, "batch": [], "progress": None, "started": time.time(), "updated": None,
            "last_update": None, "last_change": None, "last_compile": None, "last_event": None,
            "model_loaded": False, "compile": None,
            "errors": [], "error_count": 0, "log": str(log_path(self.root)),
            "stats": {"batches": 0, "files": 0, "changed": 0, "removed": 0, "compiled": 0},
        }

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Watcher:
        """Take the repository's lock, start observing and the worker; raises RepomemError if refused."""
        if not self.root.is_dir():
            raise RepomemError(f"not a folder: {self.root}")
        try:
            self._lock.acquire()
        except LockHeld as held:
            raise RepomemError(f"{self.root} is already watched by another process (pid {held.pid}); "
                               f"stop that watcher first (kill {held.pid})") from None
        except OSError as exc:  # a read-only or full data home: the lock file cannot be made
            raise storage_error(exc, "cannot watch the repository", self._lock.path.parent) from None
        try:
            prev = read_status(self.root) or {}
            if prev.get("state") not in (None, "stopped"):
                self._error(None, f"the previous watcher (pid {prev.get('pid')}) ended without a clean shutdown")
            self._write_status(force=True)
            from .walk import IgnoreRules

            self._rules = IgnoreRules(self.root)
            self._start_observer()
        except BaseException:
            self._lock.release()
            raise
        self._thread = threading.Thread(target=self._run, name=f"repomem-watch:{self.root.name}", daemon=True)
        self._thread.start()
        log.info("watching %s (pid %d)", self.root, os.getpid())
        return self

    def stop(self, reason: str = "stop requested") -> None:
        """Ask the worker to finish the current cube and exit (safe from any thread)."""
        if not self._stop.is_set():
            log.info("stopping: %s", reason)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to finish its shutdown; True when it has."""
        return self._done.wait(timeout)

    def status(self) -> dict[str, Any]:
        return dict(self._status)

    def search(self, query: str, k: int = 5) -> list[Cube]:
        """Search the watcher's own memory between batches (tests and `bench watch` use it)."""
        with self._mem_lock:
            return self._memory().search(query, k=k)

    # -- events (observer thread) ---------------------------------------------------------------
    def _own_prefixes(self) -> list[str]:
        """Our own store folder, if the data home lives inside the repository (avoids a feedback loop)."""
        try:
            rel = Path(paths.home()).resolve().relative_to(self.root)
        except ValueError:
            return []
        return [rel.as_posix()]

    def _rel(self, p: str | bytes) -> str | None:
        """The repository-relative path of an event's path (strings only: a checkout sends thousands)."""
        p, root = os.fsdecode(p), str(self.root)
        if p == root:
            return ""
        if not p.startswith(root + os.sep):
            return None
        rel = p[len(root) + 1:]
        return rel.replace(os.sep, "/") if os.sep != "/" else rel

    def _on_event(self, event: Any) -> None:
        """Called by watchdog for every event: classify and file it; never raises, never blocks long."""
        try:
            self._classify(event)
        except Exception:  # an observer thread that dies silently would stop the watcher
            log.exception("event %r could not be handled", event)

    def _classify(self, event: Any) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return
        src = os.fsdecode(event.src_path) if event.src_path else ""
        dest = os.fsdecode(event.dest_path) if event.dest_path else ""
        root = str(self.root)
        if src == root and kind in ("deleted", "moved"):
            self._flag_root(gone=True)
            return
        if dest == root or (src == root and kind == "created"):
            self._flag_root(gone=False)
            return
        if event.is_directory and kind in ("modified", "closed", "attrib"):
            return
        touched: list[tuple[str, str]] = []  # (rel, role) role: file | gone_dir | new_dir
        if kind == "moved":
            if event.is_directory:
                touched += [(self._rel(src), "gone_dir"), (self._rel(dest), "new_dir")]
            else:
                touched += [(self._rel(src), "file"), (self._rel(dest), "file")]
        elif event.is_directory:
            touched.append((self._rel(src), "gone_dir" if kind == "deleted" else "new_dir"))
        else:
            touched.append((self._rel(src), "file"))
        touched = [(rel, role) for rel, role in touched if rel and not self._skip(rel, role != "file")]
        if not touched:
            return
        now = time.monotonic()
        with self._cond:
            pend = self._pending
            starts = not pend
            if starts:
                pend.first = now
            pend.last = now
            for rel, role in touched:
                if rel.rsplit("/", 1)[-1] in IGNORE_FILES or rel in ROOT_RULE_FILES:
                    pend.rules_changed = True
                    if rel == ".git/info/exclude":
                        continue
                {"file": pend.paths, "gone_dir": pend.gone_dirs, "new_dir": pend.new_dirs}[role][rel] = now
            self._status["last_event"] = time.time()
            if starts:  # later events only move the deadline the worker already sleeps towards
                self._cond.notify_all()

    def _skip(self, rel: str, is_dir: bool) -> bool:
        if rel == ".git/info/exclude":
            return False
        if any(rel == d or rel.startswith(d + "/") for d in self._own_dirs):
            return True
        if "/.git/" in f"/{rel}/":
            return True
        rules = self._rules
        return bool(rules is not None and rules.reason(rel, is_dir))

    def _flag_root(self, *, gone: bool) -> None:
        with self._cond:
            if gone:
                self._missing = True
                self._pending = _Pending()
            else:
                self._root_back = True
            self._cond.notify_all()

    def _start_observer(self) -> None:
        import warnings

        from watchdog import events as ev
        from watchdog.observers import Observer

        # watchdog re-adds the inotify watch of a renamed folder and warns about its own bookkeeping
        warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)
        watcher = self

        class _Handler(ev.FileSystemEventHandler):
            def dispatch(self, event: Any) -> None:
                watcher._on_event(event)

        self._handler = _Handler()
        # Only what changes content: a checkout also opens and reads thousands of files, and each event
        # costs the observer thread time while the worker waits for the batch to settle.
        self._event_filter = [ev.FileCreatedEvent, ev.FileDeletedEvent, ev.FileModifiedEvent, ev.FileMovedEvent,
                              ev.FileClosedEvent, ev.DirCreatedEvent, ev.DirDeletedEvent, ev.DirMovedEvent]
        obs = Observer()
        try:
            self._root_watch = obs.schedule(self._handler, str(self.root), recursive=True,
                                            event_filter=self._event_filter)
            parent = self.root.parent
            if parent != self.root:
                try:  # sees the repository folder itself vanish and come back, without polling
                    obs.schedule(self._handler, str(parent), recursive=False, event_filter=self._event_filter)
                except OSError as exc:
                    log.info("cannot watch %s (%s): a missing repository is noticed by a slow check", parent, exc)
            obs.start()
        except OSError as exc:
            raise RepomemError(f"cannot watch {self.root}: {exc} (on Linux, raise fs.inotify.max_user_watches)"
                               ) from None
        self._observer = obs

    def _rewatch_root(self) -> None:
        """The repository folder came back: its old inotify watch died with it, so make a new one."""
        obs = self._observer
        if obs is None:
            return
        try:
            if self._root_watch is not None:
                obs.unschedule(self._root_watch)
        except Exception:  # the emitter already stopped itself when the folder went away
            pass
        self._root_watch = obs.schedule(self._handler, str(self.root), recursive=True,
                                        event_filter=self._event_filter)

    # -- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.catch_up and not self._stop.is_set():
                self._reconcile("startup catch-up")
            while not self._stop.is_set():
                work = self._next_batch()
                if work is _COMPILE:
                    self._compile_step()
                elif work is not None:
                    self._process(work)
        except Exception as exc:  # a bug, not an event: log it, report it, shut down cleanly
            log.exception("watcher failed")
            self.failed = f"{type(exc).__name__}: {exc}"
            self._error(None, f"watcher failed: {self.failed}")
        finally:
            self._shutdown()

    def _next_batch(self) -> _Pending | object | None:
        """The next thing to do: a debounced batch, `_COMPILE` (one cube) when nothing newer is ready, or
        None on stop. Blocks on the condition otherwise, so an idle watcher costs no CPU."""
        while not self._stop.is_set():
            if self._missing or self._root_back:
                if self._wait_for_root():
                    return self._came_back()
                continue
            self._follow_settings()
            unload = False
            with self._cond:
                now = time.monotonic()
                pend = self._pending
                wait: float | None = None  # nothing to do and nothing loaded: sleep until an event
                if self._missing or self._stop.is_set():
                    continue
                if pend:
                    # git mid-checkout: the tree is half switched, so neither sync it nor compile from it;
                    # once git is done, GIT_SETTLE_S of quiet lets the last of its events arrive
                    git_busy = now - pend.first < GIT_BUSY_MAX_S and self._git_busy()
                    if git_busy:
                        pend.git_seen = now
                    deadline = (max(pend.git_seen, pend.last) + GIT_SETTLE_S if pend.git_seen else
                                min(pend.last + self.debounce_s, pend.first + self.max_delay_s))
                    if now >= deadline and not git_busy:
                        self._pending = _Pending()
                        return pend
                    if self._compile_owed and not git_busy:
                        return _COMPILE  # one cube while the batch settles: preempted within one cube
                    wait = GIT_POLL_S if git_busy else deadline - now
                elif self._compile_owed:
                    return _COMPILE
                elif self._model_loaded and self.idle_unload_s >= 0:
                    wait = self._last_work + self.idle_unload_s - now
                    unload = wait <= 0
                self._set(state="idle", queue=pend.count())
                self._write_status()
                if not unload:
                    if self._mem is not None:  # an open memory must notice a change of settings
                        wait = SETTINGS_CHECK_S if wait is None else min(wait, SETTINGS_CHECK_S)
                    self._cond.wait(wait)
            if unload:
                self._release_model()
        return None

    def _git_busy(self) -> bool:
        """Whether git is in the middle of changing the work tree (checkout, merge, rebase, stash)."""
        return os.path.exists(self.root / ".git" / "index.lock")

    def _wait_for_root(self) -> bool:
        """While the repository is missing: True once it is back, else sleep until a hint or the slow check."""
        with self._cond:
            self._root_back = False
        if self.root.is_dir() and not self._looks_unmounted():
            return True
        self._go_missing("the repository folder disappeared or is empty")
        with self._cond:
            if not (self._root_back or self._stop.is_set()):
                self._cond.wait(self.missing_check_s)
        return False

    def _came_back(self) -> _Pending:
        """The repository folder is back: watch the new folder and catch up with whatever it holds now."""
        with self._cond:
            self._missing = self._missing_reported = False
            self._pending = _Pending()
        log.info("%s is back: catching up", self.root)
        try:
            self._rewatch_root()
        except OSError as exc:
            self._error(None, f"cannot watch the repository again: {exc}")
        now = time.monotonic()
        return _Pending(rules_changed=True, first=now, last=now)

    def _process(self, work: _Pending) -> None:
        if not self.root.is_dir() or self._looks_unmounted():
            self._go_missing("the repository folder disappeared")
            return
        if work.rules_changed:
            self._reconcile("ignore rules changed or the repository came back")
            return
        todo = dict(work.paths)
        if work.gone_dirs:
            known = self._known_paths()
            for d, t in work.gone_dirs.items():
                for p in known:
                    if p.startswith(d + "/") and todo.get(p, 0) < t:
                        todo[p] = t
        for d, t in work.new_dirs.items():
            for p in self._scan_dir(d):
                if todo.get(p, 0) < t:
                    todo[p] = t
        order = sorted(todo, key=lambda p: -todo[p])  # most recently edited first
        if self._mass_deletion(order):
            log.info("most of the repository vanished at once: waiting %.1fs in case the folder itself goes",
                     self.mass_delete_grace_s)
            if self._stop.wait(self.mass_delete_grace_s):
                return
            if self._missing or not self.root.is_dir() or self._looks_unmounted():
                self._go_missing("the repository folder disappeared")
                return
        for i in range(0, len(order), self.max_batch):
            if self._stop.is_set():
                return  # the next start's catch-up syncs the rest
            self._sync(order[i:i + self.max_batch])
            rest = order[i + self.max_batch:]
            if rest and self._newer_ready():
                with self._cond:  # newer edits go first: put the rest back with their own (older) times
                    pend = self._pending
                    for p in rest:
                        pend.paths.setdefault(p, todo[p])
                    pend.first = min(pend.first, min(todo[p] for p in rest))
                return

    def _mass_deletion(self, order: list[str]) -> bool:
        """At least 50 files and half of the memory gone in one batch: `rm -rf repo` in progress?

        A repository deleted file by file first reports its files' deletions; syncing them would
        wipe the memory just before the folder's own deletion says "keep it, wait". Best effort: a
        deletion slower than the grace period still loses the cubes of what went first.
        """
        gone = sum(1 for p in order if not os.path.lexists(self.root / p))
        return gone >= 50 and gone * 2 >= len(self._known_paths())

    def _newer_ready(self) -> bool:
        with self._cond:
            pend = self._pending
            return bool(pend) and time.monotonic() >= pend.last + self.debounce_s

    def _looks_unmounted(self) -> bool:
        """An empty root while the store knows files: an unplugged drive's mount point, not a wipe."""
        try:
            with os.scandir(self.root) as it:
                if next(it, None) is not None:
                    return False
        except OSError:
            return True
        return bool(self._known_paths())

    def _go_missing(self, why: str) -> None:
        """Enter (or stay in) waiting_for_repo; reported once per disappearance."""
        with self._cond:
            if not self._missing_reported:
                self._missing_reported = True
                log.warning("%s: %s; waiting for it to come back (memory kept)", self.root, why)
                self._error(None, f"{why}; waiting for it to come back (memory kept)")
            self._missing = True
            self._pending = _Pending()
            self._set(state="waiting_for_repo", queue=0, current=None, batch=[])
        self._write_status(force=True)

    # -- syncing --------------------------------------------------------------------------------
    def _memory(self) -> WatchedMemory:
        with self._mem_lock:
            if self._mem is None:
                self._settings_seen = _settings_stamp()
                self._mem = self._factory(self.root)
            return self._mem

    def _follow_settings(self) -> None:
        """settings.json changed (the app's dialog, or an edit by hand): reopen the memory with it, so a
        new model, cache type or payload encoding reaches the background compile without a restart, and
        queue a compile pass (a new encoding re-encodes the existing payloads there)."""
        stamp = _settings_stamp()
        if stamp == self._settings_seen:
            return
        with self._mem_lock:
            self._settings_seen = stamp
            old, self._mem = self._mem, None
            if old is None:
                return
            try:
                old.close()
                self._unload_unused_engines()  # the old model, if the settings chose another
                self._memory()
            except Exception as exc:  # the next job opens it again (and reports what still fails)
                self._error(None, f"reopening with the new settings failed: {type(exc).__name__}: {exc}")
                return
        log.info("settings changed: memory reopened with them")
        self._model_loaded = False
        self._set(model_loaded=False)
        with self._cond:
            self._compile_owed = True

    def _call(self, fn: Callable[..., Any], *args: Any, exclusive: bool = True, **kwargs: Any) -> Any:
        """Run a memory method; `exclusive` keeps search() out while cubes and the search index change.

        Compiling only attaches payloads to existing cubes (the store is thread-safe), so it runs
        without the lock and a search never waits behind a compile backlog.
        """
        kwargs["progress"] = self._progress
        with _SYNC_GATE:
            if not exclusive:
                return fn(*args, **kwargs)
            with self._mem_lock:
                return fn(*args, **kwargs)

    def _progress(self, stage: str, done: int, total: int) -> None:
        self._set(progress={"stage": stage, "done": done, "total": total})
        self._write_status()

    def _sync(self, batch: list[str]) -> None:
        self._set(state="syncing", current=batch[0], batch=batch[:20], progress=None, queue=self._queue_len())
        self._write_status(force=True)
        t0 = time.perf_counter()
        try:
            mem = self._memory()
            # Plaintext first (searchable at once), KV later one cube at a time so newer edits can cut in.
            summary = self._call(mem.sync_paths, batch, compile=False, cancel=self._stop)
            if summary.changed_paths:
                self._compile_owed = True
        except CancelledError:
            return
        except Exception as exc:
            if self._stop.is_set():
                return
            if len(batch) == 1 or not self.root.is_dir():
                self._sync_failed(batch[0], exc)
                return
            log.warning("batch of %d failed (%s): retrying file by file", len(batch), exc)
            errors_before = self._status["error_count"]
            for rel in batch:
                if self._stop.is_set():
                    return
                self._sync([rel])
            if self._status["error_count"] == errors_before:  # no file to blame: report the batch's error
                self._error(None, f"{type(exc).__name__}: {exc}")
            return
        finally:
            self._last_work = time.monotonic()
        self._account(batch, summary, time.perf_counter() - t0)

    def _compile_step(self) -> None:
        """Compile the hottest pending cube (the store puts recently edited ones first)."""
        n_done, t_run = self._compile_run
        if n_done == 0:
            t_run = time.perf_counter()
        try:
            mem = self._memory()
            self._set(state="compiling", current=mem.next_compile_path(), batch=[], progress=None,
                      queue=self._queue_len())
            self._write_status()
            n = self._call(mem.compile_pending, limit=1, cancel=self._stop, exclusive=False)
        except CancelledError:
            return
        except Exception as exc:
            if not self._stop.is_set():
                log.warning("compiling %s failed: %s", self._status["current"], exc)
                self._error(self._status["current"], f"compile failed: {type(exc).__name__}: {exc}")
            self._compile_owed, self._compile_run = False, (0, 0.0)
            return
        finally:
            self._model_loaded = True
            self._last_work = time.monotonic()
        if n:
            self._status["stats"]["compiled"] += n
            self._compile_run = (n_done + n, t_run)
            self._count_backlog()
            return
        self._compile_owed, self._compile_run = False, (0, 0.0)
        if n_done:
            log.info("compiled %d cube(s) in %.2fs", n_done, time.perf_counter() - t_run)
        self._count_backlog(force=True)
        self._set(state="idle", current=None, progress=None, last_compile=time.time())
        self._write_status(force=True)

    def _count_backlog(self, *, force: bool = False) -> None:
        """Refresh the status' `compile` block (backlog, rate, ETA); a count reads every live cube's length,
        so while compiling it is redone every BACKLOG_REFRESH_S only."""
        mem = self._mem
        now = time.monotonic()
        if mem is None or (not force and now - self._backlog_at < BACKLOG_REFRESH_S):
            return
        self._backlog_at = now
        try:
            self._set(compile=mem.compile_backlog())
        except Exception as exc:  # the status is informative; a failing count must not stop the work
            log.warning("cannot count the compile backlog: %s", exc)

    def _sync_failed(self, rel: str, exc: BaseException) -> None:
        if not self.root.is_dir():
            self._go_missing("the repository folder disappeared")
            return
        log.warning("could not sync %s: %s", rel, exc)
        self._error(rel, f"{type(exc).__name__}: {exc}")

    def _account(self, batch: list[str], summary: IndexSummary, seconds: float) -> None:
        changed, removed, compiled, skipped = (summary.changed_paths, summary.removed_paths, summary.compiled,
                                               summary.skipped)
        st = self._status["stats"]
        st["batches"] += 1
        st["files"] += summary.files if batch == ["(all)"] else len(batch)
        st["changed"] += len(changed)
        st["removed"] += len(removed)
        st["compiled"] += compiled
        now = time.time()
        self._count_backlog(force=True)
        self._set(last_update=now, state="compiling" if self._compile_owed else "idle", current=None, batch=[],
                  progress=None, queue=self._queue_len())
        if changed or removed:
            self._set(last_change=now)
        if skipped.get("unreadable"):
            self._error(batch[0] if len(batch) == 1 else None,
                        f"{skipped['unreadable']} file(s) could not be read (see {log_path(self.root).name})")
        log.info("synced %d file(s) in %.2fs: %d changed, %d removed, %d compiled%s", len(batch), seconds,
                 len(changed), len(removed), compiled, f", skipped {skipped}" if skipped else "")
        self._write_status(force=True)
        if self.on_batch is not None:
            try:
                self.on_batch(batch, summary)
            except Exception:
                log.exception("on_batch callback failed")

    def _reconcile(self, why: str) -> None:
        """Re-index the whole repository (hash checks make unchanged files cheap)."""
        if not self.root.is_dir() or self._looks_unmounted():
            self._go_missing("the repository folder is missing or empty")
            return
        log.info("re-indexing %s: %s", self.root, why)
        if self._rules is not None:
            self._rules.reload()
        self._set(state="catching_up", current=None, batch=[], progress=None)
        self._write_status(force=True)
        t0 = time.perf_counter()
        try:
            mem = self._memory()
            mem.reload_ignores()
            summary = self._call(mem.index, compile=False, cancel=self._stop)
            self._compile_owed = True  # also finishes a backlog a previous run left
        except CancelledError:
            return
        except Exception as exc:
            if not self._stop.is_set():
                log.warning("re-index failed: %s", exc)
                self._error(None, f"re-index failed: {type(exc).__name__}: {exc}")
            return
        finally:
            self._last_work = time.monotonic()
        self._account(["(all)"], summary, time.perf_counter() - t0)

    def _known_paths(self) -> list[str]:
        try:
            with self._mem_lock:
                return self._memory().indexed_paths()
        except Exception as exc:
            log.warning("cannot list indexed paths: %s", exc)
            return []

    def _scan_dir(self, rel_dir: str) -> list[str]:
        """Files under a folder that appeared (name rules only; the memory does the content checks)."""
        out: list[str] = []
        stack = [rel_dir]
        while stack:
            d = stack.pop()
            try:
                with os.scandir(self.root / d if d else self.root) as it:
                    entries = list(it)
            except OSError:
                continue
            for e in entries:
                rel = f"{d}/{e.name}" if d else e.name
                try:
                    is_dir = e.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if self._skip(rel, is_dir):
                    continue
                (stack if is_dir else out).append(rel)
        return out

    @staticmethod
    def _unload_unused_engines() -> None:
        """Free models no open memory holds (only if this process ever loaded one)."""
        import sys

        pool = sys.modules.get(f"{__package__}.engine_pool")
        if pool is not None:
            pool.unload_idle(0.0)

    def _release_model(self) -> None:
        """Idle: let the model go (memory stays open: store and search index are cheap to keep)."""
        with self._mem_lock:
            mem = self._mem
            if mem is None:
                self._model_loaded = False
                return
            mem.release_model()
            self._unload_unused_engines()
        self._model_loaded = False
        log.info("idle for %.0fs: model released", self.idle_unload_s)
        self._set(model_loaded=False)
        self._write_status(force=True)

    def _shutdown(self) -> None:
        self._set(state="stopping")
        self._write_status(force=True)
        obs, self._observer = self._observer, None
        if obs is not None:
            try:
                obs.stop()
                obs.join(timeout=5)
            except Exception:
                log.exception("observer did not stop cleanly")
        with self._mem_lock:
            mem, self._mem = self._mem, None
            if mem is not None:
                try:
                    mem.close()
                except Exception:
                    log.exception("closing the memory failed")
        self._set(state="stopped", queue=0, current=None, batch=[], progress=None, model_loaded=False)
        try:
            self._write_status(force=True)
        finally:
            self._lock.release()
            self._done.set()
            log.info("watcher stopped")

    # -- status ---------------------------------------------------------------------------------
    def _queue_len(self) -> int:
        with self._cond:
            return self._pending.count()

    def _set(self, **kv: Any) -> None:
        self._status.update(kv)
        if "model_loaded" not in kv:
            self._status["model_loaded"] = self._model_loaded

    def _error(self, path: str | None, message: str) -> None:
        errs = self._status["errors"]
        errs.append({"time": time.time(), "path": path, "message": message})
        del errs[:-MAX_ERRORS]
        self._status["error_count"] += 1
        self._write_status(force=True)

    def _write_status(self, *, force: bool = False) -> None:
        """Atomic snapshot for other processes; throttled to 4/s except on state changes."""
        now = time.monotonic()
        if not force and now - self._status_written < 0.25:
            return
        self._status_written = now
        self._status["updated"] = time.time()
        try:
            write_status(self.root, self._status)
        except OSError as exc:  # a full disk must not stop the watcher
            log.warning("cannot write the status file: %s", exc)


# -- process entry (the CLI's `repomem watch`) -----------------------------------------------------
def setup_logging(roots: list[Path], *, foreground: bool, verbose: bool = False) -> None:
    """`--foreground`: the terminal; otherwise each repository's watch.log (rotated, 1 MB x 3)."""
    from logging.handlers import RotatingFileHandler

    logger = logging.getLogger("repomem")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = []
    if foreground:
        handlers.append(logging.StreamHandler())
    else:
        for r in roots:
            paths.repo_dir(r)  # creates the store folder
            handlers.append(RotatingFileHandler(log_path(r), maxBytes=1_000_000, backupCount=3, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logging.getLogger("watchdog").setLevel(logging.WARNING)


def run_watch(roots: list[Path], *, catch_up: bool = True, debounce_s: float = 0.25) -> None:
    """Watch until SIGINT/SIGTERM; all repositories are locked before any is watched (all or none)."""
    import signal

    watchers = [Watcher(r, catch_up=catch_up, debounce_s=debounce_s) for r in roots]
    started: list[Watcher] = []
    try:
        for w in watchers:
            started.append(w.start())
    except BaseException:
        for w in started:
            w.stop("another repository could not be watched")
            w.join(30)
        raise

    def _on_signal(signum: int, _frame: Any) -> None:
        # Only start a thread here: taking locks inside a signal handler can deadlock the main thread.
        name = signal.Signals(signum).name
        threading.Thread(target=lambda: [w.stop(name) for w in started], daemon=True).start()
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C / TERM kills at once

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    for w in started:
        while not w.join(timeout=3600):  # blocks in the kernel; wakes only when the worker ends
            pass
    failed = [w for w in started if w.failed]
    if failed:
        raise RepomemError("; ".join(f"watching {w.root} failed: {w.failed} (see {log_path(w.root)})"
                                     for w in failed))
