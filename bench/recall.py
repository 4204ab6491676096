"""Retrieval recall on a dev question set, plus index build/update timings.

Why a script and not a test: the numbers are for choosing defaults (tokenizer, boosts, top-k) and
watching progress; they are printed, never asserted.

    python -m repomem.bench.recall --repo REPOSITORY --rows QUESTIONS.jsonl [--scale 50000] [--show-misses]

QUESTIONS.jsonl holds one question per line with its gold span (`question`, `path`, `start_line`,
`end_line`), the format `repomem eval` reads.

It walks and chunks the repository with ``repomem.core.walk`` and ``repomem.core.chunking``, the
same way the indexer does, so the numbers describe the product's own chunks.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from repomem.core.chunking import Chunk, chunk_text
from repomem.core.retrieval import BM25Index, recall_at_k, span_hit
from repomem.core.walk import walk_repo


def load_chunks(root: Path, max_tokens: int = 384) -> list[Chunk]:
    """Every chunk of a repository, walked and chunked exactly as the indexer does."""
    return [c for f in walk_repo(root).files for c in chunk_text(f.rel, f.text, f.language, max_tokens=max_tokens)]


def build_index(chunks: list[Chunk], **kw: Any) -> BM25Index:
    index = BM25Index(**kw)
    for i, c in enumerate(chunks):
        index.add(f"c{i}", c.text, c.path, c.symbol or "", start_line=c.start_line, end_line=c.end_line)
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, type=Path, help="the repository the questions are about")
    ap.add_argument("--rows", required=True, type=Path, help="questions with gold spans, one JSON object a line")
    ap.add_argument("--ks", default="1,3,5,10")
    ap.add_argument("--symbol-weight", type=float, default=None)
    ap.add_argument("--defs-weight", type=float, default=None)
    ap.add_argument("--path-weight", type=float, default=None)
    ap.add_argument("--test-prior", type=float, default=None)
    ap.add_argument("--scale", type=int, default=0, help="also time building N synthetic chunks and updates")
    ap.add_argument("--show-misses", action="store_true")
    args = ap.parse_args(argv)

    root = args.repo
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    chunks = load_chunks(root)
    kw = {
        name: getattr(args, name)
        for name in ("symbol_weight", "defs_weight", "path_weight", "test_prior")
        if getattr(args, name) is not None
    }
    t0 = time.perf_counter()
    index = build_index(chunks, **kw)
    build_s = time.perf_counter() - t0
    print(f"corpus {root.name}: {len(chunks)} chunks (core.walk + core.chunking); index built in {build_s:.2f} s")
    ks = [int(k) for k in args.ks.split(",")]
    t0 = time.perf_counter()
    for k in ks:
        print(f"recall@{k}: {recall_at_k(index, rows, k):.3f}")
    q_ms = (time.perf_counter() - t0) / (len(ks) * len(rows)) * 1000
    print(f"mean search {q_ms:.2f} ms")
    if args.show_misses:
        k = max(ks)
        for row in rows:
            hits = index.search(row["question"], k=k)
            metas = [index.meta(h.doc_id) for h in hits]
            ranks = [i + 1 for i, m in enumerate(metas) if span_hit(m.path, m.start_line, m.end_line, row)]
            if not ranks or ranks[0] > 1:
                print(f"  {row['id']} gold {row['path']}:{row['start_line']}-{row['end_line']} rank {ranks[:1] or '-'}")
                for h, m in list(zip(hits, metas, strict=True))[:5]:
                    print(f"      {h.score:7.2f} {m.path}:{m.start_line}-{m.end_line} {m.symbol}")
    if args.scale:
        _scale(chunks, args.scale)
    return 0


_WORD_RE = re.compile(r"\b[A-Za-z_]{4,}\b")


def _scale(chunks: list[Chunk], n: int) -> None:
    """Build an index of n chunks and time edits and searches.

    The corpus is repeated under fake folders, and in each copy a third of the identifiers get a
    copy-specific suffix, so the vocabulary keeps growing the way a real large repository's does
    (a plain repetition would flatter the tokenizer's caches).
    """
    docs = []
    for i in range(n):
        c = chunks[i % len(chunks)]
        copy = i // len(chunks)
        suffix = "Q" + "".join(chr(97 + int(d)) for d in str(copy))

        def rename(m: re.Match[str], suffix: str = suffix) -> str:
            w = m.group(0)
            return w + suffix if zlib.crc32(w.encode()) % 3 == 0 else w

        text = _WORD_RE.sub(rename, c.text) if copy else c.text
        docs.append((f"s{i}", text, f"pkg{copy}/{c.path}", c.symbol or ""))
    t0, c0 = time.perf_counter(), time.process_time()
    index = BM25Index()
    for d in docs:
        index.add(*d)
    index.flush()  # postings are merged lazily: count that merge as build time
    build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    n_up = 500
    for i in range(n_up):
        d = docs[(i * 7919) % n]
        index.update(d[0], d[1] + f"\nedited_{i} = {i}\n", d[2], d[3])
    up_ms = (time.perf_counter() - t0) / n_up * 1000
    t0 = time.perf_counter()
    for q in ("max redirects Session", "HTTPAdapter pool size", "raise_for_status HTTPError"):
        index.search(q, k=5)
    s_ms = (time.perf_counter() - t0) / 3 * 1000
    print(
        f"scale {n} chunks: build {build_s:.2f} s ({build_cpu:.2f} s CPU), "
        f"update {up_ms:.2f} ms each, search {s_ms:.1f} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
