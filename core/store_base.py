"""The transaction layer under `repomem.core.store.CubeStore`: opening a repository's SQLite store, one short
transaction per change, and the row helpers every layer above writes with.

Crash safety: every change is one short SQLite transaction (WAL); a payload is complete before any
row points at it. `kill -9` at any moment leaves a store that opens, where no cube points at a
missing payload; orphan payloads and unfinished writes are removed by `gc_payloads()`.

SQL: queries and updates are raw SQL, each write one `BEGIN IMMEDIATE` transaction retried while
another process holds the lock; sqlite-utils does the table work that reads better through it
(migrations' `transform`, the `files` upsert), nested inside those transactions as savepoints.

Concurrency: one database per repository may be opened by several processes (watcher, CLI,
GUI). `busy_timeout` is 5 s and writes start with `BEGIN IMMEDIATE` and are retried when the
database stays locked. One store object is safe to share between threads.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import quote

import sqlite_utils

from repomem.core.cube import Cube
from repomem.core.errors import ReadOnlyStoreError, StoreError, storage_error
from repomem.core.payloads import LocalPayloads, PayloadStore
from repomem.core.store_schema import MIGRATIONS, SCHEMA_VERSION

DB_NAME = "cubes.db"
PAYLOAD_DIR = "payloads"
BUSY_TIMEOUT_MS = 5000
LOCK_RETRIES = 8

T = TypeVar("T")

__all__ = ["DB_NAME", "PAYLOAD_DIR", "StoreBase"]

#: the columns of `cubes`, in the order of `Cube`'s fields
CUBE_COLUMNS = [f.name for f in fields(Cube)]
#: the SET clause that leaves a cube without a payload
PAYLOAD_CLEAR = (
    "kind = 'plaintext', model_fingerprint = NULL, payload_bytes = NULL, "
    "payload_sha256 = NULL, encoding = NULL, kept_tokens = NULL"
)
#: beside PAYLOAD_CLEAR where the status is kept: a stale cube becomes active (no other model's payload is left)
STALE_TO_ACTIVE = "status = CASE status WHEN 'stale' THEN 'active' ELSE status END"


def _is_locked(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


class StoreBase:
    """One repository's store, opened: the connection, the payload files and the transaction helpers.
    `CubeStore` (in `repomem.core.store`) is what callers use."""

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
    def open(cls, store_dir: str | os.PathLike[str]) -> Self:
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
    def _open_read_only(cls, store_dir: Path) -> Self:
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

    def __enter__(self) -> Self:
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
    def _dict_rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Inside a transaction: a query's rows as column -> value (`_rows` reads outside one)."""
        cur = conn.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    @staticmethod
    def _get(conn: sqlite3.Connection, cube_id: str) -> Cube | None:
        rows = StoreBase._dict_rows(conn, "SELECT * FROM cubes WHERE id = ?", (cube_id,))
        return Cube.from_row(rows[0]) if rows else None

    @staticmethod
    def _insert(conn: sqlite3.Connection, cube: Cube) -> None:
        values = [getattr(cube, c) for c in CUBE_COLUMNS]
        values[CUBE_COLUMNS.index("pinned")] = int(cube.pinned)
        conn.execute(
            f"INSERT INTO cubes({', '.join(CUBE_COLUMNS)}) VALUES ({', '.join('?' * len(CUBE_COLUMNS))})",
            values,
        )
