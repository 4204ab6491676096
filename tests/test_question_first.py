"""A question never waits behind background compilation: the turn rule, the terminal chat, the app.

`ModelTurns` is checked deterministically with plain threads (who runs when is forced by events, not by
timing). The chat and the app are then checked end to end with the small model: a question asked while a
long compile queue runs is answered before that queue ends.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from repomem.core import settings as settings_mod
from repomem.core.memory_state import ModelTurns
from repomem.core.store import CubeStore


def _wait(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def _steps(turns: ModelTurns, n: int, log: list[str], first_in: threading.Event,
           first_go: threading.Event) -> threading.Thread:
    """A background worker doing `n` steps back to back; the first one waits for `first_go` inside."""
    def run() -> None:
        for i in range(n):
            with turns.background_step():
                log.append(f"step{i}")
                if i == 0:
                    first_in.set()
                    assert first_go.wait(10)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_question_arriving_during_a_step_runs_right_after_it() -> None:
    turns, log = ModelTurns(), []
    first_in, first_go = threading.Event(), threading.Event()
    worker = _steps(turns, 4, log, first_in, first_go)
    assert first_in.wait(10)

    def ask() -> None:
        with turns.question():
            log.append("question")

    asker = threading.Thread(target=ask)
    asker.start()
    _wait(lambda: turns._questions == 1, what="the question to queue up")  # it waits for step0's lock now
    first_go.set()
    asker.join(10)
    worker.join(10)
    assert log == ["step0", "question", "step1", "step2", "step3"]


def test_a_running_question_holds_back_every_step() -> None:
    turns, log = ModelTurns(), []
    inside, leave = threading.Event(), threading.Event()

    def ask() -> None:
        with turns.question():
            inside.set()
            assert leave.wait(10)
            log.append("question done")

    asker = threading.Thread(target=ask)
    asker.start()
    assert inside.wait(10)
    go = threading.Event()
    go.set()
    worker = _steps(turns, 2, log, threading.Event(), go)
    worker.join(0.2)
    assert worker.is_alive() and log == []  # blocked before its first step
    leave.set()
    asker.join(10)
    worker.join(10)
    assert log == ["question done", "step0", "step1"]


def test_a_background_step_inside_the_lock_is_an_error_not_a_deadlock() -> None:
    turns = ModelTurns()
    with turns.lock, pytest.raises(RuntimeError, match="holds the model lock"):
        with turns.background_step():
            pass
    with turns.question(), pytest.raises(RuntimeError, match="holds the model lock"):
        with turns.background_step():
            pass
    with turns.background_step():  # the lock was let go: steps work again
        pass


def _handlers(root: Path, n: int) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"mod_{i}.py").write_text(f"def handler_{i}(request):\n    return {{'status': {200 + i}}}\n")
    return root


def _compiled(store_dir: Path) -> int:
    with CubeStore.open(store_dir) as store:
        return int(store.stats()["by_kind"].get("activation", 0))


@pytest.mark.slow
def test_chat_answers_while_its_background_compile_runs_and_quits_at_once(tmp_path: Path, home: Path,
                                                                          test_model_path: Path) -> None:
    from repomem.core import paths

    root = _handlers(tmp_path / "repo", 120)
    settings_mod.save(settings_mod.Settings(model=str(test_model_path), max_answer_tokens=4, encoding="f16",
                                            n_threads=1))
    env = {**os.environ, "REPOMEM_HOME": str(home), "REPOMEM_MODEL": str(test_model_path)}
    proc = subprocess.Popen([sys.executable, "-m", "repomem.app.cli", "chat", str(root)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True).start()

    def line_with(word: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ln = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if word in ln:
                return ln
        raise AssertionError(f"no {word!r} on stderr within {timeout}s")

    try:
        queued = int(line_with("not compiled to KV yet", 120).split()[0])
        assert queued >= 120
        store_dir = paths.repo_dir(root)
        _wait(lambda: _compiled(store_dir) >= 2, 120, "the background compile to run")
        proc.stdin.write("What does handler_7 return?\n")
        proc.stdin.flush()
        line_with("sources:", 120)  # the answer came
        assert _compiled(store_dir) < queued - 10, "the answer waited for the compile queue"
        t0 = time.monotonic()
        proc.stdin.write("/quit\n")
        proc.stdin.close()
        assert proc.wait(60) == 0
        quit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = queued - _compiled(store_dir)
    # /quit stopped the compile within the cube in flight; what is left stays queued for the next run
    assert left > 10 and quit_s < 30, (left, quit_s)


@pytest.mark.slow
def test_the_app_answers_while_it_compiles_in_the_background(qtbot, tmp_path: Path, home: Path,
                                                              test_model_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("PySide6")
    from repomem.app.gui.main_window import MainWindow
    from repomem.core import paths

    root = _handlers(tmp_path / "repo", 80)
    monkeypatch.setenv("REPOMEM_MODEL", str(test_model_path))
    settings_mod.save(settings_mod.Settings(max_answer_tokens=4, n_ctx=2048, encoding="f16", n_threads=1))
    win = MainWindow(watch=False, tray=False)
    qtbot.addWidget(win)
    try:
        with qtbot.waitSignal(win.repos.ready, timeout=60_000):
            key = win.add_repository(root)
        state = win.sidebar.states[key]
        store_dir = paths.repo_dir(root)
        qtbot.waitUntil(lambda: state.activity == "compiling" and state.done >= 2, timeout=240_000)
        with qtbot.waitSignal(win.chat_ctl.answer_finished, timeout=120_000):
            win.ask("What does handler_7 return?", "text")
        assert _compiled(store_dir) < 70, "the answer waited for the compile queue"
        # the sidebar says what is left to compile (the store's counters, refreshed while compiling)
        qtbot.waitUntil(lambda: "left to compile" in win.sidebar.list.item(0).text(), timeout=30_000)
        # the pre-empted compile is queued again and goes on once the question is answered
        qtbot.waitUntil(lambda: state.activity == "compiling", timeout=30_000)
    finally:
        win.shutdown()
