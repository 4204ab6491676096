"""`repomem eval`: answer a QA set in several modes and score it.

Per mode, overall and per repository: accuracy, where the gold piece was ranked among the memories the answer
read (precision@1, precision@2, recall@k, MRR) and the median time to first token. With `replicas` > 1, kv mode
is answered again under nudged payloads (`nudge.py`) and the report gives the replica mean: one greedy run of a
few dozen questions cannot tell a one-question difference from a flip. Replica runs use a store of their own
under REPOMEM_HOME/bench/eval/ (they rewrite payloads), so the repository's memory is never touched.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from repomem.core import CubeStore, RepomemError, RepoMemory, SamplingParams, load_settings, paths
from repomem.core.settings import MODES

from .nudge import nudged_payload


def accepted(answer: str, accept: list[str]) -> bool:
    """Right when any accept string is contained, case-insensitively; alphanumeric ends sit at word boundaries."""
    low = answer.lower()
    for a in accept:
        a = a.lower()
        pat = re.escape(a)
        if a[:1].isalnum():
            pat = r"(?<![A-Za-z0-9])" + pat
        if a[-1:].isalnum():
            pat = pat + r"(?![A-Za-z0-9])"
        if re.search(pat, low):
            return True
    return False


def hit(sources: list[dict], row: dict) -> bool:
    """A retrieved source is a hit when its path matches the gold path and the line spans overlap."""
    return any(s["path"] == row["path"] and s["start_line"] <= row["end_line"] and s["end_line"] >= row["start_line"]
               for s in sources)


def gold_rank(sources: Sequence[dict], row: dict) -> int | None:
    """1-based rank of the first source that hits the gold span (None: not among them)."""
    return next((i for i, s in enumerate(sources, 1) if hit([s], row)), None)


ROW_KEYS = ("id", "repo", "question", "accept", "path", "start_line", "end_line")  # what scoring reads
ASK_KEYS = ("id", "repo", "question")  # what only asking reads (bench serve)


def load_rows(path: Path, limit: int | None = None, keys: Sequence[str] = ROW_KEYS) -> list[dict]:
    """The QA file's rows (one JSON object per line), each checked for `keys`."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise RepomemError(f"{path}:{n}: not a JSON object")
        if missing := [key for key in keys if key not in row]:
            raise RepomemError(f"{path}:{n}: missing {', '.join(missing)}")
        accept = row.get("accept", [])
        if "accept" in keys and not (isinstance(accept, list) and all(isinstance(a, str) and a for a in accept)):
            raise RepomemError(f"{path}:{n}: accept must be a list of strings")  # a bare string would match by letter
        rows.append(row)
    return rows[:limit] if limit else rows


# What shapes an answer, recorded with every eval so two runs can be told apart.
ANSWER_SETTINGS = ("encoding", "placement", "boost_top", "key_scale", "keep_policy", "keep_ratio", "top_k",
                   "memory_tokens", "max_answer_tokens", "cache_type")


def summarize(records: Sequence[dict], k: int) -> dict:
    """Accuracy, gold-rank metrics and median TTFT of one mode's records."""
    n = len(records)
    ranks = [r["rank"] for r in records]
    out = {
        "n": n,
        "accuracy": sum(r["correct"] for r in records) / max(1, n),
        "p_at_1": sum(x == 1 for x in ranks if x) / max(1, n),
        "p_at_2": sum(x <= 2 for x in ranks if x) / max(1, n),
        f"recall_at_{k}": sum(x <= k for x in ranks if x) / max(1, n),
        "mrr": sum(1 / x for x in ranks if x) / max(1, n),
        "median_ttft_s": statistics.median([r["ttft_s"] for r in records]) if records else 0.0,
    }
    if records and "reference_logprob" in records[0]:
        out["reference_logprob"] = statistics.fmean(r["reference_logprob"] for r in records)
    return out


def _open_memory(root: Path, settings_overrides: dict | None, model: str | None, own_store: bool) -> RepoMemory:
    s = load_settings()
    for key, value in (settings_overrides or {}).items():
        setattr(s, key, value)
    if own_store:
        return RepoMemory(root, CubeStore.open(paths.home() / "bench" / "eval" / paths.repo_key(root)), s, model)
    return RepoMemory.open(root, settings=s, model=model)


def _answer(mem: RepoMemory, row: dict, mode: str, k: int, score: bool) -> dict:
    ans = mem.ask(row["question"], mode=mode, record=False,
                  sampling=SamplingParams(temperature=0.0, max_tokens=mem.settings.max_answer_tokens))
    sources = [s.as_dict() for s in ans.sources]
    # No memory is read in none mode: rank what retrieval would have given it.
    ranked = sources if mode != "none" else [
        {"path": c.path, "start_line": c.start_line, "end_line": c.end_line} for c in mem.search(row["question"], k=k)]
    rec = {"id": row["id"], "repo": row["repo"], "mode": mode, "answer": ans.answer, "ttft_s": ans.ttft_s,
           "total_s": ans.total_s, "memory_tokens": ans.memory_tokens, "sources": sources,
           "correct": accepted(ans.answer, row["accept"]), "rank": gold_rank(ranked[:k], row)}
    if score:
        rec["reference_logprob"] = mem.score_answer(row["question"], row["answer"], mode=mode).mean_logprob
    return rec


def _nudged_runs(mem: RepoMemory, rows: list[dict], replicas: int, k: int,
                 step: Callable[[], None]) -> list[dict]:
    """kv answers under payloads nudged with seeds 1..replicas-1; the original payloads are put back after."""
    cubes = [c for c in mem.store.cubes(kind="activation") if c.has_payload]
    originals = {c.id: bytes(mem.store.read_payload(c)) for c in cubes}

    def attach(payloads: dict[str, bytes]) -> None:
        for c in cubes:
            sha, n = mem.store.write_payload(payloads[c.id])
            mem.store.attach_payload(c.id, c.content_hash, sha, n, c.tokens, c.kept_tokens, c.model_fingerprint or "",
                                     c.encoding or "")

    records = []
    try:
        for seed in range(1, replicas):
            attach({cid: nudged_payload(data, seed) for cid, data in originals.items()})
            for row in rows:
                records.append({**_answer(mem, row, "kv", k, False), "replica": seed})
                step()
    finally:
        attach(originals)
    return records


def run_eval(qa_file: Path, repo_root: Path, modes: list[str], out: Path, *, limit: int | None = None, k: int = 5,
             model: str | None = None, progress: Callable[[int, int], None] | None = None,
             settings_overrides: dict | None = None, score: bool = False, replicas: int = 1) -> dict:
    """Answer every row in every mode (kv again in each replica). `score`: also the mean log-probability per token
    of the row's reference answer given the same memory (teacher-forced): smooth where accuracy over a few dozen
    greedy answers is not, but it also rewards the reference's wording, so compare modes with it, not absolute
    values."""
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    if unknown := [m for m in modes if m not in MODES]:
        raise RepomemError(f"unknown mode {unknown[0]!r}; use {', '.join(MODES)}")
    if not out.parent.is_dir():  # found now, not after an hour of answers
        raise RepomemError(f"no folder {out.parent} to write {out.name} in")
    rows = load_rows(qa_file, limit)
    by_repo: dict[str, list[dict]] = {}
    for row in rows:
        by_repo.setdefault(row["repo"], []).append(row)
    records: list[dict] = []
    used: dict = {}
    total = len(rows) * (len(modes) + (replicas - 1 if "kv" in modes else 0))

    def step() -> None:
        if progress:
            progress(len(records), total)

    for repo, mine in by_repo.items():
        mem = _open_memory(repo_root / repo, settings_overrides, model, own_store=replicas > 1)
        try:
            mem.index(compile=False)
            if "kv" in modes:
                # Compile what these questions retrieve first; the rest of the repository can wait.
                mem.compile_ids(c.id for r in mine for c in mem.search(r["question"], k=mem.settings.top_k))
            used = {name: getattr(mem.settings, name) for name in ANSWER_SETTINGS}
            used["model_sha256"] = mem.engine.info.sha256
            for row in mine:
                for mode in modes:
                    records.append({**_answer(mem, row, mode, k, score), "replica": 0})
                    step()
            if "kv" in modes and replicas > 1:
                records.extend(_nudged_runs(mem, mine, replicas, k, step))
        finally:
            mem.close()

    def block(recs: list[dict]) -> dict:
        out: dict = {}
        for mode in modes:
            first = [r for r in recs if r["mode"] == mode and r["replica"] == 0]
            out[mode] = summarize(first, k)
            if mode == "kv" and replicas > 1:
                acc = [sum(r["correct"] for r in recs if r["mode"] == "kv" and r["replica"] == i) / max(1, len(first))
                       for i in range(replicas)]
                out[mode]["accuracy_replicas"] = acc
                out[mode]["accuracy_mean"] = statistics.fmean(acc)
        return out

    report: dict = {"k": k, "n_rows": len(rows), "replicas": replicas, "settings": used, "modes": block(records),
                    "repos": {repo: block([r for r in records if r["repo"] == repo]) for repo in by_repo}}
    out.write_text(json.dumps({"report": report, "records": records}, indent=1))
    return report
