"""Fast GUI checks without a model: rendering, editor commands, ignore file, the Qt guard (the inspector's
filters and sort: test_gui_big_store.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from repomem.app.gui import qt_compat  # noqa: E402  (importing the package installs the guard)
from repomem.app.gui.chat_controller import answer_meta  # noqa: E402
from repomem.app.gui.chat_view import ChatMessage, ChatView, SourceRef  # noqa: E402
from repomem.app.gui.editor import editor_argv  # noqa: E402
from repomem.app.gui.markdown_render import MarkdownRenderer  # noqa: E402
from repomem.app.gui.memory_ops import add_ignore_line  # noqa: E402


def test_markdown_code_blocks_are_highlighted_and_kept_raw():
    r = MarkdownRenderer().render("Use **add**:\n\n```python\ndef add(a, b):\n    return a + b\n```\n", "copy:3:")
    assert r.code_blocks == ["def add(a, b):\n    return a + b\n"]
    assert 'href="copy:3:0"' in r.html and "<b>" not in r.html  # pygments inline styles, no raw markup
    assert "style=" in r.html and "<strong>add</strong>" in r.html


def test_markdown_escapes_html_and_survives_unclosed_fences():
    r = MarkdownRenderer().render("<script>alert(1)</script>\n\n```py\nx = 1")
    assert "<script>" not in r.html and "&lt;script&gt;" in r.html
    assert r.code_blocks == ["x = 1"]


def test_partial_fence_language_is_fast():
    import time

    md = MarkdownRenderer()
    md.render("```python\nx\n```")
    t0 = time.perf_counter()
    for prefix in ("p", "py", "pyt", "pyth", "pytho", "python", "zzzz-unknown"):
        md.render(f"text\n\n```{prefix}")
    assert time.perf_counter() - t0 < 0.2  # no lexer guessing or plugin scans per streamed prefix


def test_editor_argv_fills_placeholders_or_appends_path(tmp_path: Path):
    f = tmp_path / "a b.py"
    assert editor_argv("code -g {path}:{line}", f, 12) == ["code", "-g", f"{f}:12"]
    assert editor_argv("gedit", f, 3) == ["gedit", str(f)]
    assert editor_argv("vim +{line} {file}", f, 0) == ["vim", "+1", str(f)]
    with pytest.raises(ValueError):
        editor_argv("  ", f, 1)
    for unknown in ("code -g {path}:{line}:{column}", "vim {0}"):  # a clear message, not a crash of the click
        with pytest.raises(ValueError, match="placeholders are {path}, {file} and {line}"):
            editor_argv(unknown, f, 1)


def test_ignore_line_is_appended_once(tmp_path: Path):
    (tmp_path / ".repomemignore").write_text("build/")
    add_ignore_line(tmp_path, "src/secret.py")
    add_ignore_line(tmp_path, "src/secret.py")
    assert (tmp_path / ".repomemignore").read_text() == "build/\n/src/secret.py\n"


def test_chat_view_copy_and_source_links(qtbot):
    view = ChatView()
    qtbot.addWidget(view)
    view.add_message(ChatMessage("user", "q"))
    view.add_message(ChatMessage("assistant", streaming=True))
    for piece in ["Here:\n\n```python\n", "print(1)\n", "```\n\n- a\n- b\n"]:
        view.append_text(piece)
    qtbot.waitUntil(lambda: "print(1)" in view.toPlainText(), timeout=2000)
    view.update_last(streaming=False, sources=[SourceRef("src/a.py", 3, 9)], meta="kv")
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QGuiApplication

    view._on_anchor(QUrl("copy:1:0"))
    assert QGuiApplication.clipboard().text() == "print(1)\n"
    with qtbot.waitSignal(view.open_source) as sig:
        view._on_anchor(QUrl("src:1:0"))
    assert sig.args == ["src/a.py", 3]
    assert "src/a.py:3-9" in view.toPlainText()
    view.remove_last()
    assert "print(1)" not in view.toPlainText() and len(view.messages) == 1


def test_answer_meta_is_one_discreet_line():
    meta = answer_meta({"mode": "kv", "spliced": 3, "as_text": 1, "ttft_s": 0.314, "total_s": 2.0,
                        "stop_reason": "cancelled"})
    assert meta == "KV memory · 3 spliced, 1 as text · first token 0.31 s · 2.0 s total · stopped"


def test_qt_calls_cannot_exhaust_singleton_references():
    """Void Qt calls and emits must not be able to free None/True (PySide6 6.12 on Python 3.11)."""
    from PySide6.QtCore import QObject, Signal

    class Pinger(QObject):
        ping = Signal()

    obj = Pinger()
    for _ in range(20000):
        obj.setObjectName("x")
        obj.ping.emit()
    if sys.version_info < (3, 12):
        leaks = qt_compat.singleton_refcount_leak()
        assert sys.getrefcount(None) > 1 << 30 or leaks["None"] == 0
        assert sys.getrefcount(True) > 1 << 30 or leaks["True"] == 0


def test_first_run_explains_the_download_size(qtbot):
    from repomem.app.gui.model_setup import FirstRunDialog
    from repomem.core import models

    dialog = FirstRunDialog("model 'x' is not downloaded yet")
    qtbot.addWidget(dialog)
    text = " ".join(label.text() for label in dialog.findChildren(type(dialog.layout().itemAt(0).widget())))
    assert f"{models.spec(None).size / 1e6:,.0f} MB" in text and "not downloaded" in text


def test_download_runs_off_the_gui_thread_and_can_be_cancelled(qtbot, monkeypatch):
    import threading

    from repomem.app.gui.model_setup import start_download
    from repomem.core import models

    threads: list[str] = []

    def fake_fetch(name, *, progress=None, log=print, try_hub=None):
        threads.append(threading.current_thread().name)
        for i in range(1000):
            progress(i, 1000)
            threading.Event().wait(0.005)
        return Path("/models/x.gguf")

    monkeypatch.setattr(models, "fetch", fake_fetch)
    job = start_download(None)
    seen: list[int] = []
    job.progress.connect(lambda _s, done, _t: seen.append(done))
    qtbot.waitUntil(lambda: len(seen) > 3, timeout=5000)
    with qtbot.waitSignal(job.cancelled, timeout=5000):
        job.cancel.set()
    assert threads and threads[0] != threading.main_thread().name
    assert max(seen) < 999
