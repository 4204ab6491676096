"""Text mode through an OpenAI-compatible endpoint: llama-cpp-python's own server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from repomem.core import settings as settings_mod
from repomem.core.memory import RepoMemory
from repomem.core.remote import ask_remote


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(test_model_path: Path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("llama_server_safe.py")), "--model", str(test_model_path),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--verbose", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not start in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_text_mode_through_endpoint_streams_and_keeps_local_cubes_home(server: str, tmp_path: Path, home: Path,
                                                                       test_model_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "private").mkdir(parents=True)
    (repo / "calc.py").write_text("def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n")
    (repo / "private" / "plan.py").write_text("def add_secret_plan():\n    return 'launch add on friday'\n")
    s = settings_mod.Settings(model=str(test_model_path), private_paths=["private/*"], max_answer_tokens=16)
    mem = RepoMemory.open(repo, settings=s)
    try:
        mem.index(compile=False)
        assert {c.path: c.visibility for c in mem.store.cubes()}["private/plan.py"] == "local"
        pieces: list[str] = []
        ans = ask_remote(mem, "What does add do?", server, on_text=pieces.append)
        assert ans.mode == "text" and ans.answer and "".join(pieces).strip() == ans.answer
        paths = {src.path for src in ans.sources}
        assert "calc.py" in paths and "private/plan.py" not in paths
        # The same question answered locally may use the private cube.
        assert "private/plan.py" in {c.path for c in mem.search("add secret plan", k=5)}
    finally:
        mem.close()


def test_unreachable_endpoint_is_a_clear_error(tmp_path: Path, home: Path, test_model_path: Path) -> None:
    from repomem.core.errors import RepomemError

    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "a.py").write_text("x = 1\n")
    mem = RepoMemory.open(repo, settings=settings_mod.Settings(model=str(test_model_path)))
    try:
        mem.index(compile=False)
        with pytest.raises(RepomemError, match="unreachable"):
            ask_remote(mem, "what is x?", f"http://127.0.0.1:{_free_port()}/v1", timeout_s=5)
    finally:
        mem.close()


def _scripted_endpoint(reply: bytes, content_type: str):
    """An endpoint on 127.0.0.1 that answers every chat request with `reply` (hosted services send
    shapes llama.cpp's server never does: chunks without choices, errors inside the stream)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _sse(*events: object) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def _delta(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


@pytest.mark.parametrize(("reply", "content_type", "expected"), [
    # a content-filter report first and a usage chunk last, both with no choices (Azure OpenAI, include_usage)
    (_sse({"choices": [], "prompt_filter_results": []}, _delta("add returns"), _delta(" a + b", "stop"),
          {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}, b"[DONE]"),
     "text/event-stream", "add returns a + b"),
    # a server that ignores `stream` and answers with one JSON completion
    (json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "add returns a + b"},
                              "finish_reason": "stop"}]}).encode(), "application/json", "add returns a + b"),
])
def test_hosted_endpoint_shapes_are_read(reply: bytes, content_type: str, expected: str, tmp_path: Path,
                                         home: Path, test_model_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    server = _scripted_endpoint(reply, content_type)
    mem = RepoMemory.open(repo, settings=settings_mod.Settings(model=str(test_model_path)))
    try:
        mem.index(compile=False)
        pieces: list[str] = []
        ans = ask_remote(mem, "What does add return?", f"http://127.0.0.1:{server.server_port}/v1",
                         on_text=pieces.append, timeout_s=10)
        assert ans.answer == expected == "".join(pieces) and ans.stop_reason == "stop"
        assert ans.ttft_s > 0 and [s.path for s in ans.sources] == ["calc.py"]
    finally:
        mem.close()
        server.shutdown()


@pytest.mark.parametrize(("reply", "message"), [
    (_sse({"error": {"message": "the model is overloaded", "type": "server_error"}}), "the model is overloaded"),
    (_sse(_delta("add"), b"{not json"), "not JSON"),
])
def test_broken_streams_are_clear_errors(reply: bytes, message: str, tmp_path: Path, home: Path,
                                         test_model_path: Path) -> None:
    from repomem.core.errors import RepomemError

    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    server = _scripted_endpoint(reply, "text/event-stream")
    mem = RepoMemory.open(repo, settings=settings_mod.Settings(model=str(test_model_path)))
    try:
        mem.index(compile=False)
        with pytest.raises(RepomemError, match=message):
            ask_remote(mem, "What does add return?", f"http://127.0.0.1:{server.server_port}/v1", timeout_s=10)
    finally:
        mem.close()
        server.shutdown()


def test_the_endpoint_setting_answers_repomem_ask(tmp_path: Path, home: Path, test_model_path: Path) -> None:
    """`endpoint_url` in settings.json does what `ask --endpoint` does."""
    from click.testing import CliRunner

    from repomem.app.cli import cli

    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    server = _scripted_endpoint(_sse(_delta("add returns"), _delta(" a + b", "stop"), b"[DONE]"), "text/event-stream")
    try:
        settings_mod.save(settings_mod.Settings(model=str(test_model_path),
                                                endpoint_url=f"http://127.0.0.1:{server.server_port}/v1"))
        res = CliRunner().invoke(cli, ["ask", str(repo), "What does add return?", "--json"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        assert out["answer"] == "add returns a + b" and out["mode"] == "text"
    finally:
        server.shutdown()
