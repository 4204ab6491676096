"""Every call the GUI makes into repomem.core, as functions that run on a worker thread.

Why in one module: the shell stays thin and its contract with core is visible at a glance. Functions
taking `(mem, job)` run on the memory worker (they need the repository's `RepoMemory`: model,
retrieval index, conversations); functions taking `(store, job)` or `(convs, job)` run on short-lived
threads against a `CubeStore` / `ConversationStore` of their own (`StoreAccess`), so the inspector,
the sidebar's counters and the chat history never wait behind a long answer or a compile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .jobs import Job, run_detached

IGNORE_FILE = ".repomemignore"


# -- on the memory worker (mem = RepoMemory) --------------------------------------------------
def index_plaintext(mem: Any, job: Job) -> Any:
    """Walk + chunk + plaintext cubes: the repository is searchable before any model runs."""
    return mem.index(compile=False, progress=job.report, cancel=job.cancel)


def compile_pending(mem: Any, job: Job) -> int:
    """Compile everything pending, hottest first, batch after batch.

    A cancel (an interactive job arrived, or the app closes) stops between cubes; core then returns
    normally with what it did, so it is turned into CancelledError here: "cancelled" must not read
    as "nothing left to compile".
    """
    from repomem.core import CancelledError

    total = 0
    while True:
        n = mem.compile_pending(progress=job.report, cancel=job.cancel)
        if job.cancel.is_set():
            raise CancelledError("compile pre-empted")
        total += n
        if n == 0:
            return total


def refresh_from_store(mem: Any, _job: Job) -> int:
    """Pick up cubes another process (the watcher) wrote; returns how many were re-indexed."""
    return mem.refresh()


def compile_for(question: str) -> Callable[[Any, Job], int]:
    """Compile now the cubes this question will retrieve (scripted runs: KV answers, not text fallbacks)."""
    def run(mem: Any, job: Job) -> int:
        ids = [c.id for c in mem.search(question, k=mem.settings.top_k)]
        return int(mem.compile_ids(ids, cancel=job.cancel)) if ids else 0

    return run


History = list[tuple[str, str]] | None  # None: the conversation's own last exchanges


def asker(question: str, mode: str, conversation_id: str | None,
          history: History = None) -> Callable[[Any, Job], Any]:
    def ask(mem: Any, job: Job) -> Any:
        return mem.ask(question, mode=mode, conversation_id=conversation_id or None, history=history,
                       on_text=job.stream, cancel=job.cancel)

    return ask


def asker_across(question: str, mode: str, conversation_id: str | None,
                 history: History = None) -> Callable[[list[Any], Job], Any]:
    """Ask the memories of several repositories at once; the first one's conversation records it."""
    def ask(mems: list[Any], job: Job) -> Any:
        from repomem.core import ask_across

        return ask_across(mems, question, mode=mode, conversation_id=conversation_id or None, history=history,
                          on_text=job.stream, cancel=job.cancel)

    return ask


def regenerate(question: str, mode: str, drop_from: str, conversation_id: str, *,
               across: bool = False) -> Callable[[Any, Job], Any]:
    """Ask the question again, without the last exchange of conversation `drop_from` (if given) in its
    history, and drop that exchange once the new answer is in (`across`: of the memories `mems`, whose first
    one holds the conversation). An answer that fails or is stopped leaves the old exchange as it was."""
    def run(target: Any, job: Job) -> Any:
        conversations = (target[0] if across else target).conversations
        old = conversations.last_exchange(drop_from) if drop_from else []
        history = conversations.recent_exchanges(drop_from, skip=old) if drop_from else None
        ans = (asker_across if across else asker)(question, mode, conversation_id, history)(target, job)
        if old and ans.stop_reason != "cancelled":
            conversations.delete_messages(old)
        return ans

    return run


def edit_note(cube_id: str, text: str) -> Callable[[Any, Job], Any]:
    """Replace a note's text (core refuses secrets and re-indexes it)."""
    return lambda mem, _job: mem.edit_note(cube_id, text)


def exclude_path(rel_path: str) -> Callable[[Any, Job], int]:
    """Append the path to `.repomemignore`, then delete its cubes now; returns how many went.

    A file that becomes ignored is only archived by core (its history kept, in case it comes
    back); a user who excludes a path usually means "forget this" (a secret, generated noise), so its
    cubes are forgotten outright. The watcher would archive them later anyway.
    """
    def run(mem: Any, job: Job) -> int:
        add_ignore_line(Path(mem.root), rel_path)
        mem.reload_ignores()
        mem.sync_paths([rel_path], compile=False, cancel=job.cancel)
        gone = [c.id for c in mem.store.cubes(path_glob=glob_escape(rel_path)) if c.path == rel_path]
        for cube_id in gone:
            mem.store.forget(cube_id)
        return len(gone)

    return run


def glob_escape(text: str) -> str:
    """A literal for SQLite GLOB: each special character in brackets."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in text)


def recompile(cube_id: str) -> Callable[[Any, Job], int]:
    """Compile one cube again now: drop its payload (archive), let it back in the queue, compile it.

    Forcing matters: a payload compiled with other settings (keep ratio, encoding) or one the user
    distrusts would otherwise be kept, since `compile_ids` skips cubes that have a current payload.
    """
    def run(mem: Any, job: Job) -> int:
        mem.store.archive(cube_id, reason="recompile requested")
        mem.store.promote(cube_id)
        return int(mem.compile_ids([cube_id], cancel=job.cancel))

    return run


def add_ignore_line(root: Path, rel_path: str) -> Path:
    """Append `/rel_path` (anchored at the root, gitignore syntax) to `.repomemignore` unless present."""
    path = root / IGNORE_FILE
    line = "/" + rel_path.lstrip("/").replace("\\", "/")
    existing = path.read_text().splitlines() if path.exists() else []
    if line not in existing and rel_path not in existing:
        with path.open("a") as fh:
            if existing and not path.read_text().endswith("\n"):
                fh.write("\n")
            fh.write(line + "\n")
    return path


# -- on short-lived threads (store = CubeStore) -----------------------------------------------
class StoreAccess:
    """Extra connections to a repository's cube store and conversation store, for short-lived threads.

    Both are SQLite in WAL mode and safe to share between threads, so reading the memory or the chat
    history never waits for the memory worker, which may be in the middle of a model run.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _get(self, root: str, kind: str) -> Any:
        with self._lock:
            if self._closed:
                from repomem.core import CancelledError

                raise CancelledError("the window is closing")
            obj = self._open.get((root, kind))
            if obj is None:
                from repomem.core import paths

                folder = paths.repo_dir(Path(root))
                if kind == "cubes":
                    from repomem.core import CubeStore

                    obj = CubeStore.open(folder)
                else:
                    from repomem.core import ConversationStore

                    obj = ConversationStore.in_folder(folder)
                self._open[(root, kind)] = obj
            return obj

    def store(self, root: str) -> Any:
        return self._get(root, "cubes")

    def conversations(self, root: str) -> Any:
        return self._get(root, "conversations")

    def run(self, root: str, fn: Callable[[Any, Job], Any], name: str = "") -> Job:
        """Run `fn(cube_store, job)` on its own thread; results arrive as the job's signals."""
        return run_detached(Job(lambda job: fn(self.store(root), job), name=name, root=root))

    def run_chat(self, root: str, fn: Callable[[Any, Job], Any], name: str = "") -> Job:
        """Run `fn(conversation_store, job)` on its own thread."""
        return run_detached(Job(lambda job: fn(self.conversations(root), job), name=name, root=root))

    def close(self, root: str | None = None) -> None:
        """Close one repository's stores, or all of them for good (root None: the app is closing)."""
        with self._lock:
            if root is None:
                self._closed = True
            for key in [k for k in self._open if root is None or k[0] == root]:
                self._open.pop(key).close()


def list_conversations(convs: Any, _job: Job) -> list[Any]:
    return convs.list()


def conversation_messages(conversation_id: str) -> Callable[[Any, Job], list[Any]]:
    return lambda convs, _job: convs.messages(conversation_id)


def rename_conversation(conversation_id: str, title: str) -> Callable[[Any, Job], None]:
    return lambda convs, _job: convs.rename(conversation_id, title)


def delete_conversation(conversation_id: str) -> Callable[[Any, Job], None]:
    return lambda convs, _job: convs.delete(conversation_id)


def repo_stats(store: Any, _job: Job) -> dict[str, Any]:
    return store.stats()


def cube_listing(query: dict[str, Any], keep: list[str], first: int,
                 shape: Callable[[Any], Any]) -> Callable[[Any, Job], tuple[list[str], int, list[Any]]]:
    """The inspector's listing: ids of the cubes matching `query` (`CubeStore.cube_ids` arguments) in order,
    the store's total, and `shape`d fields (no text) of the first `first` cubes and of those in `keep`."""
    def run(store: Any, _job: Job) -> tuple[list[str], int, list[Any]]:
        ids = store.cube_ids(**query)
        return ids, store.count(), [shape(r) for r in store.cube_fields(dict.fromkeys([*ids[:first], *keep]))]

    return run


def cube_window(ids: list[str], shape: Callable[[Any], Any]) -> Callable[[Any, Job], list[Any]]:
    """`shape`d fields (no text) of these cubes, those still in the store."""
    return lambda store, _job: [shape(r) for r in store.cube_fields(ids)]


def cube_detail(cube_id: str) -> Callable[[Any, Job], tuple[Any, list[Any]]]:
    return lambda store, _job: (store.get(cube_id), store.history(cube_id))


def pin_cube(cube_id: str, pinned: bool) -> Callable[[Any, Job], bool]:
    return lambda store, _job: store.pin(cube_id, pinned)


def forget_cube(cube_id: str) -> Callable[[Any, Job], bool]:
    return lambda store, _job: store.forget(cube_id)
