"""`repomem serve` (OpenAI-compatible HTTP API + MCP at /mcp) and `repomem mcp` (MCP over stdio)."""

from __future__ import annotations

import logging

import click

from repomem.app.cli import cli, err


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs an API key.")
@click.option("--port", type=int, default=None, help="Port (default: the server_port setting, 7636).")
@click.option("--api-key", default=None, help="Key clients must send (default: $REPOMEM_API_KEY or the settings).")
@click.option("--cors", "cors", multiple=True, metavar="ORIGIN", help="Browser origin allowed to call (repeatable).")
@click.option("--max-queue", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests that may wait for the model before the server answers 503.")
@click.option("--model", default=None, help="Model name or GGUF path (default: the settings').")
@click.option("--debounce", type=float, default=0.25, show_default=True,
              help="Quiet seconds before a watcher started here syncs edited files.")
@click.option("-v", "--verbose", is_flag=True)
def serve(paths: tuple[str, ...], host: str, port: int | None, api_key: str | None, cors: tuple[str, ...],
          max_queue: int, model: str | None, debounce: float, verbose: bool) -> None:
    """Serve the memory of PATH... (default: .) to editors: OpenAI-compatible /v1 and MCP at /mcp."""
    from repomem.app.server.config import ServeConfig, resolve_api_key
    from repomem.app.server.runner import Service, serve_forever
    from repomem.core import load_settings

    _log(verbose)
    s = load_settings()
    config = ServeConfig(host=host, port=s.server_port if port is None else port,
                         api_key=resolve_api_key(api_key, s.server_api_key),
                         cors_origins=list(cors) or list(s.server_cors_origins), max_queue=max_queue,
                         debounce_s=debounce)
    config.check()
    service = Service.open(list(paths) or ["."], config, settings=s, model=model)
    names = ", ".join(r.model_id for r in service.repos.repos)
    err.print(f"serving {names} on http://{host}:{config.port}/v1 (MCP at /mcp)"
              f"{' · API key required' if config.api_key else ''} · Ctrl-C stops", highlight=False)
    serve_forever(service)


@cli.command("mcp")
@click.argument("paths", nargs=-1, type=click.Path(file_okay=False))
@click.option("--model", default=None, help="Model name or GGUF path (default: the settings').")
@click.option("--no-watch", is_flag=True, help="Do not start a watcher when none runs.")
def mcp_cmd(paths: tuple[str, ...], model: str | None, no_watch: bool) -> None:
    """MCP server over stdio for PATH... (default: .), the way editors launch one."""
    from repomem.app.server.runner import run_mcp_stdio

    _log(False)
    run_mcp_stdio(list(paths) or ["."], model=model, watch=not no_watch)


def _log(verbose: bool) -> None:
    """Log lines to stderr (stdout belongs to the protocol in `repomem mcp`)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
