"""Where repomem keeps its state: everything lives under one data home.

`REPOMEM_HOME` overrides the platform's user data folder (tests always point it at a temp dir).
`REPOMEM_MODELS_DIR` lets several homes share one folder of downloaded models, so a test run
with a throwaway home does not download half a gigabyte again.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import platformdirs


def home() -> Path:
    """The data home (created on first use)."""
    env = os.environ.get("REPOMEM_HOME")
    path = Path(env).expanduser() if env else Path(platformdirs.user_data_dir("repomem", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    env = os.environ.get("REPOMEM_MODELS_DIR")
    path = Path(env).expanduser() if env else home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine_dir() -> Path:
    """Per-machine facts (e.g. the AMX probe verdicts)."""
    path = home() / "machine"
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_key(repo_root: Path) -> str:
    """A readable, collision-free folder name for one repository: `<name>-<hash of its real path>`."""
    real = str(Path(repo_root).expanduser().resolve())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(real).name) or "root"
    return f"{name}-{hashlib.sha256(real.encode()).hexdigest()[:10]}"


def store_dir(repo_root: Path) -> Path:
    """The store folder of one repository, not created (asking about an unknown folder leaves no trace)."""
    return home() / "repos" / repo_key(repo_root)


def repo_dir(repo_root: Path) -> Path:
    """The store folder of one repository (database, payloads, watcher status and log), created."""
    path = store_dir(repo_root)
    path.mkdir(parents=True, exist_ok=True)
    return path
