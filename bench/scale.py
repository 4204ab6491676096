"""`repomem bench scale`: what a big repository costs, measured the way a user meets it.

Phases, each in a fresh child process so caches and memory of one phase do not flatter the next:

1. `index`: plaintext indexing of the whole tree (`RepoMemory.index(compile=False)`): files, chunks,
   seconds (wall and CPU), and the size of what it wrote (database, search index file);
2. `open`: a new process opens the store (`RepoMemory.open`), asks one question (first query), then a
   fixed set of questions made from the repository's own docstrings (latency p50/p95, and recall@5:
   how often the definition a docstring belongs to comes back), reads its resident memory, loads the
   model and answers one question in text mode, and reads it again;
3. `cold`: the same open without the search index file (what an upgrade of the tokenizer costs once).

Everything runs under a throwaway data home unless `home` is given. The machine's load is recorded
with the numbers: on a shared machine wall time follows the load, CPU time much less.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GOALS = {"index_s": 60, "reopen_s": 2, "search_p95_ms": 50, "rss_with_model_mb": 1536}
_DOC_RE = re.compile(r'(?:"""|\'\'\'|/\*\*)\s*(?:\*\s*)?([A-Z][^\n.]{15,160}[.\n])')


def _rss_mb() -> float | None:
    """Resident memory of this process now (Linux /proc), in MiB; None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    return {"cpus": os.cpu_count(), "loadavg_1m": round(load[0], 2) if load[0] is not None else None}


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, int(-(-q * len(s) // 1)) - 1))]


def questions_from(store_dir: Path, n: int) -> list[dict[str, str]]:
    """`n` questions made from docstrings of the repository's definitions, the same ones every run:
    candidates are ordered by a hash of their cube id. Each names the cube it came from."""
    from repomem.core.store import CubeStore

    store = CubeStore.open(store_dir)
    try:
        cands = []
        for c in store.cubes(source="code", status="active"):
            if not c.symbol:
                continue
            m = _DOC_RE.search(c.text)
            if m:
                cands.append((hashlib.sha256(c.id.encode()).hexdigest(), m.group(1).strip().rstrip("."), c.id))
    finally:
        store.close()
    cands.sort()
    return [{"question": q, "cube_id": cid} for _, q, cid in cands[:n]]


# ---- phases (each runs in its own process: `python -m repomem.bench.scale PHASE ...`) -------

def _phase_index(root: Path) -> dict[str, Any]:
    from repomem.core.index_file import path_for as index_path_for
    from repomem.core.memory import RepoMemory
    from repomem.core.store_base import DB_NAME

    t0, c0 = time.perf_counter(), time.process_time()
    mem = RepoMemory.open(root)
    summary = mem.index(compile=False)
    out = {"index_s": round(time.perf_counter() - t0, 2), "index_cpu_s": round(time.process_time() - c0, 2),
           "files": summary.files, "chunks": summary.chunks, "skipped": sum(summary.skipped.values())}
    t0 = time.perf_counter()
    mem.close()
    out["close_s"] = round(time.perf_counter() - t0, 2)
    store_dir = mem.store.dir
    out["store_mb"] = round(sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file()) / 1e6, 1)
    out["db_mb"] = round(sum(p.stat().st_size for p in store_dir.glob(f"{DB_NAME}*")) / 1e6, 1)
    index_path = index_path_for(store_dir)
    out["index_file_mb"] = round(index_path.stat().st_size / 1e6, 1) if index_path.exists() else 0.0
    out["store_dir"] = str(store_dir)
    return out


def _phase_open(root: Path, questions: list[dict[str, str]], model: str | None, with_model: bool) -> dict[str, Any]:
    from repomem.core.engine import SamplingParams
    from repomem.core.memory import RepoMemory

    out: dict[str, Any] = {"rss_before_open_mb": _rss_mb()}
    t0, c0 = time.perf_counter(), time.process_time()
    mem = RepoMemory.open(root, model=model)
    out["open_s"] = round(time.perf_counter() - t0, 3)
    out["open_cpu_s"] = round(time.process_time() - c0, 3)
    rep = mem.index_report
    out["index_source"], out["index_rebuild_reason"], out["index_applied"] = rep.source, rep.reason, rep.applied
    try:
        if questions:
            t0 = time.perf_counter()
            mem.search(questions[0]["question"], k=mem.settings.top_k)
            out["first_query_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            lat, found = [], 0
            for q in questions:
                t0 = time.perf_counter()
                got = mem.search(q["question"], k=5)
                lat.append((time.perf_counter() - t0) * 1000)
                found += any(c.id == q["cube_id"] for c in got)
            out.update(questions=len(questions), search_p50_ms=round(statistics.median(lat), 2),
                       search_p95_ms=round(_percentile(lat, 0.95), 2), search_max_ms=round(max(lat), 2),
                       recall_at_5=round(found / len(questions), 3))
        out["rss_after_searches_mb"] = _rss_mb()
        if with_model:
            t0 = time.perf_counter()
            ans = mem.ask(questions[0]["question"] if questions else "What does this repository do?", mode="text",
                          record=False, sampling=SamplingParams(temperature=0.0, max_tokens=16))
            out["model_answer_s"] = round(time.perf_counter() - t0, 2)
            out["model"] = mem.engine.path.name
            out["answer_memory_tokens"] = ans.memory_tokens
            out["rss_with_model_mb"] = _rss_mb()
        out["peak_rss_mb"] = _peak_rss_mb()
    finally:
        mem.close()
    return out


def _child(args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "repomem.bench.scale", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        from repomem.core.errors import RepomemError

        raise RepomemError(f"bench scale: phase {args[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_scale(repo: Path, *, n_questions: int = 50, model: str | None = None, home: Path | None = None,
                with_model: bool = True, cold: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Index `repo` as plaintext, reopen it, search it, measure memory; see the module docstring.

    Returns {"repo", "machine_start", "machine_end", "goals", "index": {...}, "open": {...},
    "cold_open": {...}}. `home`: data home to use and keep (default: a temporary one, removed).
    """
    say = log or (lambda _m: None)
    repo = Path(repo).expanduser().resolve()
    tmp = None if home is not None else tempfile.mkdtemp(prefix="repomem-bench-scale-")
    data_home = Path(home) if home is not None else Path(tmp)  # type: ignore[arg-type]
    env = {**os.environ, "REPOMEM_HOME": str(data_home)}
    if "REPOMEM_MODELS_DIR" not in env:
        from repomem.core import paths

        env["REPOMEM_MODELS_DIR"] = str(paths.models_dir())
    out: dict[str, Any] = {"repo": str(repo), "machine_start": _machine(), "goals": GOALS}
    try:
        say(f"indexing {repo} (plaintext)")
        out["index"] = _child(["index", str(repo)], env, 3600)
        store_dir = Path(out["index"].pop("store_dir"))
        questions = questions_from(store_dir, n_questions)
        qfile = data_home / "bench-questions.json"
        qfile.write_text(json.dumps(questions))
        say(f"reopening and asking {len(questions)} questions")
        args = ["open", str(repo), str(qfile), model or ""]
        out["open"] = _child(args + (["--with-model"] if with_model else []), env, 1800)
        if cold:
            from repomem.core.index_file import path_for as index_path_for

            index_path_for(store_dir).unlink(missing_ok=True)
            say("reopening without the search index file")
            out["cold_open"] = _child(args, env, 1800)
        out["machine_end"] = _machine()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str]) -> None:
    phase, root = argv[0], Path(argv[1])
    if phase == "index":
        result = _phase_index(root)
    else:
        questions = json.loads(Path(argv[2]).read_text())
        result = _phase_open(root, questions, argv[3] or None, "--with-model" in argv)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
