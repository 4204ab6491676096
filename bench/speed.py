"""`repomem bench ttft` and `repomem bench compile`: what splicing compiled KV saves at question time, and
what compiling costs against a plain prefill of the same text. They print numbers; tests never assert on them.

The default corpus is repomem's own core sources.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import repomem.core
from repomem import native
from repomem.core import Engine, SamplingParams, resolve_model
from repomem.core.chunking import chunk_text
from repomem.core.compiler import CompileOptions, Compiler
from repomem.core.prompt import make_layout, memory_text
from repomem.core.walk import walk_repo

QUESTION = "Which function in these files handles the error case, and what does it return?"


def corpus_pieces(root: Path, max_tokens: int, engine: Engine, chunk_tokens: int = 384) -> list[str]:
    """Memory pieces (as the model reads them) from a repository, up to max_tokens in total."""
    out, used = [], 0
    for f in walk_repo(root).files:
        if f.language != "python":
            continue
        for c in chunk_text(f.path, f.text, f.language, max_tokens=chunk_tokens):
            text = memory_text(c.path, c.start_line, c.end_line, c.symbol, c.text)
            n = len(engine.tokenize(text))
            if used + n > max_tokens:
                return out
            out.append(text)
            used += n
    return out


def _default_corpus() -> Path:
    return Path(repomem.core.__file__).resolve().parent


def bench_ttft(model: str | None = None, memory_tokens: int = 4096, corpus: Path | None = None,
               repeats: int = 3) -> dict:
    """Time to first token: splicing compiled KV of ~memory_tokens vs. prefilling the same text."""
    engine = Engine(resolve_model(model))
    layout = make_layout(engine)
    pieces = corpus_pieces(corpus or _default_corpus(), memory_tokens, engine)
    compiler = Compiler(engine, layout, CompileOptions(n_ctx=4096))
    payloads = [compiler.compile_text(p).payload for p in pieces]
    compiler.close()
    q = layout.question_tokens(engine, QUESTION)
    prefix = engine.tokenize(layout.prefix)
    mem_tokens = sum(len(engine.tokenize(p)) for p in pieces)
    n_ctx = len(prefix) + mem_tokens + len(q) + 64
    params = SamplingParams(max_tokens=1)
    text_s, kv_s = [], []
    with engine.new_context(n_ctx=max(n_ctx, 1024), flash_attn=False) as ctx:
        ctx.decode(prefix, start_pos=0, logits="none")
        prefix_blob = ctx.state_get()
        for _ in range(repeats):
            ctx.clear()
            t0 = time.perf_counter()
            ctx.generate(engine.tokenize(layout.prefix + "".join(pieces)) + q, start_pos=0, params=params)
            text_s.append(time.perf_counter() - t0)
            ctx.clear()
            t0 = time.perf_counter()
            blob, next_pos = native.splice(prefix_blob, payloads, mode="parallel", v_trans=ctx.v_trans)
            ctx.state_set(blob)
            ctx.generate(q, start_pos=next_pos, params=params)
            kv_s.append(time.perf_counter() - t0)
    t, k = statistics.median(text_s), statistics.median(kv_s)
    return {"model": engine.path.name, "memory_tokens": mem_tokens, "pieces": len(pieces),
            "question_tokens": len(q), "text_ttft_s": round(t, 4), "kv_ttft_s": round(k, 4),
            "speedup": round(t / k, 1), "repeats": repeats}


def bench_compile(model: str | None = None, memory_tokens: int = 3000, corpus: Path | None = None,
                  policies: tuple[str, ...] = ("all", "structural", "uniform", "attention")) -> dict:
    """Compile throughput vs. raw prefill of the same text in the same kind of context, and bytes/token."""
    engine = Engine(resolve_model(model))
    layout = make_layout(engine)
    pieces = corpus_pieces(corpus or _default_corpus(), memory_tokens, engine)
    n_tokens = sum(len(engine.tokenize(p, parse_special=False)) for p in pieces)
    out: dict = {"model": engine.path.name, "pieces": len(pieces), "tokens": n_tokens, "policies": {}}
    # Raw prefill: each piece decoded right after the prefix, as the compiler does, but nothing read back.
    opts = CompileOptions()
    prefix = engine.tokenize(layout.prefix, add_special=False, parse_special=True)
    with engine.new_context(n_ctx=opts.n_ctx, n_batch=opts.n_batch, cache_type=opts.cache_type) as ctx:
        ctx.decode(prefix, start_pos=0, logits="none")
        t0 = time.perf_counter()
        for p in pieces:
            ctx.seq_rm(0, len(prefix), -1)
            ctx.decode(engine.tokenize(p, parse_special=False), start_pos=len(prefix), logits="none")
        raw_s = time.perf_counter() - t0
    out["prefill_tokens_per_s"] = round(n_tokens / raw_s, 1)
    for mode in ("chunk", "file"):
        for policy in policies:
            opts = CompileOptions(policy=policy, keep_ratio=1.0 if policy in ("all", "structural") else 0.5)
            compiler = Compiler(engine, layout, opts)
            t0 = time.perf_counter()
            if mode == "chunk":
                done = [compiler.compile_text(p) for p in pieces]
            else:
                done = compiler.compile_file(pieces)
            secs = time.perf_counter() - t0
            compiler.close()
            key = f"{mode}/{policy}" + (f"@{opts.keep_ratio}" if opts.keep_ratio < 1 else "")
            out["policies"][key] = {
                "compile_tokens_per_s": round(n_tokens / secs, 1),
                "ratio": round(raw_s / secs, 3),
                "kept_fraction": round(sum(d.kept for d in done) / n_tokens, 3),
                "payload_bytes_per_token": round(sum(len(d.payload) for d in done) / n_tokens, 1),
            }
    out["ratio"] = out["policies"]["chunk/all"]["ratio"]
    return out
