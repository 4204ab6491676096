"""The repositories one server process serves: their memories, watchers, model names and health.

Each repository is kept current by its watcher: the one already running for it (another process,
e.g. the desktop app's), or one started here, in this process, when none runs. Either way the
watcher writes the store and this process's memory picks the changes up on its next search.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repomem.core import RepomemError, RepoMemory, Settings, load_settings

log = logging.getLogger(__name__)
MODEL_PREFIX = "repomem"
MODES = ("kv", "text", "none")  # the `:mode` suffixes a model name may carry
STALE_LISTED = 20  # stale file names /health lists (the count is always complete)


class ModelNotFound(RepomemError):
    pass


@dataclass
class ServedRepo:
    name: str  # model id: repomem/<name>
    root: Path
    mem: RepoMemory
    watcher: Any = None  # a core.watch.Watcher started by this process; None when another process watches

    @property
    def model_id(self) -> str:
        return f"{MODEL_PREFIX}/{self.name}"


class Repositories:
    """Open with `Repositories.open(paths, ...)`; `close()` stops the watchers started here."""

    def __init__(self, repos: list[ServedRepo], settings: Settings):
        if not repos:
            raise RepomemError("no repository to serve")
        self.repos = repos
        self.settings = settings

    @classmethod
    def open(cls, paths: list[str | Path], *, settings: Settings | None = None, model: str | None = None,
             watch: bool = True, debounce_s: float = 0.25) -> Repositories:
        """Open each repository's memory (indexing it as plaintext first if it never was) and watch it."""
        settings = settings or load_settings()
        served: list[ServedRepo] = []
        try:
            for p in paths:
                root = Path(p).expanduser().resolve()
                if not root.is_dir():
                    raise RepomemError(f"not a folder: {root}")
                if any(r.root == root for r in served):
                    continue
                mem = RepoMemory.open(root, settings=settings, model=model)
                repo = ServedRepo(_unique_name(root, served), root, mem)
                served.append(repo)
                if not mem.store.files():
                    log.info("indexing %s (plaintext now, KV in the background)", root)
                    mem.index(compile=False)
                if watch:
                    repo.watcher = _watch(root, debounce_s, settings, model)
        except BaseException:
            _close(served)
            raise
        return cls(served, settings)

    def resolve(self, model: str) -> tuple[ServedRepo, str | None]:
        """`repomem`, `repomem/<name>`, each with an optional `:kv`, `:text` or `:none`: (repository, mode)."""
        base, _, mode = model.strip().partition(":")
        if mode and mode not in MODES:
            raise ModelNotFound(f"unknown mode {mode!r} in model {model!r}; use :kv, :text or :none")
        if base == MODEL_PREFIX:
            return self.repos[0], mode or None
        for repo in self.repos:
            if base == repo.model_id:
                return repo, mode or None
        known = ", ".join(r.model_id for r in self.repos)
        raise ModelNotFound(f"the model {model!r} does not exist; this server has {known} (or {MODEL_PREFIX})")

    def get(self, name: str = "") -> ServedRepo:
        """A repository by name or model id ("" = the first), for the MCP tools."""
        if not name:
            return self.repos[0]
        for repo in self.repos:
            if name in (repo.name, repo.model_id):
                return repo
        raise RepomemError(f"no repository {name!r}; this server has {', '.join(r.name for r in self.repos)}")

    def health(self, repo: ServedRepo) -> dict[str, Any]:
        """Files, cubes, compiled share, stale files and the watcher of one repository (reads files: a thread).

        What leaves through `/health` and `memory_status`: no file under a private path is named (nor
        counted among the stale ones), and not where the repository lives on this machine."""
        from repomem.core import watcher_status

        mem = repo.mem
        mem.refresh()
        stats = mem.store.stats()
        live = stats["cubes"] - stats["by_status"].get("archived", 0)
        compiled = stats["by_kind"].get("activation", 0) - stats["by_status"].get("stale", 0)
        stale = sorted(rel for rel in mem.stale_files() if not mem.is_private(rel))
        w = watcher_status(repo.root)
        return {
            "model": repo.model_id, "name": repo.name, "files": stats["files"],
            "cubes": live, "compiled": compiled, "compiled_share": round(compiled / live, 3) if live else 0.0,
            "by_source": stats["by_source"], "stale_files": len(stale), "stale": stale[:STALE_LISTED],
            "watcher": {"running": w["running"], "pid": w["pid"], "in_process": repo.watcher is not None,
                        "state": w["state"], "queue": w["queue"], "last_update": w["last_update"],
                        "errors": w["error_count"]},
        }

    def close(self) -> None:
        _close(self.repos)


def _close(repos: list[ServedRepo]) -> None:
    for repo in repos:
        if repo.watcher is not None:
            repo.watcher.stop("server stopping")
    for repo in repos:
        if repo.watcher is not None:
            repo.watcher.join(30)
        repo.mem.close()


def _unique_name(root: Path, taken: list[ServedRepo]) -> str:
    return _name_among(root, {r.name for r in taken})


def _name_among(root: Path, names: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", root.name).strip("-") or "repo"
    name, n = base, 2
    while name in names:
        name, n = f"{base}-{n}", n + 1
    return name


def model_ids(roots: list[str | Path]) -> list[str]:
    """The model ids a server of these repositories would have, without opening them (the app's panel)."""
    names: list[str] = []
    seen: set[Path] = set()
    for r in roots:
        root = Path(r).expanduser().resolve()
        if root not in seen:
            seen.add(root)
            names.append(_name_among(root, set(names)))
    return [f"{MODEL_PREFIX}/{n}" for n in names]


def _watch(root: Path, debounce_s: float, settings: Settings, model: str | None) -> Any:
    """Start a watcher in this process unless one already runs for the repository (then None). It compiles
    with this server's model and settings (another model's payloads would not splice here)."""
    from repomem.core import Watcher, watcher_status, watcher_threads

    if watcher_status(root)["running"]:
        log.info("%s is watched by another process: using it", root)
        return None

    def open_memory(path: Path) -> RepoMemory:
        s = dataclasses.replace(settings, n_threads=settings.n_threads or watcher_threads())
        return RepoMemory.open(path, settings=s, model=model)

    try:
        return Watcher(root, memory_factory=open_memory, debounce_s=debounce_s).start()
    except RepomemError as exc:  # lost a race with a watcher starting elsewhere
        log.info("%s: %s", root, exc)
        return None
