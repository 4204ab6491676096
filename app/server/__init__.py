"""`repomem serve` and `repomem mcp`: the memory of one or more repositories for editors and agents.

Two shells over `repomem.core` (HTTP and MCP), one concern per module:

| module | holds |
|---|---|
| `config.py` | what a server is started with (host, port, key, CORS, queue), the bind check, trusted Hosts |
| `repos.py` | the served repositories: their memories, watchers, model names and health |
| `queue.py` | the one fair queue every model job goes through (round-robin per client, bounded) |
| `clients.py` | whom the queue is fair to: the client key of an HTTP request or an MCP call |
| `chat.py` | an OpenAI chat request read into question, history, instructions and sampling |
| `errors.py` | OpenAI's error shape and status |
| `openai_api.py` | `/v1/models`, `/v1/chat/completions` (streamed and not), usage, sources |
| `mcp_tools.py` | the MCP tools (official SDK), over stdio or at `/mcp` |
| `app.py` | the Starlette app: routes, Host allow-list, API key, CORS, `/health` |
| `runner.py` | running it: in the foreground (CLI) or on a thread (the app, tests, the benchmark) |
| `snippets.py` | editor configuration (Continue, Aider, VS Code, Claude Desktop) filled in for a server |
"""
