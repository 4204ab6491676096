"""`repomem bench serve`: time to the first streamed answer token through `/v1/chat/completions`.

For each dev question: repomem's server in kv mode (the memory spliced as KV), the same in-process
call (what HTTP adds), repomem's server in text mode, and llama-cpp-python's own OpenAI server
(`python -m llama_cpp.server`, the same model, threads and retrieved text in the prompt: what a
Continue or Aider user with a local model gets today). Also what an Aider-sized system message
costs in kv mode. It prints numbers; tests never assert on them.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from repomem.app.server.config import ServeConfig
from repomem.app.server.runner import ServerThread, Service
from repomem.bench.evaluate import ASK_KEYS, load_rows
from repomem.core import load_settings
from repomem.core.engine import SamplingParams, default_threads
from repomem.core.errors import RepomemError
from repomem.core.prompt import SYSTEM, memory_text

BASELINE_N_CTX = 4096  # holds the memory budget, the question and the answer; the smallest fair context
AIDER_SIZED_TOKENS = 2000  # Aider's edit-format instructions plus a short repository map
AIDER_LIKE = ("Act as an expert software developer. Always use best practices when coding. Respect and use "
              "existing conventions, libraries, etc that are already present in the code base. Take requests for "
              "changes to the supplied code. If the request is ambiguous, ask questions. Once you understand the "
              "request you MUST describe each change with a SEARCH/REPLACE block per the examples below. ")
Progress = Callable[[str], None]


def bench_serve(qa_file: Path, repo_root: Path, *, limit: int | None = 5, model: str | None = None,
                answer_tokens: int = 16, repeats: int = 3, baseline: bool = True,
                progress: Progress | None = None) -> dict:
    say = progress or (lambda _m: None)
    rows = load_rows(qa_file, limit, keys=ASK_KEYS)
    settings = load_settings()
    settings.n_threads = settings.n_threads or default_threads()
    roots = list(dict.fromkeys(str(repo_root / r["repo"]) for r in rows))
    service = Service.open(roots, ServeConfig(port=0, max_queue=4), settings=settings, model=model, watch=False)
    server = ServerThread(service).start()
    llama: subprocess.Popen | None = None
    try:
        by_root = {str(r.root): r for r in service.repos.repos}
        for root, served in by_root.items():
            mine = [r["question"] for r in rows if str(repo_root / r["repo"]) == root]
            say(f"{served.name}: compiling what {len(mine)} question(s) retrieve")
            served.mem.compile_ids(c.id for q in mine for c in served.mem.search(q, k=settings.top_k,
                                                                                 allow_local=False))
        first = next(iter(by_root.values())).mem
        model_path = first.engine.path
        aider_system = _aider_sized(first)
        base_url, base_error = None, "" if baseline else "--no-baseline"
        if baseline:
            try:
                llama, base_url = _start_llama_server(model_path, first.engine.use_extra_bufts, settings.n_threads)
            except RepomemError as exc:
                base_error = str(exc)
                say(f"llama_cpp.server unavailable: {exc}")
        sampling = SamplingParams(temperature=0.0, max_tokens=answer_tokens)
        records = []
        with httpx.Client(timeout=600) as http:
            for served in by_root.values():  # warm: model, prefix state, answer context
                _inproc(served.mem, "warm up", sampling)
                _stream_ttft(http, server.url, {"model": served.model_id, "messages": [
                    {"role": "user", "content": "warm up"}], "max_tokens": 2})
            if base_url:
                _stream_ttft(http, base_url, {"model": "baseline", "messages": [
                    {"role": "user", "content": "warm up"}], "max_tokens": 2})
            for i, row in enumerate(rows, 1):
                served = by_root[str(repo_root / row["repo"])]
                q = row["question"]
                say(f"[{i}/{len(rows)}] {row['id']}")
                body = {"model": f"{served.model_id}:kv", "max_tokens": answer_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": q}]}
                inproc, http_kv, ans = [], [], None
                for _ in range(repeats):  # interleaved: both see the same background load
                    t, ans = _inproc(served.mem, q, sampling)
                    inproc.append(t)
                    http_kv.append(_stream_ttft(http, server.url, body))
                rec = {"id": row["id"], "memory_tokens": ans.memory_tokens, "spliced": ans.spliced,
                       "as_text": ans.as_text, "kv_inprocess_ms": _ms(statistics.median(inproc)),
                       "kv_http_ms": _ms(statistics.median(http_kv)),
                       "http_minus_inprocess_ms": [_ms(h - i) for i, h in zip(inproc, http_kv, strict=True)]}
                rec["kv_http_aider_system_ms"] = _ms(_stream_ttft(http, server.url, {**body, "messages": [
                    {"role": "system", "content": aider_system["text"]}, {"role": "user", "content": q}]}))
                rec["text_http_ms"] = _ms(_stream_ttft(http, server.url, {**body, "model": f"{served.model_id}:text"}))
                if base_url:
                    memory = "".join(memory_text(c.path, c.start_line, c.end_line, c.symbol, c.text)
                                     for c in (served.mem.store.get(s.cube_id) for s in ans.sources) if c)
                    rec["llama_server_ms"] = _ms(_stream_ttft(http, base_url, {
                        "model": "baseline", "max_tokens": answer_tokens, "temperature": 0,
                        "messages": [{"role": "system", "content": SYSTEM + "\n\n" + memory},
                                     {"role": "user", "content": q}]}))
                records.append(rec)
    finally:
        if llama is not None:
            llama.terminate()
            try:
                llama.wait(30)
            except subprocess.TimeoutExpired:
                llama.kill()
        server.stop()
    return _report(records, model_path, settings.n_threads, answer_tokens, repeats, aider_system["tokens"],
                   base_error)


def _report(records: list[dict], model_path: Path, threads: int, answer_tokens: int, repeats: int,
            aider_tokens: int, base_error: str) -> dict:
    def med(key: str) -> float | None:
        vals = [r[key] for r in records if key in r]
        return round(statistics.median(vals), 1) if vals else None

    overhead = [d for r in records for d in r["http_minus_inprocess_ms"]]  # each HTTP run vs the call just before
    aider_cost = [r["kv_http_aider_system_ms"] - r["kv_http_ms"] for r in records]
    kv = med("kv_http_ms")
    out = {
        "model": model_path.name, "threads": threads, "questions": len(records), "answer_tokens": answer_tokens,
        "kv_repeats": repeats, "memory_tokens_median": med("memory_tokens"),
        "kv_http_ttft_ms": kv, "kv_inprocess_ttft_ms": med("kv_inprocess_ms"),
        "http_overhead_ms": round(statistics.median(overhead), 1) if overhead else None,
        "text_http_ttft_ms": med("text_http_ms"), "llama_server_ttft_ms": med("llama_server_ms"),
        "aider_system_tokens": aider_tokens, "kv_http_aider_system_ttft_ms": med("kv_http_aider_system_ms"),
        "aider_system_cost_ms": round(statistics.median(aider_cost), 1) if aider_cost else None,
        "baseline": (f"python -m llama_cpp.server, n_ctx {BASELINE_N_CTX}, {threads} threads" if not base_error
                     else f"not run: {base_error}"),
    }
    if kv:
        for key, ref in (("speedup_vs_llama_server", "llama_server_ttft_ms"), ("speedup_vs_text", "text_http_ttft_ms")):
            out[key] = round(out[ref] / kv, 1) if out[ref] else None
    out["rows"] = records
    return out


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _aider_sized(mem) -> dict:  # noqa: ANN001 - RepoMemory
    per = len(mem.engine.tokenize(AIDER_LIKE))
    text = AIDER_LIKE * max(1, AIDER_SIZED_TOKENS // per)
    return {"text": text, "tokens": len(mem.engine.tokenize(text))}


def _inproc(mem, question: str, sampling: SamplingParams):  # noqa: ANN001, ANN202 - RepoMemory -> (s, Answer)
    """The same call the server makes, timed to its first non-blank piece (the server skips leading blanks)."""
    first: list[float] = []
    t0 = time.perf_counter()
    ans = mem.ask(question, mode="kv", record=False, allow_local=False, sampling=sampling,
                  on_text=lambda p: first.append(time.perf_counter()) if not first and p.strip() else None)
    return (first[0] if first else time.perf_counter()) - t0, ans


def _stream_ttft(http: httpx.Client, base: str, body: dict) -> float:
    """Seconds from sending the request to the first streamed chunk with content (the whole answer is read)."""
    t0 = time.perf_counter()
    ttft = None
    with http.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}) as resp:
        if resp.status_code != 200:
            raise RepomemError(f"{base} answered {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            choices = json.loads(line[5:]).get("choices") or []
            piece = (choices[0].get("delta") or {}).get("content") if choices else None
            if ttft is None and piece and piece.strip():
                ttft = time.perf_counter() - t0
    if ttft is None:
        raise RepomemError(f"{base} streamed no content for {body['messages'][-1]['content'][:60]!r}")
    return ttft


def _start_llama_server(model_path: Path, extra_bufts: bool, threads: int) -> tuple[subprocess.Popen, str]:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        raise RepomemError(f"llama-cpp-python's server extra is not installed ({exc})") from None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "repomem.bench.serve_baseline", *([] if extra_bufts else ["--no-extra-bufts"]),
           "--model", str(model_path), "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(BASELINE_N_CTX),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--model_alias", "baseline"]
    log = tempfile.TemporaryFile()  # its log is long: a pipe nobody reads would block it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RepomemError(f"llama_cpp.server exited ({proc.returncode}): "
                               f"{log.read().decode(errors='replace')[-300:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RepomemError("llama_cpp.server did not start within 180 s")
