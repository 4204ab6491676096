"""`repomem bench ...`: print measured numbers (JSON or a table). Benchmarks, not tests."""

from __future__ import annotations

import click

from repomem.app.cli import cli, err
from repomem.app.cli import show_mapping as _show
from repomem.core.settings import ENCODINGS


@cli.group()
def bench() -> None:
    """Measure splice, time to first token, compile, watch and storage."""


@bench.command("splice")
@click.option("--json", "as_json", is_flag=True)
@click.option("--fragments", default=64)
@click.option("--cells", "cells_per_fragment", default=512)
@click.option("--fuzz", "fuzz_cases", default=10_000, help="Random/truncated blobs and payloads fed to the parsers.")
def bench_splice_cmd(as_json: bool, fragments: int, cells_per_fragment: int, fuzz_cases: int) -> None:
    """The native splice on synthetic payloads (fresh, verified, into a reused buffer), plus a fuzzing run."""
    from repomem.bench.splice import bench_splice, fuzz

    out = bench_splice(fragments=fragments, cells_per_fragment=cells_per_fragment)
    if fuzz_cases:
        out["fuzz"] = fuzz(fuzz_cases)
    _show(out, as_json)


@bench.command("ttft")
@click.option("--json", "as_json", is_flag=True)
@click.option("--model", default=None)
@click.option("--tokens", "memory_tokens", default=4096)
def bench_ttft_cmd(as_json: bool, model: str | None, memory_tokens: int) -> None:
    """Time to first token: spliced KV vs. prefilling the same text (default model)."""
    from repomem.bench.speed import bench_ttft

    _show(bench_ttft(model, memory_tokens), as_json)


@bench.command("compile")
@click.option("--json", "as_json", is_flag=True)
@click.option("--model", default=None)
@click.option("--tokens", "memory_tokens", default=3000)
def bench_compile_cmd(as_json: bool, model: str | None, memory_tokens: int) -> None:
    """Compile tokens/s vs. raw prefill tokens/s, and payload bytes per token for each policy."""
    from repomem.bench.speed import bench_compile

    _show(bench_compile(model, memory_tokens), as_json)


@bench.command("watch")
@click.option("--json", "as_json", is_flag=True)
@click.option("--model", default=None)
@click.option("--edits", "n_edits", default=10, help="One-function edits to time.")
def bench_watch_cmd(as_json: bool, model: str | None, n_edits: int) -> None:
    """Save-to-searchable latency for a one-function edit, and a 500-file touch burst."""
    from repomem.bench.watch import bench_watch

    _show(bench_watch(model=model, n_edits=n_edits), as_json)


@bench.command("storage")
@click.option("--json", "as_json", is_flag=True)
@click.option("--qa", "qa_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--repo-root", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--limit", type=int, default=None)
@click.option("--model", default=None)
@click.option("--replicas", default=8, show_default=True, type=click.IntRange(min=1),
              help="Accuracy runs per encoding; runs after the first nudge the f16 rows by one f16 step.")
@click.option("--encodings", default=",".join(ENCODINGS), show_default=True,
              help="Comma-separated; f16 always runs (the reference).")
@click.option("--answer-tokens", default=96, show_default=True, type=click.IntRange(min=1),
              help="Answer length (the app answers up to 384 tokens).")
def bench_storage_cmd(as_json: bool, qa_file: str, repo_root: str, limit: int | None, model: str | None,
                      replicas: int, encodings: str, answer_tokens: int) -> None:
    """Bytes per token, encode/decode speed and kv accuracy per payload encoding, next to text mode."""
    import time
    from pathlib import Path

    from repomem.bench.storage import bench_storage

    chosen = tuple(e.strip() for e in encodings.split(",") if e.strip())
    unknown = [e for e in chosen if e not in ENCODINGS]
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; choose from {', '.join(ENCODINGS)}", param_hint="--encodings")
    # An hour-long run: progress goes to stderr with the time, so `--json > out.json` still shows it.
    _show(bench_storage(Path(qa_file), Path(repo_root), limit=limit, model=model, replicas=replicas,
                        encodings=chosen, max_tokens=answer_tokens,
                        progress=lambda m: err.print(f"[dim]{time.strftime('%H:%M:%S')} {m}[/]")), as_json)


@bench.command("scale")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.option("--questions", "n_questions", default=50, show_default=True, type=click.IntRange(min=1),
              help="Questions made from the repository's docstrings (the same ones every run).")
@click.option("--model", default=None, help="Model loaded for the memory measurement (default: the default model).")
@click.option("--no-model", is_flag=True, help="Skip loading the model.")
@click.option("--no-cold", is_flag=True, help="Skip the reopen without the saved search index.")
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="Data home to index into and keep (default: a temporary one, removed afterwards).")
def bench_scale_cmd(repo: str, as_json: bool, n_questions: int, model: str | None, no_model: bool, no_cold: bool,
                    home: str | None) -> None:
    """Index a big repository as plaintext, reopen it, search it and measure memory (each phase in a new process)."""
    import time
    from pathlib import Path

    from repomem.bench.scale import bench_scale

    out = bench_scale(Path(repo), n_questions=n_questions, model=model, home=Path(home) if home else None,
                      with_model=not no_model, cold=not no_cold,
                      log=lambda m: err.print(f"[dim]{time.strftime('%H:%M:%S')} {m}[/]"))
    if as_json:
        _show(out, True)
        return
    flat = {"repo": out["repo"], "goals": out["goals"],
            "machine": f"{out['machine_start']} -> {out.get('machine_end')}"}
    for phase in ("index", "open", "cold_open"):
        for k, v in out.get(phase, {}).items():
            flat[f"{phase}.{k}"] = v
    _show(flat, False)


@bench.command("serve")
@click.option("--json", "as_json", is_flag=True)
@click.option("--qa", "qa_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--repo-root", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--limit", type=int, default=5, show_default=True, help="Questions (from the top of the file).")
@click.option("--model", default=None)
@click.option("--answer-tokens", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1),
              help="kv runs per question, in-process and over HTTP (their medians are compared).")
@click.option("--no-baseline", is_flag=True, help="Skip llama-cpp-python's server (compare with :text only).")
def bench_serve_cmd(as_json: bool, qa_file: str, repo_root: str, limit: int, model: str | None, answer_tokens: int,
                    repeats: int, no_baseline: bool) -> None:
    """Time to the first streamed token through /v1/chat/completions: kv memory vs. llama_cpp.server with the
    same retrieved text, vs. :text, and the HTTP overhead over the in-process call."""
    import time
    from pathlib import Path

    from repomem.bench.serve import bench_serve

    out = bench_serve(Path(qa_file), Path(repo_root), limit=limit, model=model, answer_tokens=answer_tokens,
                      repeats=repeats, baseline=not no_baseline,
                      progress=lambda m: err.print(f"[dim]{time.strftime('%H:%M:%S')} {m}[/]"))
    if not as_json:
        out = {k: v for k, v in out.items() if k != "rows"}
    _show(out, as_json)
