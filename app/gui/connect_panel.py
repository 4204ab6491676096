"""The "Connect an editor" panel: run repomem's server inside the app and show filled-in configuration.

Why in the app: the people repomem is for work in an editor; the app already holds the model and
the memories, so serving them from here needs no terminal. The server listens on 127.0.0.1 only (an
address other machines can reach takes an API key: `repomem serve --host ... --api-key ...`). It
starts on a short-lived thread (opening memories and watchers takes a moment) and serves from a
thread of its own, so the window never waits on it. The snippets are those of `repomem.app.server.
snippets`, filled in with this server's address, models, key and repositories.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtGui import QFont, QFontMetrics
from PySide6.QtWidgets import (
    QApplication,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .jobs import Job, run_detached

HOST = "127.0.0.1"


class SnippetBox(QFrame):
    """One client's configuration: where it goes, the text, a Copy button."""

    copied = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("snippetBox")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.title = QLabel()
        self.where = QLabel()
        self.where.setStyleSheet("color: #6e7781")
        self.where.setWordWrap(True)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        mono = QFont("DejaVu Sans Mono")
        mono.setStyleHint(QFont.StyleHint.Monospace)
        mono.setPointSizeF(max(8.0, mono.pointSizeF() * 0.9))
        self.text.setFont(mono)
        self.copy_button = QPushButton("Copy")
        self.copy_button.clicked.connect(self.copy)
        head = QHBoxLayout()
        head.addWidget(self.title)
        head.addStretch(1)
        head.addWidget(self.copy_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 8, 10, 10)
        layout.addLayout(head)
        layout.addWidget(self.where)
        layout.addWidget(self.text)
        layout.addStretch(1)  # boxes in a row share a height; their content stays at the top

    def set_snippet(self, snippet: Any) -> None:
        self.title.setText(f"<b>{snippet.client}</b>")
        self.where.setText(snippet.where)
        text = snippet.text.rstrip("\n")  # a last empty line would only add a scroll step
        if self.text.toPlainText() != text:
            self.text.setPlainText(text)
        lines = text.count("\n") + 1
        margins = 2 * (self.text.document().documentMargin() + self.text.frameWidth())
        scrollbar = self.text.horizontalScrollBar().sizeHint().height()  # long paths scroll sideways
        line = max(self.text.blockBoundingRect(self.text.document().firstBlock()).height(),
                   QFontMetrics(self.text.font()).lineSpacing())
        self.text.setFixedHeight(int(line * min(lines, 18) + margins + scrollbar + 2))

    def copy(self) -> None:
        QApplication.clipboard().setText(self.text.toPlainText())
        self.copied.emit(self.title.text().replace("<b>", "").replace("</b>", ""))


class ConnectPanel(QWidget):
    """`roots()` lists the repositories to serve; `settings()` the app's current settings."""

    error = Signal(str)
    running_changed = Signal(bool)
    copied = Signal(str)

    def __init__(self, settings: Callable[[], Any], roots: Callable[[], list[str]], *, watch: bool = True,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._settings, self._roots, self.watch = settings, roots, watch
        self.server: Any = None  # repomem.app.server.runner.ServerThread while running
        self.busy = False
        self.closed = False

        title = QLabel("<h3 style='margin:0'>Connect an editor</h3>")
        intro = QLabel("Serve this app's memory to your editor: chat clients (Continue, Aider) get answers with the "
                       "repository's compiled memory spliced in; agents (VS Code, Claude Desktop) get search, "
                       "ask, recent changes and notes as MCP tools. Only programs on this computer can connect.")
        intro.setWordWrap(True)
        intro.setStyleSheet("color: #57606a")
        self.status = QLabel()
        self.status.setObjectName("serverStatus")
        self.status.setWordWrap(True)
        self.port = QSpinBox()
        self.port.setRange(1, 65535)
        self.port.setValue(int(settings().server_port))
        self.port.setPrefix(f"{HOST}:")
        self.port.valueChanged.connect(self._refresh_snippets)
        self.toggle = QPushButton()
        self.toggle.setObjectName("serverToggle")
        self.toggle.clicked.connect(self._toggle)
        controls = QHBoxLayout()
        controls.addWidget(self.status, 1)
        controls.addWidget(self.port)
        controls.addWidget(self.toggle)

        self.boxes = [SnippetBox() for _ in range(4)]
        grid = QGridLayout()
        grid.setHorizontalSpacing(10)
        grid.setVerticalSpacing(10)
        for i, box in enumerate(self.boxes):
            box.copied.connect(self.copied)
            grid.addWidget(box, i // 2, i % 2)
        holder = QWidget()
        inner = QVBoxLayout(holder)
        inner.setContentsMargins(0, 0, 0, 0)
        inner.addLayout(grid)
        inner.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(holder)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 8, 10, 8)
        layout.addWidget(title)
        layout.addWidget(intro)
        layout.addLayout(controls)
        layout.addWidget(scroll, 1)
        self._show_state()

    # -- state ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.server is not None and self.server.running

    def url(self) -> str:
        return self.server.url if self.server is not None else f"http://{HOST}:{self.port.value()}"

    def _show_state(self, note: str = "") -> None:
        if self.busy:
            self.toggle.setEnabled(False)
        else:
            self.toggle.setEnabled(True)
        self.toggle.setText("Stop server" if self.running else "Start server")
        self.port.setEnabled(not self.running and not self.busy)
        if self.running:
            models = ", ".join(r.model_id for r in self.server.service.repos.repos)
            self.status.setText(f"<span style='color:#1a7f37'>●</span> Serving <b>{models}</b> at "
                                f"<code>{self.url()}/v1</code> · MCP at <code>{self.url()}/mcp</code>")
        else:
            self.status.setText(note or "<span style='color:#6e7781'>●</span> Server stopped. Start it, then paste "
                                        "a configuration below into your editor.")
        self._refresh_snippets()

    def _refresh_snippets(self) -> None:
        from repomem.app.server.repos import model_ids
        from repomem.app.server.snippets import editor_snippets

        roots = self._roots()
        models = ([r.model_id for r in self.server.service.repos.repos] if self.running
                  else model_ids(roots) or ["repomem"])
        key = self._settings().server_api_key
        for box, snippet in zip(self.boxes, editor_snippets(self.url(), models, roots, key), strict=True):
            box.set_snippet(snippet)

    # -- start / stop --------------------------------------------------------------------------
    def _toggle(self) -> None:
        if self.running:
            self.stop()
        else:
            self.start()

    def start(self) -> Job | None:
        roots = self._roots()
        if self.busy or self.running:
            return None
        if not roots:
            self._show_state("Add a repository first: the server serves the repositories in the sidebar.")
            return None
        settings, port, watch = self._settings(), self.port.value(), self.watch

        def start(_job: Job) -> Any:
            from repomem.app.server.config import ServeConfig
            from repomem.app.server.runner import ServerThread, Service

            config = ServeConfig(host=HOST, port=port, api_key=settings.server_api_key,
                                 cors_origins=list(settings.server_cors_origins))
            return ServerThread(Service.open(roots, config, settings=settings, watch=watch)).start()

        return self._run(start, "start server", self._started)

    def stop(self) -> Job | None:
        server = self.server
        if self.busy or server is None:
            return None
        self.server = None
        return self._run(lambda _job: server.stop(), "stop server", lambda _r: None)

    def _run(self, fn: Callable[[Job], Any], name: str, done: Callable[[Any], None]) -> Job:
        self.busy = True
        self._show_state("Starting…" if name == "start server" else "Stopping…")
        job = run_detached(Job(fn, name=name))

        def finished() -> None:
            if self.closed:
                return
            self.busy = False
            self._show_state(self._failure)
            self.running_changed.emit(self.running)

        def failed(message: str) -> None:
            self._failure = f"<span style='color:#cf222e'>●</span> Could not start: {message}"
            self.error.emit(f"server: {message}")

        self._failure = ""
        job.succeeded.connect(done)
        job.failed.connect(failed)
        job.finished.connect(finished)
        return job

    def _started(self, server: Any) -> None:
        if self.closed:  # the window closed while it was starting
            server.stop()
        else:
            self.server = server

    def shutdown(self) -> None:
        """The app is closing: stop the server now (it would die with the process anyway, uncleanly)."""
        self.closed = True
        server, self.server = self.server, None
        if server is not None:
            server.stop()
