"""The MemCube store of one repository: SQLite rows (what each memory is) + payloads (its KV).

Why this shape (MemOS): every memory is a *cube* with a type (`plaintext` text only,
`activation` text plus a compiled KV payload, `parameter` reserved), provenance (`source`:
code / conversation / change / note, a fact or decision an agent or the user asked to keep),
lifecycle (`status`: active / stale / archived), usage (access counts, last access, importance,
pinned) and a version history. Payload bytes live outside the database in a `payloads.PayloadStore`,
found by their sha256, so the database stays small and a payload is written once.

Three layers, one class for callers: `store_base.StoreBase` opens the database and runs every change
as one short transaction (crash safety, locking, concurrency: its docstring);
`store_lifecycle.PayloadLifecycle` gives cubes compiled memory and takes it away (the shelf, the disk
budget); `CubeStore` here holds the cubes themselves: code chunks, notes, usage and queries.

Identity: a code cube's id is derived from (repo, path, symbol, chunk kind, ordinal), so
re-indexing the same definition updates the same cube (and bumps its version) instead of making
a new one; a definition that comes back after being removed reactivates its old cube.

Lifecycle words used in `history.event`: created, updated (text changed: version+1, payload
dropped), moved (same text, new lines), removed (gone from its file: status archived), reactivated,
compiled (payload attached), archived (payload dropped for the budget; text stays retrievable),
promoted (an archived cube may be compiled again), stale / fresh (payload belongs to another
model / to the current one again), demoted (payload file missing or corrupt), pinned, unpinned,
forgotten (row deleted by the user), note (a conversation/change note was added), edited (a note's
text was changed by hand: version+1).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from repomem.core.cube import SOURCES, VISIBILITIES, Cube, FileRecord, HistoryEvent, UpsertResult, cube_id_for
from repomem.core.payloads import PayloadCorrupt, PayloadMissing
from repomem.core.store_base import CUBE_COLUMNS, PAYLOAD_CLEAR, STALE_TO_ACTIVE
from repomem.core.store_lifecycle import PayloadLifecycle

__all__ = ["CubeStore", "PayloadCorrupt", "PayloadMissing"]

_STAMP_SQL = "updated, status, version, start_line, end_line"


class CubeStore(PayloadLifecycle):
    """One repository's cubes. Create with `CubeStore.open(store_dir)`; close with `close()`.

    The layers below: `store_base.StoreBase` (opening, transactions), `store_lifecycle.PayloadLifecycle`
    (payloads and the disk budget). This one holds the cubes themselves: code, notes, usage, queries."""

    # ---- code cubes ---------------------------------------------------------------------------

    def upsert_chunks(
        self,
        path: str,
        chunks: Sequence[Any],
        repo: str = "",
        file_sha: str | None = None,
        source: str = "code",
        visibility: str = "shared",
        *,
        mtime: float | None = None,
        size: int | None = None,
        owner: str | None = None,
    ) -> UpsertResult:
        """Make the cubes of `path` match `chunks` (objects with the `chunking.Chunk` fields).

        Matching, in order: same (symbol, kind, text) -> unchanged (or moved: line numbers
        updated, payload kept); same (symbol, kind) -> updated (version+1, back to plaintext,
        payload unlinked for GC); else a new cube, or the reactivation of an archived one with
        the same identity. Cubes with no chunk left are archived (`removed`). With `file_sha`
        the `files` row is written in the same transaction, so a crash never records a file as
        indexed without its cubes.
        """
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}")
        if visibility not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {VISIBILITIES}")
        chunks = list(chunks)

        def run(conn: sqlite3.Connection) -> UpsertResult:
            now = time.time()
            res = UpsertResult()
            existing = [Cube.from_row(r) for r in self._dict_rows(
                conn, "SELECT * FROM cubes WHERE path = ? AND source = ?", (path, source))]
            by_id = {c.id: c for c in existing}
            live = [c for c in existing if c.status != "archived"]
            matched: dict[int, Cube] = {}
            free = list(live)

            def take(pred: Callable[[Cube], bool], chunk: Any) -> Cube | None:
                cands = [c for c in free if pred(c)]
                if not cands:
                    return None
                best = min(cands, key=lambda c: abs(c.start_line - chunk.start_line))
                free.remove(best)
                return best

            for i, ch in enumerate(chunks):
                h = ch.content_hash
                got = take(
                    lambda c, ch=ch, h=h: c.symbol == ch.symbol and c.chunk_kind == ch.kind and c.content_hash == h, ch
                )
                if got is not None:
                    matched[i] = got
            for i, ch in enumerate(chunks):
                if i in matched:
                    continue
                got = take(lambda c, ch=ch: c.symbol == ch.symbol and c.chunk_kind == ch.kind, ch)
                if got is not None:
                    matched[i] = got

            taken_ids = {c.id for c in live}
            for i, ch in enumerate(chunks):
                h = ch.content_hash
                old = matched.get(i)
                if old is not None and old.content_hash == h:
                    if (old.start_line, old.end_line) != (ch.start_line, ch.end_line):
                        conn.execute(
                            "UPDATE cubes SET start_line = ?, end_line = ?, language = ?, visibility = ? WHERE id = ?",
                            (ch.start_line, ch.end_line, ch.language, visibility, old.id),
                        )
                        self._history(
                            conn,
                            old,
                            "moved",
                            now,
                            {"from": [old.start_line, old.end_line]},
                            start_line=ch.start_line,
                            end_line=ch.end_line,
                        )
                        res.moved.append(old.id)
                    else:
                        res.unchanged.append(old.id)
                    continue
                if old is not None:
                    self._replace_text(conn, old, ch, now, visibility, "updated", {"old_hash": old.content_hash})
                    res.updated.append(old.id)
                    continue
                ordinal = 0
                while True:
                    cid = cube_id_for(repo, path, ch.symbol, ch.kind, ordinal)
                    if cid not in taken_ids:
                        break
                    ordinal += 1
                taken_ids.add(cid)
                prior = by_id.get(cid)
                if prior is not None:  # archived earlier: the same definition is back
                    self._replace_text(
                        conn,
                        prior,
                        ch,
                        now,
                        visibility,
                        "reactivated",
                        {"old_hash": prior.content_hash},
                        bump=prior.content_hash != h,
                    )
                    res.reactivated.append(cid)
                    continue
                cube = Cube(
                    id=cid,
                    kind="plaintext",
                    repo=repo,
                    path=path,
                    symbol=ch.symbol,
                    language=ch.language,
                    chunk_kind=ch.kind,
                    start_line=ch.start_line,
                    end_line=ch.end_line,
                    text=ch.text,
                    content_hash=h,
                    version=1,
                    created=now,
                    updated=now,
                    owner=owner,
                    source=source,
                    visibility=visibility,
                    status="active",
                )
                self._insert(conn, cube)
                self._history(conn, cube, "created", now)
                res.created.append(cid)

            for old in free:
                self._let_go(conn, old, now, shelve=True)
                conn.execute(
                    f"UPDATE cubes SET status = 'archived', {PAYLOAD_CLEAR}, updated = ? WHERE id = ?",
                    (now, old.id),
                )
                self._history(conn, old, "removed", now, {"reason": "gone from file"})
                res.removed.append(old.id)

            if file_sha is not None:
                self._set_file(path, file_sha, mtime, size, now)
            return res

        return self._write(run)

    def _replace_text(
        self,
        conn: sqlite3.Connection,
        old: Cube,
        ch: Any,
        now: float,
        visibility: str,
        event: str,
        detail: dict[str, Any],
        bump: bool = True,
    ) -> None:
        version = old.version + 1 if bump else old.version
        self._let_go(conn, old, now, shelve=True)
        conn.execute(
            f"UPDATE cubes SET text = ?, content_hash = ?, start_line = ?, end_line = ?, language = ?, "
            f"symbol = ?, chunk_kind = ?, version = ?, updated = ?, status = 'active', visibility = ?, "
            f"archived_at = NULL, tokens = NULL, {PAYLOAD_CLEAR} WHERE id = ?",
            (
                ch.text,
                ch.content_hash,
                ch.start_line,
                ch.end_line,
                ch.language,
                ch.symbol,
                ch.kind,
                version,
                now,
                visibility,
                old.id,
            ),
        )
        self._history(
            conn,
            old,
            event,
            now,
            detail,
            version=version,
            content_hash=ch.content_hash,
            start_line=ch.start_line,
            end_line=ch.end_line,
        )

    def remove_file(self, path: str, source: str = "code") -> list[str]:
        """A file was deleted or became ignored: archive its cubes and forget its `files` row."""

        def run(conn: sqlite3.Connection) -> list[str]:
            now = time.time()
            gone = self._dict_rows(
                conn, "SELECT * FROM cubes WHERE path = ? AND source = ? AND status != 'archived'", (path, source))
            for row in gone:
                self._let_go(conn, row, now, shelve=True)
                conn.execute(
                    f"UPDATE cubes SET status = 'archived', {PAYLOAD_CLEAR}, updated = ? WHERE id = ?",
                    (now, row["id"]),
                )
                self._history(conn, row, "removed", now, {"reason": "file removed"})
            conn.execute("DELETE FROM files WHERE path = ?", (path,))
            return [r["id"] for r in gone]

        return self._write(run)

    # ---- notes ----------------------------------------------------------------------------------

    def add_note_cube(
        self,
        text: str,
        source: str,
        *,
        path: str | None = None,
        symbol: str | None = None,
        repo: str = "",
        owner: str | None = None,
        visibility: str = "local",
        importance: float = 0.5,
        pinned: bool = False,
        language: str | None = None,
    ) -> Cube:
        """A plaintext memory not tied to a file's lines: a conversation takeaway or a change note.

        `path` defaults to `<source>:<id>` (e.g. `conversation:3f2a...`); a change note would use
        `change:<file path>` so it can be found with the file.
        """
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}")
        if not text.strip():
            raise ValueError("a note needs text")
        cid = uuid.uuid4().hex
        now = time.time()
        cube = Cube(
            id=cid,
            kind="plaintext",
            repo=repo,
            path=path or f"{source}:{cid}",
            symbol=symbol,
            language=language,
            chunk_kind="note",
            start_line=1,
            end_line=max(1, len(text.splitlines())),
            text=text,
            content_hash=hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
            version=1,
            created=now,
            updated=now,
            importance=float(importance),
            pinned=bool(pinned),
            owner=owner,
            source=source,
            visibility=visibility,
            status="active",
        )

        def run(conn: sqlite3.Connection) -> Cube:
            self._insert(conn, cube)
            self._history(conn, cube, "note", now, {"source": source})
            return cube

        return self._write(run)

    def restore_notes(self, notes: Iterable[Cube], event: str = "salvaged") -> int:
        """Put conversation and change notes back as they were (id, text, times, importance, pin), as
        plaintext without payload; notes whose id is present are left alone. For `repomem check --repair`
        after a damaged database was set aside. Returns how many were added."""
        notes = [n for n in notes if n.source != "code"]

        def run(conn: sqlite3.Connection) -> int:
            added = 0
            now = time.time()
            for n in notes:
                if self._get(conn, n.id) is not None:
                    continue
                cube = replace(n, kind="plaintext", model_fingerprint=None, payload_bytes=None,
                               payload_sha256=None, encoding=None, kept_tokens=None, archived_at=None)
                self._insert(conn, cube)
                self._history(conn, cube, event, now, {"source": cube.source})
                added += 1
            return added

        return self._write(run)

    def edit_note(self, cube_id: str, text: str) -> Cube | None:
        """Replace the text of a note (any cube not read from a file): version+1, payload dropped for a
        recompile. Returns the new cube, None when there is no such note."""
        if not text.strip():
            raise ValueError("a note needs text")

        def run(conn: sqlite3.Connection) -> Cube | None:
            cube = self._get(conn, cube_id)
            if cube is None or cube.source == "code":
                return None
            now = time.time()
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            end = max(1, len(text.splitlines()))
            self._let_go(conn, cube, now, shelve=False)
            conn.execute(
                f"UPDATE cubes SET text = ?, content_hash = ?, end_line = ?, version = version + 1, updated = ?, "
                f"tokens = NULL, archived_at = NULL, {PAYLOAD_CLEAR}, {STALE_TO_ACTIVE} WHERE id = ?",
                (text, digest, end, now, cube_id),
            )
            self._history(conn, cube, "edited", now, {"old_hash": cube.content_hash}, version=cube.version + 1,
                          content_hash=digest, end_line=end)
            return self._get(conn, cube_id)

        return self._write(run)

    def notes_since(self, source: str, since: float, limit: int | None = None) -> list[Cube]:
        """Live notes of one source (`change`, `note`, ...) created at or after `since`, newest first."""
        lim = -1 if limit is None else int(limit)
        sql = "SELECT * FROM cubes WHERE source = ? AND created >= ? AND status != 'archived' " \
              "ORDER BY created DESC, id LIMIT ?"
        return [Cube.from_row(r) for r in self._rows(sql, (source, float(since), lim))]

    # ---- usage ------------------------------------------------------------------------------

    def touch(self, cube_ids: Iterable[str], at: float | None = None) -> None:
        """Record that these cubes were retrieved (no history row: this happens on every question)."""
        ids = list(dict.fromkeys(cube_ids))
        if not ids:
            return
        when = time.time() if at is None else at

        def run(conn: sqlite3.Connection) -> None:
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                conn.execute(
                    f"UPDATE cubes SET last_access = ?, access_count = access_count + 1 "
                    f"WHERE id IN ({', '.join('?' * len(part))})",
                    [when, *part],
                )

        self._write(run)

    def pin(self, cube_id: str, pinned: bool = True) -> bool:
        """Pinned cubes are compiled first and never archived by the budget."""

        def run(conn: sqlite3.Connection) -> bool:
            cube = self._get(conn, cube_id)
            if cube is None:
                return False
            if cube.pinned != pinned:
                conn.execute("UPDATE cubes SET pinned = ? WHERE id = ?", (int(pinned), cube_id))
                self._history(conn, cube, "pinned" if pinned else "unpinned", time.time())
            return True

        return self._write(run)

    def forget(self, cube_id: str) -> bool:
        """Delete a cube now (the user asked), and its payload file; its history keeps a `forgotten` event."""

        def run(conn: sqlite3.Connection) -> bool:
            cube = self._get(conn, cube_id)
            if cube is None:
                return False
            self._let_go(conn, cube, time.time(), shelve=False)
            conn.execute("DELETE FROM cubes WHERE id = ?", (cube_id,))
            self._history(conn, cube, "forgotten", time.time(), {"path": cube.path, "symbol": cube.symbol})
            return True

        return self._write(run)

    # ---- queries ----------------------------------------------------------------------------

    def get(self, cube_id: str) -> Cube | None:
        return self._read(lambda c: self._get(c, cube_id))

    def cubes(
        self,
        path_glob: str | None = None,
        kind: str | None = None,
        status: str | None = None,
        source: str | None = None,
        *,
        path: str | None = None,
        limit: int | None = None,
    ) -> list[Cube]:
        """Cubes filtered by path (`path_glob` is SQLite GLOB: `src/*.py`; `path` is exact, safe for
        names with `[` or `*`), kind, status, source; ordered by path, line."""
        where, params = [], []
        for col, val in (("kind", kind), ("status", status), ("source", source), ("path", path)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        if path_glob is not None:
            where.append("path GLOB ?")
            params.append(path_glob)
        sql = "SELECT * FROM cubes"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY path, start_line, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [Cube.from_row(r) for r in self._rows(sql, params)]

    # Sort keys of `cube_ids`: NULL reads as 0 (or "" for the symbol) so every cube has a place.
    LIST_ORDERS: dict[str, tuple[str, ...]] = {
        "location": ("path", "start_line"),
        "symbol": ("coalesce(symbol, '')",),
        "kind": ("kind",),
        "status": ("status",),
        "source": ("source",),
        "pinned": ("pinned",),
        "tokens": ("coalesce(tokens, 0)",),
        "kept_tokens": ("coalesce(kept_tokens, 0)",),
        "payload_bytes": ("coalesce(payload_bytes, 0)",),
        "importance": ("importance",),
        "access_count": ("access_count",),
        "last_access": ("coalesce(last_access, 0)",),
    }

    def cube_ids(
        self,
        *,
        kind: str = "",
        status: str = "",
        path_contains: str = "",
        symbol_contains: str = "",
        order_by: str = "location",
        descending: bool = False,
    ) -> list[str]:
        """Ids of the matching cubes in display order, without reading their fields: what a list of every
        cube pages through (`cube_fields` reads one window). An empty filter matches all; `status="archived"`
        also matches cubes whose payload was archived for the disk budget, and `"active"` leaves them out;
        `*_contains` ignore ASCII case; ties keep location order."""
        if order_by not in self.LIST_ORDERS:
            raise ValueError(f"order_by must be one of {sorted(self.LIST_ORDERS)}")
        where, params = [], []
        if kind:
            where.append("kind = ?")
            params.append(kind)
        if status == "archived":
            where.append("(status = 'archived' OR archived_at IS NOT NULL)")
        elif status == "active":
            where.append("status = 'active' AND archived_at IS NULL")
        elif status:
            where.append("status = ?")
            params.append(status)
        for col, text in (("path", path_contains), ("symbol", symbol_contains)):
            if text:
                where.append(f"instr(lower(coalesce({col}, '')), lower(?)) > 0")
                params.append(text)
        direction = " DESC" if descending else ""
        sql = "SELECT id FROM cubes"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY " + ", ".join(k + direction for k in self.LIST_ORDERS[order_by]) + ", path, start_line, id"
        # Row by row, not fetchall: a hundred thousand live tuples would set off the cyclic GC, which
        # holds the GIL (and so the GUI thread) for a long pause.
        return self._read(lambda c: [r[0] for r in c.execute(sql, params)])

    def cube_fields(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        """Every field but the text of these cubes (those that still exist, in no particular order)."""
        ids = list(ids)
        cols = ", ".join(c for c in CUBE_COLUMNS if c != "text")
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), 500):  # under SQLite's limit on bound parameters
            part = ids[start:start + 500]
            rows += self._rows(f"SELECT {cols} FROM cubes WHERE id IN ({', '.join('?' * len(part))})", part)
        return rows

    def count(self) -> int:
        """How many cubes the store holds, in any status."""
        return int(self._read(lambda c: c.execute("SELECT COUNT(*) FROM cubes").fetchone()[0]))

    def data_version(self) -> int:
        """Changes whenever another connection (the watcher, the GUI) commits to this database."""
        return int(self._read(lambda c: c.execute("PRAGMA data_version").fetchone()[0]))

    def cube_stamps(self) -> dict[str, tuple[float, str, int, int, int]]:
        """(updated, status, version, start_line, end_line) of every cube: cheap enough to diff against
        an index. Every change of a cube's text, symbol, status or lines changes its stamp."""
        rows = self._read(lambda c: c.execute(f"SELECT id, {_STAMP_SQL} FROM cubes").fetchall())
        return {r[0]: r[1:] for r in rows}

    def search_rows(self, ids: Iterable[str] | None = None, page: int = 2000) -> Iterator[list[tuple]]:
        """What a search index reads, in pages: `(id, stamp, text, path, symbol, start_line, end_line)`
        of these cubes (any status; an archived cube's text is left out), or of every cube in rowid
        order. One query per page instead of one per cube."""
        cols = (f"id, {_STAMP_SQL}, CASE WHEN status = 'archived' THEN '' ELSE text END, "
                "path, symbol, start_line, end_line")

        def shape(rows: list[tuple]) -> list[tuple]:
            return [(r[0], r[1:6], *r[6:]) for r in rows]

        if ids is not None:
            wanted = list(dict.fromkeys(ids))
            for i in range(0, len(wanted), 500):
                part = wanted[i : i + 500]
                sql = f"SELECT {cols} FROM cubes WHERE id IN ({', '.join('?' * len(part))})"
                yield shape(self._read(lambda c, sql=sql, part=part: c.execute(sql, part).fetchall()))
            return
        after = -1
        while True:
            rows = self._read(lambda c, after=after: c.execute(
                f"SELECT rowid, {cols} FROM cubes WHERE rowid > ? ORDER BY rowid LIMIT ?", (after, page)).fetchall())
            if not rows:
                return
            after = rows[-1][0]
            yield shape([r[1:] for r in rows])

    def history(self, cube_id: str) -> list[HistoryEvent]:
        rows = self._rows("SELECT * FROM history WHERE cube_id = ? ORDER BY id", (cube_id,))
        return [
            HistoryEvent(
                id=r["id"],
                cube_id=r["cube_id"],
                version=r["version"],
                event=r["event"],
                at=r["at"],
                detail=json.loads(r["detail"] or "{}"),
                content_hash=r["content_hash"],
                start_line=r["start_line"],
                end_line=r["end_line"],
            )
            for r in rows
        ]

    def stats(self) -> dict[str, Any]:
        """Counts for `status` / `doctor` / the GUI (plain JSON types)."""

        def counts(col: str) -> dict[str, int]:
            return {r["k"]: r["n"] for r in self._rows(f"SELECT {col} AS k, COUNT(*) AS n FROM cubes GROUP BY {col}")}

        totals = self._rows(
            "SELECT COUNT(*) AS cubes, COALESCE(SUM(tokens), 0) AS tokens, "
            "COALESCE(SUM(kept_tokens), 0) AS kept_tokens, COALESCE(SUM(pinned), 0) AS pinned FROM cubes"
        )[0]
        on_disk = 0
        n_files = 0
        for sha in self.payloads.iterate():
            size = self.payloads.size(sha)
            if size is not None:
                on_disk += size
                n_files += 1
        return {
            "schema_version": self.schema_version,
            "cubes": totals["cubes"],
            "by_kind": counts("kind"),
            "by_status": counts("status"),
            "by_source": counts("source"),
            "pinned": totals["pinned"],
            "tokens": totals["tokens"],
            "kept_tokens": totals["kept_tokens"],
            "payload_bytes": self.payload_bytes(),
            "shelved": self._rows("SELECT COUNT(*) AS n FROM shelf")[0]["n"],
            "compile_backlog": self.compile_backlog(),
            "payload_files": n_files,
            "payload_bytes_on_disk": on_disk,
            "files": self._rows("SELECT COUNT(*) AS n FROM files")[0]["n"],
            "skips": {
                r["reason"]: r["n"] for r in self._rows("SELECT reason, COUNT(*) AS n FROM skips GROUP BY reason")
            },
        }

    # ---- files, skips ---------------------------------------------------------------

    def _set_file(self, path: str, sha: str, mtime: float | None, size: int | None, now: float) -> None:
        """Inside a `_write` transaction (sqlite-utils nests its own as a savepoint)."""
        self.db["files"].upsert({"path": path, "sha256": sha, "mtime": mtime, "size": size, "indexed_at": now},
                                pk="path")

    def chunked_with(self) -> str | None:
        """The chunking (its version and budget) the files were last all chunked with; None before the first."""
        rows = self._rows("SELECT value FROM meta WHERE key = 'chunking'")
        return rows[0]["value"] if rows else None

    def set_chunked_with(self, key: str) -> None:
        self._write(lambda conn: conn.execute(
            "INSERT INTO meta(key, value) VALUES ('chunking', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key,)))

    def get_file(self, path: str) -> FileRecord | None:
        rows = self._rows("SELECT * FROM files WHERE path = ?", (path,))
        return FileRecord(**rows[0]) if rows else None

    def files(self) -> dict[str, FileRecord]:
        return {r["path"]: FileRecord(**r) for r in self._rows("SELECT * FROM files ORDER BY path")}

    def set_skips(self, skips: Iterable[Any]) -> None:
        """Replace the skip list with the latest walk's (`walk.Skip` objects or (path, reason) pairs)."""
        pairs = [(s.rel, s.reason) if hasattr(s, "rel") else (s[0], s[1]) for s in skips]

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM skips")
            conn.executemany("INSERT OR REPLACE INTO skips(path, reason) VALUES (?, ?)", pairs)

        self._write(run)

    def skips(self) -> list[tuple[str, str]]:
        return [(r["path"], r["reason"]) for r in self._rows("SELECT path, reason FROM skips ORDER BY path")]
