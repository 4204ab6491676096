"""Start or attach to the watcher of each repository, and read its status.

Why one small module: the watcher is core's (`core/watch.py`, a detached `repomem watch PATH`
process that survives the window); the GUI only asks "is it running, what is it doing" (a status
file plus an OS lock: cheap enough to poll on the GUI thread) and "start it" (which waits up to a
few seconds for the new process to take its lock, so it runs on a worker thread).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

STATE_WORDS = {
    "idle": "watching", "syncing": "syncing changes", "catching_up": "catching up", "starting": "starting watcher",
    "waiting_for_repo": "waiting for the folder", "stopping": "watcher stopping", "stopped": "not watched",
    "crashed": "watcher stopped unexpectedly",
}


def status(root: str | Path) -> dict[str, Any]:
    """core's watcher snapshot ({} when its status file cannot be read)."""
    from repomem.core import watcher_status

    try:
        return watcher_status(root)
    except OSError:
        return {}


def describe(st: dict[str, Any]) -> str:
    """A few words for the sidebar."""
    if not st:
        return "not watched"
    state = str(st.get("state") or "stopped")
    if not st.get("running"):
        return STATE_WORDS["crashed"] if state == "crashed" else STATE_WORDS["stopped"]
    return STATE_WORDS.get(state, state)


def stop(root: str | Path) -> bool:
    """Ask the repository's watcher to shut down (the repository was removed from the app). Blocks."""
    from repomem.core import stop_watcher

    return stop_watcher(root)


def ensure_running(root: str | Path) -> int:
    """Attach to the repository's watcher or start one; returns its pid. Blocks up to
    `spawn_watcher`'s `wait_s` while a new one starts."""
    from repomem.core import spawn_watcher

    return spawn_watcher(root)
