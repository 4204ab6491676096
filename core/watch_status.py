"""What other processes can learn about a repository's watcher, without importing watchdog or the model.

Why a status file plus a lock instead of a socket: the GUI and `repomem status` only need a snapshot
(running? pid, queue, current file, last update, errors), the watcher may be busy in a compile for
seconds, and a file written atomically (temp + rename) can be read at any time by anyone. Liveness
never comes from the file (a killed watcher cannot clean up): it comes from the OS lock in
`locks.py`, which dies with the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import atomic, paths
from .errors import RepomemError
from .locks import holder

# 2: `compile` (the compile backlog, rate and ETA). A reader fills what an older file lacks with defaults.
STATUS_VERSION = 2
STATUS_FILE = "watch-status.json"
LOCK_FILE = "watch.lock"
LOG_FILE = "watch.log"


def status_path(root: Path) -> Path:
    return paths.store_dir(root) / STATUS_FILE


def lock_path(root: Path) -> Path:
    return paths.store_dir(root) / LOCK_FILE


def log_path(root: Path) -> Path:
    return paths.store_dir(root) / LOG_FILE


def write_status(root: Path, data: dict[str, Any]) -> None:
    """Atomic replace: a reader sees the old snapshot or the new one, never half of one."""
    path = status_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(data, indent=1, default=str), durable=False)


def read_status(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads(status_path(root).read_text())
    except (OSError, ValueError):
        return None


def watcher_status(root: str | Path) -> dict[str, Any]:
    """The watcher's last snapshot plus liveness from the lock.

    Keys: running (bool), pid (int|None), state (starting, catching_up, idle, syncing, compiling,
    waiting_for_repo, stopping, stopped, crashed), queue (paths waiting), current (file being
    synced or compiled, or None), batch (paths of the batch in progress), progress
    ({stage, done, total}|None), last_update (last batch synced) / last_change (last batch that
    changed cubes) / last_compile (compile queue drained) / last_event / started / updated (epoch
    seconds or None),
    model_loaded (bool), compile ({cubes, tokens, tokens_per_s, eta_s}|None: what is left to compile,
    tokens estimated from the text, the measured compile rate in tokens per second and the seconds left
    at that rate, None until measured), errors (last 20: {time, path, message}), error_count, stats
    ({batches, files, changed, removed, compiled}), root, log (path of watch.log).
    `crashed`: the file says a watcher was active but nobody holds the lock any more.
    """
    root = Path(root).expanduser().resolve()
    pid = holder(lock_path(root))
    data = read_status(root) or {}
    out: dict[str, Any] = {
        "root": str(root), "state": "stopped", "queue": 0, "current": None, "batch": [], "progress": None,
        "last_update": None, "last_change": None, "last_compile": None, "last_event": None, "started": None,
        "updated": None,
        "model_loaded": False, "compile": None, "errors": [], "error_count": 0, "stats": {},
        "log": str(log_path(root)),
    }
    out.update({k: v for k, v in data.items() if k != "version"})
    out["running"] = pid is not None
    out["pid"] = pid if pid else (data.get("pid") if pid == 0 else None)
    if pid is None:
        if out["state"] not in ("stopped",):
            out["state"] = "crashed"
        out.update(queue=0, current=None, batch=[], progress=None, model_loaded=False)
    return out


def describe_backlog(backlog: dict[str, Any] | None) -> str:
    """One line for a person: what is left to compile and about how long it takes (see `compile` above)."""
    if not backlog or not backlog.get("cubes"):
        return "nothing left to compile"
    text = f"{backlog['cubes']:,} cubes (~{backlog.get('tokens') or 0:,} tokens) left to compile"
    rate, eta = backlog.get("tokens_per_s"), backlog.get("eta_s")
    if not rate or eta is None:
        return f"{text}, rate not measured yet"
    minutes = eta / 60
    span = (f"{eta:.0f} s" if eta < 90 else f"{minutes:.0f} min" if minutes < 90
            else f"{minutes // 60:.0f} h {minutes % 60:.0f} min" if minutes < 48 * 60 else f"{minutes / 1440:.1f} days")
    return f"{text}: about {span} at {rate:,.0f} tokens/s"


def spawn_watcher(root: str | Path, *, wait_s: float = 15.0) -> int:
    """Start `repomem watch ROOT` detached from the caller (the GUI); returns its pid.

    Idempotent: if a watcher already holds the repository, its pid is returned. Waits until the new
    process holds the lock, so a caller can show "watching" truthfully; raises RepomemError with the
    log's last line when it exits instead.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise RepomemError(f"not a folder: {root}")
    running = holder(lock_path(root))
    if running is not None:
        return running
    log = log_path(root)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "repomem.app.cli", "watch", str(root)]
    kwargs: dict[str, Any] = {}
    if sys.platform == "win32":  # pragma: no cover
        kwargs["creationflags"] = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        kwargs["start_new_session"] = True  # no SIGINT from the GUI's terminal, survives the GUI
    with open(log, "ab") as err:  # early crashes (before logging starts) still land in the log
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                close_fds=True, **kwargs)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if holder(lock_path(root)) == proc.pid:
            return proc.pid
        code = proc.poll()
        if code is not None:
            other = holder(lock_path(root))
            if other:  # lost a race with another starter: that watcher is as good as ours
                return other
            last = _last_line(log)
            raise RepomemError(f"the watcher exited at once (code {code}): {last or 'see ' + str(log)}")
        time.sleep(0.05)
    return proc.pid  # still starting (slow machine): it will take the lock or log why not


def stop_watcher(root: str | Path, *, wait_s: float = 30.0) -> bool:
    """Ask the repository's watcher to shut down cleanly (SIGTERM); True once it has let go of the lock."""
    import signal

    root = Path(root).expanduser().resolve()
    pid = holder(lock_path(root))
    if not pid:
        return pid is None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    except PermissionError as exc:
        raise RepomemError(f"cannot stop the watcher (pid {pid}): {exc}") from None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if holder(lock_path(root)) is None:
            return True
        time.sleep(0.05)
    return False


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:300] if lines else ""
