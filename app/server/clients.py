"""Whom the fair queue is fair to: one line per client, told apart as well as a request allows.

- an OpenAI request by its `user` field when it sends one;
- else by its User-Agent together with its remote address: two editors on one machine send different
  agents, one editor on two machines comes from two addresses;
- an MCP tool call by its session (`Mcp-Session-Id`), so two agents' `ask_repo` calls take turns; a
  call without one (the sessionless 2026-07-28 protocol) by the client's name and version with its
  User-Agent and address; over stdio the process serves one client.

All of these are what the client says about itself: they spread the turns, they authenticate no one.
Keys are short digests, so `/health` shows how many lines wait without naming who waits in them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping


def http_client(user: str, headers: Mapping[str, str], address: str | None) -> str:
    """The queue key of an HTTP request: its `user` field, else its User-Agent and remote address."""
    if user:
        return "user:" + _digest(user)
    return "agent:" + _agent(headers, address)


def mcp_client(headers: Mapping[str, str] | None, address: str | None, client_name: str = "") -> str:
    """The queue key of an MCP tool call (`headers` is None over stdio; `client_name`: its clientInfo)."""
    if headers is None:
        return "mcp:stdio"
    session = headers.get("mcp-session-id", "")
    return "mcp:" + (_digest(session) if session else _agent(headers, address, client_name))


def _agent(headers: Mapping[str, str], address: str | None, client_name: str = "") -> str:
    return _digest(f"{client_name}\n{headers.get('user-agent', '')}\n{address or ''}")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
