"""`repomem serve` with real clients against a real server on 127.0.0.1 and the small model.

One server (in this process, on a thread, the way the desktop app runs it) is shared by the module:
the `openai` SDK streamed and not, an Aider-shaped request, OpenAI's errors, a rebinding Host and a
non-JSON POST, disconnects, two clients at once, editors in lines of their own, a full queue, the
`mcp` SDK over streamable HTTP and over stdio (`repomem mcp`, a subprocess), private paths, and a
file edited while serving (stale, then fresh, then a recent change). The API key is checked on
servers of its own, and `repomem serve` itself once as a subprocess; `repomem bench serve` runs once.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from repomem.app.cli import cli
from repomem.app.server.clients import http_client, mcp_client
from repomem.app.server.config import ServeConfig, resolve_api_key
from repomem.app.server.mcp_tools import parse_since, search_paths
from repomem.app.server.runner import ServerThread, Service
from repomem.core import RepoMemory, SamplingParams, Settings, load_settings, save_settings

CALC = '''"""A tiny calculator module."""

DEFAULT_PRECISION = 7


def add(a, b):
    """Add two numbers."""
    return a + b


def scale(x, factor=3):
    """Multiply x by factor."""
    return x * factor
'''

RETRY = '''class Retry:
    """Retry policy with exponential backoff."""

    max_retries = 5

    def backoff(self, attempt):
        return 0.5 * (2 ** attempt)
'''

VAULT = '''def rotate_vault_keys(vault):
    """Rotate every key in the vault."""
    return [k.rotate() for k in vault.keys]
'''

# An Aider-sized system message: its edit-format instructions run to a couple of thousand tokens.
AIDER_SYSTEM = ("Act as an expert software developer. Always use best practices when coding. Respect and use "
                "existing conventions, libraries, etc that are already present in the code base. Take requests "
                "for changes to the supplied code. If the request is ambiguous, ask questions. Once you "
                "understand the request you MUST describe each change with a SEARCH/REPLACE block. ") * 24


@dataclass
class Served:
    url: str
    service: Service
    repo: Path
    settings: Settings

    @property
    def name(self) -> str:
        return self.service.repos.repos[0].model_id

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def _make_repo(root: Path) -> Path:
    (root / "private").mkdir(parents=True)
    (root / "calc.py").write_text(CALC)
    (root / "retry.py").write_text(RETRY)
    (root / "private" / "vault.py").write_text(VAULT)
    return root


def _settings(model: Path) -> Settings:
    return Settings(model=str(model), encoding="f16", max_answer_tokens=16, n_ctx=4096, boost_top=0,
                                 private_paths=["private/*"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, test_model_path: Path):
    repo = _make_repo(tmp_path_factory.mktemp("serve") / "calcrepo")
    settings = _settings(test_model_path)
    mem = RepoMemory.open(repo, settings=settings)
    mem.index()  # compiled before serving: answers splice KV
    mem.close()
    # a debounce long enough to see a just-edited file as stale before its watcher syncs it
    service = Service.open([repo], ServeConfig(port=0, max_queue=2, debounce_s=5.0), settings=settings)
    thread = ServerThread(service).start()
    yield Served(thread.url, service, repo, settings)
    thread.stop()


def _health(served: Served) -> dict:
    return httpx.get(served.url + "/health", timeout=30).json()


def _idle(served: Served) -> dict:
    """The queue's stats once its worker is done with the job that just answered."""
    deadline = time.monotonic() + 10
    while (stats := served.service.queue.stats())["running"] is not None:
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)
    return stats


def _check_evidence(evidence: dict | None, sources: list[dict], root: Path) -> None:
    """The evidence is lines of one of the answer's sources, cited and quoted as the file has them."""
    assert evidence is not None
    assert evidence["id"] in {s["id"] for s in sources}
    assert evidence["citation"] == f"{evidence['path']}:{evidence['start_line']}-{evidence['end_line']}"
    lines = (root / evidence["path"]).read_text().splitlines()[evidence["start_line"] - 1:evidence["end_line"]]
    assert evidence["lines"].splitlines() == lines and evidence["lines"].strip()


# -- the openai SDK ----------------------------------------------------------------------------------
def test_models_one_per_repository_with_each_mode_and_the_alias(served: Served) -> None:
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["repomem/calcrepo", "repomem/calcrepo:text", "repomem/calcrepo:none",
                                           "repomem", "repomem:text", "repomem:none"]
    assert models.data[0].id == served.name
    assert [m.model_extra["repomem"]["mode"] for m in models.data[:3]] == ["kv", "text", "none"]
    # every listed name is one the server answers to, in the mode it names
    client = served.client()
    for m in models.data:
        resp = client.chat.completions.create(model=m.id, max_tokens=1,
                                              messages=[{"role": "user", "content": "What does scale do?"}])
        assert resp.model_extra["repomem"]["mode"] == m.model_extra["repomem"]["mode"]
        assert client.models.retrieve(m.id).model_dump() == m.model_dump()  # `GET /v1/models/{id}`, ids with `/`
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"


def test_openai_sdk_answer_with_sources_and_honest_usage(served: Served) -> None:
    client = served.client()
    kv = client.chat.completions.create(model="repomem", messages=[{"role": "user", "content": "What does scale do?"}],
                                        max_tokens=12)
    text = client.chat.completions.create(model=f"{served.name}:text", max_tokens=12,
                                          messages=[{"role": "user", "content": "What does scale do?"}])
    for resp in (kv, text):
        content = resp.choices[0].message.content
        assert content.strip() and "\n\nSources: calc.py:11-13" in content
        ext = resp.model_extra["repomem"]
        assert {"citation": "calc.py:11-13", "symbol": "scale"}.items() <= ext["sources"][0].items()
        _check_evidence(ext["evidence"], ext["sources"], served.repo)
        assert 1 <= resp.usage.completion_tokens <= 12
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert kv.model_extra["repomem"]["mode"] == "kv" and text.model_extra["repomem"]["mode"] == "text"
    kv_mem, text_mem = kv.usage.model_extra["repomem"], text.usage.model_extra["repomem"]
    # kv: the memory was spliced, not decoded; the cached cells hold it (plus the system prefix)
    assert kv_mem["spliced_tokens"] == kv_mem["memory_tokens"] > 0 and kv_mem["as_text_tokens"] == 0
    assert kv.usage.prompt_tokens_details.cached_tokens > kv_mem["spliced_tokens"]
    # text: the same prefix, memory and question all decoded
    assert text.usage.prompt_tokens_details.cached_tokens == 0
    assert text_mem["as_text_tokens"] == text_mem["memory_tokens"]
    # As in OpenAI's API, the cached tokens are part of the prompt: both modes read the same prompt,
    # kv decodes only what was not cached
    assert abs(text.usage.prompt_tokens - kv.usage.prompt_tokens) <= 3  # token boundaries between pieces may differ
    decoded = kv.usage.prompt_tokens - kv.usage.prompt_tokens_details.cached_tokens
    assert 0 < decoded < text.usage.prompt_tokens / 3


def test_openai_sdk_streamed_with_usage_and_footer_opt_out(served: Served) -> None:
    client = served.client()
    stream = client.chat.completions.create(model="repomem", stream=True, stream_options={"include_usage": True},
                                            max_tokens=10, messages=[{"role": "user", "content": "What is add?"}])
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip() and content.endswith("Sources: calc.py:6-8")
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason in ("stop", "length")
    ext = finish[0].model_extra["repomem"]
    assert ext["sources"][0]["citation"] == "calc.py:6-8"
    _check_evidence(ext["evidence"], ext["sources"], served.repo)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert len({c.id for c in chunks}) == 1

    quiet = client.chat.completions.create(model="repomem", stream=True, max_tokens=6, extra_body={
        "repomem": {"sources_footer": False}}, messages=[{"role": "user", "content": "What is add?"}])
    chunks = list(quiet)
    assert "Sources:" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk

    body = {"model": "repomem", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4,
            "messages": [{"role": "user", "content": "What is add?"}]}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as r:
        raw = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    assert all("usage" in c and c["usage"] is None for c in raw[:-1])  # as OpenAI: null until the last
    assert raw[-1]["usage"]["completion_tokens"] >= 1


def test_a_reply_keeps_its_first_lines_indentation_and_json_replies_get_no_footer(served: Served) -> None:
    from repomem.app.server.chat import parse_chat
    from repomem.app.server.openai_api import Reply

    ask = {"model": "repomem", "messages": [{"role": "user", "content": "Rewrite scale"}]}
    reply = Reply(parse_chat(ask, served.settings), "kv")
    sent = [reply.add(p) for p in ("\n", "\n    ", "return x", " * factor\n")]
    assert "".join(sent) + reply.flush() == "    return x * factor\n"  # blank lines dropped, indentation kept
    assert sent[:2] == ["", ""]  # leading space is held until it is known to be more than space
    assert Reply(parse_chat(ask, served.settings), "kv").add(" \n ") == ""
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}):
        assert not parse_chat({**ask, "response_format": fmt}, served.settings).sources_footer
    assert parse_chat({**ask, "response_format": {"type": "text"}}, served.settings).sources_footer
    resp = served.client().chat.completions.create(model="repomem", max_tokens=6, response_format={
        "type": "json_object"}, messages=[{"role": "user", "content": "What is add? Reply in JSON."}])
    assert "Sources:" not in resp.choices[0].message.content and resp.model_extra["repomem"]["sources"]


def test_stop_sequences_are_cut_out_even_across_pieces(served: Served) -> None:
    client = served.client()
    body = {"model": "repomem", "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": "What does scale do?"}]}
    full = client.chat.completions.create(**body, extra_body={"repomem": {"sources_footer": False}})
    words = full.choices[0].message.content.split()
    assert len(words) >= 4
    stop = " " + words[2][:3]  # a stop string that crosses token pieces
    cut = client.chat.completions.create(**body, stop=[stop], extra_body={"repomem": {"sources_footer": False}})
    streamed = client.chat.completions.create(**body, stop=stop, stream=True,
                                              extra_body={"repomem": {"sources_footer": False}})
    streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    expected = full.choices[0].message.content.split(stop)[0]
    assert cut.choices[0].message.content == streamed_text == expected
    assert cut.choices[0].finish_reason == "stop"


def test_aider_shaped_request_long_system_message_and_history(served: Served) -> None:
    client = served.client()
    messages = [{"role": "system", "content": AIDER_SYSTEM},
                {"role": "user", "content": "I added calc.py to the chat."},
                {"role": "assistant", "content": "Ok, I will treat calc.py as the file to edit."},
                {"role": "user", "content": [{"type": "text", "text": "What does the Retry backoff return?"}]}]
    resp = client.chat.completions.create(model=served.name, messages=messages, max_tokens=12, temperature=0.7,
                                          top_p=0.9, seed=3, logit_bias={}, user="aider",
                                          extra_body={"unknown_field": "ignored"})
    assert resp.choices[0].message.content.strip()
    assert resp.model_extra["repomem"]["sources"][0]["path"] == "retry.py"
    mem = served.service.repos.repos[0].mem
    system_tokens = len(mem.engine.tokenize(AIDER_SYSTEM))
    assert system_tokens > 1500
    # kv: the client's instructions are spliced from their compiled KV, the history and question decoded
    history_tokens = len(mem.engine.tokenize(messages[1]["content"] + messages[2]["content"]))
    decoded = resp.usage.prompt_tokens - resp.usage.prompt_tokens_details.cached_tokens
    assert history_tokens < decoded < system_tokens
    spliced = resp.usage.model_extra["repomem"]["spliced_tokens"]
    assert resp.usage.prompt_tokens_details.cached_tokens > system_tokens + spliced
    again = client.chat.completions.create(model=served.name, messages=messages[:1] + messages[-1:], max_tokens=4,
                                           user="aider")
    assert again.choices[0].message.content.strip()
    assert again.usage.prompt_tokens_details.cached_tokens > system_tokens
    assert mem._system_pieces.compiles == 1  # compiled once, spliced for the second request


# -- errors ------------------------------------------------------------------------------------------
def test_errors_have_openai_shape_and_status(served: Served) -> None:
    r = httpx.post(served.url + "/v1/chat/completions", content=b'{"model": "repomem", "messages": [',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(served.url + "/v1/chat/completions", content=b"[" * 100_000,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"  # too deep for the parser
    huge_body = b'{"model": "repomem", "messages": [], "pad": "' + b"x" * (17 * 2**20) + b'"}'
    def chunked():
        yield from (huge_body[i:i + 2**20] for i in range(0, len(huge_body), 2**20))
    for content in (huge_body, chunked()):  # with a Content-Length, and without one
        r = httpx.post(served.url + "/v1/chat/completions", content=content,
                       headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    client = served.client()
    question = [{"role": "user", "content": "What does scale do?"}]
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=question)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="repomem:fast", messages=question)
    huge = [{"role": "user", "content": "Explain scale in detail. " * 1200}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as over:
            client.chat.completions.create(model="repomem", messages=huge, stream=stream)
        assert over.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as n:
        client.chat.completions.create(model="repomem", messages=question, n=2)
    assert n.value.param == "n"
    with pytest.raises(openai.BadRequestError) as temp:
        client.chat.completions.create(model="repomem", messages=question, temperature="hot")
    assert temp.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="repomem", messages=[{"role": "assistant", "content": "hi"}])
    assert httpx.get(served.url + "/v1/nothing").json()["error"]["message"] == "Not Found"
    wrong_method = httpx.get(served.url + "/v1/chat/completions")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"
    for choice in ("required", {"type": "function", "function": {"name": "edit"}}):  # a tool call is demanded
        with pytest.raises(openai.BadRequestError) as forced:
            client.chat.completions.create(model="repomem", messages=question, tool_choice=choice,
                                           tools=[{"type": "function", "function": {"name": "edit"}}])
        assert forced.value.param == "tool_choice" and forced.value.code == "unsupported_value"
    schema = {"name": "answer", "schema": {"type": "object", "properties": {"where": {"type": "string"}}}}
    bound = {"type": "json_schema", "json_schema": {**schema, "strict": True}}
    with pytest.raises(openai.BadRequestError) as strict:  # a reply bound to the schema is demanded
        client.chat.completions.create(model="repomem", messages=question, max_tokens=2, response_format=bound)
    assert strict.value.param == "response_format" and strict.value.code == "unsupported_value"
    loose = client.chat.completions.create(model="repomem", messages=question, max_tokens=2,
                                           response_format={"type": "json_schema", "json_schema": schema})
    assert loose.choices[0].message.role == "assistant"


def test_what_other_clients_send_is_answered(served: Served) -> None:
    """llama.cpp's own clients send seed -1 for "random"; a JavaScript client that cut a string inside an
    emoji sends half a surrogate pair, which JSON allows."""
    for extra, content in (({"seed": -1, "temperature": 0.7}, "What does scale do?"),
                           ({}, "What does scale do? \ud83d")):
        body = {"model": "repomem", "max_tokens": 2, "messages": [{"role": "user", "content": content}], **extra}
        r = httpx.post(served.url + "/v1/chat/completions", content=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_request_while_the_server_stops_is_503(tmp_path: Path, home: Path, test_model_path: Path) -> None:
    repo = _make_repo(tmp_path / "stopping")
    settings = _settings(test_model_path)
    service = Service.open([repo], ServeConfig(port=0), settings=settings)
    thread = ServerThread(service).start()
    try:
        service.queue.close()  # what a SIGTERM does first
        body = {"model": "repomem", "messages": [{"role": "user", "content": "What does scale do?"}]}
        r = httpx.post(thread.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    finally:
        thread.stop()


def test_errors_and_warnings_sent_to_clients_name_no_local_folder(home: Path) -> None:
    """A store error names its folder (`~/.local/share/repomem/repos/<key> is read-only`): clients read
    the data folder and the home folder by name only, in error bodies and in an answer's warnings."""
    from repomem.app.server.chat import parse_chat
    from repomem.app.server.errors import APIError
    from repomem.app.server.openai_api import Reply
    from repomem.core import Answer, paths

    store_dir = paths.home() / "repos" / "abc123"
    message = f"{store_dir} is read-only: usage counts were not saved"
    assert str(paths.home()) and APIError(400, message).body()["error"]["message"] == (
        "<repomem data>/repos/abc123 is read-only: usage counts were not saved")
    req = parse_chat({"model": "repomem", "messages": [{"role": "user", "content": "hi"}]}, Settings())
    ans = Answer(answer="x", mode="kv", ttft_s=0.1, total_s=0.2, memory_tokens=0, sources=[],
                 warnings=[message, f"cannot read {Path.home() / 'src' / 'notes.txt'}"])
    assert Reply(req, "kv").extension(ans)["warnings"] == [
        "<repomem data>/repos/abc123 is read-only: usage counts were not saved", "cannot read ~/src/notes.txt"]


def test_a_busy_port_closes_the_service_it_was_given(tmp_path: Path, home: Path, test_model_path: Path) -> None:
    """The app's "Start server" retried on a busy port must not leave a queue (and watchers) per try."""
    repo = _make_repo(tmp_path / "busy")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        service = Service.open([repo], ServeConfig(port=taken.getsockname()[1]), settings=_settings(test_model_path))
        with pytest.raises(Exception, match="in use|bind|could not"):
            ServerThread(service)
    deadline = time.monotonic() + 10
    while service.queue._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not service.queue._thread.is_alive()


def test_a_store_that_fails_is_a_server_error_not_the_clients(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """A locked or unreadable store is the server's trouble, worth a retry (503), not a bad request (400)."""
    from repomem.core import CubeStore, StoreError, paths

    def locked(self: CubeStore) -> dict:
        raise StoreError(f"the store in {paths.home()}/repos/x stayed locked by another process")

    monkeypatch.setattr(CubeStore, "stats", locked)  # what another process holding the lock looks like
    r = httpx.get(served.url + "/health", timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
    assert str(paths.home()) not in r.text


def test_a_rebinding_host_and_a_non_json_post_are_refused(served: Served) -> None:
    port = served.url.rsplit(":", 1)[1]
    queue = served.service.queue
    before = queue.stats()
    question = {"model": "repomem", "max_tokens": 1, "messages": [{"role": "user", "content": "What does scale do?"}]}
    # a page on evil.example whose name now resolves to 127.0.0.1 sends its own name as Host
    for path in ("/health", "/v1/models"):
        r = httpx.get(served.url + path, headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 400 and "repositories" not in r.text and "repomem" not in r.text
    r = httpx.post(served.url + "/v1/chat/completions", json=question, headers={"Host": f"evil.example:{port}"})
    assert r.status_code == 400
    r = httpx.post(served.url + "/mcp", json={}, headers={"Host": f"evil.example:{port}"})
    assert r.status_code == 400
    for name in ("localhost", "127.0.0.1", "[::1]"):
        assert httpx.get(served.url + "/health", headers={"Host": f"{name}:{port}"}).status_code == 200
    # a cross-site form or text/plain POST (no CORS preflight) must not start a generation
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = httpx.post(served.url + "/v1/chat/completions", content=json.dumps(question).encode(), headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    after = queue.stats()
    assert (after["served"], after["cancelled"], after["rejected"]) == (
        before["served"], before["cancelled"], before["rejected"])
    ok = httpx.post(served.url + "/v1/chat/completions", content=json.dumps(question).encode(),
                    headers={"Content-Type": "application/json; charset=utf-8"}, timeout=60)
    assert ok.status_code == 200


def test_trusted_hosts_are_loopback_and_the_bind_address() -> None:
    assert ServeConfig().trusted_hosts() == ["127.0.0.1", "localhost", "[::1]"]
    assert ServeConfig(host="::1").trusted_hosts() == ["127.0.0.1", "localhost", "[::1]"]
    assert ServeConfig(host="10.1.2.3", api_key="k").trusted_hosts()[-1] == "10.1.2.3"
    assert ServeConfig(host="fd00::5", api_key="k").trusted_hosts()[-1] == "[fd00::5]"
    assert ServeConfig(host="0.0.0.0", api_key="k").trusted_hosts() == ["*"]  # any name: the key guards it


def test_full_queue_is_503_with_retry_after(served: Served) -> None:
    gate = threading.Event()
    queue = served.service.queue
    held = [queue.submit("test", lambda cancel: gate.wait(30))]
    try:
        deadline = time.monotonic() + 30
        while queue.stats()["running"] != "test":  # the model may still be finishing an earlier answer
            assert time.monotonic() < deadline
            time.sleep(0.05)
        held += [queue.submit("test", lambda cancel: gate.wait(30)) for _ in range(2)]  # one runs, two wait
        r = httpx.post(served.url + "/v1/chat/completions", json={
            "model": "repomem", "messages": [{"role": "user", "content": "What does scale do?"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        gate.set()
        for t in held:
            t.future.result(30)


def test_disconnect_mid_stream_cancels_and_the_next_request_is_served_at_once(served: Served) -> None:
    body = {"model": "repomem:none", "stream": True, "max_tokens": 3000, "temperature": 2.0, "top_p": 1.0,
            "seed": 1, "messages": [{"role": "user", "content": "Write a very long story about calculators."}]}
    before = _health(served)["queue"]["cancelled"]
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", served.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            got = 0
            for line in resp.iter_lines():
                if line.startswith("data:") and '"content": "' in line and '"content": ""' not in line:
                    got += 1
                    if got == 3:
                        break  # leaving the block closes the connection mid-answer
    t0 = time.monotonic()
    quick = served.client().chat.completions.create(model="repomem:none", max_tokens=2,
                                                    messages=[{"role": "user", "content": "Say hi."}])
    assert quick.choices[0].message.content is not None
    assert time.monotonic() - t0 < 10  # the abandoned 3000-token story would hold the model for minutes
    assert _idle(served)["cancelled"] == before + 1


def test_disconnect_while_a_non_streamed_answer_is_generated_cancels_it(served: Served) -> None:
    body = json.dumps({"model": "repomem:none", "max_tokens": 3000, "temperature": 2.0, "top_p": 1.0, "seed": 2,
                       "messages": [{"role": "user", "content": "Write a very long story about calculators."}]})
    queue = served.service.queue
    before = queue.stats()["cancelled"]
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        deadline = time.monotonic() + 60
        while queue.stats()["running"] is None:  # the generation has started
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
    t0 = time.monotonic()
    quick = served.client().chat.completions.create(model="repomem:none", max_tokens=2,
                                                    messages=[{"role": "user", "content": "Say hi."}])
    assert quick.choices[0].message.content is not None
    assert time.monotonic() - t0 < 10  # the abandoned story would hold the model for minutes
    assert _idle(served)["cancelled"] == before + 1


def test_two_concurrent_clients_are_both_answered_from_their_own_memory(served: Served) -> None:
    questions = {"retry": "How does the Retry backoff work?", "calc": "What does scale do?"}
    results: dict[str, tuple[str, list[str]]] = {}

    def ask(name: str) -> None:
        stream = served.client(api_key=f"key-{name}").chat.completions.create(
            model="repomem", stream=True, max_tokens=12, messages=[{"role": "user", "content": questions[name]}])
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        sources = next(c.model_extra["repomem"]["sources"] for c in chunks if c.choices and c.choices[0].finish_reason)
        results[name] = (text, [s["path"] for s in sources])

    threads = [threading.Thread(target=ask, args=(n,)) for n in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["retry"][1][0] == "retry.py" and results["calc"][1][0] == "calc.py"
    retry_footer = results["retry"][0].rsplit("Sources: ", 1)[1]
    calc_footer = results["calc"][0].rsplit("Sources: ", 1)[1]
    assert retry_footer.startswith("retry.py:") and calc_footer.startswith("calc.py:11-13")


def _lines_while_held(served: Served, senders: list[Callable[[], bool]]) -> list[int]:
    """Hold the model, let each sender's request queue up, and return how many wait in each line; then let
    them through and check each was answered."""
    queue = served.service.queue
    gate = threading.Event()
    held = queue.submit("test", lambda cancel: gate.wait(60))
    answered: list[bool] = []
    threads = [threading.Thread(target=lambda f=f: answered.append(f())) for f in senders]
    try:
        deadline = time.monotonic() + 60
        while queue.stats()["running"] != "test":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for t in threads:
            t.start()
        while queue.stats()["waiting"] < len(senders):
            assert time.monotonic() < deadline and all(t.is_alive() for t in threads), queue.stats()
            time.sleep(0.05)
        lines = sorted(queue.stats()["waiting_by_client"].values())
    finally:
        gate.set()
        held.future.result(30)
        for t in threads:
            t.join(120)
    assert answered == [True] * len(senders)
    return lines


def test_editors_on_one_machine_wait_in_lines_of_their_own(served: Served) -> None:
    from mcp import Client
    from mcp_types import Implementation

    def chat(user_agent: str, user: str | None = None) -> Callable[[], bool]:
        body = {"model": "repomem", "max_tokens": 2, "messages": [{"role": "user", "content": "What is add?"}]}
        if user:
            body["user"] = user

        def send() -> bool:
            r = httpx.post(served.url + "/v1/chat/completions", json=body, headers={"User-Agent": user_agent},
                           timeout=120)
            return r.status_code == 200

        return send

    def mcp_ask(name: str, mode: str) -> Callable[[], bool]:
        async def run() -> bool:
            info = Implementation(name=name, version="1")
            async with Client(served.url + "/mcp", mode=mode, client_info=info) as mcp:
                r = await mcp.call_tool("ask_repo", {"question": "What is add?"})
                return not r.is_error

        return lambda: asyncio.run(run())

    # the control: one editor's two requests share its line (and the queue holds two waiting)
    assert _lines_while_held(served, [chat("Continue/1.2"), chat("Continue/1.2")]) == [2]
    assert _lines_while_held(served, [chat("Continue/1.2"), chat("aider/0.86")]) == [1, 1]
    assert _lines_while_held(served, [chat("OpenWebUI", "alice"), chat("OpenWebUI", "bob")]) == [1, 1]
    # MCP: two sessions of the same agent; two agents speaking the sessionless protocol
    assert _lines_while_held(served, [mcp_ask("agent", "legacy"), mcp_ask("agent", "legacy")]) == [1, 1]
    assert _lines_while_held(served, [mcp_ask("cline", "auto"), mcp_ask("cursor", "auto")]) == [1, 1]


def test_client_keys() -> None:
    ua = {"user-agent": "Continue/1.2"}
    assert http_client("", ua, "127.0.0.1") == http_client("", dict(ua), "127.0.0.1")
    assert http_client("", ua, "127.0.0.1") != http_client("", ua, "10.0.0.2")
    assert http_client("", ua, "127.0.0.1") != http_client("", {"user-agent": "aider"}, "127.0.0.1")
    assert http_client("alice", ua, "127.0.0.1") == http_client("alice", {}, "10.0.0.2")  # `user` names the line
    assert mcp_client(None, None) == "mcp:stdio"
    assert mcp_client({"mcp-session-id": "s1"}, "127.0.0.1") != mcp_client({"mcp-session-id": "s2"}, "127.0.0.1")
    assert mcp_client({}, "127.0.0.1", "cline/1") != mcp_client({}, "127.0.0.1", "cursor/1")
    assert "alice" not in http_client("alice", ua, None)  # /health shows lines, not names


def test_private_paths_never_leave_through_answers_or_tools(served: Served) -> None:
    question = "How does rotate_vault_keys rotate the vault keys and scale?"
    mem = served.service.repos.repos[0].mem
    # the controls: on this machine the question retrieves the private file first, and an answer allowed to
    # read it (the app's own) shows its lines as evidence
    assert mem.search(question)[0].path == "private/vault.py"
    local = served.service.queue.submit("test", lambda cancel: mem.ask(
        question, mode="text", sampling=SamplingParams(max_tokens=8), record=False, allow_local=True))
    assert local.future.result(120).evidence.path == "private/vault.py"
    client = served.client()
    for model in ("repomem", "repomem:text"):
        resp = client.chat.completions.create(model=model, max_tokens=8, messages=[
            {"role": "user", "content": question}])
        ext = resp.model_extra["repomem"]
        assert ext["sources"]  # it answered from the memory, just not the private part
        assert not any(s["path"].startswith("private/") for s in ext["sources"])
        _check_evidence(ext["evidence"], ext["sources"], served.repo)
        assert "vault" not in json.dumps(ext["evidence"])
        assert "private/" not in resp.choices[0].message.content

    async def tools() -> tuple[dict, dict]:
        from mcp import Client

        async with Client(served.url + "/mcp") as mcp:
            found = (await mcp.call_tool("search_code", {"query": question})).structured_content
            asked = await mcp.call_tool("ask_repo", {"question": question, "mode": "text"})
            return found, {"text": asked.content[0].text, **asked.structured_content}

    found, asked = asyncio.run(tools())
    assert found["results"] and not any(h["path"].startswith("private/") for h in found["results"])
    assert asked["sources"] and not any(s["path"].startswith("private/") for s in asked["sources"])
    _check_evidence(asked["evidence"], asked["sources"], served.repo)
    assert "private/" not in asked["text"] and "vault" not in json.dumps(asked["evidence"])


def test_health_and_memory_status_name_no_private_file(tmp_path: Path, home: Path, test_model_path: Path) -> None:
    repo = _make_repo(tmp_path / "calcrepo")
    settings = _settings(test_model_path)
    mem = RepoMemory.open(repo, settings=settings)
    mem.index(compile=False)
    mem.close()
    # no watcher: the edited files stay stale while the server is asked
    thread = ServerThread(Service.open([repo], ServeConfig(port=0), settings=settings, watch=False)).start()
    try:
        (repo / "private" / "vault.py").write_text(VAULT.replace("rotate()", "rotate(force=True)"))
        (repo / "calc.py").write_text(CALC.replace("factor=3", "factor=4"))
        assert sorted(thread.service.repos.repos[0].mem.stale_files()) == ["calc.py", "private/vault.py"]  # control

        async def status() -> dict:
            from mcp import Client

            async with Client(thread.url + "/mcp") as mcp:
                r = await mcp.call_tool("memory_status", {})
                return {"text": r.content[0].text, **r.structured_content}

        health = httpx.get(thread.url + "/health", timeout=30).json()
        assert health["repositories"][0]["stale"] == ["calc.py"]
        for leaving in (json.dumps(health), json.dumps(asyncio.run(status()))):
            assert "private/" not in leaving and "vault" not in leaving
            assert str(repo) not in leaving  # nor where the repository lives on this machine
    finally:
        thread.stop()


# -- MCP ---------------------------------------------------------------------------------------------
MCP_INSTRUCTIONS = ("Answer in at most two sentences. Name the function and the file it is in, quote the "
                    "line that does the work, and say nothing about code you were not shown.")


async def _every_tool(mcp, on_note: Callable[[str], None] = lambda _id: None) -> dict:
    """Call every tool once; `on_note(id)` runs while the note `remember` kept exists (before `forget`)."""
    out = {}
    tools = await mcp.list_tools()
    out["tools"] = sorted(t.name for t in tools.tools)
    out["ask_params"] = sorted(next(t for t in tools.tools if t.name == "ask_repo").input_schema["properties"])
    r = await mcp.call_tool("search_code", {"query": "scale factor", "k": 3, "path_glob": "*.py"})
    out["search"] = r.structured_content
    out["search_text"] = r.content[0].text
    r = await mcp.call_tool("ask_repo", {"question": "What does scale do?"})
    out["ask"] = r.structured_content
    out["ask_text"] = r.content[0].text
    r = await mcp.call_tool("ask_repo", {"question": "What does scale do?", "instructions": MCP_INSTRUCTIONS})
    out["ask_instructed"] = r.structured_content
    r = await mcp.call_tool("memory_status", {})
    out["status"] = r.structured_content
    r = await mcp.call_tool("remember", {"note": "We decided scale keeps a default factor of 3.",
                                         "paths": ["calc.py"]})
    out["remember"] = r.structured_content
    r = await mcp.call_tool("search_code", {"query": "decided default factor"})
    out["found_note"] = {h["id"]: h for h in r.structured_content["results"]}
    on_note(out["remember"]["id"])
    t0 = time.time()
    r = await mcp.call_tool("recent_changes", {"since": "1h"})
    out["changes"] = (t0, r.structured_content)
    r = await mcp.call_tool("remember", {"note": 'Deploy with token = "ghp_' + "a1B2" * 10 + '"'})
    out["secret"] = (r.is_error, r.content[0].text)
    # forgotten by the citation search_code showed for it (`note:<id>`), the form an agent's model reads
    r = await mcp.call_tool("forget", {"id": out["found_note"][out["remember"]["id"]]["citation"]})
    out["forget"] = (r.is_error, r.structured_content)
    r = await mcp.call_tool("forget", {"id": out["search"]["results"][0]["id"]})
    out["forget_code"] = (r.is_error, r.content[0].text)
    return out


def _check_every_tool(out: dict, root: Path) -> None:
    assert out["tools"] == ["ask_repo", "forget", "memory_status", "recent_changes", "remember", "search_code"]
    assert out["ask_params"] == ["instructions", "mode", "question", "repo"]  # the SDK's context is not one
    hit = out["search"]["results"][0]
    assert hit["citation"] == "calc.py:11-13" and hit["symbol"] == "scale" and hit["fresh"] is True
    assert "def scale" in hit["snippet"] and "calc.py:11-13 (scale) [fresh]" in out["search_text"]
    assert out["ask"]["answer"].strip() and out["ask"]["sources"][0]["citation"] == "calc.py:11-13"
    # The instructions reach the model: the same question and memory, read with them, is longer by their words.
    plain, instructed = out["ask"]["usage"], out["ask_instructed"]["usage"]
    def read(usage: dict) -> int:
        return usage["prompt_tokens"]

    grew = read(instructed) - read(plain)
    assert grew >= len(MCP_INSTRUCTIONS.split())
    assert out["ask_instructed"]["sources"] == out["ask"]["sources"]
    ev = out["ask"]["evidence"]
    _check_evidence(ev, out["ask"]["sources"], root)
    assert f"Evidence: {ev['citation']}\n```\n{ev['lines']}\n```" in out["ask_text"]
    st = out["status"]["repositories"][0]
    assert st["files"] == 3 and st["compiled_share"] > 0.5 and st["watcher"]["running"]
    assert "root" not in st
    note = out["found_note"][out["remember"]["id"]]
    assert note["citation"] == f"note:{note['id']}"
    assert note["source"] == "note" and note["fresh"] is None and note["snippet"].endswith("Files: calc.py")
    asked_at, changes = out["changes"]
    since = datetime.datetime.fromisoformat(changes["since"]).timestamp()
    assert abs(since - (asked_at - 3600)) < 5  # "1h" read as an hour before the call
    assert out["secret"][0] and "secret" in out["secret"][1]
    assert out["forget"] == (False, {"forgotten": out["remember"]["id"]})
    assert out["forget_code"][0] and "not a note" in out["forget_code"][1]


def test_mcp_over_streamable_http_calls_every_tool(served: Served) -> None:
    from mcp import Client

    async def run() -> dict:
        async with Client(served.url + "/mcp") as mcp:
            return await _every_tool(mcp)

    _check_every_tool(asyncio.run(run()), served.repo)


def test_mcp_ask_repo_reports_progress_while_it_waits_and_answers(served: Served,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from mcp import Client

    from repomem.app.server import mcp_tools

    monkeypatch.setattr(mcp_tools, "PROGRESS_EVERY_S", 0.02)  # the served app runs in this process
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, _total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async def run() -> object:
        async with Client(served.url + "/mcp") as mcp:
            return await mcp.call_tool("ask_repo", {"question": "What does scale do?", "mode": "text"},
                                       progress_callback=on_progress)

    result = asyncio.run(run())
    assert not result.is_error and result.structured_content["answer"].strip()
    assert seen and {m for _, m in seen} <= {"answering", "waiting for the model"}
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)  # seconds so far: they only grow


def test_mcp_over_stdio_calls_every_tool_on_the_same_store(served: Served) -> None:
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(command=sys.executable, args=[
        "-m", "repomem.app.cli", "mcp", str(served.repo), "--model", served.settings.model],
        env=dict(os.environ))
    store = served.service.repos.repos[0].mem.store
    seen = {}

    def on_note(note_id: str) -> None:  # the note `repomem mcp` kept, as the HTTP server (and the inspector) see it
        seen["note"] = store.get(note_id)

    async def run() -> dict:
        async with Client(params, read_timeout_seconds=300) as mcp:
            return await _every_tool(mcp, on_note)

    out = asyncio.run(run())
    _check_every_tool(out, served.repo)
    assert seen["note"] is not None and seen["note"].source == "note" and "default factor of 3" in seen["note"].text
    assert store.get(out["remember"]["id"]) is None  # and forget removed it there


def test_a_file_edited_while_serving_is_stale_then_fresh_and_a_recent_change(served: Served) -> None:
    from mcp import Client

    async def call(tool: str, args: dict) -> dict:
        async with Client(served.url + "/mcp") as mcp:
            r = await mcp.call_tool(tool, args)
            return {"text": r.content[0].text, **r.structured_content}

    def retry_hit() -> dict:
        return next(h for h in asyncio.run(call("search_code", {"query": "Retry backoff attempt"}))["results"]
                    if h["path"] == "retry.py")

    path = served.repo / "retry.py"
    edited_at = time.time()
    path.write_text(RETRY.replace("0.5 * (2 ** attempt)", "0.25 * (2 ** attempt)"))
    hit = retry_hit()
    assert hit["fresh"] is False
    assert "retry.py" in _health(served)["repositories"][0]["stale"]
    deadline = time.monotonic() + 180
    while True:
        hit = retry_hit()
        if hit["fresh"]:
            break
        assert time.monotonic() < deadline, "the watcher never synced the edit"
        time.sleep(0.5)
    assert "0.25" in hit["snippet"] and _health(served)["repositories"][0]["stale_files"] == 0
    # the change memory has it: which file, where its changed code is now, the diff
    since = datetime.datetime.fromtimestamp(edited_at - 1).isoformat()
    changes = asyncio.run(call("recent_changes", {"since": since}))
    change = next(c for c in changes["changes"] if c["path"] == "retry.py")
    assert change["citations"] == [hit["citation"]]
    assert "+        return 0.25 * (2 ** attempt)" in change["summary"]
    assert f"{hit['citation']} ({change['symbols']})" in changes["text"]
    later = asyncio.run(call("recent_changes", {"since": str(time.time() + 60)}))
    assert later["changes"] == []


def test_search_code_path_glob_finds_k_matches_ranked_below_many_others(tmp_path: Path, home: Path,
                                                                          test_model_path: Path) -> None:
    root = tmp_path / "globrepo"
    (root / "gen").mkdir(parents=True)
    (root / "src").mkdir()
    for i in range(60):  # outrank everything under src/ for the query
        (root / "gen" / f"g{i}.py").write_text(f"def frobnicate_{i}(x):\n    return frobnicate(frobnicate(x))\n")
    for i in range(3):
        (root / "src" / f"s{i}.py").write_text(f'def handler_{i}(request):\n    """Parse, validate and store."""\n'
                                                f"    data = parse(request)\n    return frobnicate(data)\n")
    mem = RepoMemory.open(root, settings=Settings(model=str(test_model_path)))
    try:
        mem.index(compile=False)
        assert all(c.path.startswith("gen/") for c in mem.search("frobnicate", k=50, allow_local=False))
        hits = search_paths(mem, "frobnicate", 3, "src/*.py")
        assert sorted(c.path for c in hits) == ["src/s0.py", "src/s1.py", "src/s2.py"]
        assert search_paths(mem, "frobnicate", 5, "src/*.py") == hits  # fewer exist: all of them
        assert [c.path for c in search_paths(mem, "frobnicate", 2, None)] == [c.path for c in mem.search(
            "frobnicate", k=2, allow_local=False)]
    finally:
        mem.close()


def test_parse_since_reads_durations_dates_and_epoch_seconds() -> None:
    from mcp.server.mcpserver.exceptions import ToolError

    now = time.time()
    for text, ago in (("30m", 1800), ("6h", 6 * 3600), (" 2d ", 2 * 86400), ("1w", 604800), ("1.5h", 5400)):
        assert abs(now - ago - parse_since(text)) < 2, text
    assert parse_since("1700000000") == 1700000000.0
    assert parse_since("2024-03-01T12:30:00+00:00") == datetime.datetime(2024, 3, 1, 12, 30,
                                                                         tzinfo=datetime.UTC).timestamp()
    assert parse_since("2024-03-01") == datetime.datetime(2024, 3, 1).timestamp()  # local midnight
    for bad in ("yesterday", "5y", ""):
        with pytest.raises(ToolError, match="cannot read"):
            parse_since(bad)


# -- API key -----------------------------------------------------------------------------------------
def test_api_key_enforced_off_loopback_and_cors_only_when_configured(served: Served) -> None:
    with pytest.raises(Exception, match="refusing to listen on 0.0.0.0 without an API key"):
        ServeConfig(host="0.0.0.0", port=0).check()
    page = {"Origin": "http://localhost:3000"}
    assert "access-control-allow-origin" not in httpx.get(served.url + "/v1/models", headers=page).headers
    config = ServeConfig(host="0.0.0.0", port=0, api_key="s3cret-key", cors_origins=["http://localhost:3000"])
    service = Service.open([served.repo], config, settings=served.settings, watch=False)
    thread = ServerThread(service).start()
    try:
        url = f"http://127.0.0.1:{thread.port}"
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0)
        assert good.models.list().data[0].id == served.name
        with pytest.raises(openai.AuthenticationError) as bad:
            openai.OpenAI(base_url=url + "/v1", api_key="s3cret-kez", max_retries=0).models.list()
        assert bad.value.code == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 401
        assert httpx.post(url + "/mcp", json={}).status_code == 401
        assert httpx.get(url + "/health", headers={"X-API-Key": "s3cret-key"}).status_code == 200
        allowed = httpx.get(url + "/v1/models", headers={**page, "Authorization": "Bearer s3cret-key"})
        assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
        preflight = httpx.options(url + "/v1/chat/completions", headers={
            **page, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200  # answered by CORS before the key check, as browsers need
        other = httpx.get(url + "/v1/models", headers={"Origin": "http://evil.example",
                                                       "Authorization": "Bearer s3cret-key"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        thread.stop()


def test_browser_clients_of_a_configured_origin_pass_cors_for_the_api_and_mcp(served: Served) -> None:
    app_origin = "https://app.example"
    config = ServeConfig(port=0, cors_origins=[app_origin])
    service = Service.open([served.repo], config, settings=served.settings, watch=False)
    thread = ServerThread(service).start()
    try:
        url = f"http://127.0.0.1:{thread.port}"
        page = {"Origin": app_origin}
        # the openai JS SDK sends its X-Stainless-* headers on every request
        sdk = httpx.options(url + "/v1/chat/completions", headers={
            **page, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,x-stainless-lang"})
        assert sdk.status_code == 200
        session = httpx.options(url + "/mcp", headers={
            **page, "Access-Control-Request-Method": "DELETE",
            "Access-Control-Request-Headers": "mcp-session-id,mcp-protocol-version"})
        assert session.status_code == 200
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "page", "version": "1"}}}
        r = httpx.post(url + "/mcp", json=init, headers={**page, "Accept": "application/json, text/event-stream"})
        assert r.status_code == 200 and r.headers.get("mcp-session-id")
        assert "mcp-session-id" in r.headers["access-control-expose-headers"].lower()
        evil = httpx.post(url + "/mcp", json=init, headers={"Origin": "https://evil.example",
                                                             "Accept": "application/json, text/event-stream"})
        assert evil.status_code == 403  # an origin nobody configured still may not drive the tools
    finally:
        thread.stop()


def test_api_key_comes_from_the_flag_else_the_environment_else_the_settings(home: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    save_settings(Settings(server_api_key="from-settings"))
    monkeypatch.delenv("REPOMEM_API_KEY", raising=False)
    settings_key = load_settings().server_api_key
    assert resolve_api_key(None, settings_key) == "from-settings"
    monkeypatch.setenv("REPOMEM_API_KEY", " from-env ")
    assert resolve_api_key(None, settings_key) == "from-env"
    assert resolve_api_key("from-flag", settings_key) == "from-flag"
    monkeypatch.delenv("REPOMEM_API_KEY")
    assert resolve_api_key(None, "") == ""


def test_repomem_serve_cli_refuses_then_serves_with_the_environments_key_and_stops_on_sigterm(
        served: Served) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REPOMEM_API_KEY"}
    refused = subprocess.run([sys.executable, "-m", "repomem.app.cli", "serve", str(served.repo), "--host", "0.0.0.0"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1 and "without an API key" in refused.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "repomem.app.cli", "serve", str(served.repo), "--port", str(port),
                             "--model", served.settings.model], env={**env, "REPOMEM_API_KEY": "env-key"},
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/health"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                refused_health = httpx.get(url, timeout=5)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        assert refused_health.status_code == 401  # the key from the environment guards even loopback
        health = httpx.get(url, headers={"Authorization": "Bearer env-key"}, timeout=30).json()
        assert health["repositories"][0]["model"] == served.name
        assert health["repositories"][0]["watcher"]["in_process"] is False  # the module's server watches it
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_bench_serve_runs_end_to_end(tmp_path: Path, home: Path, test_model_path: Path) -> None:
    """`repomem bench serve` on one question, without the llama_cpp.server baseline: it must not rot."""
    _make_repo(tmp_path / "corpus" / "calcrepo")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "q1", "repo": "calcrepo", "question": "What does scale do?"}) + "\n")
    res = CliRunner().invoke(cli, ["bench", "serve", "--json", "--qa", str(qa), "--repo-root", str(tmp_path / "corpus"),
                                   "--limit", "1", "--model", str(test_model_path), "--answer-tokens", "2",
                                   "--repeats", "1", "--no-baseline"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["questions"] == 1 and out["kv_http_ttft_ms"] > 0 and out["text_http_ttft_ms"] > 0
    assert out["rows"][0]["spliced"] >= 1 and out["rows"][0]["memory_tokens"] > 0
    assert out["baseline"] == "not run: --no-baseline" and out["llama_server_ttft_ms"] is None


@pytest.mark.default_model
def test_default_model_answers_from_spliced_memory(tmp_path: Path, default_model_path: Path) -> None:
    repo = _make_repo(tmp_path / "calcrepo")
    settings = _settings(default_model_path)
    settings.max_answer_tokens = 48
    mem = RepoMemory.open(repo, settings=settings)
    mem.index()
    mem.close()
    thread = ServerThread(Service.open([repo], ServeConfig(port=0), settings=settings, watch=False)).start()
    try:
        client = openai.OpenAI(base_url=thread.url + "/v1", api_key="none", max_retries=0)
        resp = client.chat.completions.create(model="repomem", temperature=0, messages=[
            {"role": "user", "content": "What is the value of DEFAULT_PRECISION in calc.py?"}])
        assert resp.model_extra["repomem"]["spliced"] >= 1
        assert "7" in resp.choices[0].message.content.split("Sources:")[0]
    finally:
        thread.stop()


def test_health_shows_queue_and_memory_state(served: Served) -> None:
    h = _health(served)
    assert h["status"] == "ok" and h["queue"]["max_waiting"] == 2
    repo = h["repositories"][0]
    assert repo["files"] == 3 and repo["cubes"] >= 5 and 0 < repo["compiled_share"] <= 1
    assert repo["watcher"]["running"] and repo["watcher"]["in_process"]
    assert "root" not in repo and str(served.repo) not in json.dumps(h)
