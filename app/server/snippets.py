"""Editor configuration for a running server, filled in: Continue, Aider, VS Code, Claude Desktop.

The desktop app's "Connect an editor" panel shows these, and docs/editors.md has the same shapes.
Chat clients (Continue, Aider) use the OpenAI-compatible API, the only path that brings the spliced
KV's speed to the user; agents (VS Code, Claude Desktop) call the MCP tools, over HTTP from the
running server or by launching `repomem mcp` themselves (Claude Desktop speaks stdio only).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Snippet:
    client: str  # "Continue"
    where: str  # where the text goes
    language: str  # yaml, json, shell
    text: str


def repomem_command() -> list[str]:
    """How another program starts this repomem (the bundle's executable, the installed script, or -m)."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    beside = Path(sys.executable).parent / ("repomem.exe" if sys.platform == "win32" else "repomem")
    found = str(beside) if beside.is_file() else shutil.which("repomem")
    return [found] if found else [sys.executable, "-m", "repomem.app.cli"]


def editor_snippets(url: str, models: list[str], roots: list[str], api_key: str = "") -> list[Snippet]:
    """`url`: the server's base (http://127.0.0.1:7636); `models`: its model ids; `roots`: the repositories."""
    key = api_key or "none"  # OpenAI clients insist on some key; the server ignores it when none is set
    cmd = repomem_command()
    mcp_args = [*cmd[1:], "mcp", *roots]
    continue_models = "\n".join(
        f"  - name: {m}\n    provider: openai\n    model: {m}\n    apiBase: {url}/v1\n    apiKey: {key}\n"
        f"    roles: [chat, edit, apply]" for m in models)
    continue_yaml = (f"name: repomem\nversion: 0.0.1\nschema: v1\nmodels:\n{continue_models}\n"
                     f"mcpServers:\n  - name: repomem\n    command: {json.dumps(cmd[0])}\n"
                     f"    args: {json.dumps(mcp_args)}\n")
    aider = (f"export OPENAI_API_BASE={url}/v1\nexport OPENAI_API_KEY={key}\n"
             f"aider --model openai/{models[0]} \\\n      --no-show-model-warnings\n")
    vscode_server: dict = {"type": "http", "url": f"{url}/mcp"}
    if api_key:
        vscode_server["headers"] = {"Authorization": f"Bearer {api_key}"}
    vscode = json.dumps({"servers": {"repomem": vscode_server}}, indent=2) + "\n"
    claude = json.dumps({"mcpServers": {"repomem": {"command": cmd[0], "args": mcp_args}}}, indent=2) + "\n"
    return [
        Snippet("Continue", "~/.continue/config.yaml (chat with spliced memory, tools over MCP)", "yaml",
                continue_yaml),
        Snippet("Aider", "in the terminal where you run aider", "shell", aider),
        Snippet("VS Code", ".vscode/mcp.json in your project (agent mode tools)", "json", vscode),
        Snippet("Claude Desktop", "claude_desktop_config.json (Settings › Developer › Edit Config)", "json", claude),
    ]
