"""The repositories sidebar: which repositories the app remembers and what state each memory is in.

Why the state is shown per repository: the memory is only useful if the user can see that it is
current: how much is indexed, how much is compiled to KV, what is stale (compiled by another model)
or archived (over the disk budget), what is left to compile and about how long that takes, whether a
watcher keeps it up to date, and what runs right now.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from repomem.core import describe_backlog

ROOT_ROLE = Qt.ItemDataRole.UserRole


@dataclass
class RepoState:
    """What the sidebar shows for one repository (filled from store stats and watcher status)."""

    root: str
    files: int = 0
    cubes: int = 0
    compiled: int = 0
    stale: int = 0
    archived: int = 0
    watcher: str = "not watched"  # "watching", "syncing", "stopped", "crashed", "not watched", ...
    activity: str = ""  # "indexing", "compiling", "" when idle
    done: int = 0
    total: int = 0
    error: str = ""
    backlog: dict[str, Any] | None = None  # what is left to compile ({cubes, tokens, tokens_per_s, eta_s})

    @property
    def name(self) -> str:
        return Path(self.root).name or self.root

    def summary(self) -> str:
        parts = [f"{self.files:,} files · {self.cubes:,} cubes · {self.compiled:,} compiled"]
        extra = []
        if self.stale:
            extra.append(f"{self.stale:,} stale")
        if self.archived:
            extra.append(f"{self.archived:,} archived")
        if extra:
            parts.append(" · ".join(extra))
        if self.backlog is not None:
            parts.append(describe_backlog(self.backlog))
        status = self.watcher
        if self.activity:
            status = f"{self.activity} {self.done:,}/{self.total:,}" if self.total else self.activity
        parts.append(status)
        if self.error:
            parts.append(f"⚠ {self.error}")
        return "\n".join(parts)


class RepoSidebar(QWidget):
    """List of repositories with add/remove; emits the chosen repository's root."""

    add_requested = Signal(str)
    remove_requested = Signal(str)
    current_changed = Signal(str)  # "" when none

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.states: dict[str, RepoState] = {}
        title = QLabel("<b>Repositories</b>")
        self.list = QListWidget()
        self.list.setObjectName("repoList")
        self.list.setWordWrap(True)
        self.list.setSpacing(2)
        self.list.currentItemChanged.connect(self._on_current)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setMaximumHeight(16)
        self.progress.hide()
        self.add_button = QPushButton("Add…")
        self.add_button.setToolTip("Add a repository folder")
        self.add_button.clicked.connect(self._pick_folder)
        self.remove_button = QPushButton("Remove")
        self.remove_button.setToolTip("Forget this repository in the app (its memory stays on disk)")
        self.remove_button.clicked.connect(self._remove_current)
        buttons = QHBoxLayout()
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(title)
        layout.addWidget(self.list, 1)
        layout.addWidget(self.progress)
        layout.addLayout(buttons)

    # -- model ---------------------------------------------------------------------------------
    def set_state(self, state: RepoState) -> None:
        """Add or refresh one repository's row."""
        self.states[state.root] = state
        item = self._item(state.root)
        if item is None:
            item = QListWidgetItem()
            item.setData(ROOT_ROLE, state.root)
            self.list.addItem(item)
            if self.list.currentItem() is None:
                self.list.setCurrentItem(item)
        item.setText(f"{state.name}\n{state.summary()}")
        item.setToolTip(state.root)
        if state.root == self.current_root():
            self._show_progress(state)

    def remove(self, root: str) -> None:
        self.states.pop(root, None)
        item = self._item(root)
        if item is not None:
            self.list.takeItem(self.list.row(item))
        if self.list.count() == 0:
            self.current_changed.emit("")

    def current_root(self) -> str:
        item = self.list.currentItem()
        return str(item.data(ROOT_ROLE)) if item is not None else ""

    def select(self, root: str) -> None:
        item = self._item(root)
        if item is not None:
            self.list.setCurrentItem(item)

    def roots(self) -> list[str]:
        return [str(self.list.item(i).data(ROOT_ROLE)) for i in range(self.list.count())]

    # -- internals -----------------------------------------------------------------------------
    def _item(self, root: str) -> QListWidgetItem | None:
        for i in range(self.list.count()):
            item = self.list.item(i)
            if item.data(ROOT_ROLE) == root:
                return item
        return None

    def _show_progress(self, state: RepoState) -> None:
        if state.activity and state.total:
            self.progress.setRange(0, state.total)
            self.progress.setValue(min(state.done, state.total))
            self.progress.setFormat(f"{state.activity} %v/%m")
            self.progress.show()
        elif state.activity:
            self.progress.setRange(0, 0)  # busy indicator
            self.progress.show()
        else:
            self.progress.hide()

    def _on_current(self, current: QListWidgetItem | None, _previous: QListWidgetItem | None) -> None:
        root = str(current.data(ROOT_ROLE)) if current is not None else ""
        if root in self.states:
            self._show_progress(self.states[root])
        self.current_changed.emit(root)

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Add a repository", str(Path.home()))
        if folder:
            self.add_requested.emit(folder)

    def _remove_current(self) -> None:
        root = self.current_root()
        if root:
            self.remove_requested.emit(root)
