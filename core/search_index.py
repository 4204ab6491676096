"""The search index of one store, kept in step with it and saved beside it.

`SearchIndex` owns a `retrieval.BM25Index` and, for every cube the index reflects, the cube's *stamp*
(`CubeStore.cube_stamps`: updated time, status, version and lines) as it was when the cube was read.
`sync()` compares those stamps with the store's and re-reads only the cubes whose stamp differs, so
changes made by other processes (the watcher, the CLI) or while this one was closed are applied as a
delta. Opening loads the last saved index (`index_file`) and syncs it the same way: the file may be
old, but the index that comes out of `open()` is exactly what the store holds. A missing, damaged or
foreign file, or one so old that most cubes changed, means a rebuild from the store instead.

Saving writes the whole index (`save()`), so it happens when it pays: after a full index run, and on
`close()` once enough changes have piled up that replaying them at the next start would cost more
than writing the file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import index_file
from .cube import Cube
from .retrieval import BM25Index, Hit
from .store import CubeStore

log = logging.getLogger(__name__)

Stamp = tuple[float, str, int, int, int]  # CubeStore.cube_stamps(): updated, status, version, start, end

# Replaying a change at open costs about a thousandth of writing the whole file, so a few hundred
# pending changes are cheaper to replay than to save.
SAVE_AFTER_CHANGES = 500
# When more than this share of the store (and more than REBUILD_MIN cubes) changed since the file was
# written, build afresh: replaying would remove and re-add nearly every document.
REBUILD_SHARE = 0.25
REBUILD_MIN = 1000


def stamp_of(cube: Cube) -> Stamp:
    return (cube.updated, cube.status, cube.version, cube.start_line, cube.end_line)


@dataclass
class OpenReport:
    """How `SearchIndex.open` got its index, for logs and `repomem bench scale`."""

    source: str  # "file" or "rebuilt"
    reason: str  # why it rebuilt ("" when the file was used)
    applied: int  # cubes re-read to catch up with the store
    seconds: float


class SearchIndex:
    """A store's BM25 index with the stamps that say which version of each cube it holds."""

    def __init__(self, store: CubeStore, path: Path | None = None) -> None:
        self.store = store
        self.path = path if path is not None else index_file.path_for(store.dir)
        self.bm25 = BM25Index()
        self._stamps: dict[str, Stamp] = {}
        self._lock = threading.RLock()
        self._data_version = -1
        self._unsaved = 0  # changes the file on disk does not have
        self._rebuilt = ""  # why the last sync built the index afresh ("" when it did not)
        self.report = OpenReport("rebuilt", "not opened", 0, 0.0)

    @classmethod
    def open(cls, store: CubeStore, path: Path | None = None) -> SearchIndex:
        """Load the saved index and bring it up to date with the store (or build it from the store)."""
        t0 = time.perf_counter()
        index = cls(store, path)
        source, reason = "rebuilt", ""
        try:
            state, stamps = index_file.load(index.path)
        except index_file.IndexFileInvalid as exc:
            reason = str(exc)
        else:
            index.bm25.restore_state(state)
            index._stamps = stamps
            source = "file"
        applied = index.sync(rebuild_reason=reason)
        if index._rebuilt:
            source, reason = "rebuilt", index._rebuilt
        index.report = OpenReport(source, reason, applied, round(time.perf_counter() - t0, 3))
        if source == "rebuilt":
            log.info("search index rebuilt from the store (%s)", reason)
        return index

    # ---- keeping in step with the store -----------------------------------------------------

    def sync(self, *, rebuild_reason: str = "") -> int:
        """Re-read the cubes whose stamp changed since this index read them. A no-op unless the
        database changed under another connection (or this is the first sync). Returns how many."""
        with self._lock:
            version = self.store.data_version()  # before the stamps: a later commit shows up next time
            if version == self._data_version:
                return 0
            self._rebuilt = ""
            applied = self._apply_stamps(rebuild_reason)
            self._data_version = version  # only once applied: a read that failed is tried again next time
            return applied

    def _apply_stamps(self, rebuild_reason: str) -> int:
        """Read the stamps and apply what changed (or rebuild); caller holds the lock."""
        stamps = self.store.cube_stamps()
        gone = [cid for cid in self._stamps if cid not in stamps]
        changed = [cid for cid, st in stamps.items() if self._stamps.get(cid) != st]
        n_changes = len(gone) + len(changed)
        if self._stamps and n_changes > max(REBUILD_SHARE * len(stamps), REBUILD_MIN):
            rebuild_reason = rebuild_reason or f"{n_changes} of {len(stamps)} cubes changed"
            self.bm25, self._stamps = BM25Index(), {}
        if not self._stamps:
            self._rebuilt = rebuild_reason or "no index yet"
            self._read_rows(self.store.search_rows())
            self._unsaved = len(self._stamps) or self._unsaved
            self.bm25.flush()
            return len(self._stamps)
        for cid in gone:
            self._drop(cid)
        if changed:
            self._read_rows(self.store.search_rows(changed), expected=changed)
        self._unsaved += len(gone) + len(changed)
        return len(gone) + len(changed)

    def refresh_ids(self, ids: Iterable[str]) -> None:
        """Re-read these cubes now (this process just changed them)."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return
        with self._lock:
            self._read_rows(self.store.search_rows(ids), expected=ids)
            self._unsaved += len(ids)

    def add_cube(self, cube: Cube) -> None:
        """Index a cube this process just wrote (a note), without reading it back."""
        with self._lock:
            self._put(cube.id, stamp_of(cube), cube.text, cube.path, cube.symbol, cube.start_line, cube.end_line)
            self._unsaved += 1

    def _read_rows(self, pages: Iterable[list[tuple]], expected: Iterable[str] = ()) -> None:
        seen: set[str] = set()
        for rows in pages:
            for cid, stamp, text, path, symbol, start, end in rows:
                seen.add(cid)
                if stamp[1] == "archived":
                    if cid in self.bm25:
                        self.bm25.remove(cid)
                    self._stamps[cid] = stamp
                else:
                    self._put(cid, stamp, text, path, symbol, start, end)
        for cid in expected:
            if cid not in seen:  # deleted meanwhile
                self._drop(cid)

    def _put(self, cid: str, stamp: Stamp, text: str, path: str, symbol: str | None, start: int, end: int) -> None:
        self.bm25.update(cid, text, path, symbol or "", start_line=start, end_line=end)
        self._stamps[cid] = stamp

    def _drop(self, cid: str) -> None:
        if cid in self.bm25:
            self.bm25.remove(cid)
        self._stamps.pop(cid, None)

    # ---- reading ------------------------------------------------------------------------------

    def search(self, query: str, k: int = 5) -> list[Hit]:
        return self.bm25.search(query, k=k)

    def __len__(self) -> int:
        return len(self.bm25)

    def __contains__(self, cube_id: object) -> bool:
        return cube_id in self.bm25

    # ---- saving -------------------------------------------------------------------------------

    def save(self, *, min_changes: int = 1) -> bool:
        """Write the index file when at least `min_changes` changes are unsaved. A failure (read-only
        or full disk) is logged, not raised: the file is a cache. Returns whether it was written."""
        with self._lock:
            if self._unsaved < min_changes:
                return False
            state = self.bm25.export_state()
            stamps = dict(self._stamps)
            unsaved, self._unsaved = self._unsaved, 0
        try:
            index_file.save(self.path, state, stamps)
        except OSError as exc:
            with self._lock:
                self._unsaved += unsaved
            log.warning("could not save the search index to %s: %s", self.path, exc)
            return False
        return True

    def close(self) -> None:
        """Save if replaying the unsaved changes at the next open would cost more than saving now."""
        self.save(min_changes=SAVE_AFTER_CHANGES)
