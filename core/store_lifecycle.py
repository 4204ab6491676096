"""Payload lifecycle of a repository's store: compiled KV attached, archived, promoted, made stale, shelved,
reused, checked and collected, within the disk budget (MemOS: hot text is compiled to KV, cold KV goes back
to text).

Payload files and the disk budget: a payload file is deleted as soon as nothing refers to it any more
(payloads are content-addressed, so only when no cube and no shelf row has that sha256). When a cube's
text changes or leaves its file (an edit, a branch switch), its payload goes on the *shelf* instead,
keyed by (cube, content hash, model fingerprint, encoding): the same text coming back (switching back
to the branch) takes it again without a compile (`reuse_shelved`). Shelved payloads count against the
disk budget and are the first to go (`make_room`), and they expire after `SHELF_KEEP_S`.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from repomem.core.cube import Cube
from repomem.core.payloads import PayloadCorrupt, PayloadMissing
from repomem.core.store_base import PAYLOAD_CLEAR, STALE_TO_ACTIVE, StoreBase

# A payload is only garbage once it is older than this: a compiler in another process may have
# written it and not attached it yet.
GC_GRACE_S = 600.0
# compile_queue: a cube edited within this many seconds counts as hot.
RECENT_EDIT_S = 3600.0
# How long a payload of text a cube no longer has is kept for that text coming back (a branch switched
# back to), unless the disk budget needs the room first.
SHELF_KEEP_S = 86400.0

__all__ = ["GC_GRACE_S", "SHELF_KEEP_S", "PayloadLifecycle"]


class PayloadLifecycle(StoreBase):
    """The payload half of `CubeStore`: every method that gives a cube compiled memory or takes it away."""

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
        self._drop_payload(conn, cube, now, "archived", {"reason": reason, "bytes": cube.payload_bytes},
                           keep_out=True)
        return True

    def _drop_payload(self, conn: sqlite3.Connection, cube: Cube, now: float, event: str, detail: dict[str, Any],
                      *, keep_out: bool) -> None:
        """Inside a transaction: the cube goes back to plain text (a stale one becomes active: there is no
        other model's payload left to be stale) and its payload file is deleted after the commit unless
        something else has it. `keep_out`: also keep it out of the compile queue until `promote`."""
        self._let_go(conn, cube, now, shelve=False)
        conn.execute(f"UPDATE cubes SET {PAYLOAD_CLEAR}, {STALE_TO_ACTIVE}, archived_at = ? WHERE id = ?",
                     (now if keep_out else cube.archived_at, cube.id))
        self._history(conn, cube, event, now, detail)

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
            stale = self._dict_rows(conn, "SELECT * FROM cubes WHERE kind = 'activation' AND status = 'active' "
                                    "AND (model_fingerprint IS NULL OR model_fingerprint != ?)", (fingerprint,))
            for row in stale:
                conn.execute("UPDATE cubes SET status = 'stale' WHERE id = ?", (row["id"],))
                self._history(conn, row, "stale", now, {"fingerprint": row["model_fingerprint"], "now": fingerprint})
            for row in self._dict_rows(conn, "SELECT * FROM cubes WHERE kind = 'activation' AND status = 'stale' "
                                       "AND model_fingerprint = ?", (fingerprint,)):
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
            cubes = [Cube.from_row(r) for r in self._dict_rows(
                conn, "SELECT * FROM cubes WHERE payload_sha256 IS NOT NULL AND model_fingerprint = ?", (fingerprint,))]
            for cube in cubes:
                self._drop_payload(conn, cube, now, "archived",
                                   {"reason": "prompt prefix changed", "bytes": cube.payload_bytes}, keep_out=False)
            self._dropped += [r[0] for r in conn.execute("SELECT sha256 FROM shelf WHERE fingerprint = ?",
                                                         (fingerprint,))]
            conn.execute("DELETE FROM shelf WHERE fingerprint = ?", (fingerprint,))
            return len(cubes)

        return self._write(run)

    # ---- compile queue and disk budget -------------------------------------------------------

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
                self._drop_payload(conn, cube, now, "demoted", {"reason": reason, "payload": cube.payload_sha256},
                                   keep_out=False)
                fixed += 1
            return fixed

        fixed = self._write(run) if bad else 0
        return {"checked": len(rows), "missing": missing, "corrupt": corrupt, "fixed": fixed}
