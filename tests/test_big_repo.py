"""Big repositories, at small scale: indexing progress, `repomem bench scale` running end to end, a branch
switch through a real watcher and git, and the compile ETA.

Why: on a big tree the user waits for indexing and for every later start. Progress must count every
file up to the total (the CLI's bar and ETA and the GUI's sidebar read these callbacks), and the
benchmark that measures the goals must keep working (its numbers are printed, not asserted here). A
`git checkout` must be absorbed as one batch and switching back must not compile again; what is left to
compile, and about how long it takes, must be visible.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path

from click.testing import CliRunner

from repomem.app.cli import cli
from repomem.bench.scale import questions_from
from repomem.core.compiler import CompiledPiece, CompileOptions
from repomem.core.memory import RepoMemory
from repomem.core.watch import Watcher


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


# -- branch switches and the compile ETA, through a real watcher and a real store ---------------------------
class PlaceholderCompiler:
    """Stands in for the model in `CountingMemory`: a payload per text, and a count of model runs."""

    def __init__(self) -> None:
        self.options = CompileOptions(encoding="f16")
        self.texts: list[str] = []

    def compile_text(self, text: str, cancel: threading.Event | None = None) -> CompiledPiece:
        self.texts.append(text)
        return CompiledPiece(payload=hashlib.sha256(text.encode()).digest() * 64, tokens=len(text) // 4,
                             kept=len(text) // 4)

    def close(self) -> None:
        pass


class CountingMemory(RepoMemory):
    """A real RepoMemory, store and compile queue (budget, shelf, rate); only the model run is a placeholder,
    so a few hundred cubes compile in seconds and every model run is counted."""

    fingerprint = "placeholder-model"
    payload_encoding = "f16"

    def _compiler_for(self) -> PlaceholderCompiler:
        if self._compiler is None:
            self._compiler = PlaceholderCompiler()
        return self._compiler


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "advice.detachedHead=false",
                    *args], cwd=root, check=True, capture_output=True)


def _two_branches(root: Path, n: int) -> Path:
    """Branch main with `n` small modules; branch other with every one of them changed."""
    root.mkdir()
    for i in range(n):
        (root / f"m{i:03}.py").write_text(f"def main_{i}():\n    return 'main {i}'\n")
    _git(root, "init", "-q", "-b", "main")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "main")
    _git(root, "checkout", "-q", "-b", "other")
    for i in range(n):
        (root / f"m{i:03}.py").write_text(f"def other_{i}():\n    return 'other {i}'\n")
    _git(root, "commit", "-q", "-am", "other")
    _git(root, "checkout", "-q", "main")
    return root


def _wait(pred, timeout: float, what: str, w: Watcher) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        assert not w.status()["error_count"], w.status()["errors"]
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _idle(w: Watcher) -> bool:
    st = w.status()
    return st["state"] == "idle" and st["queue"] == 0


def test_a_branch_switch_is_one_batch_and_switching_back_compiles_nothing(tmp_path: Path, home: Path) -> None:
    n = 240  # under the watcher's max_batch: the whole checkout is one sync
    root = _two_branches(tmp_path / "repo", n)
    mem = CountingMemory.open(root)
    compiler = mem._compiler_for()
    batches: list[int] = []  # files per batch synced
    w = Watcher(root, memory_factory=lambda r: mem, debounce_s=0.15, max_delay_s=1.5, idle_unload_s=-1,
                on_batch=lambda batch, _summary: batches.append(len(batch))).start()
    try:
        _wait(lambda: _idle(w) and len(compiler.texts) >= n, 300, "main indexed and compiled", w)
        runs = len(compiler.texts)
        del batches[:]
        _git(root, "checkout", "-q", "other")
        absorbed = _wait(lambda: any("other_117" in c.text for c in w.search("other_117", k=3)), 300,
                         "the other branch searchable", w)
        _wait(lambda: _idle(w) and len(compiler.texts) >= runs + n, 300, "the other branch compiled", w)
        assert batches == [n], f"the checkout was cut into batches of {batches} files"
        runs = len(compiler.texts)
        del batches[:]
        _git(root, "checkout", "-q", "main")
        back = _wait(lambda: any("main_117" in c.text for c in w.search("main_117", k=3)), 300,
                     "main searchable again", w)
        _wait(lambda: _idle(w) and len(mem.store.cubes(kind="activation", status="active")) == n, 300,
              "main's payloads back", w)
        assert batches == [n], f"the checkout was cut into batches of {batches} files"
        assert len(compiler.texts) == runs, "cubes whose text came back were compiled again"
        reused = [e for c in mem.store.cubes(kind="activation") for e in mem.store.history(c.id)[-1:]]
        assert all(e.event == "compiled" and e.detail.get("reused") for e in reused) and len(reused) == n
        print(f"\ncheckout of {n} files: searchable after {absorbed:.2f}s, back after {back:.2f}s")
    finally:
        w.stop()
        assert w.join(30)
        mem.close()


def test_the_backlog_reads_as_one_line_in_the_sidebar() -> None:
    from repomem.app.gui.repo_sidebar import RepoState
    from repomem.core import describe_backlog

    assert describe_backlog(None) == describe_backlog({"cubes": 0}) == "nothing left to compile"
    fresh = {"cubes": 1200, "tokens": 150_000, "tokens_per_s": None, "eta_s": None}
    assert describe_backlog(fresh) == "1,200 cubes (~150,000 tokens) left to compile, rate not measured yet"
    for eta, span in ((45, "45 s"), (1500, "25 min"), (12_000, "3 h 20 min"), (400_000, "4.6 days")):
        line = describe_backlog({**fresh, "tokens_per_s": 200.0, "eta_s": eta})
        assert line.endswith(f": about {span} at 200 tokens/s"), line
    state = RepoState("/r", files=3, cubes=1200, backlog={**fresh, "tokens_per_s": 200.0, "eta_s": 750.0})
    assert "1,200 cubes (~150,000 tokens) left to compile: about 12 min at 200 tokens/s" in state.summary()
    assert "left to compile" not in RepoState("/r").summary()  # before the store's counters arrive


def test_the_compile_eta_comes_from_the_measured_rate_and_shows_in_status(tmp_path: Path, home: Path) -> None:
    root = _tree(tmp_path / "repo", 30)
    mem = CountingMemory.open(root)
    try:
        mem.index(compile=False)
        before = mem.compile_backlog()
        assert before["cubes"] == 60 and before["tokens"] > 0 and before["eta_s"] is None
        out = CliRunner().invoke(cli, ["status", str(root)])
        assert "60 cubes (~" in out.output and "rate not measured yet" in out.output, out.output
        assert mem.compile_pending(limit=10) == 10
        after = mem.compile_backlog()
        assert after["cubes"] == 50 and 0 < after["tokens"] < before["tokens"]
        assert after["tokens_per_s"] > 0 and after["eta_s"] == round(after["tokens"] / after["tokens_per_s"], 1)
        stored = mem.store.compile_backlog()  # what another process reads: the rate was recorded
        assert stored["cubes"] == 50 and stored["tokens_per_s"] > 0 and stored["eta_s"] is not None
        data = json.loads(CliRunner().invoke(cli, ["status", str(root), "--json"]).stdout)
        assert data["compile"]["cubes"] == 50 and data["compile"]["eta_s"] is not None
        assert "50 cubes (~" in CliRunner().invoke(cli, ["status", str(root)]).output
    finally:
        mem.close()


# -- the disk budget and the shelf, with the real small model -----------------------------------------------
def _on_disk(store_dir: Path) -> int:
    return sum(p.stat().st_size for p in (store_dir / "payloads").rglob("*.kv"))


def test_a_compile_pass_never_holds_more_payloads_than_the_budget_and_keeps_the_hottest(
        tmp_path: Path, home: Path, test_model_path: Path) -> None:
    from repomem.core import settings as settings_mod

    root = tmp_path / "repo"
    root.mkdir()
    for i in range(10):
        (root / f"mod_{i}.py").write_text(f"def handler_{i}(request):\n    return {{'status': {200 + i}}}\n")
    # a test-model f16 payload of one of these is a bit under 1 MB: two fit
    s = settings_mod.Settings(model=str(test_model_path), encoding="f16", disk_budget_mb=2)
    budget = 2 * 1024 * 1024
    mem = RepoMemory.open(root, settings=s)
    try:
        mem.index(compile=False)
        ids = {c.symbol: c.id for c in mem.store.cubes()}
        now = time.time()
        for age, name in enumerate(["handler_1", "handler_2", "handler_3"]):  # asked about: hottest first
            mem.store.touch([ids[name]], at=now - 10 * age)
        peaks: list[int] = []
        mem.compile_pending(progress=lambda *_: peaks.append(_on_disk(mem.store.dir)))
        assert peaks and max(peaks) <= budget, peaks
        assert mem.store.compile_queue(mem.fingerprint, limit=None, encoding="f16") == []  # the rest stays text
        assert {c.symbol for c in mem.store.cubes(kind="activation")} == {"handler_1", "handler_2"}
        assert set(p.stem for p in (mem.store.dir / "payloads").rglob("*.kv")) == mem.store.referenced_payloads()
        # an edit shelves the old payload (it counts); compiling the new text makes room from the shelf first
        (root / "mod_1.py").write_text("def handler_1(request):\n    return {'status': 201, 'edited': True}\n")
        mem.sync_paths(["mod_1.py"], compile=False)
        assert mem.store.stats()["shelved"] == 1 and _on_disk(mem.store.dir) <= budget
        mem.store.touch([ids["handler_1"]])
        mem.compile_pending(progress=lambda *_: peaks.append(_on_disk(mem.store.dir)))
        assert max(peaks) <= budget and mem.store.stats()["shelved"] == 0
        assert mem.store.get(ids["handler_1"]).has_payload
    finally:
        mem.close()


def test_text_that_comes_back_reuses_its_payload_and_it_still_splices(tmp_path: Path, home: Path,
                                                                      test_model_path: Path) -> None:
    from repomem.core import settings as settings_mod

    root = tmp_path / "repo"
    root.mkdir()
    main = "def render_banner(name):\n    return '*** ' + name + ' ***'\n"
    (root / "banner.py").write_text(main)
    s = settings_mod.Settings(model=str(test_model_path), encoding="f16", max_answer_tokens=4)
    mem = RepoMemory.open(root, settings=s)
    try:
        mem.index()
        cube = mem.store.cubes(kind="activation")[0]
        (root / "banner.py").write_text(main.replace("***", "==="))  # the other branch
        mem.sync_paths(["banner.py"])
        assert mem.store.get(cube.id).payload_sha256 != cube.payload_sha256
        (root / "banner.py").write_text(main)  # and back
        assert mem.sync_paths(["banner.py"]).payloads_reused == 1
        back = mem.store.get(cube.id)
        assert back.payload_sha256 == cube.payload_sha256
        model_runs = [e for e in mem.store.history(cube.id) if e.event == "compiled" and not e.detail.get("reused")]
        assert len(model_runs) == 2  # main once, the other branch once; main again came off the shelf
        ans = mem.ask("What does render_banner return?", mode="kv", record=False)
        assert ans.spliced >= 1 and not ans.warnings, ans.warnings
    finally:
        mem.close()
