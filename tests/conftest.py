"""Shared fixtures. Every test runs with a throwaway REPOMEM_HOME; models come from the setup's folder.

Models are fetched by `make test` before pytest starts: a missing model is a failed setup, so the
fixtures fail loudly instead of skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ["REPOMEM_NO_HUB"] = "1"  # no network in tests

# Resolve the models folder of the real data home before any test swaps the home out.
from repomem.core import models as _models  # noqa: E402
from repomem.core import paths as _paths  # noqa: E402

MODELS_DIR = _paths.models_dir()
os.environ["REPOMEM_MODELS_DIR"] = str(MODELS_DIR)


@pytest.fixture(autouse=True, scope="session")
def _session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("repomem-home")
    os.environ["REPOMEM_HOME"] = str(home)
    return home


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data home for one test (stores, verdicts), sharing the fetched models."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("REPOMEM_HOME", str(h))
    return h


def _model(name: str) -> Path:
    path = MODELS_DIR / _models.spec(name).filename
    if not path.exists():
        pytest.fail(f"{path} missing: run `make test` (it fetches the models) instead of bare pytest")
    return path


@pytest.fixture(scope="session")
def test_model_path() -> Path:
    return _model(_models.TEST_MODEL)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    return _model(_models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def test_engine(test_model_path: Path):
    from repomem.core.engine import Engine

    return Engine(test_model_path)


@pytest.fixture(scope="session")
def default_engine(default_model_path: Path):
    from repomem.core.engine import Engine

    return Engine(default_model_path)
