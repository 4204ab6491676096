"""The desktop app end to end (offscreen): real window, real store, real small model (SmolLM2-135M).

What the small model says is not checked (it is too small to be right); what is checked is the
mechanics a user relies on: a repository is added and indexed, an answer streams in with its
sources, Stop stops it, the inspector lists and forgets cubes, settings survive a restart, and the
GUI thread never stalls while an answer streams.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import QElapsedTimer, Qt, QTimer  # noqa: E402

from repomem.app.gui.main_window import MainWindow  # noqa: E402
from repomem.core import settings as settings_mod  # noqa: E402

ANSWER_TIMEOUT_MS = 180_000


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "calc"
    root.mkdir()
    (root / "calc.py").write_text(
        '"""A tiny calculator."""\n\n\n'
        "def add(a: int, b: int) -> int:\n"
        '    """Return the sum of a and b."""\n'
        "    return a + b\n\n\n"
        "def multiply(a: int, b: int) -> int:\n"
        '    """Return the product of a and b."""\n'
        "    return a * b\n")
    (root / "README.md").write_text("# calc\n\n`add` sums two numbers and `multiply` multiplies them.\n")
    return root


@pytest.fixture
def gui_home(home: Path, test_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data home whose settings keep answers short (the suite must stay fast)."""
    monkeypatch.setenv("REPOMEM_MODEL", str(test_model_path))
    s = settings_mod.Settings(max_answer_tokens=24, n_ctx=2048, memory_tokens=800, n_threads=1)
    settings_mod.save(s)
    return home


@pytest.fixture
def window(qtbot, gui_home: Path):
    win = MainWindow(watch=False, tray=False)
    qtbot.addWidget(win)
    win.resize(1100, 700)
    win.show()
    yield win
    win.shutdown()


def add_and_wait(qtbot, win: MainWindow, repo: Path) -> str:
    root = win.add_repository(repo)
    state = win.sidebar.states[root]
    # Ready or failed, and either way with what the app was doing: a plain timeout says nothing.
    try:
        qtbot.waitUntil(lambda: root in win.repos.ready_roots or bool(state.error), timeout=60_000)
    except qtbot.TimeoutError:
        current = win.worker._current
        pytest.fail(f"not indexed in 60 s: activity {state.activity!r} {state.done}/{state.total}, "
                    f"worker running {win.worker.isRunning()} on {current.name if current else None!r} "
                    f"with {win.worker._queue.qsize()} queued, errors {win.errors}")
    assert root in win.repos.ready_roots, (state.error, win.errors)
    qtbot.waitUntil(lambda: win.sidebar.states[root].cubes > 0, timeout=10_000)
    return root


def ask_and_wait(qtbot, win: MainWindow, question: str, mode: str = ""):
    chunks: list[str] = []
    with qtbot.waitSignal(win.chat_ctl.answer_finished, timeout=ANSWER_TIMEOUT_MS) as sig:
        job = win.ask(question, mode)
        assert job is not None
        job.text.connect(chunks.append)
    return sig.args[0], chunks


def test_add_repository_indexes_and_is_remembered(qtbot, window: MainWindow, repo: Path):
    root = add_and_wait(qtbot, window, repo)
    assert window.sidebar.roots() == [root]
    # The sidebar counters refresh as indexing reports progress: wait for the final numbers.
    qtbot.waitUntil(lambda: window.sidebar.states[root].files == 2 and window.sidebar.states[root].cubes >= 2,
                    timeout=20_000)
    assert not window.sidebar.states[root].error
    item_text = window.sidebar.list.item(0).text()
    assert "calc" in item_text and "2 files" in item_text
    assert window.chat.input.isEnabled()
    assert settings_mod.load().repos == [root]  # persisted: the next start restores it


def test_settings_that_cannot_be_saved_are_a_message_not_a_crash(qtbot, window: MainWindow, repo: Path,
                                                                   gui_home: Path):
    root = add_and_wait(qtbot, window, repo)
    settings_file = gui_home / "settings.json"
    settings_file.unlink()
    settings_file.mkdir()  # an unwritable settings file, whatever the user's rights
    window.remove_repository(root)  # a slot: an exception here would vanish into Qt
    assert window.sidebar.roots() == [] and root not in window.settings.repos  # applied for this session
    assert any("could not save the settings" in e for e in window.errors), window.errors


def test_ask_streams_answer_with_sources(qtbot, window: MainWindow, repo: Path, monkeypatch):
    root = add_and_wait(qtbot, window, repo)
    answer, chunks = ask_and_wait(qtbot, window, "What does add return?", "text")
    assert len(chunks) >= 2, "tokens must arrive one by one, not as one final block"
    assert answer.answer and answer.mode == "text"
    last = window.chat.view.messages[-1]
    assert last.role == "assistant" and not last.streaming
    assert [s.label for s in last.sources] == [f"{s.path}:{s.start_line}-{s.end_line}" for s in answer.sources]
    assert any(s.path == "calc.py" for s in answer.sources)
    assert "calc.py:" in window.chat.view.toPlainText()  # the citation is shown under the answer
    assert window.chat.timing.text().startswith("first token")
    # the exchange is persisted as a conversation, listed for this repository
    qtbot.waitUntil(lambda: window.conversations.list.count() == 1, timeout=10_000)
    assert window.chat_ctl.conversation_id == answer.conversation_id
    # a source link opens the file at its first line in the configured editor
    opened: list[tuple[Path, int, str]] = []
    monkeypatch.setattr("repomem.app.gui.main_window.open_location",
                        lambda path, line, command="": opened.append((path, line, command)))
    src = next(i for i, s in enumerate(last.sources) if s.path == "calc.py")
    from PySide6.QtCore import QUrl

    window.chat.view._on_anchor(QUrl(f"src:{len(window.chat.view.messages) - 1}:{src}"))
    assert opened == [(Path(root) / "calc.py", last.sources[src].start, "")]


def test_stop_generation(qtbot, window: MainWindow, repo: Path):
    window.settings.max_answer_tokens = 400
    window.worker.reconfigure(window.settings)
    add_and_wait(qtbot, window, repo)
    chunks: list[str] = []
    job = window.ask("Write a long story about calculators, with many chapters.", "none")
    job.text.connect(chunks.append)
    qtbot.waitUntil(lambda: len(chunks) >= 2, timeout=ANSWER_TIMEOUT_MS)
    assert window.chat.stop_button.isEnabled()
    t0 = time.monotonic()
    with qtbot.waitSignal(job.finished, timeout=30_000):
        window.chat.stop_button.click()
    assert time.monotonic() - t0 < 10
    assert not window.chat.streaming and window.chat.send_button.isEnabled()
    assert job.result is None or job.result.stop_reason == "cancelled"
    last = window.chat.view.messages[-1]
    assert last.role == "assistant" and not last.streaming and "stopped" in last.meta
    assert len(job.result.answer if job.result else "") < 2000


def read_rows(insp) -> list:
    """The inspector's rows whose fields have been read (all of them in a repository this small)."""
    return [r for r in map(insp.model.row, range(insp.model.rowCount())) if r is not None]


def test_inspector_lists_pins_and_forgets_cubes(qtbot, window: MainWindow, repo: Path):
    root = add_and_wait(qtbot, window, repo)
    window.tabs.setCurrentWidget(window.inspector)
    insp = window.inspector
    qtbot.waitUntil(lambda: len(read_rows(insp)) >= 2 and not insp.loading, timeout=10_000)
    assert {r.path for r in read_rows(insp)} == {"calc.py", "README.md"}
    insp.set_filter(symbol="multiply")
    qtbot.waitUntil(lambda: [r.symbol for r in read_rows(insp)] == ["multiply"], timeout=10_000)
    cube_id = read_rows(insp)[0].id
    insp.select(cube_id)
    qtbot.waitUntil(lambda: insp.detail.text.toPlainText().count("a * b") == 1, timeout=10_000)
    assert insp.detail.history.topLevelItemCount() >= 1  # at least "created"

    from repomem.core import paths
    from repomem.core.store import CubeStore

    with qtbot.waitSignal(insp.changed, timeout=10_000):
        insp.toggle_pin()
    with CubeStore.open(paths.repo_dir(Path(root))) as store:
        assert store.get(cube_id).pinned
    qtbot.waitUntil(lambda: insp.pin_button.text() == "Unpin", timeout=10_000)

    before = len(read_rows(insp))
    with qtbot.waitSignal(insp.changed, timeout=10_000):
        insp.forget_selected()
    qtbot.waitUntil(lambda: len(read_rows(insp)) == before - 1, timeout=10_000)
    assert insp.model.row_of(cube_id) == -1
    with CubeStore.open(paths.repo_dir(Path(root))) as store:
        assert store.get(cube_id) is None
        assert store.history(cube_id)[-1].event == "forgotten"


def test_inspector_recompiles_and_excludes_a_path(qtbot, window: MainWindow, repo: Path):
    root = add_and_wait(qtbot, window, repo)
    window.tabs.setCurrentWidget(window.inspector)
    insp = window.inspector
    qtbot.waitUntil(lambda: len(read_rows(insp)) >= 2 and not insp.loading, timeout=10_000)
    insp.set_filter(symbol="add")
    qtbot.waitUntil(lambda: not insp.loading, timeout=10_000)
    cube_id = read_rows(insp)[0].id
    insp.select(cube_id)
    qtbot.waitUntil(lambda: insp.detail.text.toPlainText().count("a + b") == 1, timeout=10_000)
    with qtbot.waitSignal(insp.changed, timeout=ANSWER_TIMEOUT_MS):
        insp.recompile_selected()
    qtbot.waitUntil(lambda: any(r.id == cube_id and r.kind == "activation" for r in read_rows(insp)),
                    timeout=10_000)

    insp.set_filter(symbol="", file="README")
    qtbot.waitUntil(lambda: not insp.loading, timeout=10_000)
    insp.select(read_rows(insp)[0].id)
    qtbot.waitUntil(lambda: insp.exclude_button.isEnabled() and "calc" in insp.detail.text.toPlainText(),
                    timeout=10_000)
    with qtbot.waitSignal(insp.changed, timeout=60_000):
        insp.exclude_selected()
    assert "/README.md" in (Path(root) / ".repomemignore").read_text().splitlines()
    qtbot.waitUntil(lambda: not any(r.path == "README.md" for r in read_rows(insp)), timeout=10_000)


def test_conversations_new_rename_delete(qtbot, window: MainWindow, repo: Path):
    root = add_and_wait(qtbot, window, repo)
    for _ in range(2):
        job = window.stores.run_chat(root, lambda convs, _job: convs.create())
        with qtbot.waitSignal(job.finished, timeout=10_000):
            pass
    with qtbot.waitSignal(window.chat_ctl.conversations_changed, timeout=10_000):
        window.chat_ctl.reload_conversations()
    assert window.conversations.list.count() == 2
    cid = window.conversations.list.item(0).data(256)
    with qtbot.waitSignal(window.chat_ctl.conversations_changed, timeout=10_000):
        window.chat_ctl.rename_conversation(cid, "Adding numbers")

    def titled() -> list:
        return window.conversations.list.findItems("Adding numbers", Qt.MatchFlag.MatchExactly)

    assert [item.data(256) for item in titled()] == [cid]
    with qtbot.waitSignal(window.chat_ctl.conversations_changed, timeout=10_000):
        window.chat_ctl.delete_conversation(cid)
    assert window.conversations.list.count() == 1 and titled() == []


def test_a_question_asked_while_its_conversation_loads_stays_on_screen(qtbot, window: MainWindow, repo: Path):
    add_and_wait(qtbot, window, repo)
    first, _ = ask_and_wait(qtbot, window, "What does add return?", "text")
    window.chat_ctl.new_conversation()
    window.chat_ctl.open_conversation(first.conversation_id)  # its messages load on a worker ...
    again, _ = ask_and_wait(qtbot, window, "What does scale do?", "text")  # ... while this is asked
    qtbot.wait(300)  # the load has landed by now
    view = window.chat.view
    assert [(m.role, m.text if m.role == "user" else "") for m in view.messages] == [
        ("user", "What does add return?"), ("assistant", ""), ("user", "What does scale do?"), ("assistant", "")]
    assert view.messages[1].text == first.answer and view.messages[3].text == again.answer
    assert not window.chat.streaming and not view.messages[-1].streaming


def test_settings_persist_across_restart(qtbot, gui_home: Path, repo: Path):
    from repomem.app.gui.settings_dialog import SettingsDialog

    first = MainWindow(watch=False, tray=False)
    qtbot.addWidget(first)
    root = add_and_wait(qtbot, first, repo)
    dialog = SettingsDialog(first.settings, first)
    dialog.threads.setValue(3)
    dialog.n_ctx.setValue(4096)
    dialog.gpu_layers.setValue(0)
    dialog.cache_type.setCurrentText("q8_0")
    dialog.mode.setCurrentText("text")
    dialog.keep_ratio.setValue(0.5)
    assert dialog.encoding.currentData() == "k4v3"  # the default
    dialog.encoding.setCurrentIndex(dialog.encoding.findData("q4"))
    dialog.editor.setText("gedit +{line} {path}")
    dialog.close_to_tray.setChecked(False)
    first.save_settings(dialog.result_settings())
    first.shutdown()
    first.close()

    second = MainWindow(watch=False, tray=False)  # a new window reads what the first one saved
    qtbot.addWidget(second)
    try:
        s = second.settings
        assert (s.n_threads, s.n_ctx, s.n_gpu_layers, s.cache_type, s.mode, s.keep_ratio, s.encoding) == \
            (3, 4096, 0, "q8_0", "text", 0.5, "q4")
        assert s.editor_command == "gedit +{line} {path}" and s.close_to_tray is False
        assert s.max_answer_tokens == 24  # values the dialog does not show are kept
        assert second.chat.current_mode() == "text"
        assert second.sidebar.roots() == [root]  # the repository list is restored too
        reopened = SettingsDialog(second.settings, second)
        assert reopened.threads.value() == 3 and reopened.mode.currentText() == "text"
        assert reopened.encoding.currentData() == "q4"
    finally:
        second.shutdown()


def test_gui_thread_never_stalls_while_streaming(qtbot, window: MainWindow, repo: Path):
    """A 10 ms QTimer probe on the GUI thread: the longest gap between its ticks while tokens stream."""
    window.settings.max_answer_tokens = 64
    window.worker.reconfigure(window.settings)
    add_and_wait(qtbot, window, repo)
    ask_and_wait(qtbot, window, "What does multiply do?", "kv")  # warm: model loaded, prefix cached

    gaps: list[float] = []
    streaming = {"on": False, "chunks": 0}
    clock = QElapsedTimer()
    probe = QTimer()
    probe.setInterval(10)

    def tick() -> None:
        elapsed = clock.restart()
        if streaming["on"]:
            gaps.append(elapsed)

    def on_text(_piece: str) -> None:
        streaming["chunks"] += 1
        if not streaming["on"]:
            streaming["on"] = True
            clock.restart()

    probe.timeout.connect(tick)
    clock.start()
    probe.start()
    with qtbot.waitSignal(window.chat_ctl.answer_finished, timeout=ANSWER_TIMEOUT_MS):
        job = window.ask("Explain add and multiply in detail, with examples.", "kv")
        job.text.connect(on_text)
    streaming["on"] = False
    probe.stop()
    assert streaming["chunks"] >= 5 and len(gaps) >= 5
    worst = max(gaps)
    print(f"\nGUI probe: {len(gaps)} ticks while {streaming['chunks']} chunks streamed; max gap {worst} ms")
    assert worst < 50, f"the GUI thread stalled for {worst} ms while an answer streamed"


def test_scripted_mode_saves_a_screenshot(gui_home: Path, repo: Path, tmp_path: Path):
    out = tmp_path / "shot.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([sys.executable, "-c", "from repomem.app.cli import main; main()", "gui", str(repo),
                           "--ask", "What does add do?", "--screenshot", str(out), "--mode", "kv",
                           "--timeout", "240"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.strip() == str(out)


def test_scripted_mode_with_an_unwritable_screenshot_folder_fails_at_once(gui_home: Path, repo: Path,
                                                                          tmp_path: Path):
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "shot.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([sys.executable, "-c", "from repomem.app.cli import main; main()", "gui", str(repo),
                           "--screenshot", str(out), "--timeout", "120"],
                          env=env, capture_output=True, text=True, timeout=150)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1 and "could not write the screenshot" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "timed out" not in proc.stderr


def test_scripted_mode_fails_with_one_line(gui_home: Path, repo: Path, tmp_path: Path):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "REPOMEM_MODEL": str(tmp_path / "missing.gguf")}
    proc = subprocess.run([sys.executable, "-c", "from repomem.app.cli import main; main()", "gui", str(repo),
                           "--ask", "hi", "--screenshot", str(tmp_path / "x.png")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "missing.gguf" in lines[0], proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_regenerate_stopped_midway_keeps_the_answer_it_was_to_replace(qtbot, window: MainWindow, repo: Path):
    add_and_wait(qtbot, window, repo)
    first, _ = ask_and_wait(qtbot, window, "What does add return?", "text")
    done: list = []
    window.chat_ctl.answer_finished.connect(done.append)
    window.chat_ctl.answer_failed.connect(done.append)
    window.chat.regen_button.click()
    window.chat_ctl.job.text.connect(lambda _piece: window.chat_ctl.stop())  # Stop at the first word
    qtbot.waitUntil(lambda: bool(done), timeout=ANSWER_TIMEOUT_MS)
    convs = window.stores.conversations(window.current_root())
    kept = [(m.role, m.content) for m in convs.messages(first.conversation_id)]
    assert kept == [("user", "What does add return?"), ("assistant", first.answer)]


def test_regenerate_replaces_the_last_answer(qtbot, window: MainWindow, repo: Path):
    add_and_wait(qtbot, window, repo)
    first, _ = ask_and_wait(qtbot, window, "What does add return?", "text")
    assert window.chat.regen_button.isEnabled()
    outcome: list = []
    window.chat_ctl.answer_finished.connect(outcome.append)
    window.chat_ctl.answer_failed.connect(lambda msg: outcome.append(f"failed: {msg}"))
    window.chat.regen_button.click()
    qtbot.waitUntil(lambda: bool(outcome), timeout=ANSWER_TIMEOUT_MS)
    again = outcome[0]
    assert not isinstance(again, str), again
    assert again.conversation_id == first.conversation_id
    assert [m.role for m in window.chat.view.messages] == ["user", "assistant"]
    convs = window.stores.conversations(window.current_root())
    assert [m.role for m in convs.messages(first.conversation_id)] == ["user", "assistant"]
