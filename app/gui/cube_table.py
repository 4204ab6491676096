"""Table model of MemCubes for the inspector: filter by kind, status, file, symbol; sort by any column.

Why it is lazy: a monorepo's store holds a cube for every definition, and reading them all (or even
building a Python row for each) would hold the GUI thread for seconds. The store filters and sorts in SQL and
hands back only the ordered ids; the fields of a row (never its text) are read a page at a time, on a
worker thread, when the view first shows it, and at most `CACHED_ROWS` of them stay in memory. A row
not read yet shows a placeholder until its page arrives.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt, Signal

from . import memory_ops as ops
from .records import pick

Index = QModelIndex | QPersistentModelIndex
#: `fetch(fn, done, failed)`: run `fn(cube_store, job)` off the GUI thread, then call `done(result)`
#: (or `failed()`) back on the GUI thread.
Fetch = Callable[[Callable[[Any, Any], Any], Callable[[Any], None], Callable[[], None]], None]
_ROLES = frozenset(int(r) for r in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.TextAlignmentRole,
                                    Qt.ItemDataRole.ToolTipRole, Qt.ItemDataRole.UserRole))
PAGE = 200  # rows read per query
CACHED_ROWS = 2000  # rows kept in memory at most: several screens, never the whole store


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


class CubeTableModel(QAbstractTableModel):
    """Rows of one store, read lazily through `fetch` (see the module doc); `listed()` fires when a new
    listing (after `set_source`, `reload`, a filter or a sort) is in place."""

    listed = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.filter = CubeFilter()
        self.sort_column = COLUMN_INDEX["last_access"]
        self.sort_order = Qt.SortOrder.DescendingOrder
        self.store_total = 0  # cubes in the store, whatever the filter
        self.loading = False
        self._fetch: Fetch | None = None
        self._ids: list[str] = []  # the listing: every matching cube, in display order
        self._rows: OrderedDict[str, CubeRow] = OrderedDict()  # least recently shown first, for eviction
        self._gone: set[str] = set()  # listed, but no longer in the store when its page was read
        self._pending: set[int] = set()  # pages asked for and not back yet
        self._generation = 0  # bumped by each listing: answers to an older one are dropped

    # -- data in -------------------------------------------------------------------------------
    def set_source(self, fetch: Fetch | None) -> None:
        """Read another store from now on (None: list nothing)."""
        self._fetch = fetch
        self._rows.clear()
        self.reload()

    def set_filter(self, flt: CubeFilter) -> None:
        self.filter = flt
        self.reload()

    def reload(self) -> None:
        """List again (the store, the filter or the sort changed). The rows shown last are read again in the
        same query, so a refresh does not blank what is on screen."""
        self._generation += 1
        self._pending.clear()
        gen = self._generation
        if self._fetch is None:
            self._install(gen, ([], 0, []))
            return
        self.loading = True
        query = dict(kind=self.filter.kind, status=self.filter.status, path_contains=self.filter.file,
                     symbol_contains=self.filter.symbol, order_by=COLUMNS[self.sort_column].key,
                     descending=self.sort_order == Qt.SortOrder.DescendingOrder)
        shown_last = list(itertools.islice(reversed(self._rows), 2 * PAGE))
        self._fetch(ops.cube_listing(query, shown_last, PAGE, CubeRow.from_cube),
                    lambda result: self._install(gen, result), lambda: self._listing_failed(gen))

    def drop(self, cube_id: str) -> None:
        row = self.row_of(cube_id)
        if row < 0:
            return
        self.beginRemoveRows(QModelIndex(), row, row)
        del self._ids[row]
        self._rows.pop(cube_id, None)
        self.store_total -= 1
        self.endRemoveRows()

    def _install(self, gen: int, listing: tuple[list[str], int, list[CubeRow]]) -> None:
        if gen != self._generation:
            return
        ids, total, rows = listing
        self.beginResetModel()
        self._ids, self.store_total = ids, total
        self._rows = OrderedDict((r.id, r) for r in rows)
        self._gone = set()
        self.loading = False
        self.endResetModel()
        self.listed.emit()

    def _listing_failed(self, gen: int) -> None:
        if gen == self._generation:
            self.loading = False

    def _want(self, page: int) -> None:
        """Read the fields of one page of rows (once: a failed page is not asked again until a new listing)."""
        if page in self._pending or self._fetch is None:
            return
        ids = [i for i in self._ids[page * PAGE:(page + 1) * PAGE] if i not in self._rows and i not in self._gone]
        if not ids:
            return
        self._pending.add(page)
        gen = self._generation
        self._fetch(ops.cube_window(ids, CubeRow.from_cube),
                    lambda rows: self._arrived(gen, page, ids, rows), lambda: None)

    def _arrived(self, gen: int, page: int, asked: list[str], rows: list[CubeRow]) -> None:
        if gen != self._generation:
            return
        self._pending.discard(page)
        for r in rows:
            self._rows[r.id] = r
        self._gone.update(set(asked) - {r.id for r in rows})
        while len(self._rows) > CACHED_ROWS:
            self._rows.popitem(last=False)
        if self._ids:  # one range: the view repaints what it shows, whichever rows moved meanwhile
            self.dataChanged.emit(self.index(0, 0), self.index(len(self._ids) - 1, len(COLUMNS) - 1))

    # -- rows ----------------------------------------------------------------------------------
    def cube_id(self, row: int) -> str:
        return self._ids[row]

    def row(self, row: int) -> CubeRow | None:
        """The fields of a row if they have been read (None: not yet, or the cube is gone)."""
        return self._rows.get(self._ids[row])

    def row_of(self, cube_id: str) -> int:
        try:
            return self._ids.index(cube_id)
        except ValueError:
            return -1

    # -- Qt model API --------------------------------------------------------------------------
    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802, B008 - Qt API
        return 0 if parent.isValid() else len(self._ids)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802, B008 - Qt API
        return 0 if parent.isValid() else len(COLUMNS)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if role not in _ROLES or not index.isValid():  # the view asks every cell for many roles, on every paint
            return None
        cube_id, col = self._ids[index.row()], COLUMNS[index.column()]
        if role == Qt.ItemDataRole.UserRole:
            return cube_id
        row = self._rows.get(cube_id)
        if row is None:
            if cube_id not in self._gone:
                self._want(index.row() // PAGE)
            if role == Qt.ItemDataRole.DisplayRole and index.column() == 0:
                return "(forgotten)" if cube_id in self._gone else "…"
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            self._rows.move_to_end(cube_id)
            return row.display(col.key)
        if role == Qt.ItemDataRole.TextAlignmentRole and col.align_right:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ToolTipRole and col.key == "location":
            return f"{row.location}\n{row.id}"
        return None

    def headerData(self, section: int, orientation: Qt.Orientation,  # noqa: N802 - Qt API
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section].title
        return None

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        self.sort_column, self.sort_order = column, order
        self.reload()
