"""The conversations of the current repository (persisted by core's ConversationStore).

Why a separate widget: it only shows a list and asks for changes by signal; the main window runs
them on the memory worker, so this never touches a database and never blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .records import pick

ID_ROLE = Qt.ItemDataRole.UserRole


class ConversationList(QWidget):
    """`selected(id)` ("" = a new, unsaved conversation); new/rename/delete are requests."""

    selected = Signal(str)
    new_requested = Signal()
    rename_requested = Signal(str, str)
    delete_requested = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.list = QListWidget()
        self.list.setObjectName("conversationList")
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.itemSelectionChanged.connect(self._on_selection)
        self.list.itemDoubleClicked.connect(lambda _item: self._rename())
        self.new_button = QPushButton("New")
        self.new_button.setToolTip("Start a new conversation")
        self.new_button.clicked.connect(self.new_requested)
        self.rename_button = QPushButton("Rename")
        self.rename_button.clicked.connect(self._rename)
        self.delete_button = QPushButton("Delete")
        self.delete_button.clicked.connect(self._delete)
        buttons = QHBoxLayout()
        for b in (self.new_button, self.rename_button, self.delete_button):
            buttons.addWidget(b)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QLabel("<b>Conversations</b>"))
        layout.addWidget(self.list, 1)
        layout.addLayout(buttons)
        self._quiet = False

    def set_conversations(self, conversations: Sequence[Any], current: str = "") -> None:
        """Replace the list (newest first, as core returns it) and keep `current` selected."""
        self._quiet = True
        try:
            self.list.clear()
            for conv in conversations:
                title = str(pick(conv, "title", default="Untitled"))
                item = QListWidgetItem(title)
                item.setToolTip(title)
                item.setData(ID_ROLE, str(pick(conv, "id")))
                self.list.addItem(item)
                if item.data(ID_ROLE) == current:
                    self.list.setCurrentItem(item)
        finally:
            self._quiet = False

    def current_id(self) -> str:
        item = self.list.currentItem()
        return str(item.data(ID_ROLE)) if item is not None and item.isSelected() else ""

    def clear_selection(self) -> None:
        self._quiet = True
        self.list.clearSelection()
        self.list.setCurrentItem(None)
        self._quiet = False

    def _on_selection(self) -> None:
        if not self._quiet:
            self.selected.emit(self.current_id())

    def _rename(self) -> None:
        cid = self.current_id()
        if not cid:
            return
        title, ok = QInputDialog.getText(self, "Rename conversation", "Title:",
                                         text=self.list.currentItem().text())
        if ok and title.strip():
            self.rename_requested.emit(cid, title.strip())

    def _delete(self) -> None:
        cid = self.current_id()
        if not cid:
            return
        answer = QMessageBox.question(self, "Delete conversation",
                                      f"Delete “{self.list.currentItem().text()}” and its messages?")
        if answer == QMessageBox.StandardButton.Yes:
            self.delete_requested.emit(cid)
