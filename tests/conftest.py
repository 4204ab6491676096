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


_DEFAULT_MODEL_FILE = (MODELS_DIR / _models.spec(_models.DEFAULT_MODEL).filename).resolve()
_DEFAULT_MODEL_FIXTURES = {"default_model_path"}


@pytest.fixture(autouse=True)
def _default_model_needs_its_marker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Keep the `default_model` marker truthful: an unmarked test that asks for the default model, or loads
    it in this process (directly or through the engine pool), fails."""
    if request.node.get_closest_marker("default_model"):
        yield
        return
    asked = _DEFAULT_MODEL_FIXTURES & set(request.fixturenames)
    if asked:
        pytest.fail(f"uses {', '.join(sorted(asked))} without @pytest.mark.default_model")
    from repomem.core import engine as engine_mod
    from repomem.core import engine_pool

    loads: list[str] = []
    real_init, real_acquire = engine_mod.Engine.__init__, engine_pool.acquire

    def note(model_path: object) -> None:
        if Path(str(model_path)).resolve() == _DEFAULT_MODEL_FILE:
            loads.append(str(model_path))

    def init(self: object, model_path: object, *args: object, **kwargs: object) -> None:
        note(model_path)
        real_init(self, model_path, *args, **kwargs)

    def acquire(model_path: object, *args: object, **kwargs: object) -> object:
        note(model_path)
        return real_acquire(model_path, *args, **kwargs)

    monkeypatch.setattr(engine_mod.Engine, "__init__", init)
    monkeypatch.setattr(engine_pool, "acquire", acquire)
    yield
    if loads:
        pytest.fail(f"loaded the default model ({loads[0]}) without @pytest.mark.default_model")


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
