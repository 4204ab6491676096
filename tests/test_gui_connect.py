"""The app's "Connect an editor" panel and the notes agents write, offscreen with real widgets.

The panel starts a real server inside the app (checked with the `openai` SDK), shows configuration
filled in with that server, copies it, and stops it; the scripted run opens the panel for a screenshot.
A note written through the memory shows up in the inspector, where the user edits it (a secret is
refused) and forgets it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("PySide6")

from PySide6.QtWidgets import QApplication  # noqa: E402

from repomem.app.gui.main_window import MainWindow  # noqa: E402
from repomem.core import settings as settings_mod  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "calc"
    root.mkdir()
    (root / "calc.py").write_text('"""A tiny calculator."""\n\n\ndef add(a, b):\n    """Sum."""\n    return a + b\n')
    return root


@pytest.fixture
def gui_home(home: Path, test_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REPOMEM_MODEL", str(test_model_path))
    settings_mod.save(settings_mod.Settings(max_answer_tokens=8, n_ctx=2048, memory_tokens=800, n_threads=1,
                                            server_port=_free_port()))
    return home


@pytest.fixture
def window(qtbot, gui_home: Path):
    win = MainWindow(watch=False, tray=False)
    qtbot.addWidget(win)
    win.resize(1280, 820)
    win.show()
    yield win
    win.shutdown()


def _add(qtbot, win: MainWindow, repo: Path) -> str:
    with qtbot.waitSignal(win.repos.ready, timeout=60_000):
        root = win.add_repository(repo)
    return root


def test_connect_panel_starts_the_server_shows_filled_in_snippets_and_stops(qtbot, window: MainWindow,
                                                                             repo: Path) -> None:
    _add(qtbot, window, repo)
    panel = window.connect_panel
    window.tabs.setCurrentWidget(panel)
    port = window.settings.server_port
    assert panel.toggle.text() == "Start server"
    with qtbot.waitSignal(panel.running_changed, timeout=60_000) as started:
        panel.toggle.click()
    assert started.args == [True] and panel.running
    url = f"http://127.0.0.1:{port}"
    assert "Serving" in panel.status.text() and "repomem/calc" in panel.status.text()
    texts = {box.title.text(): box.text.toPlainText() for box in panel.boxes}
    assert f"apiBase: {url}/v1" in texts["<b>Continue</b>"] and "model: repomem/calc" in texts["<b>Continue</b>"]
    assert f"OPENAI_API_BASE={url}/v1" in texts["<b>Aider</b>"] and "openai/repomem/calc" in texts["<b>Aider</b>"]
    assert f'"url": "{url}/mcp"' in texts["<b>VS Code</b>"]
    assert str(repo) in texts["<b>Claude Desktop</b>"] and '"mcp"' in texts["<b>Claude Desktop</b>"]

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    assert client.models.list().data[0].id == "repomem/calc"
    panel.boxes[1].copy_button.click()
    assert QApplication.clipboard().text() == texts["<b>Aider</b>"]

    with qtbot.waitSignal(panel.running_changed, timeout=60_000) as stopped:
        panel.toggle.click()
    assert stopped.args == [False] and panel.toggle.text() == "Start server"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


def test_connect_panel_reports_a_port_in_use(qtbot, window: MainWindow, repo: Path) -> None:
    _add(qtbot, window, repo)
    panel = window.connect_panel
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        panel.port.setValue(busy.getsockname()[1])
        with qtbot.waitSignal(panel.error, timeout=60_000) as err:
            panel.start()
        qtbot.waitUntil(lambda: not panel.busy, timeout=10_000)
    assert "cannot listen" in err.args[0] and not panel.running
    assert "Could not start" in panel.status.text()


def test_inspector_shows_edits_and_forgets_a_note(qtbot, window: MainWindow, repo: Path) -> None:
    from repomem.core.memory import RepoMemory

    root = _add(qtbot, window, repo)
    mem = RepoMemory.open(repo, settings=window.settings)
    note = mem.remember("We decided add stays integer-only.", ["calc.py"])
    mem.close()
    window.tabs.setCurrentWidget(window.inspector)
    insp = window.inspector
    insp.refresh()
    qtbot.waitUntil(lambda: insp.model.row_of(note.id) >= 0 and not insp.loading, timeout=10_000)
    insp.select(note.id)
    qtbot.waitUntil(lambda: "integer-only" in insp.detail.text.toPlainText(), timeout=10_000)
    assert not insp.detail.text.isReadOnly() and insp.save_note_button.isVisible()
    assert not insp.save_note_button.isEnabled()  # nothing edited yet

    _type(insp.detail.text, 'We decided add stays integer-only. api_key = "k3Y9x7Qz2w8Lm4Np6R"')
    assert insp.save_note_button.isEnabled()
    with qtbot.waitSignal(insp.error, timeout=60_000) as refused:
        insp.save_note()
    assert "secret" in refused.args[0]
    _type(insp.detail.text, "We decided add accepts floats too.")
    with qtbot.waitSignal(insp.changed, timeout=60_000):
        insp.save_note()

    from repomem.core import paths
    from repomem.core.store import CubeStore

    with CubeStore.open(paths.repo_dir(Path(root))) as store:
        cube = store.get(note.id)
        assert cube.text == "We decided add accepts floats too." and cube.version == 2
    qtbot.waitUntil(lambda: "floats" in insp.detail.text.toPlainText() and not insp.save_note_button.isEnabled()
                    and not insp.loading, timeout=10_000)
    qtbot.wait(100)  # the reloaded table re-selects the note first
    code = next(insp.model.cube_id(i) for i in range(insp.model.rowCount()) if insp.model.row(i).source == "code")
    insp.select(code)
    qtbot.waitUntil(lambda: insp.detail.text.isReadOnly() and not insp.save_note_button.isVisible(), timeout=10_000)
    insp.select(note.id)
    qtbot.waitUntil(lambda: "floats" in insp.detail.text.toPlainText(), timeout=10_000)
    with qtbot.waitSignal(insp.changed, timeout=10_000):
        insp.forget_selected()
    with CubeStore.open(paths.repo_dir(Path(root))) as store:
        assert store.get(note.id) is None


def _type(edit, text: str) -> None:
    """Replace the text the way typing does (a programmatic setPlainText is not an edit)."""
    edit.selectAll()
    edit.insertPlainText(text)


def test_scripted_run_opens_the_connect_panel_for_a_screenshot(gui_home: Path, repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "connect.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([sys.executable, "-c", "from repomem.app.cli import main; main()", "gui", str(repo),
                           "--screenshot", str(out), "--panel", "connect", "--timeout", "240"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.strip().splitlines()[-1] == str(out)
