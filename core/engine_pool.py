"""One loaded model per process, shared by every repository's memory.

Loading a GGUF costs a second and hundreds of MB; the GUI with five repositories and the watcher
should hold it once. Engines are released when the last user lets go and stay cached until
`unload_idle()` (the watcher calls it after a quiet period) or process exit.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from .engine import Engine

_lock = threading.Lock()
_engines: dict[tuple[str, int | None], Engine] = {}
_users: dict[tuple[str, int | None], int] = {}
_last_release: dict[tuple[str, int | None], float] = {}


def acquire(model_path: Path, n_gpu_layers: int | None = None) -> Engine:
    key = (str(Path(model_path).resolve()), n_gpu_layers)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = Engine(model_path, n_gpu_layers=n_gpu_layers)
            _engines[key] = engine
        _users[key] = _users.get(key, 0) + 1
        return engine


def release(engine: Engine) -> None:
    with _lock:
        for key, e in _engines.items():
            if e is engine:
                _users[key] = max(0, _users.get(key, 0) - 1)
                _last_release[key] = time.monotonic()


def unload_idle(idle_s: float = 0.0) -> int:
    """Free engines nobody uses and nobody used for idle_s seconds; returns how many were freed."""
    now, freed = time.monotonic(), 0
    with _lock:
        for key in list(_engines):
            if _users.get(key, 0) == 0 and now - _last_release.get(key, 0) >= idle_s:
                _engines.pop(key).close()
                freed += 1
    return freed


def loaded() -> int:
    with _lock:
        return len(_engines)
