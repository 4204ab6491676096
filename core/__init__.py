"""repomem core: engine, models, memory compiler, MemCube store, retrieval, answering, watch.

Nothing here imports Qt: the GUI and the CLI in `repomem.app` are thin shells over this package, and
what they use is exported here (`__all__`); the modules behind it are the implementation. Names load
on first use, so `import repomem.core` stays cheap (the model runtime loads with `RepoMemory` or
`Engine`). docs/ARCHITECTURE.md describes the modules and the facade.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("repomem")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> (module, name in it)
_EXPORTS: dict[str, tuple[str, str]] = {
    # one repository's memory and what its methods return
    "RepoMemory": ("memory", "RepoMemory"),
    "Answer": ("answering", "Answer"),
    "AnswerScore": ("answering", "AnswerScore"),
    "Source": ("answering", "Source"),
    "IndexSummary": ("indexing", "IndexSummary"),
    # one question across several repositories' memories
    "ask_across": ("across", "ask_across"),
    # settings.json
    "Settings": ("settings", "Settings"),
    "load_settings": ("settings", "load"),
    "save_settings": ("settings", "save"),
    # the stores a shell may open beside a RepoMemory (inspector, history)
    "Cube": ("store", "Cube"),
    "CubeStore": ("store", "CubeStore"),
    "ConversationStore": ("conversations", "ConversationStore"),
    # models
    "Engine": ("engine", "Engine"),
    "SamplingParams": ("engine", "SamplingParams"),
    "resolve_model": ("models", "resolve_model"),
    # the repository watcher
    "Watcher": ("watch", "Watcher"),
    "WatchedMemory": ("watch", "WatchedMemory"),
    "run_watch": ("watch", "run_watch"),
    "setup_logging": ("watch", "setup_logging"),
    "spawn_watcher": ("watch_status", "spawn_watcher"),
    "stop_watcher": ("watch_status", "stop_watcher"),
    "watcher_status": ("watch_status", "watcher_status"),
    "describe_backlog": ("watch_status", "describe_backlog"),
    "watcher_threads": ("watch", "watcher_threads"),
    "watcher_log_path": ("watch_status", "log_path"),
    # one-shot reports and the remote text mode
    "doctor_report": ("doctor", "report"),
    "check_store": ("store_check", "check_store"),
    "ask_remote": ("remote", "ask_remote"),
    # errors a user can act on
    "RepomemError": ("errors", "RepomemError"),
    "ModelError": ("errors", "ModelError"),
    "StoreError": ("errors", "StoreError"),
    "ContextOverflowError": ("errors", "ContextOverflowError"),
    "CancelledError": ("errors", "CancelledError"),
}

# `models` (the catalogue: fetch, spec, installed) and `paths` (the data home) are used as namespaces.
_MODULES = ("models", "paths")

__all__ = [
    "__version__",
    "models",
    "paths",
    "RepoMemory",
    "Answer",
    "AnswerScore",
    "Source",
    "IndexSummary",
    "ask_across",
    "Settings",
    "load_settings",
    "save_settings",
    "Cube",
    "CubeStore",
    "ConversationStore",
    "Engine",
    "SamplingParams",
    "resolve_model",
    "Watcher",
    "WatchedMemory",
    "run_watch",
    "setup_logging",
    "spawn_watcher",
    "stop_watcher",
    "watcher_status",
    "describe_backlog",
    "watcher_threads",
    "watcher_log_path",
    "doctor_report",
    "check_store",
    "ask_remote",
    "RepomemError",
    "ModelError",
    "StoreError",
    "ContextOverflowError",
    "CancelledError",
]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from . import models, paths
    from .across import ask_across
    from .answering import Answer, AnswerScore, Source
    from .conversations import ConversationStore
    from .cube import Cube
    from .doctor import report as doctor_report
    from .engine import Engine, SamplingParams
    from .errors import CancelledError, ContextOverflowError, ModelError, RepomemError, StoreError
    from .indexing import IndexSummary
    from .memory import RepoMemory
    from .models import resolve_model
    from .remote import ask_remote
    from .settings import Settings
    from .settings import load as load_settings
    from .settings import save as save_settings
    from .store import CubeStore
    from .store_check import check_store
    from .watch import WatchedMemory, Watcher, run_watch, setup_logging, watcher_threads
    from .watch_status import describe_backlog, spawn_watcher, stop_watcher, watcher_status
    from .watch_status import log_path as watcher_log_path
