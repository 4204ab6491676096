"""Table model of MemCubes for the inspector: filter by kind, status, file, symbol; sort by any column.

Why filtering and sorting live in the model instead of a QSortFilterProxyModel: a proxy calls a
Python `filterAcceptsRow` once per row, which for a large repository (tens of thousands of cubes)
holds the GUI thread far too long. One list comprehension and one `sorted` over plain tuples do the
same work without a Python call per row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt

from .records import pick

Index = QModelIndex | QPersistentModelIndex


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    align_right: bool = False


COLUMNS = (
    Column("location", "Location"),
    Column("symbol", "Symbol"),
    Column("kind", "Kind"),
    Column("status", "Status"),
    Column("source", "Source"),
    Column("pinned", "Pinned"),
    Column("tokens", "Tokens", True),
    Column("kept_tokens", "Kept", True),
    Column("payload_bytes", "Size", True),
    Column("importance", "Importance", True),
    Column("access_count", "Uses", True),
    Column("last_access", "Last access", True),
)
COLUMN_INDEX = {c.key: i for i, c in enumerate(COLUMNS)}


def human_bytes(n: int | None) -> str:
    if not n:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def human_age(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "never"
    delta = max(0.0, (now or time.time()) - ts)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if delta >= size:
            return f"{delta / size:.0f} {unit} ago"
    return "just now"


@dataclass
class CubeRow:
    """The fields the table shows, read once from a core `Cube` (whatever its exact shape)."""

    id: str
    path: str
    start_line: int
    end_line: int
    symbol: str
    kind: str
    status: str
    source: str
    pinned: bool
    tokens: int
    kept_tokens: int
    payload_bytes: int
    importance: float
    access_count: int
    last_access: float
    archived: bool

    @classmethod
    def from_cube(cls, cube: Any) -> CubeRow:
        return cls(
            id=str(pick(cube, "id")), path=str(pick(cube, "path", default="")),
            start_line=int(pick(cube, "start_line", default=1)), end_line=int(pick(cube, "end_line", default=1)),
            symbol=str(pick(cube, "symbol", default="") or ""), kind=str(pick(cube, "kind", default="")),
            status=str(pick(cube, "status", default="")), source=str(pick(cube, "source", default="")),
            pinned=bool(pick(cube, "pinned", default=False)), tokens=int(pick(cube, "tokens", default=0) or 0),
            kept_tokens=int(pick(cube, "kept_tokens", default=0) or 0),
            payload_bytes=int(pick(cube, "payload_bytes", default=0) or 0),
            importance=float(pick(cube, "importance", default=0.0) or 0.0),
            access_count=int(pick(cube, "access_count", default=0) or 0),
            last_access=float(pick(cube, "last_access", default=0.0) or 0.0),
            archived=pick(cube, "archived_at") is not None,
        )

    @property
    def location(self) -> str:
        return f"{self.path}:{self.start_line}-{self.end_line}"

    def sort_key(self, key: str) -> Any:
        if key == "location":
            return (self.path, self.start_line)
        return getattr(self, key)

    def display(self, key: str) -> str:
        if key == "location":
            return self.location
        if key == "payload_bytes":
            return human_bytes(self.payload_bytes)
        if key == "last_access":
            return human_age(self.last_access)
        if key == "importance":
            return f"{self.importance:.2f}"
        if key == "pinned":
            return "📌" if self.pinned else ""
        if key == "status" and self.archived and self.status == "active":
            return "archived (budget)"
        if key in ("tokens", "kept_tokens", "access_count"):
            value = getattr(self, key)
            return f"{value:,}" if value else "—"
        return str(getattr(self, key))


@dataclass
class CubeFilter:
    kind: str = ""  # "" = any
    status: str = ""  # "" = any; "archived" also matches cubes archived for the disk budget
    file: str = ""  # substring of the path
    symbol: str = ""  # substring of the symbol

    def accepts(self, row: CubeRow) -> bool:
        if self.kind and row.kind != self.kind:
            return False
        if self.status:
            if self.status == "archived":
                if not (row.status == "archived" or row.archived):
                    return False
            elif row.status != self.status or (self.status == "active" and row.archived):
                return False
        if self.file and self.file.lower() not in row.path.lower():
            return False
        return not (self.symbol and self.symbol.lower() not in row.symbol.lower())


class CubeTableModel(QAbstractTableModel):
    def __init__(self) -> None:
        super().__init__()
        self.all_rows: list[CubeRow] = []
        self.rows: list[CubeRow] = []
        self.filter = CubeFilter()
        self.sort_column = COLUMN_INDEX["last_access"]
        self.sort_order = Qt.SortOrder.DescendingOrder

    # -- data in -------------------------------------------------------------------------------
    def set_cubes(self, cubes: list[Any]) -> None:
        self.all_rows = [CubeRow.from_cube(c) for c in cubes]
        self._apply()

    def set_filter(self, flt: CubeFilter) -> None:
        self.filter = flt
        self._apply()

    def drop(self, cube_id: str) -> None:
        self.all_rows = [r for r in self.all_rows if r.id != cube_id]
        self._apply()

    def row_of(self, cube_id: str) -> int:
        for i, r in enumerate(self.rows):
            if r.id == cube_id:
                return i
        return -1

    def _apply(self) -> None:
        self.beginResetModel()
        key = COLUMNS[self.sort_column].key
        rows = [r for r in self.all_rows if self.filter.accepts(r)]
        rows.sort(key=lambda r: r.sort_key(key), reverse=self.sort_order == Qt.SortOrder.DescendingOrder)
        self.rows = rows
        self.endResetModel()

    # -- Qt model API --------------------------------------------------------------------------
    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802, B008 - Qt API
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802, B008 - Qt API
        return 0 if parent.isValid() else len(COLUMNS)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        row, col = self.rows[index.row()], COLUMNS[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return row.display(col.key)
        if role == Qt.ItemDataRole.TextAlignmentRole and col.align_right:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ToolTipRole and col.key == "location":
            return f"{row.location}\n{row.id}"
        if role == Qt.ItemDataRole.UserRole:
            return row.id
        return None

    def headerData(self, section: int, orientation: Qt.Orientation,  # noqa: N802 - Qt API
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section].title
        return None

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        self.sort_column, self.sort_order = column, order
        self._apply()
