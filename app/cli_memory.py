"""CLI commands over a repository's memory: index, cubes, ask, chat, eval."""

from __future__ import annotations

import shlex
import sys
import threading
from contextlib import nullcontext
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn
from rich.syntax import Syntax
from rich.table import Table

from repomem.app.cli import _print_json, cli, console, err
from repomem.core import RepomemError


def _open(path: str | None, model: str | None):
    from repomem.core import RepoMemory

    root = Path(path or ".").expanduser().resolve()
    if not root.exists():
        raise RepomemError(f"repository not found: {root}")
    return RepoMemory.open(root, model=model)


def _progress_bar(enabled: bool):
    """A rich progress bar with counts and an ETA on a terminal; nothing when piped or --json."""
    if not enabled:
        return None
    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), "eta", TimeRemainingColumn(), console=err, transient=True)


def _run_index(mem, *, compile: bool, show: bool):
    bar = _progress_bar(show and err.is_terminal)
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if bar is None:
            return
        if stage not in tasks:
            tasks[stage] = bar.add_task({"read": "reading files", "compile": "compiling KV"}.get(stage, stage),
                                        total=total)
        bar.update(tasks[stage], completed=done, total=total)

    with bar if bar is not None else nullcontext():
        return mem.index(compile=compile, progress=progress)


@cli.command()
@click.argument("path", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plaintext-only", is_flag=True, help="Make chunks searchable now; compile KV later.")
@click.option("--explain", is_flag=True, help="List every skipped file with its reason.")
@click.option("--model", default=None, help="Model name or GGUF path.")
def index(path: str | None, as_json: bool, plaintext_only: bool, explain: bool, model: str | None) -> None:
    """Index a repository: chunks become searchable cubes, then compiled KV memory."""
    mem = _open(path, model)
    try:
        summary = _run_index(mem, compile=not plaintext_only, show=not as_json)
        data = summary.as_dict()
        data.pop("changed_paths", None)
        if explain:
            data["skips"] = mem.store.skips()
        if as_json:
            _print_json(data)
            return
        t = Table(show_header=False, box=None)
        for k in ("files", "chunks", "compiled", "reused", "tokens", "kept_tokens", "payload_bytes", "seconds"):
            t.add_row(k, f"{data[k]:,}" if isinstance(data[k], int) else str(data[k]))
        t.add_row("skipped", ", ".join(f"{k}: {v}" for k, v in sorted(data["skipped"].items())) or "none")
        console.print(t)
        if explain:
            st = Table("path", "reason", title="skipped files")
            for p, r in data["skips"]:
                st.add_row(p, r)
            console.print(st)
    finally:
        mem.close()


@cli.command()
@click.argument("path", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--path", "path_glob", default=None, help="Only cubes whose path matches this glob.")
@click.option("--kind", type=click.Choice(["plaintext", "activation", "parameter"]), default=None)
@click.option("--status", type=click.Choice(["active", "stale", "archived"]), default=None)
def cubes(path: str | None, as_json: bool, path_glob: str | None, kind: str | None, status: str | None) -> None:
    """List the MemCubes of a repository."""
    from dataclasses import asdict

    from repomem.core import CubeStore, paths

    root = Path(path or ".").expanduser().resolve()
    folder = paths.store_dir(root)
    if not (folder / "cubes.db").is_file():  # a typo must not leave an empty store behind
        raise RepomemError(f"no memory of {root} yet: `repomem index {shlex.quote(str(root))}` makes one")
    store = CubeStore.open(folder)
    try:
        rows = store.cubes(path_glob=path_glob, kind=kind, status=status)
        if as_json:
            out = []
            for c in rows:
                d = asdict(c)
                d.pop("text", None)
                d["bytes_per_token"] = round(c.payload_bytes / c.tokens, 1) if c.payload_bytes and c.tokens else None
                out.append(d)
            _print_json(out)
            return
        t = Table("path", "lines", "symbol", "kind", "status", "v", "tokens", "kept", "bytes/token", "enc")
        for c in rows:
            bpt = f"{c.payload_bytes / c.tokens:,.0f}" if c.payload_bytes and c.tokens else ""
            t.add_row(c.path, f"{c.start_line}-{c.end_line}", c.symbol or "", c.kind, c.status, str(c.version),
                      str(c.tokens or ""), str(c.kept_tokens or ""), bpt, c.encoding or "")
        console.print(t)
        console.print(f"{len(rows)} cubes")
    finally:
        store.close()


def _ensure_indexed(mem, show: bool) -> None:
    if not mem.store.files():
        if show:
            err.print("[dim]repository not indexed yet: indexing (plaintext now, KV next)…[/]")
        mem.index(compile=False)


@cli.command()
@click.argument("path")
@click.argument("question")
@click.option("--mode", type=click.Choice(["kv", "text", "none"]), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.option("--model", default=None, help="Model name or GGUF path.")
@click.option("--endpoint", default=None,
              help="OpenAI-compatible base URL for text mode (e.g. http://127.0.0.1:8080/v1; default: the "
                   "endpoint_url setting).")
def ask(path: str, question: str, mode: str | None, as_json: bool, model: str | None, endpoint: str | None) -> None:
    """Ask one question about a repository."""
    mem = _open(path, model)
    try:
        if not question.strip():
            raise RepomemError("the question is empty")
        _ensure_indexed(mem, not as_json)
        endpoint = endpoint or mem.settings.endpoint_url
        if endpoint:
            from repomem.core import ask_remote

            ans = ask_remote(mem, question, endpoint, on_text=None if as_json else _stream)
        else:
            ans = mem.ask(question, mode=mode, on_text=None if as_json else _stream)
        if as_json:
            _print_json(ans.as_dict())
            return
        click.echo()
        _print_sources(ans)
    finally:
        mem.close()


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _print_sources(ans) -> None:
    for w in ans.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    srcs = ", ".join(f"{s.path}:{s.start_line}-{s.end_line}" for s in ans.sources) or "none"
    err.print(f"[dim]sources: {srcs} · {ans.mode} · first token {ans.ttft_s:.2f}s[/]")
    if ans.evidence is not None:
        ev = ans.evidence
        err.print(f"[dim]evidence: {ev.location}[/]")
        err.print(Syntax(ev.text, Syntax.guess_lexer(ev.path, ev.text), line_numbers=True,
                         start_line=ev.start_line, theme="ansi_dark", background_color="default"))


@cli.command()
@click.argument("path", required=False)
@click.option("--mode", type=click.Choice(["kv", "text", "none"]), default=None)
@click.option("--model", default=None, help="Model name or GGUF path.")
def chat(path: str | None, mode: str | None, model: str | None) -> None:
    """Terminal chat with streaming answers. Commands: /sources /new /history /quit."""
    mem = _open(path, model)
    stop_compile = threading.Event()
    compiling: threading.Thread | None = None
    try:
        _ensure_indexed(mem, True)
        pending = mem.store.compile_queue(mem.fingerprint, limit=None)
        if pending:
            err.print(f"[dim]{len(pending)} memories not compiled to KV yet: compiling in the background[/]")
            # one cube per step: a question waits for the cube in flight, never for the queue
            compiling = threading.Thread(target=lambda: mem.compile_pending(cancel=stop_compile), daemon=True,
                                         name="repomem-chat-compile")
            compiling.start()
        conv = mem.conversations.create("Terminal chat")
        last = None
        console.print(f"[bold]repomem[/] · {mem.root} · /sources /new /history /quit")
        while True:
            try:
                q = console.input("[bold cyan]> [/]")
            except EOFError:
                break
            q = q.strip()
            if not q:
                continue
            if q in ("/quit", "/exit"):
                break
            if q == "/new":
                conv = mem.conversations.create("Terminal chat")
                console.print("[dim]new conversation[/]")
                continue
            if q == "/sources":
                if last:
                    for s in last.sources:
                        console.print(f"  {s.path}:{s.start_line}-{s.end_line} {s.symbol or ''}")
                continue
            if q == "/history":
                for c in mem.conversations.list()[:20]:
                    console.print(f"  {c.id}  {c.title}")
                continue
            cancel = threading.Event()
            try:
                last = mem.ask(q, mode=mode, conversation_id=conv.id, on_text=_stream, cancel=cancel)
            except KeyboardInterrupt:
                cancel.set()
                console.print("\n[dim]stopped[/]")
                continue
            click.echo()
            _print_sources(last)
    finally:
        stop_compile.set()  # the cube in flight is dropped; the rest stays queued for next time
        if compiling is not None:
            compiling.join()
        mem.close()


@cli.command("eval")
@click.argument("qa_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--repo-root", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--modes", default="kv,text,none")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--limit", type=int, default=None)
@click.option("--k", "k", type=int, default=5, help="k for recall@k.")
@click.option("--model", default=None)
@click.option("--score", is_flag=True,
              help="Also score each row's reference answer teacher-forced (mean log-probability per token).")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1),
              help="kv runs; runs after the first nudge every payload's rows by one f16 step (own store).")
def eval_cmd(qa_file: str, repo_root: str, modes: str, out_path: str, limit: int | None, k: int,
             model: str | None, score: bool, replicas: int) -> None:
    """Answer a QA set greedily in every mode; write records and print accuracy, gold rank and median TTFT,
    overall and per repository."""
    from repomem.bench.evaluate import run_eval

    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    bar = _progress_bar(err.is_terminal)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            if not bar.tasks:
                bar.add_task("answering", total=total)
            bar.update(bar.tasks[0].id, completed=done, total=total)

    with bar if bar is not None else nullcontext():
        report = run_eval(Path(qa_file), Path(repo_root), mode_list, Path(out_path), limit=limit, k=k,
                          model=model, progress=progress, score=score, replicas=replicas)
    used = report["settings"]
    caption = (f"{used['encoding']} payloads, {used['placement']} placement, boost_top {used['boost_top']}, "
               f"{used['max_answer_tokens']}-token answers") if used else None
    legend = f"acc: accuracy{', mean: over the replicas' if replicas > 1 else ''}; P@1/P@2/R@{k}: gold piece " \
             f"ranked 1st / in the top 2 / top {k} of the memories read; TTFT: median seconds" + \
             ("; logp: the reference answer's mean log-probability, teacher-forced" if score else "")
    t = Table("repo", "mode", "n", "acc", *(["mean"] if replicas > 1 else []), "P@1", "P@2", f"R@{k}", "MRR",
              "TTFT", *(["logp"] if score else []), caption=f"{caption}\n{legend}" if caption else legend)
    blocks = [("all", report["modes"])] + (list(report["repos"].items()) if len(report["repos"]) > 1 else [])
    for name, block in blocks:
        for m, r in block.items():
            mean = r.get("accuracy_mean")
            t.add_row(name, m, str(r["n"]), f"{r['accuracy']:.3f}",
                      *([f"{mean:.3f}" if mean is not None else ""] if replicas > 1 else []),
                      f"{r['p_at_1']:.2f}", f"{r['p_at_2']:.2f}", f"{r[f'recall_at_{k}']:.2f}", f"{r['mrr']:.2f}",
                      f"{r['median_ttft_s']:.2f}", *([f"{r['reference_logprob']:.2f}"] if score else []))
    console.print(t)
    err.print(f"[dim]records written to {out_path}[/]")


@cli.command()
@click.argument("path", required=False)
@click.option("--repair", is_flag=True, help="Rebuild what can be rebuilt (conversations and notes are kept).")
@click.option("--json", "as_json", is_flag=True)
def check(path: str | None, repair: bool, as_json: bool) -> None:
    """Verify a repository's store: database integrity, every payload's sha256, orphan files, search index."""
    from repomem.core import check_store

    bar = _progress_bar(not as_json and err.is_terminal)

    def progress(stage: str, done: int, total: int) -> None:
        if bar is not None:
            if not bar.tasks:
                bar.add_task("verifying payloads", total=total)
            bar.update(bar.tasks[0].id, completed=done, total=total)

    with bar if bar is not None else nullcontext():
        report = check_store(Path(path or "."), repair=repair, progress=progress)
    data = report.as_dict()
    if repair:  # what the repair could not fix
        data["problems_left"] = check_store(Path(path or ".")).problems
    if as_json:
        _print_json(data)
    else:
        t = Table(show_header=False, box=None)
        t.add_row("store", data["store"])
        detail = f": {'; '.join(data['integrity'][:3])}" if data["integrity"] else ""
        t.add_row("database", data["database"] if data["database"] == "ok" else f"[red]{data['database']}[/]{detail}")
        t.add_row("payloads", f"{data['payloads_checked']:,} checked, {len(data['payloads_missing'])} missing, "
                  f"{len(data['payloads_corrupt'])} damaged")
        t.add_row("orphan files", f"{len(data['orphans'])} ({data['orphans_recent']} recent), "
                  f"{data['temp_files']} temp files")
        t.add_row("search index", data["index_file"])
        t.add_row("conversations", data["conversations"])
        for k, v in data["repaired"].items():
            t.add_row(f"repaired: {k}", str(v))
        console.print(t)
    if data["problems"] and not repair:
        if not as_json:
            unreadable = data["database"].startswith("cannot be read")
            err.print("[yellow]the store cannot be checked now:[/] see above" if unreadable else
                      "[yellow]problems found:[/] run with --repair to fix what can be rebuilt")
        sys.exit(1)
    if repair and data["problems_left"]:
        if not as_json:
            err.print(f"[yellow]{data['problems_left']} problem(s) left[/] that a repair does not fix; see above")
        sys.exit(1)
