"""`GET /v1/models` and `POST /v1/chat/completions`, streamed (SSE ending in `data: [DONE]`) and not.

The answer comes from `RepoMemory.ask` on the queue's worker thread; its text reaches the event
loop through an asyncio queue. Response headers go out with the first piece of the answer, so an
error found before it (unknown model, a question that overflows the context, a full queue) is a
real HTTP status. A client that goes away cancels its job: a waiting one leaves the queue, a running
generation stops at its next token. Cubes under private paths are never retrieved here.

Extensions, all optional for clients: `"repomem": {"sources_footer": false}` in the request drops the
`Sources:` footer; every response carries `"repomem": {sources, mode, ...}` and `usage.repomem`
(memory tokens spliced and placed as text). As in OpenAI's API, `usage.prompt_tokens` counts every
token of the prompt and `usage.prompt_tokens_details.cached_tokens` the part of them restored from KV
instead of decoded (repomem's system prefix, the spliced memory and, in kv mode, the client's system
message).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from repomem.core import Answer, CancelledError, ContextOverflowError, ModelError, RepomemError, StoreError

from .chat import ChatRequest, parse_chat
from .clients import http_client
from .errors import APIError, without_local_paths
from .queue import FairQueue, QueueFull, ShuttingDown, Ticket
from .repos import MODEL_PREFIX, MODES, ModelNotFound, Repositories, ServedRepo

DISCONNECT_POLL_S = 0.1
MAX_BODY_BYTES = 16 * 2**20  # far more than a context can hold: only a runaway client meets it


class ClientGone(Exception):
    pass


# -- /v1/models -------------------------------------------------------------------------------------
def _models(request: Request) -> list[dict]:
    """Every name `model` takes, so clients that pick from a list (Open WebUI) can pick each: per
    repository `repomem/<name>` (the settings' mode, kv unless changed) and a suffix for each other
    mode, then the same for the `repomem` alias (the first repository)."""
    repos: Repositories = request.app.state.repos
    created = int(request.app.state.started)
    default = repos.settings.mode
    variants = [("", default)] + [(f":{m}", m) for m in MODES if m != default]
    named = [(r.model_id, r) for r in repos.repos] + [(MODEL_PREFIX, repos.repos[0])]
    return [{"id": base + suffix, "object": "model", "created": created, "owned_by": "repomem",
             "repomem": {"repository": repo.name, "mode": mode, "context_length": repos.settings.n_ctx}}
            for base, repo in named for suffix, mode in variants]


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": _models(request)})


async def retrieve_model(request: Request) -> Response:
    """`GET /v1/models/{model}`: one entry of the list (clients check a configured name exists)."""
    name = request.path_params["model"]
    found = next((m for m in _models(request) if m["id"] == name), None)
    if found is None:
        raise APIError(404, f"no model {name!r}: GET /v1/models lists them", code="model_not_found", param="model")
    return JSONResponse(found)


# -- /v1/chat/completions ---------------------------------------------------------------------------
async def chat_completions(request: Request) -> Response:
    repos: Repositories = request.app.state.repos
    queue: FairQueue = request.app.state.queue
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":  # a cross-site form or text/plain POST needs no preflight: refuse it
        raise APIError(415, "send the request as JSON (Content-Type: application/json)",
                       code="unsupported_media_type")
    try:
        body = json.loads(await _body(request))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    req = parse_chat(body, repos.settings)
    try:
        repo, mode = repos.resolve(req.model)
    except ModelNotFound as exc:
        raise APIError(404, str(exc), code="model_not_found", param="model") from None
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    client = http_client(req.user, request.headers, request.client.host if request.client else None)
    ticket = _submit(queue, client, repo, mode, req, loop, events)
    reply = Reply(req, mode or repos.settings.mode)
    watched = WatchedJob(request, queue, ticket, events)
    try:
        first = await watched.first()
    except ClientGone:
        return Response(status_code=499)
    if req.stream:
        return EventSourceResponse(_stream(reply, first, queue, ticket, events), sep="\n",
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    event = first
    try:
        while event[0] == "text":
            reply.add(event[1])
            event = await watched.next()
    except ClientGone:
        return Response(status_code=499)
    if event[0] == "error":
        raise api_error(event[1])
    return JSONResponse(reply.completion(event[1]))


async def _body(request: Request) -> bytes:
    """The request body, refused past MAX_BODY_BYTES before it is all read (413)."""
    too_big = APIError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _submit(queue: FairQueue, client: str, repo: ServedRepo, mode: str | None, req: ChatRequest,
            loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Ticket:
    def put(kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the server stopped, nobody reads these
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    def job(cancel: Any) -> Answer:
        return repo.mem.ask(req.question, mode=mode, history=req.history, system=req.system, sampling=req.sampling,
                            on_text=lambda piece: put("text", piece), cancel=cancel, record=False,
                            allow_local=False)

    try:
        ticket = queue.submit(client, job)
    except QueueFull as exc:
        raise APIError(503, str(exc), type="server_error", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after)}) from None

    def finished(fut: Any) -> None:
        if fut.cancelled():
            put("error", CancelledError("cancelled"))
        elif fut.exception() is not None:
            put("error", fut.exception())
        else:
            put("done", fut.result())

    ticket.future.add_done_callback(finished)
    return ticket


class WatchedJob:
    """A job's events for a request that is not streamed, watching for the client to go away meanwhile
    (then the job is cancelled). The client is looked at every DISCONNECT_POLL_S whether or not pieces
    keep arriving: a fast generation must not hide a disconnect."""

    def __init__(self, request: Request, queue: FairQueue, ticket: Ticket, events: asyncio.Queue) -> None:
        self.request, self.queue, self.ticket, self.events = request, queue, ticket, events
        self._checked = time.monotonic()

    async def next(self) -> tuple[str, Any]:
        while True:
            try:
                event: tuple[str, Any] | None = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                event = None
            now = time.monotonic()
            if event is None or now - self._checked >= DISCONNECT_POLL_S:
                self._checked = now
                if await self.request.is_disconnected():
                    self.queue.cancel(self.ticket)
                    raise ClientGone from None
            if event is not None:
                return event

    async def first(self) -> tuple[str, Any]:
        """The first event; a job that failed before any text raises its error as the API's."""
        event = await self.next()
        if event[0] == "error":
            raise api_error(event[1])
        return event


def api_error(exc: BaseException) -> APIError:
    """A failure of the model job, as the status and error code an OpenAI client expects."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), type="server_error", code="shutting_down")
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, ModelError):
        return APIError(500, str(exc), type="server_error", code="model_error")
    if isinstance(exc, StoreError):  # locked by another process, read-only, full: the server's, and passing
        return APIError(503, str(exc), type="server_error", code="store_unavailable")
    if isinstance(exc, RepomemError):
        return APIError(400, str(exc))
    return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error")


async def _stream(reply: Reply, first: tuple[str, Any], queue: FairQueue, ticket: Ticket,
                  events: asyncio.Queue) -> AsyncIterator[dict]:
    """SSE events; a disconnect cancels this generator (sse-starlette), which cancels the job."""
    try:
        yield {"data": json.dumps(reply.chunk({"role": "assistant", "content": ""}))}
        event = first
        while event[0] == "text":
            piece = reply.add(event[1])
            if piece:
                yield {"data": json.dumps(reply.chunk({"content": piece}))}
            event = await events.get()
        if event[0] == "error":
            yield {"data": json.dumps(api_error(event[1]).body())}
        else:
            for chunk in reply.final_chunks(event[1]):
                yield {"data": json.dumps(chunk)}
        yield {"data": "[DONE]"}
    finally:
        if not ticket.future.done():
            queue.cancel(ticket)


_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


class Reply:
    """One answer as OpenAI shapes it: stop sequences cut out, leading blank lines dropped (the first line's
    indentation kept: an editor may write the reply into a file), the footer."""

    def __init__(self, req: ChatRequest, mode: str):
        self.req, self.mode = req, mode
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.stops = list(req.sampling.stop)
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # a stop may begin in the held tail
        self.pending = ""
        self.text: list[str] = []
        self.stopped = False

    def add(self, piece: str) -> str:
        """Take a piece of the answer; return the part safe to send now."""
        if self.stopped:
            return ""
        buf = self.pending + piece
        if not self.text:
            if not buf.strip():  # nothing but space yet: it may be the indentation of a first code line
                self.pending = buf
                return ""
            buf = _LEADING_BLANK_LINES.sub("", buf)
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = buf[:cut], "", True
        else:
            keep = min(self.hold, len(buf))
            out, self.pending = buf[:len(buf) - keep], buf[len(buf) - keep:]
        if out:
            self.text.append(out)
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped or not (self.text or self.pending.strip()) else self.pending), ""
        if out:
            self.text.append(out)
        return out

    def footer(self, ans: Answer) -> str:
        if not self.req.sources_footer or not ans.sources:
            return ""
        cites = [f"{s.path}:{s.start_line}-{s.end_line}" if s.source == "code" else s.path for s in ans.sources]
        return "\n\nSources: " + ", ".join(cites)

    def finish_reason(self, ans: Answer) -> str:
        return "length" if not self.stopped and ans.stop_reason in ("length", "context") else "stop"

    def extension(self, ans: Answer) -> dict:
        return {"mode": ans.mode, "sources": [source_dict(s) for s in ans.sources], "evidence": evidence_dict(ans),
                "spliced": ans.spliced, "as_text": ans.as_text, "ttft_s": round(ans.ttft_s, 4),
                "warnings": [without_local_paths(w) for w in ans.warnings]}

    def chunk(self, delta: dict, finish: str | None = None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.req.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.req.include_usage:  # every chunk but the last carries `usage: null` then
            out["usage"] = None
        return out

    def final_chunks(self, ans: Answer) -> list[dict]:
        out = []
        tail = self.flush() + self.footer(ans)
        if tail:
            out.append(self.chunk({"content": tail}))
        last = self.chunk({}, self.finish_reason(ans))
        last["repomem"] = self.extension(ans)
        out.append(last)
        if self.req.include_usage:
            out.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.req.model, "choices": [], "usage": usage_dict(ans)})
        return out

    def completion(self, ans: Answer) -> dict:
        self.flush()
        content = "".join(self.text) + self.footer(ans)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": None, "finish_reason": self.finish_reason(ans)}],
                "usage": usage_dict(ans), "repomem": self.extension(ans)}


def source_dict(s: Any) -> dict:
    """A source with its `path:start-end` citation (the way answers and tools cite memory)."""
    cite = f"{s.path}:{s.start_line}-{s.end_line}" if s.source == "code" else s.path
    return {"citation": cite, "path": s.path, "start_line": s.start_line, "end_line": s.end_line,
            "symbol": s.symbol, "source": s.source, "id": s.cube_id}


def usage_dict(ans: Answer) -> dict:
    """Tokens an answer read and wrote, in the OpenAI API's shape: `prompt_tokens` all it read, of which
    `cached_tokens` were taken from KV rather than decoded; repomem's memory counts beside them."""
    prompt = ans.prompt_tokens + ans.cached_tokens
    return {"prompt_tokens": prompt, "completion_tokens": ans.completion_tokens,
            "total_tokens": prompt + ans.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": ans.cached_tokens},
            "repomem": {"memory_tokens": ans.memory_tokens, "spliced_tokens": ans.spliced_tokens,
                        "as_text_tokens": ans.memory_tokens - ans.spliced_tokens, "spliced": ans.spliced,
                        "as_text": ans.as_text}}


def evidence_dict(ans: Answer) -> dict | None:
    """The exact lines the answer stands in, cited `path:start-end` (None when it read no memory). They come
    from the answer's own sources, so a private file's lines cannot be among them."""
    ev = ans.evidence
    if ev is None:
        return None
    return {"citation": ev.location, "path": ev.path, "start_line": ev.start_line, "end_line": ev.end_line,
            "lines": ev.text, "id": ev.cube_id}
