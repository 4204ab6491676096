"""Repo-watch: debounce, coalescing, lock, status file, robustness, and the real memory end to end.

Most tests drive the watcher with `RecordingMemory`, a small implementation of the whole
`WatchedMemory` protocol that hashes files like the store does and records every call, so they run in
a second or two without a model. Folder moves and deletions, the mass-deletion grace, an emptied root
and the compile order run against `PlaintextMemory`: a real RepoMemory and store whose compile step
attaches a placeholder payload instead of running a model. The integration tests at the end use
RepoMemory and the test model.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from click.testing import CliRunner

from repomem.core.cube import Cube
from repomem.core.errors import RepomemError
from repomem.core.memory import IndexSummary, RepoMemory
from repomem.core.walk import IgnoreRules
from repomem.core.watch import WatchedMemory, Watcher
from repomem.core.watch_status import lock_path, watcher_status, write_status

FAST = dict(debounce_s=0.15, max_delay_s=1.5, idle_unload_s=-1, missing_check_s=0.3)
Progress = Callable[[str, int, int], None]


class RecordingMemory:
    """The WatchedMemory protocol in miniature: hash check, removal of vanished/ignored files, a compile
    queue taken most recently changed first (as the store orders it), a call log."""

    def __init__(self, root: Path, *, delay: float = 0.0, fail: Iterable[str] = ()):
        self.root = root
        self.known: dict[str, str] = {}
        self.calls: list[list[str]] = []
        self.index_calls = 0
        self.released = 0
        self.closed = False
        self.cancelled = False
        self.delay = delay
        self.compile_delay = 0.0
        self.fail = set(fail)
        self.pending: list[str] = []  # changed paths whose "KV" is not compiled yet
        self.compiled: list[str] = []
        self.rules = IgnoreRules(root)
        self.lock = threading.Lock()

    def sync_paths(self, rel_paths: Iterable[str], *, compile: bool = True, cancel: threading.Event | None = None,
                   progress: Progress | None = None) -> IndexSummary:
        paths = list(rel_paths)
        with self.lock:
            self.calls.append(paths)
        s = IndexSummary()
        for rel in paths:
            if rel in self.fail:
                raise PermissionError(13, "Permission denied", str(self.root / rel))
            full = self.root / rel
            if not full.is_file() or full.is_symlink() or self.rules.reason(rel):
                if self.known.pop(rel, None):
                    s.removed_paths.append(rel)
                continue
            try:
                sha = hashlib.sha256(full.read_bytes()).hexdigest()
            except OSError:
                s.skipped["unreadable"] = s.skipped.get("unreadable", 0) + 1
                continue
            s.files += 1
            if self.known.get(rel) != sha:
                self.known[rel] = sha
                s.changed_paths.append(rel)
        with self.lock:
            self.pending = [p for p in self.pending if p not in s.changed_paths] + s.changed_paths
        if compile:
            s.compiled = self.compile_pending(cancel=cancel)
        if self.delay and cancel is not None and cancel.wait(self.delay):
            self.cancelled = True
        return s

    def index(self, *, compile: bool = True, progress: Progress | None = None,
              cancel: threading.Event | None = None) -> IndexSummary:
        self.index_calls += 1
        self.rules.reload()
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir
            dirnames[:] = [d for d in dirnames if not self.rules.reason(f"{rel_dir}/{d}".lstrip("/"), True)]
            found += [f"{rel_dir}/{f}".lstrip("/") for f in filenames]
        return self.sync_paths(sorted(set(found) | set(self.known)), compile=compile, cancel=cancel)

    def compile_pending(self, *, limit: int | None = None, progress: Progress | None = None,
                        cancel: threading.Event | None = None) -> int:
        done = 0
        while self.pending and (limit is None or done < limit):
            if cancel is not None and cancel.wait(self.compile_delay):
                return done
            with self.lock:
                self.compiled.append(self.pending.pop())
            done += 1
        return done

    def next_compile_path(self) -> str | None:
        with self.lock:
            return self.pending[-1] if self.pending else None

    def compile_backlog(self) -> dict:
        with self.lock:
            return {"cubes": len(self.pending), "tokens": 0, "tokens_per_s": None, "eta_s": None}

    def indexed_paths(self) -> list[str]:
        return sorted(self.known)

    def reload_ignores(self) -> None:
        self.rules.reload()

    def search(self, query: str, k: int = 5) -> list[Cube]:
        return [Cube(id=p, path=p) for p in sorted(self.known) if query in p][:k]

    def release_model(self) -> None:
        self.released += 1

    def close(self) -> None:
        self.closed = True

    def synced(self) -> list[str]:
        with self.lock:
            return [p for c in self.calls for p in c]


PLACEHOLDER_FP = "placeholder-model"


class PlaintextMemory(RepoMemory):
    """A real RepoMemory and store; its compile step attaches a placeholder payload (no model), in the
    store's own queue order, so what the watcher does to the memory can be checked without a model."""

    compile_delay = 0.0

    @classmethod
    def at(cls, root: Path) -> PlaintextMemory:
        mem = cls.open(root)
        mem.compiled = []
        return mem

    def queued(self) -> int:
        return len(self.store.compile_queue(PLACEHOLDER_FP, limit=None))

    def compile_pending(self, *, limit: int | None = None, progress: Progress | None = None,
                        cancel: threading.Event | None = None) -> int:
        done = 0
        for cube in self.store.compile_queue(PLACEHOLDER_FP, limit=limit):
            if cancel is not None and cancel.wait(self.compile_delay):
                break
            sha, n = self.store.write_payload(f"placeholder {cube.id} {cube.content_hash}".encode())
            if self.store.attach_payload(cube.id, cube.content_hash, sha, n, tokens=1, kept_tokens=1,
                                         fingerprint=PLACEHOLDER_FP, encoding="f16"):
                self.compiled.append(cube.path)
                done += 1
        return done

    def next_compile_path(self) -> str | None:
        queue = self.store.compile_queue(PLACEHOLDER_FP, limit=1)
        return queue[0].path if queue else None


def test_memories_implement_the_watcher_protocol() -> None:
    """Same methods and parameters as WatchedMemory: the watcher calls them without probing."""
    for impl in (RepoMemory, RecordingMemory, PlaintextMemory):
        for name, want in inspect.getmembers(WatchedMemory, inspect.isfunction):
            if name.startswith("_"):
                continue
            have = inspect.signature(getattr(impl, name)).parameters
            for pname, param in inspect.signature(want).parameters.items():
                assert pname in have and have[pname].kind == param.kind, (impl.__name__, name, pname)


def wait_for(pred: Callable[[], object], timeout: float = 10.0, what: str = "condition",
             watcher: Watcher | None = None) -> None:
    """Poll `pred`; with `watcher`, fail at once when it reports an error instead of timing out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if watcher is not None and watcher.status()["error_count"]:
            raise AssertionError(f"watcher error while waiting for {what}: {watcher.status()['errors']}")
        time.sleep(0.03)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def repo(tmp_path: Path, home: Path) -> Path:
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text("def a():\n    return 1\n")
    (root / "b.py").write_text("def b():\n    return 2\n")
    (root / "pkg" / "c.py").write_text("def c():\n    return 3\n")
    (root / "pkg" / "d.py").write_text("def d():\n    return 4\n")
    (root / ".gitignore").write_text("*.log\n")
    return root


@pytest.fixture
def watched(repo: Path):
    """A started watcher on `repo` with a RecordingMemory already in sync (catch-up done)."""
    mem = RecordingMemory(repo)
    w = Watcher(repo, memory_factory=lambda r: mem, **FAST).start()
    wait_for(lambda: w.status()["stats"]["batches"] >= 1, what="catch-up")
    yield w, mem
    w.stop()
    assert w.join(10)


@pytest.fixture
def watched_store(repo: Path):
    """A started watcher on `repo` with a PlaintextMemory (a real store), catch-up done and compiled."""
    mem = PlaintextMemory.at(repo)
    w = Watcher(repo, memory_factory=lambda r: mem, **FAST).start()
    wait_for(lambda: idle(w, 1) and not mem.queued(), what="catch-up compiled", watcher=w)
    yield w, mem
    w.stop()
    assert w.join(10)


def idle(w: Watcher, batches: int) -> bool:
    s = w.status()
    return s["stats"]["batches"] >= batches and s["state"] == "idle" and s["queue"] == 0


# -- coalescing, hashing, ordering --------------------------------------------------------------------
def test_catch_up_then_edit_is_one_small_batch(watched) -> None:
    w, mem = watched
    assert mem.index_calls == 1 and set(mem.known) == {"a.py", "b.py", "pkg/c.py", "pkg/d.py", ".gitignore"}
    n = len(mem.calls)
    (w.root / "a.py").write_text("def a():\n    return 10\n")
    wait_for(lambda: len(mem.calls) > n and idle(w, 2), what="edit synced")
    assert mem.calls[n] == ["a.py"]
    assert w.status()["stats"]["compiled"] >= 1


def test_burst_is_coalesced_and_unchanged_files_compile_nothing(watched) -> None:
    w, mem = watched
    burst = w.root / "burst"
    burst.mkdir()
    for i in range(300):
        (burst / f"f{i:03}.py").write_text(f"X = {i}\n")
    wait_for(lambda: sum(p.startswith("burst/") for p in mem.known) == 300, what="burst indexed")
    wait_for(lambda: not mem.pending and idle(w, 1), what="burst compiled")
    n = len(mem.calls)
    assert n <= 6, f"300 new files took {n} syncs"
    before = w.status()["stats"]["compiled"]
    t0 = time.monotonic()
    for p in burst.iterdir():  # touched, content unchanged (like a git checkout of the same tree)
        os.utime(p)
        p.write_bytes(p.read_bytes())
    wait_for(lambda: sum(len(c) for c in mem.calls[n:]) >= 300 and idle(w, 1), what="touch burst absorbed")
    assert len(mem.calls) - n <= 3
    assert w.status()["stats"]["compiled"] == before, "unchanged files must not compile"
    assert time.monotonic() - t0 < 5


def test_a_checkout_slower_than_the_debounce_is_one_batch_while_git_holds_its_lock(repo: Path, home: Path) -> None:
    mem = RecordingMemory(repo)
    w = Watcher(repo, memory_factory=lambda r: mem, catch_up=False, **FAST).start()
    lock = repo / ".git" / "index.lock"
    try:
        lock.parent.mkdir()
        lock.write_text("")  # git checkout in progress
        for i in range(6):  # 2.4 s of writes with gaps longer than the debounce, past max_delay_s
            (repo / f"switched_{i}.py").write_text(f"S = {i}\n")
            time.sleep(0.4)
        assert mem.calls == [], "a batch was taken while git was still switching the tree"
        lock.unlink()
        wait_for(lambda: mem.calls and idle(w, 1), what="the checkout synced", watcher=w)
        time.sleep(3 * FAST["debounce_s"])
        assert len(mem.calls) == 1 and sorted(mem.calls[0]) == [f"switched_{i}.py" for i in range(6)]
    finally:
        w.stop()
        w.join(10)


def test_status_carries_the_compile_backlog(watched) -> None:
    w, mem = watched
    wait_for(lambda: not mem.pending and idle(w, 1), what="catch-up compiled", watcher=w)
    assert w.status()["compile"] == {"cubes": 0, "tokens": 0, "tokens_per_s": None, "eta_s": None}
    mem.compile_delay = 0.3
    for i in range(5):
        (w.root / f"more_{i}.py").write_text(f"M = {i}\n")
    wait_for(lambda: (w.status()["compile"] or {}).get("cubes", 0) >= 4, what="backlog counted", watcher=w)
    assert watcher_status(w.root)["compile"]["cubes"] >= 4  # in the status file other processes read
    wait_for(lambda: idle(w, 2) and w.status()["compile"]["cubes"] == 0, 20, "backlog drained", w)


def test_recently_edited_first(repo: Path, home: Path) -> None:
    mem = RecordingMemory(repo)
    w = Watcher(repo, memory_factory=lambda r: mem, catch_up=False, **{**FAST, "debounce_s": 0.6}).start()
    try:
        for name in ("a.py", "b.py", "pkg/c.py"):
            (repo / name).write_text(f"# {name} edited\n")
            time.sleep(0.1)
        wait_for(lambda: mem.calls, what="a batch")
        assert mem.calls[0][:3] == ["pkg/c.py", "b.py", "a.py"]
    finally:
        w.stop()
        w.join(10)


def test_new_edit_jumps_the_compile_backlog(watched_store) -> None:
    w, mem = watched_store
    mem.compile_delay = 0.1  # 30 cubes: 3 s of backlog
    start = len(mem.compiled)
    for i in range(30):
        (w.root / f"gen_{i:02}.py").write_text(f"V = {i}\n")
    wait_for(lambda: mem.queued() >= 20 and w.status()["state"] == "compiling", what="backlog compiling", watcher=w)
    assert (w.status()["current"] or "gen_").startswith("gen_")  # None between two compile steps
    t0 = time.monotonic()
    (w.root / "pkg" / "d.py").write_text("def d():\n    return 'urgent'\n")
    wait_for(lambda: any("urgent" in c.text for c in w.search("urgent")), what="urgent edit searchable", watcher=w)
    assert time.monotonic() - t0 < 1.5, "an edit waited behind the compile backlog"
    backlog = mem.queued() - 1
    assert backlog >= 5, "the backlog should still be compiling"
    wait_for(lambda: not mem.queued() and w.status()["state"] == "idle", 20, "backlog drained", w)
    # compiled right after the cube in flight, ahead of what was left of the backlog
    run = mem.compiled[start:]
    after = run[run.index("pkg/d.py") + 1:]
    assert sum(p.startswith("gen_") for p in after) >= backlog - 1, run


def test_ignored_paths_never_wake_the_memory(watched) -> None:
    w, mem = watched
    n = len(mem.calls)
    (w.root / "debug.log").write_text("noise\n")
    (w.root / ".git").mkdir()
    (w.root / ".git" / "index").write_text("x")
    (w.root / "node_modules").mkdir()
    (w.root / "node_modules" / "x.js").write_text("1")
    time.sleep(0.6)
    assert len(mem.calls) == n


# -- renames, deletes, moved folders, editor saves --------------------------------------------------
def test_rename_and_delete(watched) -> None:
    w, mem = watched
    os.rename(w.root / "a.py", w.root / "renamed.py")
    wait_for(lambda: "renamed.py" in mem.known and "a.py" not in mem.known, what="rename")
    (w.root / "b.py").unlink()
    wait_for(lambda: "b.py" not in mem.known, what="delete")
    assert {"renamed.py", "pkg/c.py"} <= set(mem.known)


def test_folder_moved_within_out_of_and_into_the_repo(watched_store, tmp_path: Path) -> None:
    w, mem = watched_store

    def under(folder: str) -> set[str]:
        return {p for p in mem.indexed_paths() if p.startswith(folder + "/")}

    def searchable(path: str) -> bool:
        return any(c.path == path for c in mem.search(path, k=20))

    os.rename(w.root / "pkg", w.root / "lib")
    wait_for(lambda: under("lib") == {"lib/c.py", "lib/d.py"} and not under("pkg"), what="folder renamed", watcher=w)
    assert searchable("lib/c.py") and not searchable("pkg/c.py")
    os.rename(w.root / "lib", tmp_path / "outside")  # moved away: no per-file events, only the folder's
    wait_for(lambda: not under("lib"), what="folder moved out", watcher=w)
    assert not searchable("lib/c.py")
    os.rename(tmp_path / "outside", w.root / "back")  # moved in
    wait_for(lambda: under("back") == {"back/c.py", "back/d.py"}, what="folder moved in", watcher=w)
    assert searchable("back/d.py")
    shutil.rmtree(w.root / "back")
    wait_for(lambda: not under("back"), what="folder deleted", watcher=w)
    assert not searchable("back/d.py") and searchable("a.py")


def test_editor_save_via_temp_file_and_rename(watched) -> None:
    w, mem = watched
    tmp = w.root / ".a.py.tmp1234"
    tmp.write_text("def a():\n    return 'saved'\n")
    os.replace(tmp, w.root / "a.py")
    want = hashlib.sha256(b"def a():\n    return 'saved'\n").hexdigest()
    wait_for(lambda: mem.known.get("a.py") == want, what="saved content")
    assert ".a.py.tmp1234" not in mem.known


def test_file_that_vanishes_before_its_batch(watched) -> None:
    w, mem = watched
    n = len(mem.calls)
    (w.root / "flash.py").write_text("x = 1\n")
    (w.root / "flash.py").unlink()
    (w.root / "a.py").write_text("def a():\n    return 5\n")
    wait_for(lambda: len(mem.calls) > n and idle(w, 2), what="batch")
    assert "flash.py" not in mem.known and w.status()["error_count"] == 0


# -- ignore rules ---------------------------------------------------------------------------------
def test_gitignore_change_reloads_rules_and_resyncs(watched) -> None:
    w, mem = watched
    (w.root / "gen").mkdir()
    (w.root / "gen" / "out.py").write_text("GENERATED = 1\n")
    wait_for(lambda: "gen/out.py" in mem.known, what="gen/out.py indexed")
    (w.root / ".gitignore").write_text("*.log\ngen/\n")
    wait_for(lambda: "gen/out.py" not in mem.known and mem.index_calls >= 2, what="newly ignored removed")
    (w.root / "gen" / "late.py").write_text("LATE = 1\n")  # ignored now: no sync
    time.sleep(0.5)
    assert "gen/late.py" not in mem.known
    (w.root / ".gitignore").write_text("*.log\n")
    wait_for(lambda: {"gen/out.py", "gen/late.py"} <= set(mem.known), what="un-ignored files back")


def test_root_package_json_entry_points_reload_the_rules(watched) -> None:
    w, mem = watched
    (w.root / "dist").mkdir()
    (w.root / "dist" / "index.js").write_text("module.exports = 1;\n")
    (w.root / "lib").mkdir()
    (w.root / "lib" / "package.json").write_text('{"main": "dist/index.js"}\n')  # not the root's: no reload
    wait_for(lambda: "lib/package.json" in mem.known and idle(w, 1), what="lib/package.json indexed")
    assert "dist/index.js" not in mem.known and mem.index_calls == 1  # vendored output
    (w.root / "package.json").write_text('{"name": "p", "main": "dist/index.js"}\n')
    wait_for(lambda: "dist/index.js" in mem.known and mem.index_calls == 2, what="the entry folder indexed")
    (w.root / "dist" / "extra.js").write_text("module.exports = 2;\n")  # events there are seen now
    wait_for(lambda: "dist/extra.js" in mem.known, what="a new file in the entry folder synced")
    (w.root / "package.json").write_text('{"name": "p", "main": "index.js"}\n')
    wait_for(lambda: not any(p.startswith("dist/") for p in mem.known) and mem.index_calls == 3,
             what="the folder vendored again")


# -- robustness -----------------------------------------------------------------------------------
def test_one_unreadable_file_does_not_block_the_others(repo: Path, home: Path) -> None:
    mem = RecordingMemory(repo, fail={"bad.py"})
    w = Watcher(repo, memory_factory=lambda r: mem, catch_up=False, **FAST).start()
    try:
        (repo / "bad.py").write_text("x = 1\n")
        (repo / "good.py").write_text("y = 2\n")
        wait_for(lambda: "good.py" in mem.known, what="good file synced despite bad one")
        wait_for(lambda: watcher_status(repo)["error_count"] >= 1, what="error in status")
        st = watcher_status(repo)
        assert st["running"] and st["errors"][-1]["path"] == "bad.py"
        assert "PermissionError" in st["errors"][-1]["message"]
        (repo / "a.py").write_text("def a():\n    return 7\n")  # still alive
        wait_for(lambda: mem.known.get("a.py") == hashlib.sha256((repo / "a.py").read_bytes()).hexdigest())
    finally:
        w.stop()
        w.join(10)


def test_symlink_loops_do_not_hurt(watched) -> None:
    w, mem = watched
    os.symlink(".", w.root / "loop")
    os.symlink(w.root / "pkg", w.root / "pkg" / "self")
    os.symlink("missing-target", w.root / "dangling.py")
    (w.root / "a.py").write_text("def a():\n    return 8\n")
    wait_for(lambda: "a.py" in mem.synced() and idle(w, 2), what="edit after symlinks")
    assert not any(p.startswith(("loop/", "pkg/self/")) for p in mem.known)
    assert w._thread is not None and w._thread.is_alive()


def test_repository_deleted_then_back(watched_store, tmp_path: Path) -> None:
    w, mem = watched_store
    known = mem.indexed_paths()
    shutil.rmtree(w.root)
    wait_for(lambda: watcher_status(tmp_path / "repo")["state"] == "waiting_for_repo", what="waiting_for_repo")
    st = watcher_status(tmp_path / "repo")
    assert st["running"] and any("disappeared" in e["message"] or "missing" in e["message"] for e in st["errors"])
    time.sleep(FAST["debounce_s"] * 3)  # the deletions of the files inside would have formed a batch by now
    # the memory of a vanished folder is kept (it may be an unplugged drive), not wiped
    assert mem.indexed_paths() == known
    (w.root / "pkg").mkdir(parents=True)
    (w.root / "pkg" / "c.py").write_text("def c():\n    return 3\n")
    (w.root / "new.py").write_text("N = 1\n")
    wait_for(lambda: "new.py" in mem.indexed_paths() and w.status()["state"] == "idle", what="caught up after return")
    assert "a.py" not in mem.indexed_paths() and "pkg/c.py" in mem.indexed_paths()  # the catch-up
    (w.root / "new.py").write_text("N = 2\n")  # and the new folder is watched
    wait_for(lambda: any("N = 2" in c.text for c in mem.search("new", k=5)), what="watching again")


def test_slow_rm_rf_of_the_repository_keeps_the_memory(repo: Path, home: Path) -> None:
    for i in range(60):
        (repo / "pkg" / f"m{i:02}.py").write_text(f"M = {i}\n")
    mem = PlaintextMemory.at(repo)
    w = Watcher(repo, memory_factory=lambda r: mem, **FAST).start()
    try:
        wait_for(lambda: len(mem.indexed_paths()) >= 64 and idle(w, 1), what="catch-up", watcher=w)
        known = mem.indexed_paths()
        for p in sorted(repo.rglob("*.py")):  # `rm -rf` of a big tree: the files go first, slowly
            p.unlink()
        time.sleep(0.5)  # longer than the debounce: the file deletions form a batch of their own
        shutil.rmtree(repo)
        wait_for(lambda: w.status()["state"] == "waiting_for_repo", what="waiting_for_repo")
        assert mem.indexed_paths() == known, "the memory of a deleted repository folder is kept"
        assert any(c.path == "pkg/m07.py" for c in mem.search("M m07", k=5))
    finally:
        w.stop()
        w.join(10)


def test_emptied_root_is_treated_as_unmounted(watched_store) -> None:
    w, mem = watched_store
    known = mem.indexed_paths()
    for p in sorted(w.root.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    wait_for(lambda: w.status()["state"] == "waiting_for_repo", what="empty root -> waiting")
    time.sleep(FAST["debounce_s"] * 3)
    assert mem.indexed_paths() == known, "an emptied mount point must not wipe the memory"
    (w.root / "a.py").write_text("def a():\n    return 1\n")
    wait_for(lambda: w.status()["state"] == "idle" and mem.indexed_paths() == ["a.py"], what="back")


# -- idle cost, unload, shutdown ----------------------------------------------------------------------
def test_idle_watcher_uses_no_cpu_and_releases_the_model(repo: Path, home: Path) -> None:
    mem = RecordingMemory(repo)
    w = Watcher(repo, memory_factory=lambda r: mem, **{**FAST, "idle_unload_s": 0.4}).start()
    try:
        wait_for(lambda: mem.released == 1, what="model released after idle")
        # The status file is written right after the release: wait for it rather than race it.
        wait_for(lambda: not w.status()["model_loaded"], what="status shows the model unloaded")
        time.sleep(0.3)
        t0 = time.process_time()
        time.sleep(2.0)
        used = time.process_time() - t0
        assert used < 0.1, f"idle watcher used {used:.3f}s CPU in 2s"
        assert mem.released == 1  # nothing loaded: no further timers
        (repo / "a.py").write_text("def a():\n    return 9\n")
        wait_for(lambda: mem.released == 2, what="released again after the next edit")
    finally:
        w.stop()
        w.join(10)


def test_settings_edit_reopens_the_memory_and_a_failed_reopen_is_reported(repo: Path, home: Path) -> None:
    from repomem.core import settings as settings_mod

    mems: list[RecordingMemory] = []

    def factory(root: Path) -> RecordingMemory:
        if len(mems) == 1 and not getattr(factory, "failed", False):
            factory.failed = True  # type: ignore[attr-defined]
            raise OSError("model file unreadable")
        mems.append(RecordingMemory(root))
        return mems[-1]

    w = Watcher(repo, memory_factory=factory, **FAST).start()
    try:
        wait_for(lambda: idle(w, 1), what="catch-up")
        s = settings_mod.load()
        s.top_k += 1
        settings_mod.save(s)  # picked up without an event in the repository
        wait_for(lambda: w.status()["error_count"] == 1, what="failed reopen reported")
        assert mems[0].closed and "reopening with the new settings failed" in w.status()["errors"][0]["message"]
        (repo / "a.py").write_text("def a():\n    return 5\n")
        wait_for(lambda: len(mems) == 2 and "a.py" in mems[1].synced(), what="next job reopens the memory")
        assert w.failed is None  # the watcher itself carried on
    finally:
        w.stop()
        assert w.join(10)


def test_stop_cancels_the_running_sync(repo: Path, home: Path) -> None:
    mem = RecordingMemory(repo, delay=30)
    w = Watcher(repo, memory_factory=lambda r: mem, **FAST).start()
    wait_for(lambda: mem.calls, what="sync running")
    t0 = time.monotonic()
    w.stop()
    assert w.join(10) and time.monotonic() - t0 < 5
    assert mem.cancelled and mem.closed
    st = watcher_status(repo)
    assert st["state"] == "stopped" and not st["running"]


# -- lock and status ----------------------------------------------------------------------------------
def test_second_watcher_refused_and_status_visible(watched) -> None:
    w, _ = watched
    with pytest.raises(RepomemError, match=rf"already watched .*pid {os.getpid()}"):
        Watcher(w.root, memory_factory=lambda r: RecordingMemory(r), **FAST).start()
    st = watcher_status(w.root)
    assert st["running"] and st["pid"] == os.getpid() and st["state"] == "idle"
    assert st["stats"]["batches"] >= 1 and st["last_update"] and st["log"].endswith("watch.log")


def test_file_system_without_locks_is_named_not_reported_as_held(repo: Path, monkeypatch) -> None:
    """NFS without lockd and some FUSE mounts answer flock with ENOLCK: that is no watcher holding the repository."""
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(RepomemError, match="does not support file locks") as refused:
        Watcher(repo, memory_factory=lambda r: RecordingMemory(r), **FAST).start()
    assert "pid" not in str(refused.value)
    assert watcher_status(repo)["running"] is False


def test_second_watcher_cli_is_refused(watched) -> None:
    w, _ = watched
    proc = subprocess.run([sys.executable, "-m", "repomem.app.cli", "watch", str(w.root)],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert proc.returncode == 1
    assert "already watched" in proc.stderr and str(os.getpid()) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_status_cli(watched) -> None:
    from repomem.app.cli import cli

    w, _ = watched
    res = CliRunner().invoke(cli, ["status", str(w.root), "--json"])
    assert res.exit_code == 0, res.output
    import json

    data = json.loads(res.output)
    assert data["running"] and data["pid"] == os.getpid() and data["state"] == "idle"
    res = CliRunner().invoke(cli, ["status", str(w.root)])
    assert res.exit_code == 0 and "running" in res.output


def test_crashed_watcher_is_reported(repo: Path, home: Path) -> None:
    write_status(repo.resolve(), {"state": "syncing", "pid": 999999, "queue": 3, "current": "a.py"})
    st = watcher_status(repo)
    assert not st["running"] and st["state"] == "crashed" and st["queue"] == 0 and st["current"] is None
    assert not lock_path(repo.resolve()).exists() or st["pid"] is None


# -- the real memory, the test model ---------------------------------------------------------------
SOURCE = '''\
def parse_config(text):
    """Parse key=value lines."""
    out = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def render_banner(name):
    return "*** " + name + " ***"
'''


@pytest.fixture
def real_repo(tmp_path: Path, home: Path, test_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REPOMEM_MODEL", str(test_model_path))
    root = tmp_path / "proj"
    root.mkdir()
    (root / "config.py").write_text(SOURCE)
    (root / "util.py").write_text("def add(a, b):\n    return a + b\n")
    return root


def _cube_for(w: Watcher, query: str, symbol: str):
    for c in w.search(query, k=5):
        if c.symbol and symbol in c.symbol and c.path == "config.py":
            return c
    return None


@pytest.mark.slow
def test_integration_edit_one_function(real_repo: Path) -> None:
    from repomem.core import engine_pool

    w = Watcher(real_repo, debounce_s=0.2, idle_unload_s=3.0).start()
    try:
        wait_for(lambda: w.status()["stats"]["batches"] >= 1 and w.status()["state"] == "idle", 120, "catch-up", w)
        before = _cube_for(w, "render_banner", "render_banner")
        assert before is not None and "***" in before.text
        t0 = time.monotonic()
        (real_repo / "config.py").write_text(SOURCE.replace('"*** " + name + " ***"', '"=== " + name.upper() + " ==="'))
        wait_for(lambda: (c := _cube_for(w, "render_banner upper", "render_banner")) is not None and "===" in c.text,
                 10, "updated cube searchable", w)
        searchable_s = time.monotonic() - t0
        after = _cube_for(w, "render_banner upper", "render_banner")
        assert after.id == before.id and after.version > before.version
        wait_for(lambda: _cube_for(w, "render_banner upper", "render_banner").kind == "activation", 60,
                 "the edited function compiled", w)
        compiled_s = time.monotonic() - t0
        wait_for(lambda: w.status()["state"] == "idle", 60, "compile queue drained", w)
        parse = _cube_for(w, "parse_config", "parse_config")
        assert parse is not None and parse.version == 1, "the untouched function kept its cube"
        changes = [c for c in w.search("what changed in config.py render_banner", k=10) if c.source == "change"]
        assert changes and "config.py" in changes[0].text and "render_banner" in changes[0].text
        assert searchable_s < 5 and compiled_s < 60, (searchable_s, compiled_s)
        # idle: the model leaves memory, the watcher stays
        wait_for(lambda: not w.status()["model_loaded"], 20, "model released when idle", w)
        assert engine_pool.loaded() == 0
        (real_repo / "util.py").write_text("def add(a, b):\n    return b + a\n")
        wait_for(lambda: any(c.kind == "activation" and "b + a" in c.text for c in w.search("add", k=5)), 60,
                 "compiled again after the unload", w)
    finally:
        w.stop()
        assert w.join(60)
    st = watcher_status(real_repo)
    assert st["state"] == "stopped" and not st["running"] and st["error_count"] == 0, st["errors"]


@pytest.mark.slow
def test_spawned_watcher_runs_detached_and_stops_on_sigterm(real_repo: Path) -> None:
    from repomem.core.watch import spawn_watcher

    pid = spawn_watcher(real_repo)
    try:
        st = watcher_status(real_repo)
        assert st["running"] and st["pid"] == pid
        assert spawn_watcher(real_repo) == pid  # idempotent
        wait_for(lambda: watcher_status(real_repo)["stats"].get("batches", 0) >= 1
                 and watcher_status(real_repo)["state"] == "idle", 120, "catch-up in the child")
        (real_repo / "util.py").write_text("def add(a, b):\n    return b + a\n")
        wait_for(lambda: watcher_status(real_repo)["stats"]["changed"] >= 1, 60, "edit synced by the child")
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not watcher_status(real_repo)["running"], 60, "child stopped")
    st = watcher_status(real_repo)
    assert st["state"] == "stopped", st
    assert "watcher stopped" in Path(st["log"]).read_text()


@pytest.mark.slow
def test_encoding_changed_in_settings_reaches_the_running_watchers_payloads(real_repo: Path) -> None:
    from repomem.core import settings as settings_mod
    from repomem.core.memory import RepoMemory

    s = settings_mod.load()
    s.encoding = "f16"
    settings_mod.save(s)
    w = Watcher(real_repo, debounce_s=0.2).start()
    m = RepoMemory.open(real_repo, settings=s)  # a reader beside the watcher, like the app

    def encodings() -> set[str | None]:
        return {c.encoding for c in m.store.cubes(kind="activation", status="active")}

    try:
        wait_for(lambda: w.status()["stats"]["compiled"] >= 2 and w.status()["state"] == "idle", 120,
                 "catch-up compiled", w)
        assert encodings() == {"f16"}
        n = len(m.store.cubes(kind="activation", status="active"))
        s.encoding = "k4v3"
        settings_mod.save(s)  # the app's dialog does this; the watcher is neither restarted nor told
        wait_for(lambda: encodings() == {"k4v3"}, 30, "payloads re-encoded by the watcher", w)
        assert len(m.store.cubes(kind="activation", status="active")) == n
        assert w.status()["stats"]["compiled"] >= 2 + n  # one re-encode per compile step
    finally:
        m.close()
        w.stop()
        assert w.join(60)
