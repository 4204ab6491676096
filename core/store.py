"""The MemCube store of one repository: SQLite rows (what each memory is) + payloads (its KV).

Why this shape (MemOS): every memory is a *cube* with a type (`plaintext` text only,
`activation` text plus a compiled KV payload, `parameter` reserved), provenance (`source`:
code / conversation / change / note, a fact or decision an agent or the user asked to keep),
lifecycle (`status`: active / stale / archived), usage (access counts, last access, importance,
pinned) and a version history. Payload bytes live outside the database in a `payloads.PayloadStore`,
found by their sha256, so the database stays small and a payload is written once.

Crash safety: every change is one short SQLite transaction (WAL); a payload is complete before any
row points at it. `kill -9` at any moment leaves a store that opens, where no cube points at a
missing payload; orphan payloads and unfinished writes are removed by `gc_payloads()`.

Payload files and the disk budget: a payload file is deleted as soon as nothing refers to it any more
(payloads are content-addressed, so only when no cube and no shelf row has that sha256). When a cube's
text changes or leaves its file (an edit, a branch switch), its payload goes on the *shelf* instead,
keyed by (cube, content hash, model fingerprint, encoding): the same text coming back (switching back
to the branch) takes it again without a compile (`reuse_shelved`). Shelved payloads count against the
disk budget and are the first to go (`make_room`), and they expire after `SHELF_KEEP_S`.

SQL: queries and updates are raw SQL, each write one `BEGIN IMMEDIATE` transaction retried while
another process holds the lock; sqlite-utils does the table work that reads better through it
(migrations' `transform`, the `files` upsert), nested inside those transactions as savepoints.

Concurrency: one database per repository may be opened by several processes (watcher, CLI,
GUI). `busy_timeout` is 5 s and writes start with `BEGIN IMMEDIATE` and are retried when the
database stays locked. One `CubeStore` object is safe to share between threads.

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
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import sqlite_utils

from repomem.core.cube import SOURCES, VISIBILITIES, Cube, FileRecord, HistoryEvent, UpsertResult, cube_id_for
from repomem.core.errors import ReadOnlyStoreError, StoreError, storage_error
from repomem.core.payloads import LocalPayloads, PayloadCorrupt, PayloadMissing, PayloadStore
from repomem.core.store_schema import MIGRATIONS, SCHEMA_VERSION

DB_NAME = "cubes.db"
PAYLOAD_DIR = "payloads"
BUSY_TIMEOUT_MS = 5000
LOCK_RETRIES = 8
# A payload is only garbage once it is older than this: a compiler in another process may have
# written it and not attached it yet.
GC_GRACE_S = 600.0
# compile_queue: a cube edited within this many seconds counts as hot.
RECENT_EDIT_S = 3600.0
# How long a payload of text a cube no longer has is kept for that text coming back (a branch switched
# back to), unless the disk budget needs the room first.
SHELF_KEEP_S = 86400.0

T = TypeVar("T")

__all__ = ["CubeStore", "PayloadCorrupt", "PayloadMissing"]



_CUBE_COLUMNS = [f.name for f in fields(Cube)]
_STAMP_SQL = "updated, status, version, start_line, end_line"
_PAYLOAD_CLEAR = (
    "kind = 'plaintext', model_fingerprint = NULL, payload_bytes = NULL, "
    "payload_sha256 = NULL, encoding = NULL, kept_tokens = NULL"
)


def _is_locked(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class CubeStore:
    """One repository's cubes. Create with `CubeStore.open(store_dir)`; close with `close()`."""

    def __init__(self, store_dir: Path, conn: sqlite3.Connection, payloads: PayloadStore | None = None, *,
                 read_only: bool = False) -> None:
        self.dir = Path(store_dir)
        self.payloads: PayloadStore = payloads or LocalPayloads(self.dir / PAYLOAD_DIR)
        self.conn = conn
        #: Opened from a data home this process cannot write: every write raises ReadOnlyStoreError.
        self.read_only = read_only
        self.db = sqlite_utils.Database(conn, execute_plugins=False, recursive_triggers=False)
        self._lock = threading.RLock()
        self._dropped: list[str] = []  # payloads the transaction under way stopped referring to

    # ---- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, store_dir: str | os.PathLike[str]) -> CubeStore:
        """Open (creating if needed) `store_dir/cubes.db` and `store_dir/payloads/`, migrating the schema.

        In a folder this process cannot write (a read-only data home) an existing store opens
        read-only (`read_only`): it can be searched and answered from, not changed."""
        store_dir = Path(store_dir)
        db_path = store_dir / DB_NAME
        if db_path.is_file() and not os.access(store_dir, os.W_OK):
            return cls._open_read_only(store_dir)
        try:
            store_dir.mkdir(parents=True, exist_ok=True)
            (store_dir / PAYLOAD_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, "cannot create the store folder", store_dir) from exc
        try:
            conn = sqlite3.connect(
                str(db_path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {db_path}: {exc}") from exc
        store = cls(store_dir, conn)
        try:
            store._configure()
            store._migrate()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise storage_error(exc, f"{db_path} is not a usable repomem store", store_dir) from exc
        except BaseException:
            conn.close()
            raise
        return store

    @classmethod
    def _open_read_only(cls, store_dir: Path) -> CubeStore:
        db_path = store_dir / DB_NAME
        uri = f"file:{quote(str(db_path.resolve()))}"
        # mode=ro reads a WAL database whose -shm file exists; without one (the last writer closed
        # cleanly) SQLite cannot create it here, and immutable=1 (nobody can write this folder) is safe.
        for params in ("?mode=ro", "?mode=ro&immutable=1"):
            conn = sqlite3.connect(uri + params, uri=True, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
            store = cls(store_dir, conn, read_only=True)
            try:
                version = store._read(store._schema_version)
            except StoreError as exc:
                conn.close()
                last: StoreError = exc
                continue
            if version != SCHEMA_VERSION:
                conn.close()
                raise ReadOnlyStoreError(f"{store_dir} is read-only and its store has schema {version}, "
                                         f"this repomem needs {SCHEMA_VERSION}")
            return store
        raise last

    def _configure(self) -> None:
        self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        for attempt in range(LOCK_RETRIES):
            try:
                if self.conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self.db.enable_wal()
                break
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or attempt == LOCK_RETRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        # NORMAL in WAL mode: a killed process loses nothing; only a power cut may lose the last commits.
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def _schema_version(self, conn: sqlite3.Connection) -> int:
        has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if not has_meta:
            return 0
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        current = self._read(lambda c: self._schema_version(c))
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the store in {self.dir} was written by a newer repomem (schema {current} > {SCHEMA_VERSION})"
            )
        for target in range(current + 1, SCHEMA_VERSION + 1):

            def step(conn: sqlite3.Connection, target: int = target) -> None:
                if self._schema_version(conn) >= target:  # another process got there first
                    return
                MIGRATIONS[target - 1](conn)
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(target),),
                )

            self._write(step)

    @property
    def schema_version(self) -> int:
        return self._read(lambda c: self._schema_version(c))

    def close(self) -> None:
        with self._lock:
            try:
                self.conn.close()
            except sqlite3.Error:
                pass

    def __enter__(self) -> CubeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transactions ---------------------------------------------------------------------

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one `BEGIN IMMEDIATE` transaction, retrying while the database is locked."""
        if self.read_only:
            raise ReadOnlyStoreError(f"{self.dir} is read-only: the memory of this repository can be searched, "
                                     "not changed")
        last: BaseException | None = None
        for attempt in range(LOCK_RETRIES):
            with self._lock:
                try:
                    self.conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    if not _is_locked(exc):
                        raise storage_error(exc, "store write failed", self.dir) from exc
                    last = exc
                else:
                    try:
                        result = fn(self.conn)
                        self.conn.execute("COMMIT")
                    except BaseException as exc:
                        self._dropped.clear()
                        if self.conn.in_transaction:
                            self.conn.execute("ROLLBACK")
                        if isinstance(exc, sqlite3.OperationalError) and _is_locked(exc):
                            last = exc
                        elif isinstance(exc, sqlite3.Error):
                            raise storage_error(exc, "store write failed", self.dir) from exc
                        else:
                            raise
                    else:
                        dropped, self._dropped = self._dropped, []
                        self._delete_unreferenced(dropped)
                        return result
            time.sleep(min(0.05 * 2**attempt, 1.0))
        raise StoreError(f"the store in {self.dir} stayed locked by another process ({last})")

    def _delete_unreferenced(self, shas: Iterable[str]) -> None:
        """Delete the payload files of these hashes that no cube and no shelf row refers to (after the
        commit that dropped them: a crash in between leaves a file for `gc_payloads`, never a dangling row)."""
        todo = list(dict.fromkeys(shas))
        for i in range(0, len(todo), 400):
            part = todo[i:i + 400]
            marks = ", ".join("?" * len(part))
            try:
                used = {r[0] for r in self.conn.execute(
                    f"SELECT payload_sha256 FROM cubes WHERE payload_sha256 IN ({marks}) "
                    f"UNION SELECT sha256 FROM shelf WHERE sha256 IN ({marks})", [*part, *part])}
            except sqlite3.Error:  # the files stay for gc_payloads
                return
            for sha in part:
                if sha not in used:
                    self.payloads.delete(sha)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        last: BaseException | None = None
        for attempt in range(LOCK_RETRIES):
            with self._lock:
                try:
                    return fn(self.conn)
                except sqlite3.OperationalError as exc:
                    if not _is_locked(exc):
                        raise storage_error(exc, "store read failed", self.dir) from exc
                    last = exc
                except sqlite3.DatabaseError as exc:  # "malformed", "not a database"
                    raise storage_error(exc, "store read failed", self.dir) from exc
            time.sleep(min(0.05 * 2**attempt, 1.0))
        raise StoreError(f"the store in {self.dir} stayed locked by another process ({last})")

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self._read(lambda c: list(self.db.query(sql, list(params))))

    @staticmethod
    def _history(
        conn: sqlite3.Connection,
        cube: Cube | dict[str, Any],
        event: str,
        at: float,
        detail: dict[str, Any] | None = None,
        **override: Any,
    ) -> None:
        get = (lambda k: getattr(cube, k)) if isinstance(cube, Cube) else cube.get
        vals = {k: override.get(k, get(k)) for k in ("id", "version", "content_hash", "start_line", "end_line")}
        conn.execute(
            "INSERT INTO history(cube_id, version, event, at, detail, content_hash, start_line, end_line) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                vals["id"],
                vals["version"],
                event,
                at,
                json.dumps(detail or {}, sort_keys=True),
                vals["content_hash"],
                vals["start_line"],
                vals["end_line"],
            ),
        )

    def _let_go(self, conn: sqlite3.Connection, cube: Cube | dict[str, Any], now: float, *, shelve: bool) -> None:
        """Inside a transaction that clears a cube's payload: shelve it (`shelve`: the cube's text changed or
        left its file, and may come back) or let its file be deleted after the commit."""
        get = (lambda k: getattr(cube, k)) if isinstance(cube, Cube) else cube.get
        sha = get("payload_sha256")
        if not sha:
            return
        if shelve and get("model_fingerprint") and get("payload_bytes") is not None:
            conn.execute(
                "INSERT OR REPLACE INTO shelf(cube_id, content_hash, fingerprint, encoding, sha256, bytes, tokens, "
                "kept_tokens, shelved_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (get("id"), get("content_hash"), get("model_fingerprint"), get("encoding") or "", sha,
                 get("payload_bytes"), get("tokens"), get("kept_tokens"), now),
            )
        else:
            self._dropped.append(sha)

    @staticmethod
    def _get(conn: sqlite3.Connection, cube_id: str) -> Cube | None:
        cur = conn.execute("SELECT * FROM cubes WHERE id = ?", (cube_id,))
        row = cur.fetchone()
        if row is None:
            return None
        return Cube.from_row(dict(zip([d[0] for d in cur.description], row, strict=True)))

    @staticmethod
    def _insert(conn: sqlite3.Connection, cube: Cube) -> None:
        values = [getattr(cube, c) for c in _CUBE_COLUMNS]
        values[_CUBE_COLUMNS.index("pinned")] = int(cube.pinned)
        conn.execute(
            f"INSERT INTO cubes({', '.join(_CUBE_COLUMNS)}) VALUES ({', '.join('?' * len(_CUBE_COLUMNS))})",
            values,
        )

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
            cur = conn.execute("SELECT * FROM cubes WHERE path = ? AND source = ?", (path, source))
            cols = [d[0] for d in cur.description]
            existing = [Cube.from_row(dict(zip(cols, r, strict=True))) for r in cur.fetchall()]
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
                    f"UPDATE cubes SET status = 'archived', {_PAYLOAD_CLEAR}, updated = ? WHERE id = ?",
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
            f"archived_at = NULL, tokens = NULL, {_PAYLOAD_CLEAR} WHERE id = ?",
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
            cur = conn.execute(
                "SELECT * FROM cubes WHERE path = ? AND source = ? AND status != 'archived'", (path, source)
            )
            cols = [d[0] for d in cur.description]
            gone = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
            for row in gone:
                self._let_go(conn, row, now, shelve=True)
                conn.execute(
                    f"UPDATE cubes SET status = 'archived', {_PAYLOAD_CLEAR}, updated = ? WHERE id = ?",
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
                f"tokens = NULL, archived_at = NULL, {_PAYLOAD_CLEAR} WHERE id = ?",
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

    # ---- payloads ---------------------------------------------------------------------------

    def write_payload(self, data: bytes | bytearray | memoryview) -> tuple[str, int]:
        """Store payload bytes; returns (sha256, size) for `attach_payload`. Complete before it returns,
        so a row may point at it right after; the same bytes written twice are stored once."""
        return self.payloads.write(data), memoryview(data).nbytes

    def read_payload(self, cube: Cube, *, verify: bool = False) -> memoryview:
        """A cube's payload bytes (a read-only memoryview, no copy where the payload store can map them).

        The size is always checked; `verify=True` also checks the sha256 (reads every byte).
        """
        if not cube.payload_sha256:
            raise PayloadMissing(f"cube {cube.id} ({cube.location}) has no payload")
        try:
            view = self.payloads.read(cube.payload_sha256, verify=verify)
        except PayloadCorrupt as exc:
            raise PayloadCorrupt(f"payload of {cube.location}: {exc}") from exc
        except PayloadMissing as exc:
            raise PayloadMissing(f"payload of {cube.location}: {exc}") from exc
        size = view.nbytes
        if cube.payload_bytes is not None and size != cube.payload_bytes:
            view.release()
            raise PayloadCorrupt(f"payload of {cube.location} has {size} bytes, expected {cube.payload_bytes}")
        return view

    def attach_payload(
        self,
        cube_id: str,
        expected_content_hash: str,
        sha: str,
        nbytes: int,
        tokens: int | None,
        kept_tokens: int | None,
        fingerprint: str,
        encoding: str | None,
    ) -> bool:
        """Make a cube `activation` with this payload (from `write_payload`), if its text is still what
        was compiled.

        Returns False (and changes nothing) when the cube changed, was archived or deleted since
        the compile started: the caller just drops the work, and the new file goes unless another cube has it.
        """
        size = self.payloads.size(sha)
        if size is None:
            raise PayloadMissing(f"payload {sha[:12]} is not stored")
        if size != nbytes:
            raise PayloadCorrupt(f"payload {sha[:12]} has {size} bytes, expected {nbytes}")

        def run(conn: sqlite3.Connection) -> bool:
            cube = self._get(conn, cube_id)
            if cube is None or cube.content_hash != expected_content_hash or cube.status == "archived":
                self._dropped.append(sha)  # nobody takes the new payload: deleted unless another cube has it
                return False
            now = time.time()
            if cube.payload_sha256 != sha:
                self._let_go(conn, cube, now, shelve=False)  # the payload it replaces (another encoding)
            conn.execute(
                "UPDATE cubes SET kind = 'activation', status = 'active', payload_bytes = ?, "
                "payload_sha256 = ?, tokens = ?, kept_tokens = ?, model_fingerprint = ?, encoding = ?, "
                "archived_at = NULL WHERE id = ?",
                (nbytes, sha, tokens, kept_tokens, fingerprint, encoding, cube_id),
            )
            self._history(
                conn,
                cube,
                "compiled",
                now,
                {
                    "fingerprint": fingerprint,
                    "encoding": encoding,
                    "bytes": nbytes,
                    "tokens": tokens,
                    "kept_tokens": kept_tokens,
                },
            )
            return True

        return self._write(run)

    def archive(self, cube_id: str, reason: str = "budget") -> bool:
        """Drop a cube's payload (activation -> plaintext); its text stays retrievable.

        The cube then stays out of `compile_queue` until `promote()` (see `promote_candidates`),
        so the budget does not compile and archive the same cube over and over.
        """

        def run(conn: sqlite3.Connection) -> bool:
            return self._archive(conn, cube_id, time.time(), reason)

        return self._write(run)

    def _archive(self, conn: sqlite3.Connection, cube_id: str, now: float, reason: str) -> bool:
        """Drop the payload and keep the cube out of the compile queue; a cube without a payload is only
        kept out (it did not fit the budget, or does not compile)."""
        cube = self._get(conn, cube_id)
        out_of_queue = cube is not None and (cube.archived_at is not None or cube.status == "archived")
        if cube is None or (cube.payload_sha256 is None and out_of_queue):
            return False
        status = "active" if cube.status == "stale" else cube.status
        self._let_go(conn, cube, now, shelve=False)
        conn.execute(
            f"UPDATE cubes SET {_PAYLOAD_CLEAR}, status = ?, archived_at = ? WHERE id = ?",
            (status, now, cube_id),
        )
        self._history(conn, cube, "archived", now, {"reason": reason, "bytes": cube.payload_bytes})
        return True

    def promote(self, cube_id: str) -> bool:
        """Let an archived-for-budget cube back into the compile queue."""

        def run(conn: sqlite3.Connection) -> bool:
            cube = self._get(conn, cube_id)
            if cube is None or cube.archived_at is None:
                return False
            conn.execute("UPDATE cubes SET archived_at = NULL WHERE id = ?", (cube_id,))
            self._history(conn, cube, "promoted", time.time(), {"access_count": cube.access_count})
            return True

        return self._write(run)

    def mark_stale_for_model(self, fingerprint: str) -> int:
        """The current model is `fingerprint`: payloads of other models become `stale` (never
        spliced, kept on disk in case that model comes back); this model's stale payloads become
        active again. Returns how many cubes went stale.
        """

        def run(conn: sqlite3.Connection) -> int:
            now = time.time()
            cur = conn.execute(
                "SELECT * FROM cubes WHERE kind = 'activation' AND status = 'active' "
                "AND (model_fingerprint IS NULL OR model_fingerprint != ?)",
                (fingerprint,),
            )
            cols = [d[0] for d in cur.description]
            stale = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
            for row in stale:
                conn.execute("UPDATE cubes SET status = 'stale' WHERE id = ?", (row["id"],))
                self._history(conn, row, "stale", now, {"fingerprint": row["model_fingerprint"], "now": fingerprint})
            cur = conn.execute(
                "SELECT * FROM cubes WHERE kind = 'activation' AND status = 'stale' AND model_fingerprint = ?",
                (fingerprint,),
            )
            cols = [d[0] for d in cur.description]
            for r in cur.fetchall():
                row = dict(zip(cols, r, strict=True))
                conn.execute("UPDATE cubes SET status = 'active' WHERE id = ?", (row["id"],))
                self._history(conn, row, "fresh", now, {"fingerprint": fingerprint})
            return len(stale)

        return self._write(run)

    def check_prefix(self, fingerprint: str, prefix_sha256: str) -> int:
        """A payload is KV computed after the prompt prefix, so it fits only that prefix. The store keeps the
        prefix this model's payloads were compiled after; when it is not `prefix_sha256` (repomem's own
        instructions changed), the payloads are dropped and their cubes go back to the compile queue instead
        of being spliced after text they never saw. Returns how many were dropped."""
        key = f"prefix:{fingerprint}"
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        if rows and rows[0]["value"] == prefix_sha256:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, prefix_sha256))
            if row is None or row[0] == prefix_sha256:
                return 0
            now = time.time()
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM cubes WHERE payload_sha256 IS NOT NULL AND model_fingerprint = ?", (fingerprint,))]
            for cid in ids:
                cube = self._get(conn, cid)
                assert cube is not None
                self._let_go(conn, cube, now, shelve=False)
                conn.execute(f"UPDATE cubes SET {_PAYLOAD_CLEAR} WHERE id = ?", (cid,))
                self._history(conn, cube, "archived", now, {"reason": "prompt prefix changed",
                                                            "bytes": cube.payload_bytes})
            self._dropped += [r[0] for r in conn.execute("SELECT sha256 FROM shelf WHERE fingerprint = ?",
                                                         (fingerprint,))]
            conn.execute("DELETE FROM shelf WHERE fingerprint = ?", (fingerprint,))
            return len(ids)

        return self._write(run)

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
        cols = ", ".join(c for c in _CUBE_COLUMNS if c != "text")
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

    def compile_queue(self, fingerprint: str, limit: int | None = 64, encoding: str | None = None) -> list[Cube]:
        """Cubes to compile for model `fingerprint`, hottest first.

        Live cubes without a payload of this model (or, given `encoding`, with one in another encoding:
        it keeps answering until its replacement is attached), except those archived for the budget (they
        come back through `promote`). Order: no payload before a payload to replace, then pinned, edited
        in the last hour, code before notes, most accessed, most important, most recently updated.
        """
        sql = (
            "SELECT * FROM cubes WHERE status IN ('active', 'stale') AND archived_at IS NULL "
            "AND NOT (kind = 'activation' AND status = 'active' AND payload_sha256 IS NOT NULL "
            "         AND model_fingerprint = ? AND (? IS NULL OR encoding IS ?)) "
            "ORDER BY (kind = 'activation' AND status = 'active' AND payload_sha256 IS NOT NULL), "
            "pinned DESC, (updated >= ?) DESC, (source = 'code') DESC, access_count DESC, importance DESC, "
            "updated DESC, "
            "path, start_line LIMIT ?"
        )
        lim = -1 if limit is None else int(limit)  # SQLite: a negative LIMIT means no limit
        args = (fingerprint, encoding, encoding, time.time() - RECENT_EDIT_S, lim)
        return [Cube.from_row(r) for r in self._rows(sql, args)]

    def payloads_by_encoding(self) -> dict[str, list[str]]:
        """Ids of the active compiled cubes, grouped by payload encoding: what a re-encode pass works
        through (one indexed query, cheap enough to run before every compile step)."""
        rows = self._read(lambda c: c.execute(
            "SELECT id, encoding FROM cubes WHERE kind = 'activation' AND status = 'active' "
            "AND payload_sha256 IS NOT NULL ORDER BY path, start_line, id").fetchall())
        out: dict[str, list[str]] = {}
        for cid, enc in rows:
            out.setdefault(enc or "", []).append(cid)
        return out

    def promote_candidates(self, min_access: int, limit: int = 64) -> list[Cube]:
        """Archived-for-budget cubes that keep being retrieved: worth compiling again."""
        sql = (
            "SELECT * FROM cubes WHERE status = 'active' AND kind = 'plaintext' AND archived_at IS NOT NULL "
            "AND access_count >= ? ORDER BY access_count DESC, last_access DESC LIMIT ?"
        )
        return [Cube.from_row(r) for r in self._rows(sql, (int(min_access), int(limit)))]

    _KEPT_SHAS = (
        "SELECT payload_sha256 AS sha, payload_bytes AS b FROM cubes WHERE payload_sha256 IS NOT NULL "
        "UNION ALL SELECT sha256, bytes FROM shelf"
    )

    def payload_bytes(self) -> int:
        """Bytes of the payloads kept (referenced by a cube or shelved), each payload counted once: what the
        disk budget holds."""
        rows = self._rows(
            f"SELECT COALESCE(SUM(b), 0) AS n FROM (SELECT MAX(b) AS b FROM ({self._KEPT_SHAS}) GROUP BY sha)")
        return int(rows[0]["n"])

    def referenced_payloads(self) -> set[str]:
        """Hashes of every payload kept (a cube's or shelved): any other payload file is garbage."""
        return {r["sha"] for r in self._rows(f"SELECT DISTINCT sha FROM ({self._KEPT_SHAS})")}

    @staticmethod
    def _coldness(stale: bool, last_access: float | None, access_count: int, importance: float,
                  updated: float) -> tuple:
        """Sort key of `make_room`'s eviction order: smaller is colder (the SQL order below, in Python)."""
        return (not stale, last_access or 0.0, access_count, importance, updated)

    def make_room(self, incoming: int, max_bytes: int, *, for_cube: Cube | None = None) -> tuple[bool, list[str]]:
        """Make kept payloads plus `incoming` new bytes fit `max_bytes`; returns (fits, archived cube ids).

        Frees, in order: shelved payloads (oldest first), then compiled cubes coldest first: stale
        payloads, then least recently accessed, least accessed, least important, least recently updated;
        never pinned ones. With `for_cube` (the cube about to get those bytes) only cubes colder than it
        are archived, so a compile never pushes out something hotter than what it adds. Freed files are
        deleted right after the commit.
        """

        def kept(conn: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int]]:
            refs: dict[str, int] = {}
            sizes: dict[str, int] = {}
            for sha, nbytes in conn.execute(self._KEPT_SHAS):
                refs[sha] = refs.get(sha, 0) + 1
                sizes[sha] = max(sizes.get(sha, 0), nbytes or 0)
            return refs, sizes

        if sum(self._read(kept)[1].values()) + incoming <= max_bytes:  # the usual case: no write lock taken
            return True, []

        def run(conn: sqlite3.Connection) -> tuple[bool, list[str]]:
            refs, sizes = kept(conn)
            total = sum(sizes.values())

            def release(sha: str) -> None:
                nonlocal total
                refs[sha] -= 1
                if refs[sha] == 0:
                    total -= sizes[sha]

            out: list[str] = []
            if total + incoming <= max_bytes:
                return True, out
            for key in conn.execute(
                "SELECT cube_id, content_hash, fingerprint, encoding, sha256 FROM shelf ORDER BY shelved_at"
            ).fetchall():
                if total + incoming <= max_bytes:
                    return True, out
                conn.execute("DELETE FROM shelf WHERE cube_id = ? AND content_hash = ? AND fingerprint = ? "
                             "AND encoding = ?", key[:4])
                self._dropped.append(key[4])
                release(key[4])
            limit = None
            if for_cube is not None and not for_cube.pinned:
                limit = self._coldness(for_cube.status == "stale", for_cube.last_access, for_cube.access_count,
                                       for_cube.importance, for_cube.updated)
            now = time.time()
            for cid, sha, *key in conn.execute(
                "SELECT id, payload_sha256, status = 'stale', last_access, access_count, importance, updated "
                "FROM cubes WHERE payload_sha256 IS NOT NULL AND pinned = 0 "
                "ORDER BY (status = 'stale') DESC, COALESCE(last_access, 0) ASC, access_count ASC, "
                "importance ASC, updated ASC"
            ).fetchall():
                if total + incoming <= max_bytes:
                    break
                if limit is not None and self._coldness(bool(key[0]), *key[1:]) >= limit:
                    break
                if self._archive(conn, cid, now, "budget"):
                    out.append(cid)
                    release(sha)
            return total + incoming <= max_bytes, out

        return self._write(run)

    def enforce_budget(self, max_bytes: int) -> list[str]:
        """Archive cubes, coldest first (after every shelved payload), until kept payloads fit `max_bytes`;
        never pinned ones. Returns the archived ids; their files are deleted."""
        return self.make_room(0, max_bytes)[1]

    def reuse_shelved(self, fingerprint: str, encoding: str | None) -> list[str]:
        """Give every live cube without a current payload the shelved payload of its own text for this model
        and encoding, if its file is intact (a branch switched back to); returns their ids. No model runs."""

        def run(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT c.id, s.sha256, s.bytes, s.tokens, s.kept_tokens FROM cubes c JOIN shelf s "
                "ON s.cube_id = c.id AND s.content_hash = c.content_hash AND s.fingerprint = ? AND s.encoding = ? "
                "WHERE c.status IN ('active', 'stale') AND c.archived_at IS NULL "
                "AND NOT (c.kind = 'activation' AND c.status = 'active' AND c.payload_sha256 IS NOT NULL "
                "         AND c.model_fingerprint = ? AND c.encoding IS ?)",
                (fingerprint, encoding or "", fingerprint, encoding),
            ).fetchall()
            now = time.time()
            out: list[str] = []
            for cid, sha, nbytes, tokens, kept in rows:
                conn.execute("DELETE FROM shelf WHERE cube_id = ? AND sha256 = ? AND fingerprint = ?",
                             (cid, sha, fingerprint))
                if self.payloads.size(sha) != nbytes:
                    self._dropped.append(sha)  # gone or damaged: compiled again instead
                    continue
                cube = self._get(conn, cid)
                if cube is None:
                    continue
                if cube.payload_sha256 != sha:
                    self._let_go(conn, cube, now, shelve=False)
                conn.execute(
                    "UPDATE cubes SET kind = 'activation', status = 'active', payload_bytes = ?, payload_sha256 = ?, "
                    "tokens = ?, kept_tokens = ?, model_fingerprint = ?, encoding = ?, archived_at = NULL WHERE id = ?",
                    (nbytes, sha, tokens, kept, fingerprint, encoding, cid),
                )
                self._history(conn, cube, "compiled", now, {"fingerprint": fingerprint, "encoding": encoding,
                                                            "bytes": nbytes, "tokens": tokens, "kept_tokens": kept,
                                                            "reused": True})
                out.append(cid)
            return out

        return self._write(run)

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

    # ---- maintenance ------------------------------------------------------------------------

    def gc_payloads(self, grace_s: float = GC_GRACE_S, shelf_keep_s: float = SHELF_KEEP_S) -> int:
        """Drop shelved payloads older than `shelf_keep_s`, then delete payloads nothing refers to and
        unfinished writes; returns how many files went.

        Unreferenced payloads younger than `grace_s` are kept: another process may be about to attach them.
        """
        cutoff = time.time() - shelf_keep_s
        if not self.read_only and self._rows("SELECT 1 FROM shelf WHERE shelved_at < ? LIMIT 1", (cutoff,)):
            def expire(conn: sqlite3.Connection) -> None:
                self._dropped += [r[0] for r in conn.execute("SELECT sha256 FROM shelf WHERE shelved_at < ?",
                                                             (cutoff,))]
                conn.execute("DELETE FROM shelf WHERE shelved_at < ?", (cutoff,))

            self._write(expire)
        return self.payloads.gc(self.referenced_payloads(), grace_s)

    def compile_backlog(self, fingerprint: str | None = None, encoding: str | None = None) -> dict[str, Any]:
        """How much `compile_queue(fingerprint, encoding=...)` holds: {cubes, tokens, tokens_per_s, eta_s}.

        `tokens` is estimated from the text (at the characters per token of the cubes compiled so far);
        `tokens_per_s` is the last compile rate recorded (`record_compile_rate`), None before any, and then
        `eta_s` is None too. Without `fingerprint` the compiled cubes count as current (the model that last
        opened this store marked the others stale): a reader with no model loaded gets the same numbers.
        """
        current = "kind = 'activation' AND status = 'active' AND payload_sha256 IS NOT NULL"
        args: list[Any] = []
        if fingerprint is not None:
            current += " AND model_fingerprint = ? AND (? IS NULL OR encoding IS ?)"
            args += [fingerprint, encoding, encoding]
        pending = f"(archived_at IS NULL AND NOT ({current}))"
        row = self._read(lambda c: c.execute(
            f"SELECT COALESCE(SUM({pending}), 0), COALESCE(SUM(CASE WHEN {pending} THEN LENGTH(text) END), 0), "
            "COALESCE(SUM(tokens), 0), COALESCE(SUM(CASE WHEN tokens IS NOT NULL THEN LENGTH(text) END), 0) "
            "FROM cubes WHERE status IN ('active', 'stale')", args * 2).fetchone())
        cubes, chars, done_tokens, done_chars = (int(v) for v in row)
        # chunking.estimate_tokens' ratio until this store has compiled something to measure it on
        per_char = done_tokens / done_chars if done_tokens and done_chars else 1 / 3.5
        tokens = round(chars * per_char)
        rate = self.compile_rate()
        return {"cubes": cubes, "tokens": tokens, "tokens_per_s": rate,
                "eta_s": round(tokens / rate, 1) if rate else None}

    def record_compile_rate(self, tokens_per_s: float) -> None:
        """Remember how fast this machine compiles (tokens per second of recent compile steps) for the ETA."""
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO meta(key, value) VALUES ('compile_rate', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (f"{tokens_per_s:.3f}",))

        self._write(run)

    def compile_rate(self) -> float | None:
        """The last compile rate recorded, in tokens per second (None before any)."""
        rows = self._rows("SELECT value FROM meta WHERE key = 'compile_rate'")
        return float(rows[0]["value"]) if rows else None

    def check(self, *, verify: bool = False) -> dict[str, int]:
        """Find cubes whose payload is missing or damaged and demote them to plaintext.

        Returns counts: checked, missing, corrupt, fixed. `verify=True` also hashes every payload.
        """
        rows = self._rows("SELECT * FROM cubes WHERE payload_sha256 IS NOT NULL")
        bad: list[tuple[str, str]] = []
        missing = corrupt = 0
        for r in rows:
            cube = Cube.from_row(r)
            try:
                self.read_payload(cube, verify=verify).release()
            except PayloadMissing:
                missing += 1
                bad.append((cube.id, "payload_missing"))
            except PayloadCorrupt:
                corrupt += 1
                bad.append((cube.id, "payload_corrupt"))

        def run(conn: sqlite3.Connection) -> int:
            now = time.time()
            fixed = 0
            for cid, reason in bad:
                cube = self._get(conn, cid)
                if cube is None or cube.payload_sha256 is None:
                    continue
                status = "active" if cube.status == "stale" else cube.status
                self._let_go(conn, cube, now, shelve=False)
                conn.execute(f"UPDATE cubes SET {_PAYLOAD_CLEAR}, status = ? WHERE id = ?", (status, cid))
                self._history(conn, cube, "demoted", now, {"reason": reason, "payload": cube.payload_sha256})
                fixed += 1
            return fixed

        fixed = self._write(run) if bad else 0
        return {"checked": len(rows), "missing": missing, "corrupt": corrupt, "fixed": fixed}

    # ---- files, skips ---------------------------------------------------------------

    def _set_file(self, path: str, sha: str, mtime: float | None, size: int | None, now: float) -> None:
        """Inside a `_write` transaction (sqlite-utils nests its own as a savepoint)."""
        self.db["files"].upsert({"path": path, "sha256": sha, "mtime": mtime, "size": size, "indexed_at": now},
                                pk="path")

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
