"""Big repositories, at small scale: indexing progress, and `repomem bench scale` running end to end.

Why: on a big tree the user waits for indexing and for every later start. Progress must count every
file up to the total (the CLI's bar and ETA and the GUI's sidebar read these callbacks), and the
benchmark that measures the goals must keep working (its numbers are printed, not asserted here).
"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from repomem.app.cli import cli
from repomem.bench.scale import questions_from
from repomem.core.memory import RepoMemory


def _tree(root: Path, n: int) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"mod{i}.py").write_text(
            f'def handler_{i}(request):\n    """Handle request number {i} and return its status code."""\n'
            f"    return {200 + i}\n\n\n"
            f'class Model{i}:\n    """Stores the rows of table number {i} for the admin."""\n\n'
            f"    def save(self):\n        return {i}\n")
    return root


def test_index_progress_counts_every_file_to_the_total(tmp_path: Path, home: Path) -> None:
    root = _tree(tmp_path / "repo", 30)
    for rerun in (False, True):  # the second run reuses every file: progress still reaches the total
        calls: list[tuple[str, int, int]] = []
        mem = RepoMemory.open(root)
        try:
            summary = mem.index(compile=False, progress=lambda *a, calls=calls: calls.append(a))
        finally:
            mem.close()
        assert summary.reused == (30 if rerun else 0)
        assert [c[1] for c in calls] == list(range(1, 31)) and {c[2] for c in calls} == {30}
        assert {c[0] for c in calls} == {"read"}


def test_bench_scale_reports_each_phase(tmp_path: Path, home: Path) -> None:
    root = _tree(tmp_path / "repo", 12)
    result = CliRunner().invoke(cli, ["bench", "scale", str(root), "--json", "--questions", "5", "--no-model",
                                      "--home", str(tmp_path / "bench-home")])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # progress lines go to stderr
    assert out["index"]["files"] == 12 and out["index"]["chunks"] >= 24 and "index_file_mb" in out["index"]
    assert out["open"]["index_source"] == "file" and out["open"]["questions"] == 5
    assert out["cold_open"]["index_source"] == "rebuilt"
    assert out["open"]["rss_after_searches_mb"] > 0
    assert set(out["goals"]) == {"index_s", "reopen_s", "search_p95_ms", "rss_with_model_mb"}


def test_bench_questions_are_the_same_every_run(tmp_path: Path, home: Path) -> None:
    root = _tree(tmp_path / "repo", 20)
    mem = RepoMemory.open(root)
    try:
        mem.index(compile=False)
        first, second = questions_from(mem.store.dir, 8), questions_from(mem.store.dir, 8)
    finally:
        mem.close()
    assert first == second and len(first) == 8
    assert all(q["question"][0].isupper() and "number" in q["question"] for q in first)
