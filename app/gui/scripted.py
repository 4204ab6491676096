"""`repomem gui PATH --ask QUESTION --screenshot OUT.png`: drive the real window once, then exit.

Why: tests, documentation screenshots and bug reports need the actual app doing the actual thing
(index in the worker, stream an answer with sources, its evidence lines expanded) without a person
clicking. Every failure ends the run with a one-line message and a non-zero exit code instead of a
window left open.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QTimer
from PySide6.QtWidgets import QApplication

from . import memory_ops as ops
from .main_window import MainWindow
from .records import pick

SETTLE_MS = 400  # let the last refresh, the sources and the conversation list land before the grab


class ScriptedRun(QObject):
    def __init__(self, window: MainWindow, path: str, question: str | None, screenshot: str | None,
                 mode: str | None, timeout_s: float = 0, panel: str | None = None) -> None:
        super().__init__(window)
        self.window, self.path, self.question = window, path, question
        self.screenshot, self.mode, self.panel = screenshot, mode, panel
        self.root = ""
        self.exit_code: int | None = None
        self.message = ""
        self.answer: Any = None
        if timeout_s > 0:
            QTimer.singleShot(int(timeout_s * 1000), lambda: self.fail(f"timed out after {timeout_s:g} s"))

    def start(self) -> None:
        try:
            self.root = self.window.add_repository(self.path, persist=False)
        except OSError as exc:
            self.fail(str(exc))
            return
        self.window.repos.ready.connect(self._ready)
        self.window.repos.error.connect(self._repo_error)

    def _ready(self, root: str) -> None:
        if root != self.root or self.exit_code is not None:
            return
        if self.panel == "connect":
            self._connect()
            return
        if not self.question:
            if self.panel == "memory":
                self.window.tabs.setCurrentWidget(self.window.inspector)
            QTimer.singleShot(SETTLE_MS, self._capture)
            return
        self.window.chat_ctl.answer_finished.connect(self._answered)
        self.window.chat_ctl.answer_failed.connect(lambda msg: self.fail(f"answer failed: {msg}"))
        mode = self.mode or self.window.chat.current_mode()
        if mode != "kv":
            self._ask()
            return
        # "compile if needed": the memories this question retrieves are compiled first, so the
        # answer really splices KV instead of falling back to text for cubes not compiled yet.
        job = self.window.worker.call(root, ops.compile_for(self.question), name="compile for question")
        job.finished.connect(self._ask)

    def _connect(self) -> None:
        """The "Connect an editor" panel with its server running, its snippets filled in."""
        panel = self.window.connect_panel
        self.window.tabs.setCurrentWidget(panel)
        panel.error.connect(lambda msg: self.fail(msg))
        panel.running_changed.connect(lambda running: QTimer.singleShot(SETTLE_MS, self._capture) if running
                                      else self.fail("the server stopped"))
        if panel.start() is None:
            self.fail("could not start the server (no repository?)")

    def _ask(self) -> None:
        if self.exit_code is None and self.window.ask(self.question or "", self.mode or "") is None:
            self.fail("could not ask (no repository selected)")

    def _repo_error(self, message: str) -> None:
        if self.root and Path(self.root).name in message and self.root not in self.window.repos.ready_roots:
            self.fail(message)

    def _answered(self, answer: Any) -> None:
        self.answer = answer
        if not str(pick(answer, "answer", default="")).strip():
            self.fail("the model returned an empty answer")
            return
        # the picture shows the lines the answer came from, as a click on its evidence line does
        view = self.window.chat.view
        view.show_evidence(len(view.messages) - 1)
        QTimer.singleShot(SETTLE_MS, self._capture)

    def _capture(self) -> None:
        if self.exit_code is not None:
            return
        self.window.chat.view.flush()
        if self.screenshot:
            out = Path(self.screenshot).expanduser()
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # in a slot: raised, it would leave the run waiting for its timeout
                self.fail(f"could not write the screenshot to {out}: {exc}")
                return
            if not self.window.grab().save(str(out)):
                self.fail(f"could not write the screenshot to {out}")
                return
        self.finish(0, "")

    def fail(self, message: str) -> None:
        self.finish(1, message)

    def finish(self, code: int, message: str) -> None:
        if self.exit_code is not None:
            return
        self.exit_code, self.message = code, message
        app = QApplication.instance()
        if app is not None:
            app.exit(code)
