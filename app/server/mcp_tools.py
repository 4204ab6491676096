"""The MCP tools (official `mcp` SDK): the same over stdio (`repomem mcp`) and at `/mcp` on `repomem serve`.

Every result cites `path:start-end` and comes twice: as text the agent's model reads, and as
structured content a program can use. Model work (`ask_repo`) goes through the server's fair queue
like any HTTP request; searches and notes do not need the model and run on their own. Cubes under
private paths never leave through a tool, as through the HTTP API.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import re
import time
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from repomem.core import Answer, RepomemError, __version__

from .openai_api import source_dict
from .queue import FairQueue, QueueFull
from .repos import Repositories

SNIPPET_CHARS = 1500
INSTRUCTIONS = (
    "repomem keeps a lasting memory of a code repository. search_code finds definitions and code with "
    "path:start-end and says whether each file is unchanged since it was indexed (fresh); ask_repo has the "
    "local model answer from that memory; recent_changes tells what changed; remember keeps a decision or "
    "fact for later sessions, forget removes one."
)
Repo = Annotated[str, Field(description="Repository name when the server has several (default: the first)")]
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


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
        cubes = mem.search(query, k=k if not path_glob else k * 4 + 10, allow_local=False)
        if path_glob:
            cubes = [c for c in cubes if fnmatch.fnmatch(c.path, path_glob)]
        hits = []
        for c in cubes[:k]:
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
        mode: Annotated[str, Field(description="kv (compiled memory, fastest), text or none")] = "kv",
        repo: Repo = "",
    ) -> CallToolResult:
        """Ask repomem's local model, which answers from the repository's memory, with its sources."""
        served = _repo(repos, repo)
        if mode not in ("kv", "text", "none"):
            raise ToolError(f"unknown mode {mode!r}; use kv, text or none")
        try:
            ticket = queue.submit("mcp", lambda cancel: served.mem.ask(question, mode=mode, cancel=cancel,
                                                                       record=False, allow_local=False))
        except QueueFull as exc:
            raise ToolError(str(exc)) from None
        try:
            ans: Answer = await asyncio.wrap_future(ticket.future)
        except asyncio.CancelledError:
            queue.cancel(ticket)
            raise
        except RepomemError as exc:
            raise ToolError(str(exc)) from None
        sources = [source_dict(s) for s in ans.sources]
        text = ans.answer + ("\n\nSources: " + ", ".join(s["citation"] for s in sources) if sources else "")
        return _result(text, {"answer": ans.answer, "mode": ans.mode, "sources": sources,
                              "ttft_s": round(ans.ttft_s, 3), "warnings": ans.warnings})

    @server.tool(annotations=read_only)
    def memory_status(repo: Repo = "") -> CallToolResult:
        """What the memory holds: files, memories, the share compiled to KV, files changed since indexed,
        and whether a watcher keeps it current."""
        states = [repos.health(r) for r in ([_repo(repos, repo)] if repo else repos.repos)]
        for st in states:
            st.pop("root", None)  # where the repository lives on this machine is not the agent's business
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
        """Changes to the repository's files the memory recorded (file, symbols, a short diff), newest first."""
        served = _repo(repos, repo)
        start = parse_since(since)
        changes = served.mem.changes_since(start, limit=limit, allow_local=False)
        items = [{"path": c.path.removeprefix("change:"), "at": _iso(c.created), "symbols": c.symbol,
                  "summary": c.text[:SNIPPET_CHARS], "id": c.id} for c in changes]
        lines = [f"{len(items)} change(s) since {_iso(start)} in {served.name}:"]
        lines += [f"\n- {i['at']} {i['path']} ({i['symbols']})\n{i['summary'].rstrip()}" for i in items]
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
            raise ToolError(str(exc)) from None
        return _result(f"Remembered as {cube.path} (id {cube.id}).", {"id": cube.id, "citation": cube.path})

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False))
    def forget(
        id: Annotated[str, Field(description="The id remember returned (or a search result's id of a note)")],
        repo: Repo = "",
    ) -> CallToolResult:
        """Delete a note from the memory. Memories of code follow their files and cannot be forgotten here."""
        served = _repo(repos, repo)
        try:
            served.mem.forget_note(id)
        except RepomemError as exc:
            raise ToolError(str(exc)) from None
        return _result(f"Forgot note {id}.", {"forgotten": id})

    return server


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


def _repo(repos: Repositories, name: str) -> Any:
    try:
        return repos.get(name)
    except RepomemError as exc:
        raise ToolError(str(exc)) from None


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _result(text: str, data: dict) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)
