"""`repomem eval`: answer a QA set in several modes and score it (accuracy, recall@k, TTFT)."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path

from repomem.core import RepoMemory, SamplingParams, load_settings


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


def load_rows(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


# What shapes an answer, recorded with every eval so two runs can be told apart.
ANSWER_SETTINGS = ("encoding", "placement", "boost_top", "key_scale", "keep_policy", "keep_ratio", "top_k",
                   "memory_tokens", "max_answer_tokens", "cache_type")


def run_eval(qa_file: Path, repo_root: Path, modes: list[str], out: Path, *, limit: int | None = None, k: int = 5,
             model: str | None = None, progress: Callable[[int, int], None] | None = None,
             settings_overrides: dict | None = None, score: bool = False) -> dict:
    """Answer every row in every mode. `score`: also the mean log-probability per token of the row's reference
    answer given the same memory (teacher-forced): smooth where accuracy over a few dozen greedy answers is not,
    but it also rewards the reference's wording, so compare modes with it, not absolute values."""
    rows = load_rows(qa_file, limit)
    records: list[dict] = []
    used: dict = {}
    mems: dict[str, RepoMemory] = {}
    total, done = len(rows) * len(modes), 0
    try:
        for row in rows:
            mem = mems.get(row["repo"])
            if mem is None:
                s = load_settings()
                for key, value in (settings_overrides or {}).items():
                    setattr(s, key, value)
                mem = RepoMemory.open(repo_root / row["repo"], settings=s, model=model)
                mem.index(compile=False)
                if "kv" in modes:
                    # Compile what these questions retrieve first; the rest of the repository can wait.
                    mine = [r["question"] for r in rows if r["repo"] == row["repo"]]
                    mem.compile_ids(c.id for q in mine for c in mem.search(q, k=mem.settings.top_k))
                mems[row["repo"]] = mem
                used = {name: getattr(mem.settings, name) for name in ANSWER_SETTINGS}
                used["model_sha256"] = mem.engine.info.sha256
            retrieved = [{"path": c.path, "start_line": c.start_line, "end_line": c.end_line}
                         for c in mem.search(row["question"], k=k)]
            for mode in modes:
                ans = mem.ask(row["question"], mode=mode, record=False,
                              sampling=SamplingParams(temperature=0.0, max_tokens=mem.settings.max_answer_tokens))
                rec = {"id": row["id"], "mode": mode, "answer": ans.answer, "ttft_s": ans.ttft_s,
                       "total_s": ans.total_s, "memory_tokens": ans.memory_tokens,
                       "sources": [s.as_dict() for s in ans.sources],
                       "correct": accepted(ans.answer, row["accept"]), "retrieval_hit": hit(retrieved, row)}
                if score:
                    rec["reference_logprob"] = mem.score_answer(row["question"], row["answer"], mode=mode).mean_logprob
                records.append(rec)
                done += 1
                if progress:
                    progress(done, total)
    finally:
        for mem in mems.values():
            mem.close()
    report: dict = {"k": k, "n_rows": len(rows), "settings": used, "modes": {}}
    for mode in modes:
        rs = [r for r in records if r["mode"] == mode]
        report["modes"][mode] = {
            "n": len(rs),
            "accuracy": sum(r["correct"] for r in rs) / max(1, len(rs)),
            "recall": sum(r["retrieval_hit"] for r in rs) / max(1, len(rs)),
            "median_ttft_s": statistics.median([r["ttft_s"] for r in rs]) if rs else 0.0,
        }
        if score and rs:
            report["modes"][mode]["reference_logprob"] = statistics.fmean(r["reference_logprob"] for r in rs)
    out.write_text(json.dumps({"report": report, "records": records}, indent=1))
    return report
