"""Text-mode answers through any OpenAI-compatible chat endpoint (llama.cpp server, Ollama, LM Studio, hosted).

This is the MemOS path for a model whose internals we cannot reach: memory enters as plain text
before the question. Cubes marked `local` (private paths) never leave the machine: they are filtered
out of retrieval before anything is sent.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator

import httpx

from .errors import CancelledError, RepomemError
from .memory import Answer, RepoMemory, Source
from .prompt import SYSTEM, memory_text


def ask_remote(mem: RepoMemory, question: str, endpoint: str, *, model: str | None = None,
               on_text: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
               max_tokens: int | None = None, timeout_s: float = 120.0) -> Answer:
    question = question.strip()
    if not question:
        raise RepomemError("the question is empty")
    s = mem.settings
    cubes = mem.search(question, k=s.top_k, allow_local=False)
    budget_chars = s.memory_tokens * 3  # no tokenizer for a remote model: a conservative character budget
    memory, used = [], 0
    for c in cubes:
        text = memory_text(c.path, c.start_line, c.end_line, c.symbol, c.text)
        if used + len(text) > budget_chars:
            continue
        memory.append((c, text))
        used += len(text)
    messages = [{"role": "system", "content": SYSTEM + "\n\n" + "".join(t for _, t in memory)},
                {"role": "user", "content": question}]
    headers = {}
    key = os.environ.get(s.endpoint_api_key_env or "OPENAI_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = {"model": model or s.endpoint_model or "default", "messages": messages, "stream": True,
            "temperature": s.temperature, "max_tokens": max_tokens or s.max_answer_tokens}
    url = endpoint.rstrip("/") + "/chat/completions"
    t0 = time.perf_counter()
    ttft, parts, stop = 0.0, [], ""
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                raise RepomemError(f"endpoint {url} answered HTTP {resp.status_code}: {resp.read()[:200]!r}")
            for chunk in _chunks(resp, url):
                if cancel is not None and cancel.is_set():
                    stop = "cancelled"
                    break
                choices = chunk.get("choices") or []
                if not choices:  # a content-filter report or the usage chunk
                    continue
                choice = choices[0]
                piece = (choice.get("delta") or choice.get("message") or {}).get("content") or ""
                if piece:
                    if not parts:
                        ttft = time.perf_counter() - t0
                    parts.append(piece)
                    if on_text:
                        on_text(piece)
                stop = choice.get("finish_reason") or stop
    except httpx.HTTPError as exc:
        raise RepomemError(f"endpoint {url} unreachable: {exc}") from exc
    if stop == "cancelled" and not parts:
        raise CancelledError("cancelled")
    sources = [Source.of(c, str(mem.root)) for c, _ in memory]
    return Answer(answer="".join(parts).strip(), mode="text", ttft_s=ttft, total_s=time.perf_counter() - t0,
                  memory_tokens=used // 3, sources=sources, as_text=len(memory), stop_reason=stop)


def _chunks(resp: httpx.Response, url: str) -> Iterator[dict]:
    """The reply's completion chunks: its server-sent events, or the one JSON completion of a server that
    does not stream."""
    if "json" in resp.headers.get("content-type", ""):
        yield _chunk(resp.read().decode("utf-8", "replace"), url)
        return
    for line in resp.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield _chunk(data, url)


def _chunk(data: str, url: str) -> dict:
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise RepomemError(f"endpoint {url} sent a reply that is not JSON: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise RepomemError(f"endpoint {url} sent a reply that is not a completion: {data[:200]!r}")
    if chunk.get("error"):
        err = chunk["error"]
        message = err.get("message", err) if isinstance(err, dict) else err
        raise RepomemError(f"endpoint {url} reported an error: {message}")
    return chunk
