"""The store's SQLite schema, as the migrations that build it.

Applied in order by `CubeStore`, each in its own transaction; `meta.schema_version` counts how many have
run. Append only: never edit a migration that has shipped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import sqlite_utils


def _m1_initial(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute(
        """
        CREATE TABLE cubes (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL DEFAULT 'plaintext',
            repo TEXT NOT NULL DEFAULT '',
            path TEXT NOT NULL,
            symbol TEXT,
            language TEXT,
            chunk_kind TEXT,
            start_line INTEGER NOT NULL DEFAULT 1,
            end_line INTEGER NOT NULL DEFAULT 1,
            text TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            version INTEGER NOT NULL DEFAULT 1,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            last_access REAL,
            access_count INTEGER NOT NULL DEFAULT 0,
            importance REAL NOT NULL DEFAULT 0.5,
            pinned INTEGER NOT NULL DEFAULT 0,
            owner TEXT,
            source TEXT NOT NULL DEFAULT 'code',
            visibility TEXT NOT NULL DEFAULT 'shared',
            status TEXT NOT NULL DEFAULT 'active',
            model_fingerprint TEXT,
            payload_path TEXT,
            payload_bytes INTEGER,
            payload_sha256 TEXT,
            encoding TEXT,
            tokens INTEGER,
            kept_tokens INTEGER,
            archived_at REAL
        )
        """
    )
    conn.execute("CREATE INDEX cubes_path ON cubes(path, source)")
    conn.execute("CREATE INDEX cubes_status_kind ON cubes(status, kind)")
    conn.execute("CREATE INDEX cubes_payload ON cubes(payload_path)")
    conn.execute("CREATE INDEX cubes_hash ON cubes(content_hash)")
    conn.execute(
        """
        CREATE TABLE history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            cube_id TEXT NOT NULL,
            version INTEGER,
            event TEXT NOT NULL,
            at REAL NOT NULL,
            detail TEXT,
            content_hash TEXT,
            start_line INTEGER,
            end_line INTEGER
        )
        """
    )
    conn.execute("CREATE INDEX history_cube ON history(cube_id, id)")
    conn.execute(
        """
        CREATE TABLE files (
            path TEXT PRIMARY KEY,
            sha256 TEXT NOT NULL,
            mtime REAL,
            size INTEGER,
            indexed_at REAL NOT NULL
        )
        """
    )
    conn.execute("CREATE TABLE skips (path TEXT PRIMARY KEY, reason TEXT NOT NULL)")
    conn.execute("CREATE TABLE settings_kv (key TEXT PRIMARY KEY, value TEXT)")


def _m2_payloads_by_sha256(conn: sqlite3.Connection) -> None:
    """A cube names its payload by sha256 alone (the key of any PayloadStore): the file path column goes,
    and so does the `settings_kv` table nothing used."""
    db = sqlite_utils.Database(conn, execute_plugins=False)
    conn.execute(
        "UPDATE cubes SET kind = 'plaintext', payload_path = NULL, payload_bytes = NULL, model_fingerprint = NULL, "
        "encoding = NULL, kept_tokens = NULL WHERE payload_path IS NOT NULL AND payload_sha256 IS NULL"
    )
    conn.execute("DROP INDEX cubes_payload")
    db["cubes"].transform(drop={"payload_path"})
    db["cubes"].create_index(["payload_sha256"], index_name="cubes_payload")
    db["settings_kv"].drop()


def _m3_payload_shelf(conn: sqlite3.Connection) -> None:
    """Payloads of text a cube no longer has, kept for that text coming back (see `repomem.core.store`)."""
    conn.execute(
        """
        CREATE TABLE shelf (
            cube_id TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            encoding TEXT NOT NULL DEFAULT '',
            sha256 TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            tokens INTEGER,
            kept_tokens INTEGER,
            shelved_at REAL NOT NULL,
            PRIMARY KEY (cube_id, content_hash, fingerprint, encoding)
        )
        """
    )
    conn.execute("CREATE INDEX shelf_sha ON shelf(sha256)")
    conn.execute("CREATE INDEX shelf_age ON shelf(shelved_at)")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_m1_initial, _m2_payloads_by_sha256, _m3_payload_shelf]
SCHEMA_VERSION = len(MIGRATIONS)
