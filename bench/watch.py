"""`repomem bench watch`: how fast an edit becomes memory, and what a burst of untouched files costs.

Numbers users feel: the time from saving a one-function edit to its updated cube (new version) being
found by search, the time until that cube is also compiled to KV (the watcher syncs plaintext first
and compiles afterwards, one cube at a time), and the time a `git checkout`-like burst of
touched-but-unchanged files keeps the watcher busy (it must compile nothing: the store's hash check
answers). Both run on throwaway repositories in a temp folder with the real watcher and
RepoMemory; their store folders are removed afterwards. Numbers are printed, never asserted.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from repomem.core import IndexSummary, RepomemError, Watcher, paths, resolve_model
from repomem.core.watch import open_memory

N_FUNCTIONS = 8


def _module(markers: dict[int, str]) -> str:
    parts = ['"""Helpers the benchmark edits one at a time."""\n']
    for i in range(N_FUNCTIONS):
        tag = markers.get(i, f"initial_{i}")
        parts.append(f"\n\ndef helper_{i}(values):\n"
                     f'    """Scale and tag the values (variant {i})."""\n'
                     f"    scaled = [v * {i + 2} for v in values]\n"
                     f'    return {{"tag": "{tag}", "total": sum(scaled)}}\n')
    return "".join(parts)


def _percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (with 10 samples p95 is the worst one, which is the honest reading)."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 1)) - 1))
    return s[k]


def _wait(pred: Callable[[], bool], timeout: float, what: str, watcher: Any) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        st = watcher.status()
        if st["error_count"]:
            raise RepomemError(f"bench watch: the watcher reported {st['errors'][-1]['message']}")
        if time.monotonic() > deadline:
            raise RepomemError(f"bench watch: timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


def bench_watch(model: str | None = None, n_edits: int = 10, burst_files: int = 500, *,
                debounce_s: float = 0.25, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure save -> searchable updated cube (p50/p95 over `n_edits`) and a touched-file burst.

    Returns {"edit_p50_s", "edit_p95_s" (save -> updated cube found by search), "compiled_p50_s",
    "compiled_p95_s" (save -> that cube compiled), "edit_latencies_s", "compiled_latencies_s",
    "burst_files", "burst_s", "burst_compiles", "burst_batches", "debounce_s", "model"}.
    `model`: catalogue name or GGUF path (default: $REPOMEM_MODEL or the default).
    """
    say = log or (lambda _msg: None)
    model_path = str(resolve_model(model))
    factory = lambda root: open_memory(root, model=model_path)  # noqa: E731
    out: dict[str, Any] = {"model": Path(model_path).name, "debounce_s": debounce_s}
    with tempfile.TemporaryDirectory(prefix="repomem-bench-watch-") as tmp:
        roots = [Path(tmp) / "edits", Path(tmp) / "burst"]
        try:
            out.update(_edits(roots[0], factory, n_edits, debounce_s, say))
            out.update(_burst(roots[1], factory, burst_files, debounce_s, say))
        finally:
            for r in roots:
                shutil.rmtree(paths.repo_dir(r.resolve()), ignore_errors=True)
    return out


def _edits(root: Path, factory: Callable[[Path], Any], n_edits: int, debounce_s: float,
           say: Callable[[str], None]) -> dict[str, Any]:
    root.mkdir()
    (root / "helpers.py").write_text(_module({}))
    (root / "README.md").write_text("# bench\n\nA repository the watcher benchmark edits.\n")
    w = Watcher(root, memory_factory=factory, debounce_s=debounce_s, idle_unload_s=-1).start()
    latencies: list[float] = []
    compiled: list[float] = []
    try:
        say("compiling the start-up index")
        _wait(lambda: w.status()["stats"]["batches"] >= 1 and w.status()["state"] == "idle", 600, "catch-up", w)
        markers: dict[int, str] = {}
        nonce = uuid.uuid4().hex[:6]
        for i in range(n_edits):
            fn = i % N_FUNCTIONS
            marker = markers[fn] = f"edited_{nonce}_{i}"
            text = _module(markers)
            t0 = time.perf_counter()
            (root / "helpers.py").write_text(text)  # the save
            hit: list[Any] = []

            def found(marker: str = marker, fn: int = fn, hit: list[Any] = hit) -> bool:
                for c in w.search(marker, k=3):
                    if c.path == "helpers.py" and marker in c.text and f"helper_{fn}" in (c.symbol or ""):
                        hit.append(c)
                        return True
                return False

            _wait(found, 120, f"edit {i} searchable", w)
            latencies.append(time.perf_counter() - t0)
            cube_id = hit[0].id

            def compiled_now(marker: str = marker, cube_id: str = cube_id) -> bool:
                return any(c.id == cube_id and c.kind == "activation" for c in w.search(marker, k=3))

            _wait(compiled_now, 300, f"edit {i} compiled", w)
            compiled.append(time.perf_counter() - t0)
            say(f"edit {i + 1}/{n_edits}: searchable {latencies[-1]:.3f}s, compiled {compiled[-1]:.3f}s")
            _wait(lambda: w.status()["state"] == "idle", 300, "idle", w)
    finally:
        w.stop()
        w.join(120)
    return {"edit_p50_s": round(statistics.median(latencies), 3), "edit_p95_s": round(_percentile(latencies, 0.95), 3),
            "compiled_p50_s": round(statistics.median(compiled), 3),
            "compiled_p95_s": round(_percentile(compiled, 0.95), 3),
            "edit_latencies_s": [round(x, 3) for x in latencies],
            "compiled_latencies_s": [round(x, 3) for x in compiled]}


def _burst(root: Path, factory: Callable[[Path], Any], n_files: int, debounce_s: float,
           say: Callable[[str], None]) -> dict[str, Any]:
    for i in range(n_files):
        d = root / f"mod{i // 50:02}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file_{i:04}.py").write_text(f"def value_{i}():\n    return {i}\n")
    say(f"indexing {n_files} files (plaintext)")
    mem = factory(root)
    try:
        mem.index(compile=False)
    finally:
        mem.close()
    synced = [0]
    compiles = [0]
    done = threading.Event()

    def on_batch(batch: list[str], summary: IndexSummary) -> None:
        synced[0] += len(batch)
        compiles[0] += summary.compiled
        if synced[0] >= n_files:
            done.set()

    w = Watcher(root, memory_factory=factory, debounce_s=debounce_s, idle_unload_s=-1, catch_up=False,
                    on_batch=on_batch).start()
    try:
        time.sleep(0.5)  # let the observer settle its watches
        files = sorted(root.rglob("*.py"))
        t0 = time.perf_counter()
        for p in files:  # a checkout that rewrites identical bytes
            data = p.read_bytes()
            with open(p, "wb") as fh:
                fh.write(data)
            os.utime(p)
        _wait(done.is_set, 300, "the burst to be absorbed", w)
        burst_s = time.perf_counter() - t0
        time.sleep(debounce_s * 2)  # anything late (a compile job, another batch) would show now
        batches = w.status()["stats"]["batches"]
        compiles[0] += w.status()["stats"]["compiled"]
    finally:
        w.stop()
        w.join(120)
    say(f"burst: {n_files} files in {burst_s:.2f}s, {batches} batches, {compiles[0]} compiles")
    return {"burst_files": n_files, "burst_s": round(burst_s, 3), "burst_compiles": compiles[0],
            "burst_batches": batches}
