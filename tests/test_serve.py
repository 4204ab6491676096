"""`repomem serve` with real clients against a real server on 127.0.0.1 and the small model.

One server (in this process, on a thread, the way the desktop app runs it) is shared by the module:
the `openai` SDK streamed and not, an Aider-shaped request, OpenAI's errors, a disconnect mid-stream,
two clients at once, a full queue, the `mcp` SDK over streamable HTTP and over stdio (`repomem mcp`,
a subprocess), private paths, and a file edited while serving (stale, then fresh). The API key is
checked on servers of its own, and `repomem serve` itself once as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from repomem.app.server.config import ServeConfig
from repomem.app.server.runner import ServerThread, Service
from repomem.core import settings as settings_mod
from repomem.core.memory import RepoMemory

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
    settings: settings_mod.Settings

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


def _settings(model: Path) -> settings_mod.Settings:
    return settings_mod.Settings(model=str(model), encoding="f16", max_answer_tokens=16, n_ctx=4096, boost_top=0,
                                 private_paths=["private/*"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, test_model_path: Path):
    repo = _make_repo(tmp_path_factory.mktemp("serve") / "calcrepo")
    settings = _settings(test_model_path)
    mem = RepoMemory.open(repo, settings=settings)
    mem.index()  # compiled before serving: answers splice KV
    mem.close()
    # a debounce long enough to see a just-edited file as stale before its watcher syncs it
    service = Service.open([repo], ServeConfig(port=0, max_queue=2, debounce_s=2.0), settings=settings)
    thread = ServerThread(service).start()
    yield Served(thread.url, service, repo, settings)
    thread.stop()


def _health(served: Served) -> dict:
    return httpx.get(served.url + "/health", timeout=30).json()


# -- the openai SDK ----------------------------------------------------------------------------------
def test_models_one_per_repository(served: Served) -> None:
    models = served.client().models.list()
    assert [m.id for m in models.data] == [served.name] == ["repomem/calcrepo"]


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
    whole = kv.usage.prompt_tokens + kv.usage.prompt_tokens_details.cached_tokens
    assert abs(text.usage.prompt_tokens - whole) <= 3  # token boundaries between pieces may differ
    assert kv.usage.prompt_tokens < text.usage.prompt_tokens / 3


def test_openai_sdk_streamed_with_usage_and_footer_opt_out(served: Served) -> None:
    client = served.client()
    stream = client.chat.completions.create(model="repomem", stream=True, stream_options={"include_usage": True},
                                            max_tokens=10, messages=[{"role": "user", "content": "What is add?"}])
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip() and content.endswith("Sources: calc.py:6-8")
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason in ("stop", "length")
    assert finish[0].model_extra["repomem"]["sources"][0]["citation"] == "calc.py:6-8"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert len({c.id for c in chunks}) == 1

    quiet = client.chat.completions.create(model="repomem", stream=True, max_tokens=6, extra_body={
        "repomem": {"sources_footer": False}}, messages=[{"role": "user", "content": "What is add?"}])
    chunks = list(quiet)
    assert "Sources:" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


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
    system_tokens = len(served.service.repos.repos[0].mem.engine.tokenize(AIDER_SYSTEM))
    assert system_tokens > 1500
    assert resp.usage.prompt_tokens > system_tokens  # the client's instructions and history were decoded


# -- errors ------------------------------------------------------------------------------------------
def test_errors_have_openai_shape_and_status(served: Served) -> None:
    r = httpx.post(served.url + "/v1/chat/completions", content=b'{"model": "repomem", "messages": [',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
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
    queue = _health(served)["queue"]
    assert queue["cancelled"] == before + 1 and queue["running"] is None


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


def test_private_paths_never_leave_through_answers_or_tools(served: Served) -> None:
    client = served.client()
    for model in ("repomem", "repomem:text"):
        resp = client.chat.completions.create(model=model, max_tokens=8, messages=[
            {"role": "user", "content": "How does rotate_vault_keys rotate the vault keys and scale?"}])
        assert not any(s["path"].startswith("private/") for s in resp.model_extra["repomem"]["sources"])
        assert "private/" not in resp.choices[0].message.content

    async def search() -> dict:
        from mcp import Client

        async with Client(served.url + "/mcp") as mcp:
            result = await mcp.call_tool("search_code", {"query": "rotate_vault_keys vault keys"})
            return result.structured_content

    assert not any(h["path"].startswith("private/") for h in asyncio.run(search())["results"])


# -- MCP ---------------------------------------------------------------------------------------------
async def _every_tool(mcp, stale_file: Path | None = None) -> dict:
    out = {}
    tools = await mcp.list_tools()
    out["tools"] = sorted(t.name for t in tools.tools)
    r = await mcp.call_tool("search_code", {"query": "scale factor", "k": 3, "path_glob": "*.py"})
    out["search"] = r.structured_content
    out["search_text"] = r.content[0].text
    r = await mcp.call_tool("ask_repo", {"question": "What does scale do?"})
    out["ask"] = r.structured_content
    r = await mcp.call_tool("memory_status", {})
    out["status"] = r.structured_content
    r = await mcp.call_tool("remember", {"note": "We decided scale keeps a default factor of 3.",
                                         "paths": ["calc.py"]})
    out["remember"] = r.structured_content
    r = await mcp.call_tool("search_code", {"query": "decided default factor"})
    out["found_note"] = {h["id"]: h for h in r.structured_content["results"]}
    r = await mcp.call_tool("recent_changes", {"since": "1h"})
    out["changes"] = r.structured_content
    r = await mcp.call_tool("remember", {"note": 'Deploy with token = "ghp_' + "a1B2" * 10 + '"'})
    out["secret"] = (r.is_error, r.content[0].text)
    r = await mcp.call_tool("forget", {"id": out["remember"]["id"]})
    out["forget"] = (r.is_error, r.structured_content)
    r = await mcp.call_tool("forget", {"id": out["search"]["results"][0]["id"]})
    out["forget_code"] = (r.is_error, r.content[0].text)
    return out


def _check_every_tool(out: dict, stdio: bool) -> None:
    assert out["tools"] == ["ask_repo", "forget", "memory_status", "recent_changes", "remember", "search_code"]
    hit = out["search"]["results"][0]
    assert hit["citation"] == "calc.py:11-13" and hit["symbol"] == "scale" and hit["fresh"] is True
    assert "def scale" in hit["snippet"] and "calc.py:11-13 (scale) [fresh]" in out["search_text"]
    assert out["ask"]["answer"].strip() and out["ask"]["sources"][0]["citation"] == "calc.py:11-13"
    st = out["status"]["repositories"][0]
    assert st["files"] == 3 and st["compiled_share"] > 0.5 and st["watcher"]["running"]
    assert "root" not in st
    note = out["found_note"][out["remember"]["id"]]
    assert note["source"] == "note" and note["fresh"] is None and note["snippet"].endswith("Files: calc.py")
    assert isinstance(out["changes"]["changes"], list)
    assert out["secret"][0] and "secret" in out["secret"][1]
    assert out["forget"] == (False, {"forgotten": out["remember"]["id"]})
    assert out["forget_code"][0] and "not a note" in out["forget_code"][1]


def test_mcp_over_streamable_http_calls_every_tool(served: Served) -> None:
    from mcp import Client

    async def run() -> dict:
        async with Client(served.url + "/mcp") as mcp:
            return await _every_tool(mcp)

    _check_every_tool(asyncio.run(run()), stdio=False)


def test_mcp_over_stdio_calls_every_tool(served: Served) -> None:
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(command=sys.executable, args=[
        "-m", "repomem.app.cli", "mcp", str(served.repo), "--model", served.settings.model],
        env=dict(os.environ))
    before = served.service.repos.repos[0].mem.store.cubes(source="note")

    async def run() -> dict:
        async with Client(params, read_timeout_seconds=300) as mcp:
            return await _every_tool(mcp)

    _check_every_tool(asyncio.run(run()), stdio=True)
    # the note went through the same store the HTTP server reads (and the inspector shows)
    assert served.service.repos.repos[0].mem.store.cubes(source="note") == before


def test_a_file_edited_while_serving_is_stale_then_fresh(served: Served) -> None:
    from mcp import Client

    async def search() -> list[dict]:
        async with Client(served.url + "/mcp") as mcp:
            r = await mcp.call_tool("search_code", {"query": "Retry backoff attempt"})
            return r.structured_content["results"]

    path = served.repo / "retry.py"
    path.write_text(RETRY.replace("0.5 * (2 ** attempt)", "0.25 * (2 ** attempt)"))
    hit = next(h for h in asyncio.run(search()) if h["path"] == "retry.py")
    assert hit["fresh"] is False
    assert "retry.py" in _health(served)["repositories"][0]["stale"]
    deadline = time.monotonic() + 60
    while True:
        hit = next(h for h in asyncio.run(search()) if h["path"] == "retry.py")
        if hit["fresh"]:
            break
        assert time.monotonic() < deadline, "the watcher never synced the edit"
        time.sleep(0.5)
    assert "0.25" in hit["snippet"] and _health(served)["repositories"][0]["stale_files"] == 0


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
        assert [m.id for m in good.models.list().data] == [served.name]
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


def test_repomem_serve_cli_refuses_then_serves_and_stops_on_sigterm(served: Served) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REPOMEM_API_KEY"}
    refused = subprocess.run([sys.executable, "-m", "repomem.app.cli", "serve", str(served.repo), "--host", "0.0.0.0"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1 and "without an API key" in refused.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "repomem.app.cli", "serve", str(served.repo), "--port", str(port),
                             "--model", served.settings.model], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        assert health["repositories"][0]["model"] == served.name
        assert health["repositories"][0]["watcher"]["in_process"] is False  # the module's server watches it
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


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
    assert json.dumps(h)  # plain JSON types only
