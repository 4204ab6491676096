"""The MCP tools (official `mcp` SDK): the same over stdio (`repomem mcp`) and at `/mcp` on `repomem serve`.

Every result cites `path:start-end` and comes twice: as text the agent's model reads, and as
structured content a program can use. Model work (`ask_repo`) goes through the server's fair queue
like any HTTP request, in a line of its MCP session's own (`clients.py`); searches and notes do not
need the model and run on their own. Cubes under private paths never leave through a tool, as
through the HTTP API.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import re
import time
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from repomem.core import Answer, Cube, RepomemError, RepoMemory, __version__

from .clients import mcp_client
from .errors import without_local_paths
from .openai_api import evidence_dict, source_dict, usage_dict
from .queue import FairQueue, Ticket
from .repos import MODES, Repositories

SNIPPET_CHARS = 1500
PROGRESS_EVERY_S = 5.0
INSTRUCTIONS = (
    "repomem keeps a lasting memory of a code repository. search_code finds definitions and code with "
    "path:start-end and says whether each file is unchanged since it was indexed (fresh); ask_repo has the "
    "local model answer from that memory; recent_changes tells what changed; remember keeps a decision or "
    "fact for later sessions, forget removes one."
)
Repo = Annotated[str, Field(description="Repository name when the server has several (default: the first)")]
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


async def _with_progress(ticket: Ticket, ctx: Context) -> Answer:
    """The ticket's answer, with a progress notification every PROGRESS_EVERY_S while it waits or runs: MCP
    clients time a tool call out (often after 60 s) unless progress comes, and a queue of text-mode answers
    takes longer. A no-op for a client that asked for no progress."""
    waiting = asyncio.wrap_future(ticket.future)
    started = time.monotonic()
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=PROGRESS_EVERY_S)
        if done:
            return waiting.result()
        state = "answering" if ticket.future.running() else "waiting for the model"
        await ctx.report_progress(round(time.monotonic() - started, 1), None, state)


def build_mcp(repos: Repositories, queue: FairQueue) -> MCPServer:
    server = MCPServer("repomem", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING")
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(annotations=read_only)
    def search_code(
        query: Annotated[str, Field(description="Words, identifiers, file names")],
        k: Annotated[int, Field(description="How many pieces", ge=1, le=50)] = 8,
        path_glob: Annotated[str | None, Field(description="Only paths matching this glob, e.g. src/*.py")] = None,
        repo: Repo = "",
    ) -> CallToolResult:
        """Search the repository's memory: ranked code pieces with path:start-end, symbol, a snippet, and
        whether the file is unchanged since it was indexed (fresh: false means re-read the file)."""
        served = _repo(repos, repo)
        mem = served.mem
        hits = []
        for c in search_paths(mem, query, k, path_glob):
            hit = {"citation": c.location if c.source == "code" else c.path, "path": c.path,
                   "start_line": c.start_line, "end_line": c.end_line, "symbol": c.symbol, "source": c.source,
                   "fresh": mem.file_is_current(c.path) if c.source == "code" else None, "id": c.id,
                   "snippet": c.text[:SNIPPET_CHARS]}
            hits.append(hit)
        lines = [f"{len(hits)} result(s) for {query!r} in {served.name}:"]
        for i, h in enumerate(hits, 1):
            fresh = {True: "fresh", False: "STALE: file changed since indexed", None: h["source"]}[h["fresh"]]
            lines.append(f"\n{i}. {h['citation']}" + (f" ({h['symbol']})" if h["symbol"] else "") + f" [{fresh}]")
            lines.append(f"```\n{h['snippet'].rstrip()}\n```")
        return _result("\n".join(lines), {"repository": served.name, "results": hits})

    @server.tool(annotations=read_only)
    async def ask_repo(
        question: Annotated[str, Field(description="A question about the repository")],
        ctx: Context,
        mode: Annotated[str, Field(description="kv (compiled memory, fastest), text or none")] = "kv",
        instructions: Annotated[str, Field(description="How to answer (format, length): read after the memory, "
                                                       "like a chat client's system message")] = "",
        repo: Repo = "",
    ) -> CallToolResult:
        """Ask repomem's local model, which answers from the repository's memory, with its sources."""
        served = _repo(repos, repo)
        if mode not in MODES:
            raise ToolError(f"unknown mode {mode!r}; use kv, text or none")
        client = _queue_client(ctx)
        try:
            ticket = queue.submit(client, lambda cancel: served.mem.ask(question, mode=mode, cancel=cancel,
                                                                       record=False, allow_local=False,
                                                                       system=instructions))
        except RepomemError as exc:  # a full queue, or the server stopping
            raise ToolError(without_local_paths(str(exc))) from None
        try:
            ans: Answer = await _with_progress(ticket, ctx)
        except asyncio.CancelledError:
            queue.cancel(ticket)
            raise
        except RepomemError as exc:
            raise ToolError(without_local_paths(str(exc))) from None
        sources = [source_dict(s) for s in ans.sources]
        evidence = evidence_dict(ans)
        text = ans.answer + ("\n\nSources: " + ", ".join(s["citation"] for s in sources) if sources else "")
        if evidence:
            text += f"\n\nEvidence: {evidence['citation']}\n```\n{evidence['lines']}\n```"
        warnings = [without_local_paths(w) for w in ans.warnings]
        return _result(text, {"answer": ans.answer, "mode": ans.mode, "sources": sources, "evidence": evidence,
                              "ttft_s": round(ans.ttft_s, 3), "warnings": warnings, "usage": usage_dict(ans)})

    @server.tool(annotations=read_only)
    def memory_status(repo: Repo = "") -> CallToolResult:
        """What the memory holds: files, memories, the share compiled to KV, files changed since indexed,
        and whether a watcher keeps it current."""
        states = [repos.health(r) for r in ([_repo(repos, repo)] if repo else repos.repos)]
        lines = []
        for st in states:
            w = st["watcher"]
            lines.append(f"{st['name']}: {st['files']} files, {st['cubes']} memories, "
                         f"{st['compiled_share']:.0%} compiled to KV, {st['stale_files']} file(s) changed since "
                         f"indexed; watcher {'running' if w['running'] else 'not running'} ({w['state']})")
        return _result("\n".join(lines), {"repositories": states})

    @server.tool(annotations=read_only)
    def recent_changes(
        since: Annotated[str, Field(description="How far back: 30m, 6h, 2d, 1w, or an ISO date/time")] = "24h",
        limit: Annotated[int, Field(ge=1, le=200)] = 20,
        repo: Repo = "",
    ) -> CallToolResult:
        """Changes to the repository's files the memory recorded (file, symbols, a short diff), newest first,
        each with path:start-end of where its symbols are now."""
        served = _repo(repos, repo)
        start = parse_since(since)
        changes = served.mem.changes_since(start, limit=limit, allow_local=False)
        items = [{"path": c.path.removeprefix("change:"), "at": _iso(c.created), "symbols": c.symbol,
                  "citations": change_citations(served.mem, c), "summary": c.text[:SNIPPET_CHARS], "id": c.id}
                 for c in changes]
        lines = [f"{len(items)} change(s) since {_iso(start)} in {served.name}:"]
        lines += [f"\n- {i['at']} {', '.join(i['citations']) or i['path']} ({i['symbols']})\n"
                  f"{i['summary'].rstrip()}" for i in items]
        return _result("\n".join(lines), {"repository": served.name, "since": _iso(start), "changes": items})

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False))
    def remember(
        note: Annotated[str, Field(description="A decision or fact worth keeping, in a few sentences")],
        paths: Annotated[list[str] | None, Field(description="Files it is about (repository-relative)")] = None,
        repo: Repo = "",
    ) -> CallToolResult:
        """Keep a note in the repository's memory: later questions and searches find it, and the user sees
        it (and can edit or delete it) in repomem's memory inspector. Secrets are refused."""
        served = _repo(repos, repo)
        try:
            cube = served.mem.remember(note, paths or [])
        except RepomemError as exc:
            raise ToolError(without_local_paths(str(exc))) from None
        return _result(f"Remembered as {cube.path} (id {cube.id}).", {"id": cube.id, "citation": cube.path})

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False))
    def forget(
        id: Annotated[str, Field(description="The id remember returned (or a search result's id of a note)")],
        repo: Repo = "",
    ) -> CallToolResult:
        """Delete a note from the memory. Memories of code follow their files and cannot be forgotten here."""
        served = _repo(repos, repo)
        id = id.strip().removeprefix("note:")  # the citation search_code shows for a note
        try:
            served.mem.forget_note(id)
        except RepomemError as exc:
            raise ToolError(without_local_paths(str(exc))) from None
        return _result(f"Forgot note {id}.", {"forgotten": id})

    return server


def search_paths(mem: RepoMemory, query: str, k: int, path_glob: str | None) -> list[Cube]:
    """The top `k` shared cubes whose path matches `path_glob`. `RepoMemory.search` takes no path filter,
    so the search is widened until `k` match or it has been asked for every cube in the index."""
    if not path_glob:
        return mem.search(query, k=k, allow_local=False)
    fetch = k * 4 + 10
    while True:
        hits = [c for c in mem.search(query, k=fetch, allow_local=False) if fnmatch.fnmatch(c.path, path_glob)]
        if len(hits) >= k or fetch >= len(mem.index_):
            return hits[:k]
        fetch *= 4


def change_citations(mem: RepoMemory, change: Cube) -> list[str]:
    """`path:start-end` of the code cubes a change note names (the symbols it touched), where they are now."""
    rel = change.path.removeprefix("change:")
    names = set((change.symbol or "").split(", "))
    return [c.location for c in mem.store.cubes(path=rel, source="code")
            if c.status != "archived" and (c.symbol or "(module)") in names]


def parse_since(since: str) -> float:
    """`30m`, `6h`, `2d`, `1w` ago, an ISO date or date-time (local time unless it names a zone), or epoch seconds."""
    text = since.strip()
    m = _RELATIVE.match(text)
    if m:
        return time.time() - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ToolError(f"cannot read {since!r} as a time: use 30m, 6h, 2d, 1w or an ISO date") from None
    return when.timestamp()


def _queue_client(ctx: Context) -> str:
    request = ctx.request_context.request
    params = ctx.session.client_params
    info = params.client_info if params is not None else None
    return mcp_client(ctx.headers, request.client.host if getattr(request, "client", None) else None,
                      f"{info.name}/{info.version}" if info is not None else "")


def _repo(repos: Repositories, name: str) -> Any:
    try:
        return repos.get(name)
    except RepomemError as exc:
        raise ToolError(without_local_paths(str(exc))) from None


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _result(text: str, data: dict) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)
