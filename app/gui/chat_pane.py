"""The chat pane: transcript, question box, send / stop / regenerate, memory mode, scope (this repository or
all open ones), time to first token.

Why it only emits requests: asking runs on the memory worker; the main window owns that job and
feeds the streamed text back through `ChatView`. The pane's only state is "is an answer streaming".
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .chat_view import ChatView

MODE_LABELS = {
    "kv": "Memory: KV (spliced)",
    "text": "Memory: text",
    "none": "No memory",
}
MODE_TIPS = {
    "kv": "Compiled memories are spliced into the model's KV cache: fastest first token",
    "text": "Retrieved code is placed in the prompt as text (classic RAG)",
    "none": "Ask the model alone, without the repository's memory",
}
SCOPE_LABELS = {
    "repo": "This repository",
    "all": "All open repositories",
}
SCOPE_TIP = ("Answer from this repository's memory, or from the memories of every repository open here "
             "(each source then names its repository)")


class QuestionBox(QPlainTextEdit):
    """Enter sends, Shift+Enter starts a new line (as in every chat app)."""

    submitted = Signal()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not (
                event.modifiers() & Qt.KeyboardModifier.ShiftModifier):
            self.submitted.emit()
            return
        super().keyPressEvent(event)


class ChatPane(QWidget):
    ask_requested = Signal(str, str)  # question, mode
    stop_requested = Signal()
    regenerate_requested = Signal(str)  # mode

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.view = ChatView()
        self.view.setObjectName("chatView")
        self.view.setPlaceholderText("Ask anything about this repository. Answers stream in with the code "
                                     "they come from: click a path:line to open it in your editor.")
        self.input = QuestionBox()
        self.input.setObjectName("questionBox")
        self.input.setPlaceholderText("Ask about this repository…  (Enter to send, Shift+Enter for a new line)")
        self.input.setFixedHeight(72)
        self.input.submitted.connect(self.submit)
        self.mode = QComboBox()
        self.mode.setObjectName("modeCombo")
        for key, label in MODE_LABELS.items():
            self.mode.addItem(label, key)
            self.mode.setItemData(self.mode.count() - 1, MODE_TIPS[key], Qt.ItemDataRole.ToolTipRole)
        self.scope = QComboBox()
        self.scope.setObjectName("scopeCombo")
        self.scope.setToolTip(SCOPE_TIP)
        for key, label in SCOPE_LABELS.items():
            self.scope.addItem(label, key)
        self.send_button = QPushButton("Send")
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.submit)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop_requested)
        self.regen_button = QPushButton("Regenerate")
        self.regen_button.setToolTip("Ask the last question again and replace its answer")
        self.regen_button.clicked.connect(lambda: self.regenerate_requested.emit(self.current_mode()))
        self.timing = QLabel("")
        self.timing.setObjectName("ttftLabel")
        self.timing.setStyleSheet("color: #6e7781; font-size: 11px")
        bar = QHBoxLayout()
        bar.addWidget(self.mode)
        bar.addWidget(self.scope)
        bar.addWidget(self.timing, 1)
        bar.addWidget(self.regen_button)
        bar.addWidget(self.stop_button)
        bar.addWidget(self.send_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.view, 1)
        layout.addWidget(self.input)
        layout.addLayout(bar)
        self.set_streaming(False)
        self.set_enabled_for_repo(False)

    def current_mode(self) -> str:
        return str(self.mode.currentData())

    def current_scope(self) -> str:
        """"repo" (this repository) or "all" (every open repository)."""
        return str(self.scope.currentData())

    def set_scope(self, scope: str) -> None:
        i = self.scope.findData(scope)
        if i >= 0:
            self.scope.setCurrentIndex(i)

    def set_mode(self, mode: str) -> None:
        i = self.mode.findData(mode)
        if i >= 0:
            self.mode.setCurrentIndex(i)

    def set_streaming(self, streaming: bool) -> None:
        self.streaming = streaming
        self.stop_button.setEnabled(streaming)
        self.send_button.setEnabled(not streaming and self._has_repo())
        self.regen_button.setEnabled(not streaming and self._has_repo() and self._has_exchange())

    def set_enabled_for_repo(self, has_repo: bool) -> None:
        self._repo = has_repo
        self.input.setEnabled(has_repo)
        self.input.setPlaceholderText(
            "Ask about this repository…  (Enter to send, Shift+Enter for a new line)" if has_repo
            else "Add a repository (left) to start")
        self.set_streaming(getattr(self, "streaming", False))

    def submit(self) -> None:
        question = self.input.toPlainText().strip()
        if not question or self.streaming or not self._has_repo():
            return
        self.input.clear()
        self.ask_requested.emit(question, self.current_mode())

    def _has_repo(self) -> bool:
        return getattr(self, "_repo", False)

    def _has_exchange(self) -> bool:
        return any(m.role == "user" for m in self.view.messages)
