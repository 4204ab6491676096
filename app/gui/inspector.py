"""The memory inspector: every MemCube of a repository, its details and history, and the user's controls.

Why it exists: a memory the user cannot see cannot be trusted. The table answers "what does it
remember, in what form (text or compiled KV), how fresh, how used"; the detail pane shows the exact
text, its lines, its versions and payload; the actions let the user pin what matters, forget what must
go now, exclude a path for good (`.repomemignore`), recompile, and edit a note (the memories an agent
or the user wrote: their text is the user's to correct). Reads and pin/forget run on
short-lived threads against a store of their own; exclude and recompile go through the memory worker.
The table is lazy (`cube_table`): a store of any size lists at once, and a cube's text is read only
when it is selected.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTableView,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import memory_ops as ops
from .cube_table import COLUMN_INDEX, CubeFilter, CubeTableModel, Fetch, human_age, human_bytes
from .jobs import Job
from .memory_worker import MemoryWorker
from .records import pick

KINDS = ("", "plaintext", "activation", "parameter")
STATUSES = ("", "active", "stale", "archived")


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "—"


class CubeDetail(QWidget):
    """Everything about one cube: fields, text, version history."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = QLabel("Select a memory")
        self.title.setWordWrap(True)
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.fields = QFormLayout()
        self._labels: dict[str, QLabel] = {}
        for key, label in (("form", "Form"), ("lines", "Lines"), ("version", "Version"), ("tokens", "Tokens"),
                           ("payload", "Payload"), ("usage", "Usage"), ("times", "Updated"), ("id", "Id")):
            value = QLabel("—")
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            value.setWordWrap(True)
            self._labels[key] = value
            self.fields.addRow(f"{label}:", value)
        self.text = QPlainTextEdit()
        self.text.setObjectName("cubeText")
        self.text.setReadOnly(True)
        self.text.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        mono = QFont("DejaVu Sans Mono")
        mono.setStyleHint(QFont.StyleHint.Monospace)
        self.text.setFont(mono)
        self.history = QTreeWidget()
        self.history.setObjectName("cubeHistory")
        self.history.setHeaderLabels(["When", "Event", "Version", "Lines", "Detail"])
        self.history.setRootIsDecorated(False)
        self.history.setMaximumHeight(150)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addLayout(self.fields)
        layout.addWidget(self.text, 1)
        layout.addWidget(QLabel("History"))
        layout.addWidget(self.history)

    def show_cube(self, cube: Any, history: list[Any]) -> None:
        if cube is None:
            self.clear()
            return
        g = lambda *names, default=None: pick(cube, *names, default=default)  # noqa: E731
        sym = g("symbol", default="") or ""
        self.title.setText(f"<b>{g('path', default='')}</b>{' — ' + sym if sym else ''}")
        archived = " (archived for the disk budget)" if g("archived_at") else ""
        self._labels["form"].setText(f"{g('kind')} · {g('status')}{archived} · source {g('source')}"
                                     f"{' · pinned' if g('pinned') else ''}")
        self._labels["lines"].setText(f"{g('start_line')}–{g('end_line')} ({g('language') or 'text'}, "
                                      f"{g('chunk_kind') or 'chunk'})")
        self._labels["version"].setText(str(g("version", default=1)))
        tokens, kept = g("tokens"), g("kept_tokens")
        self._labels["tokens"].setText(
            f"{tokens:,} tokens, {kept:,} kept" if tokens else "not compiled")
        self._labels["payload"].setText(
            f"{human_bytes(g('payload_bytes'))} · {g('encoding') or '—'} · model {str(g('model_fingerprint'))[:12]}"
            if g("payload_bytes") else "none (text only)")
        self._labels["usage"].setText(f"used {g('access_count', default=0)}×, last {human_age(g('last_access'))}"
                                      f" · importance {float(g('importance', default=0)):.2f}")
        self._labels["times"].setText(f"{_when(g('updated'))} (created {_when(g('created'))})")
        self._labels["id"].setText(str(g("id")))
        self.text.setPlainText(str(g("text", default="")))
        self.text.setReadOnly(g("source") != "note")
        self.text.document().setModified(False)
        self.history.clear()
        for ev in reversed(history):
            e = lambda *names, default=None, ev=ev: pick(ev, *names, default=default)  # noqa: E731
            lines = f"{e('start_line')}–{e('end_line')}" if e("start_line") else ""
            detail = e("detail", default={}) or {}
            text = ", ".join(f"{k}={v}" for k, v in detail.items()) if isinstance(detail, dict) else str(detail)
            self.history.addTopLevelItem(QTreeWidgetItem(
                [_when(e("at")), str(e("event")), str(e("version", default="")), lines, text]))
        for i in range(4):
            self.history.resizeColumnToContents(i)

    def clear(self) -> None:
        self.title.setText("Select a memory")
        for label in self._labels.values():
            label.setText("—")
        self.text.clear()
        self.history.clear()


class Inspector(QWidget):
    """`error(message)` reports failures; `changed()` fires after an action altered the memory."""

    error = Signal(str)
    changed = Signal()

    def __init__(self, worker: MemoryWorker, stores: ops.StoreAccess, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.worker, self.stores = worker, stores
        self.root = ""
        self.model = CubeTableModel()
        self._selected: str = ""
        self._current_cube: Any = None
        self.closed = False  # set at shutdown: late job results must not touch deleted widgets

        self.kind = QComboBox()
        for k in KINDS:
            self.kind.addItem(k or "any kind", k)
        self.status = QComboBox()
        for s in STATUSES:
            self.status.addItem(s or "any status", s)
        self.file = QLineEdit()
        self.file.setPlaceholderText("file contains…")
        self.symbol = QLineEdit()
        self.symbol.setPlaceholderText("symbol contains…")
        self.count = QLabel("")
        self.count.setStyleSheet("color: #6e7781")
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(150)
        self._debounce.timeout.connect(self._apply_filter)
        self.kind.currentIndexChanged.connect(self._debounce.start)
        self.status.currentIndexChanged.connect(self._debounce.start)
        self.file.textChanged.connect(self._debounce.start)
        self.symbol.textChanged.connect(self._debounce.start)
        filters = QHBoxLayout()
        for w in (self.kind, self.status, self.file, self.symbol):
            filters.addWidget(w)
        filters.addWidget(self.count, 1)
        filters.addWidget(self.refresh_button)

        self.table = QTableView()
        self.table.setObjectName("cubeTable")
        self.table.setModel(self.model)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(COLUMN_INDEX["last_access"], Qt.SortOrder.DescendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setColumnWidth(0, 220)
        self.table.setColumnWidth(1, 140)
        self.table.selectionModel().selectionChanged.connect(self._on_selection)
        self.model.modelReset.connect(self._reselect)
        self.model.listed.connect(self._update_count)

        self.detail = CubeDetail()
        self.pin_button = QPushButton("Pin")
        self.pin_button.setToolTip("Pinned memories are compiled first and never archived")
        self.pin_button.clicked.connect(self.toggle_pin)
        self.forget_button = QPushButton("Forget")
        self.forget_button.setToolTip("Delete this memory now")
        self.forget_button.clicked.connect(self._confirm_forget)
        self.exclude_button = QPushButton("Exclude path")
        self.exclude_button.setToolTip("Add this file to .repomemignore and drop its memories")
        self.exclude_button.clicked.connect(self._confirm_exclude)
        self.recompile_button = QPushButton("Recompile")
        self.recompile_button.setToolTip("Compile this memory to KV again")
        self.recompile_button.clicked.connect(self.recompile_selected)
        self.save_note_button = QPushButton("Save note")
        self.save_note_button.setToolTip("Keep your edit of this note (secrets are refused)")
        self.save_note_button.clicked.connect(self.save_note)
        self.detail.text.modificationChanged.connect(lambda _m: self._update_actions())
        actions = QHBoxLayout()
        for b in (self.pin_button, self.forget_button, self.exclude_button, self.recompile_button,
                  self.save_note_button):
            actions.addWidget(b)
        actions.addStretch(1)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.detail, 1)
        right_layout.addLayout(actions)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.table)
        split.addWidget(right)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(filters)
        layout.addWidget(split, 1)
        self._update_actions()

    # -- loading -------------------------------------------------------------------------------
    @property
    def loading(self) -> bool:
        return self.model.loading

    def set_root(self, root: str) -> None:
        if root == self.root:
            self.refresh()
            return
        self.root = root
        self._selected = ""
        self.detail.clear()
        self.model.set_source(self._fetcher(root) if root else None)

    def refresh(self) -> None:
        if self.root:
            self.model.reload()

    def _fetcher(self, root: str) -> Fetch:
        def fetch(fn: Any, done: Any, failed: Any) -> None:
            job = self.stores.run(root, fn, "inspector rows")
            job.succeeded.connect(lambda result: None if self.closed else done(result))
            job.failed.connect(lambda message: None if self.closed else (failed(), self.error.emit(message)))

        return fetch

    def _failed(self, message: str) -> None:
        if not self.closed:
            self.error.emit(message)

    def _apply_filter(self) -> None:
        self.model.set_filter(CubeFilter(kind=self.kind.currentData(), status=self.status.currentData(),
                                         file=self.file.text().strip(), symbol=self.symbol.text().strip()))

    def set_filter(self, **kw: str) -> None:
        """Set filters programmatically (tests, links from the chat) and list again now, without the debounce."""
        for name, widget in (("kind", self.kind), ("status", self.status)):
            if name in kw:
                widget.setCurrentIndex(max(0, widget.findData(kw[name])))
        if "file" in kw:
            self.file.setText(kw["file"])
        if "symbol" in kw:
            self.symbol.setText(kw["symbol"])
        self._debounce.stop()
        self._apply_filter()

    def _update_count(self) -> None:
        self.count.setText(f"{self.model.rowCount():,} of {self.model.store_total:,} memories")

    # -- selection and detail ------------------------------------------------------------------
    def select(self, cube_id: str) -> None:
        row = self.model.row_of(cube_id)
        if row >= 0:
            self.table.selectRow(row)

    def _on_selection(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        cube_id = self.model.cube_id(rows[0].row()) if rows else ""
        if cube_id == self._selected and cube_id:
            return
        self._selected = cube_id
        self._current_cube = None
        self._update_actions()
        if cube_id:
            self._load_detail(cube_id)
        else:
            self.detail.clear()

    def _reselect(self) -> None:
        if self._selected:
            row = self.model.row_of(self._selected)
            if row >= 0:
                QTimer.singleShot(0, lambda r=row: self.table.selectRow(r))
            else:
                self._selected = ""
                self.detail.clear()
                self._update_actions()

    def _load_detail(self, cube_id: str) -> None:
        job = self.stores.run(self.root, ops.cube_detail(cube_id), "cube detail")
        job.succeeded.connect(lambda res, cid=cube_id: self._show_detail(cid, res))
        job.failed.connect(self._failed)

    def _show_detail(self, cube_id: str, result: tuple[Any, list[Any]]) -> None:
        if cube_id != self._selected or self.closed:
            return
        cube, history = result
        self._current_cube = cube
        self.detail.show_cube(cube, history)
        self._update_actions()

    def _update_actions(self) -> None:
        has = bool(self._selected)
        for b in (self.pin_button, self.forget_button, self.exclude_button, self.recompile_button):
            b.setEnabled(has)
        pinned = bool(pick(self._current_cube, "pinned", default=False)) if self._current_cube else False
        self.pin_button.setText("Unpin" if pinned else "Pin")
        source = pick(self._current_cube, "source", default="code") if self._current_cube else "code"
        self.exclude_button.setEnabled(has and source == "code")
        self.save_note_button.setVisible(has and source == "note")
        self.save_note_button.setEnabled(has and source == "note" and self.detail.text.document().isModified())

    # -- actions -------------------------------------------------------------------------------
    def toggle_pin(self) -> Job | None:
        if not self._selected:
            return None
        pinned = not bool(pick(self._current_cube, "pinned", default=False)) if self._current_cube else True
        return self._act(ops.pin_cube(self._selected, pinned), "pin", reload_detail=True)

    def forget_selected(self) -> Job | None:
        """Delete the selected cube now (no confirmation: the button asks first)."""
        cube_id = self._selected
        if not cube_id:
            return None
        job = self._act(ops.forget_cube(cube_id), "forget")
        job.succeeded.connect(lambda _ok, cid=cube_id: None if self.closed else self.model.drop(cid))
        return job

    def exclude_selected(self) -> Job | None:
        path = str(pick(self._current_cube, "path", default="")) if self._current_cube else ""
        if not path:
            return None
        job = self.worker.call(self.root, ops.exclude_path(path), name="exclude path")
        job.succeeded.connect(lambda _summary: None if self.closed else (self.refresh(), self.changed.emit()))
        job.failed.connect(self._failed)
        return job

    def recompile_selected(self) -> Job | None:
        if not self._selected:
            return None
        job = self.worker.call(self.root, ops.recompile(self._selected), name="recompile")
        job.succeeded.connect(lambda _n: None if self.closed else (self.refresh(), self.changed.emit()))
        job.failed.connect(self._failed)
        return job

    def save_note(self) -> Job | None:
        """Replace the selected note's text with the edited one (through the memory: re-indexed, checked)."""
        cube_id, text = self._selected, self.detail.text.toPlainText()
        if not cube_id or pick(self._current_cube, "source", default="") != "note":
            return None
        job = self.worker.call(self.root, ops.edit_note(cube_id, text), name="edit note")

        def saved(_cube: Any) -> None:
            if self.closed:
                return
            if cube_id == self._selected:
                self._load_detail(cube_id)
            self.refresh()
            self.changed.emit()

        job.succeeded.connect(saved)
        job.failed.connect(self._failed)
        return job

    def _act(self, fn: Any, name: str, reload_detail: bool = False) -> Job:
        job = self.stores.run(self.root, fn, name)
        cube_id = self._selected

        def done(_result: Any) -> None:
            if self.closed:
                return
            if reload_detail and cube_id == self._selected:
                self._load_detail(cube_id)
            self.refresh()
            self.changed.emit()

        job.succeeded.connect(done)
        job.failed.connect(self._failed)
        return job

    def _confirm_forget(self) -> None:
        if QMessageBox.question(self, "Forget memory", "Delete this memory now? It is re-created only if "
                                "its code is indexed again.") == QMessageBox.StandardButton.Yes:
            self.forget_selected()

    def _confirm_exclude(self) -> None:
        path = str(pick(self._current_cube, "path", default="")) if self._current_cube else ""
        if path and QMessageBox.question(
                self, "Exclude path", f"Add {path} to .repomemignore and drop its memories?"
        ) == QMessageBox.StandardButton.Yes:
            self.exclude_selected()
