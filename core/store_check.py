"""`repomem check PATH [--repair]`: is a repository's store whole, and rebuild what can be rebuilt.

What is checked:
* `cubes.db`: SQLite's `PRAGMA integrity_check`, read only (a database SQLite cannot read for another reason
  than damage, a full disk or a read-only folder, is reported as such and never rebuilt);
* every payload a cube points at: present, of its recorded size and sha256 (every byte is read);
* payloads no cube points at (orphans) and leftovers of unfinished writes;
* the saved search index (`index_file`): readable and from this version;
* `conversations.db`: `integrity_check`. It is the user's own data: only a damaged one is ever replaced.

What `--repair` does, and only that (compiled memory can always be rebuilt; notes and conversations
are never dropped):
* a damaged `cubes.db` is moved aside (`cubes.db.damaged-<time>`, with its -wal/-shm; never deleted),
  conversation and change notes readable in it are copied into a new store (when that fails or is
  interrupted, the damaged file goes back in place), conversation notes it lost are written again from
  `conversations.db`, and the repository is indexed again as plaintext;
* a damaged `conversations.db` is moved aside the same way, and every conversation and message readable
  in it is copied, with its id, into a new one (a message whose conversation row is lost gets a
  "Recovered conversation");
* a cube whose payload is missing or damaged goes back to plaintext and into the compile queue;
* orphan payloads and leftovers older than the GC grace period are deleted (younger ones may be
  a compile in another process that has not attached its payload yet);
* a missing or unusable search index file is rebuilt.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import index_file, paths
from .conversations import DB_NAME as CONVERSATIONS_DB
from .conversations import ConversationStore
from .cube import Cube
from .errors import RepomemError, StoreError
from .locks import holder
from .payloads import LocalPayloads, PayloadMissing
from .store import CubeStore
from .store_base import DB_NAME, PAYLOAD_DIR
from .store_lifecycle import GC_GRACE_S
from .watch_status import lock_path

Progress = Callable[[str, int, int], None]
BITE_ROWS = 256  # rows read at a time from a damaged table
MAX_MISSED_BITES = 4096  # failed bites before the salvage of a table stops
SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass
class CheckReport:
    """What `check_store` found (and, with repair, did). Plain types: `as_dict()` is the JSON."""

    store: str
    database: str = "ok"  # "ok", "missing", or what is wrong
    integrity: list[str] = field(default_factory=list)  # integrity_check messages when not ok
    cubes: int = 0
    payloads_checked: int = 0
    payloads_missing: list[str] = field(default_factory=list)  # cube ids
    payloads_corrupt: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # sha256 of payloads no cube points at
    orphans_recent: int = 0  # of which younger than the grace period
    temp_files: int = 0  # leftovers of unfinished writes
    index_file: str = "ok"
    conversations: str = "ok"
    repaired: dict[str, Any] = field(default_factory=dict)

    @property
    def problems(self) -> int:
        """Things wrong. Recent orphans are not: a compile in another process may be about to attach them."""
        return (int(self.database != "ok") + len(self.payloads_missing) + len(self.payloads_corrupt)
                + len(self.orphans) - self.orphans_recent + self.temp_files + int(self.index_file != "ok")
                + int(self.conversations != "ok"))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "problems": self.problems}


class Unreadable(Exception):
    """The database could not be read at all (a full disk, a read-only folder, a lock): no sign of damage."""


def _damage(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorname", "") or "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


def _integrity(db_path: Path) -> list[str]:
    """[] when SQLite finds the database whole, else its messages. Read only: a check writes nothing. Raises
    Unreadable when SQLite cannot read it for another reason than damage, which a rebuild would not mend."""
    try:
        conn = sqlite3.connect(f"file:{quote(str(db_path))}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute("PRAGMA integrity_check(20)").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if _damage(exc):
            return [str(exc)]
        raise Unreadable(str(exc)) from None
    return [] if rows == [("ok",)] else [str(r[0]) for r in rows]


def check_store(repo_root: str | Path, *, repair: bool = False, progress: Progress | None = None) -> CheckReport:
    """Check (and with `repair`, fix) the store of the repository at `repo_root`."""
    root = Path(repo_root).expanduser().resolve()
    store_dir = paths.store_dir(root)
    if not store_dir.is_dir():
        raise RepomemError(f"no memory of {root} yet (nothing under {store_dir})")
    report = CheckReport(store=str(store_dir))
    conv_db = store_dir / CONVERSATIONS_DB
    try:
        if conv_db.exists() and (problems := _integrity(conv_db)):
            report.conversations = "; ".join(problems)
            if repair:
                _rebuild_conversations(root, store_dir, report)
    except Unreadable as exc:
        report.conversations = f"cannot be read ({exc})"
    db_path = store_dir / DB_NAME
    try:
        report.integrity = _integrity(db_path) if db_path.exists() else []
    except Unreadable as exc:
        # a full disk or a read-only folder is not damage: moving a whole database aside would not mend it
        report.database = f"cannot be read ({exc}): free space or make the folder writable, then check again"
        return report
    if not db_path.exists():
        report.database = "missing"
    elif report.integrity:
        report.database = "damaged"
    if report.database != "ok":
        report.orphans = sorted(LocalPayloads(store_dir / PAYLOAD_DIR).iterate())
        if repair:
            _rebuild_database(root, store_dir, report)
        return report

    store = CubeStore.open(store_dir)
    try:
        _check_payloads(store, report, progress)
        _check_files(store, report)
        try:
            index_file.load(index_file.path_for(store_dir))
        except index_file.IndexFileInvalid as exc:
            report.index_file = str(exc)
        if repair:
            _repair(store, report)
    finally:
        store.close()
    return report


def _check_payloads(store: CubeStore, report: CheckReport, progress: Progress | None) -> None:
    cubes = store.cubes()
    report.cubes = len(cubes)
    with_payload = [c for c in cubes if c.payload_sha256]
    for i, cube in enumerate(with_payload):
        try:
            view = store.payloads.read(str(cube.payload_sha256), verify=True)
        except PayloadMissing:
            report.payloads_missing.append(cube.id)
        except StoreError:
            report.payloads_corrupt.append(cube.id)
        else:
            if cube.payload_bytes is not None and view.nbytes != cube.payload_bytes:
                report.payloads_corrupt.append(cube.id)
        report.payloads_checked += 1
        if progress:
            progress("payloads", i + 1, len(with_payload))


def _check_files(store: CubeStore, report: CheckReport) -> None:
    referenced = store.referenced_payloads()
    report.orphans = sorted(sha for sha in store.payloads.iterate() if sha not in referenced)
    for sha in report.orphans:
        age = store.payloads.age(sha)
        report.orphans_recent += age is not None and age < GC_GRACE_S
    report.temp_files = store.payloads.unfinished()


def _repair(store: CubeStore, report: CheckReport) -> None:
    demoted = 0
    for cid in (*report.payloads_missing, *report.payloads_corrupt):
        # back to plaintext and into the compile queue: it answers as text until compiled again
        if store.archive(cid, reason="repomem check: payload missing or damaged"):
            store.promote(cid)
            demoted += 1
    report.repaired["payloads_requeued"] = demoted
    if report.orphans or report.temp_files:
        report.repaired["files_deleted"] = store.gc_payloads()
    if report.index_file != "ok":
        from .search_index import SearchIndex

        SearchIndex.open(store).save(min_changes=0)
        report.repaired["index_file"] = "rebuilt"


def _move_db(src: Path, dst: Path) -> None:
    """A database file and its -wal/-shm, moved together."""
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{src}{suffix}").exists():
            shutil.move(f"{src}{suffix}", f"{dst}{suffix}")


def _salvage_notes(db_path: Path) -> list[Cube]:
    """Conversation and change notes still readable in a damaged database."""
    return [Cube.from_row(r) for r in _salvage_rows(db_path, "cubes", "source != 'code'")]


def _salvage_rows(db_path: Path, table: str, where: str = "1") -> list[dict]:
    """The rows of `table` still readable in a damaged database (row by row where needed; through a copy
    with SQLite's magic string written back when that is what was overwritten)."""
    rows = _read_rows(db_path, table, where)
    if rows or db_path.read_bytes()[:16] == SQLITE_MAGIC:
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / db_path.name
        data = bytearray(db_path.read_bytes())
        data[:16] = SQLITE_MAGIC
        copy.write_bytes(bytes(data))
        return _read_rows(copy, table, where)


def _read_rows(db_path: Path, table: str, where: str) -> list[dict]:
    try:
        conn = sqlite3.connect(f"file:{quote(str(db_path))}?mode=ro", uri=True)
    except sqlite3.Error:
        return []
    conn.row_factory = sqlite3.Row
    out: list[dict] = []
    try:
        try:
            return [dict(r) for r in conn.execute(f"SELECT * FROM {table} WHERE {where}").fetchall()]
        except sqlite3.DatabaseError:
            pass
        # Smaller bites, in rowid order, around the damaged pages; a bite that fails is stepped over. The
        # steps are counted: a damaged page can make the largest rowid look like 2**63.
        last, misses = -(2**63), 0
        while misses < MAX_MISSED_BITES:
            try:
                rows = conn.execute(f"SELECT rowid AS _rowid_, * FROM {table} WHERE rowid > ? AND {where} "
                                    f"ORDER BY rowid LIMIT {BITE_ROWS}", (last,)).fetchall()
            except sqlite3.DatabaseError:
                misses += 1
                last = last + BITE_ROWS if last >= 0 else 0
                continue
            if not rows:
                break
            last = rows[-1]["_rowid_"]
            out.extend({k: r[k] for k in r.keys() if k != "_rowid_"} for r in rows)
    finally:
        conn.close()
    return out


def _rebuild_conversations(root: Path, store_dir: Path, report: CheckReport) -> None:
    """A damaged conversations.db: moved aside (never deleted), and every conversation and message still
    readable in it copied into a new one, with their ids. On a failure the damaged file goes back."""
    _refuse_while_watched(root)
    conv_db = store_dir / CONVERSATIONS_DB
    conversations = _salvage_rows(conv_db, "conversations")
    messages = _salvage_rows(conv_db, "messages")
    aside = store_dir / f"{CONVERSATIONS_DB}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    _move_db(conv_db, aside)
    try:
        fresh = ConversationStore(conv_db)
        try:
            with fresh.db.conn:
                fresh.db["conversations"].insert_all(conversations, pk="id", replace=True)
                known = {c["id"] for c in conversations}
                # a message whose conversation row was lost keeps a conversation of its own
                for cid in dict.fromkeys(m["conversation_id"] for m in messages if m["conversation_id"] not in known):
                    first = min(m["created"] for m in messages if m["conversation_id"] == cid)
                    fresh.db["conversations"].insert({"id": cid, "title": "Recovered conversation",
                                                      "created": first, "updated": first})
                fresh.db["messages"].insert_all(messages, pk="id", replace=True)
        finally:
            fresh.close()
    except BaseException as exc:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{conv_db}{suffix}").unlink(missing_ok=True)
        _move_db(aside, conv_db)
        if isinstance(exc, sqlite3.Error | StoreError):
            raise RepomemError(f"could not write a new {CONVERSATIONS_DB} in {store_dir}: {exc}; the damaged "
                               "one is back in place") from exc
        raise
    report.repaired["conversations_kept_as"] = aside.name
    report.repaired["conversations_salvaged"] = {"conversations": len(conversations), "messages": len(messages)}


def _refuse_while_watched(root: Path) -> None:
    if (pid := holder(lock_path(root))) is not None:
        # its open connection would keep writing into the file moved aside
        raise RepomemError(f"a watcher (pid {pid}: the app, `repomem watch` or `repomem serve`) has this memory "
                           "open: stop it, then repair")


def _rebuild_database(root: Path, store_dir: Path, report: CheckReport) -> None:
    from .memory import RepoMemory
    from .notes import conversation_note

    db_path = store_dir / DB_NAME
    _refuse_while_watched(root)
    notes: list[Cube] = []
    aside = None
    if db_path.exists():
        notes = _salvage_notes(db_path)
        aside = store_dir / f"{DB_NAME}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        _move_db(db_path, aside)
        report.repaired["damaged_database_kept_as"] = aside.name
    index_file.path_for(store_dir).unlink(missing_ok=True)
    try:
        store = CubeStore.open(store_dir)
        try:
            report.repaired["notes_salvaged"] = store.restore_notes(notes)
        except BaseException:
            store.close()
            raise
    except BaseException as exc:
        # No new store holds the notes yet: the damaged file goes back, to be repaired again later.
        if aside is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db_path}{suffix}").unlink(missing_ok=True)
            _move_db(aside, db_path)
            report.repaired.pop("damaged_database_kept_as", None)
        if isinstance(exc, StoreError):
            raise RepomemError(f"could not create a new store in {store_dir}: {exc}; the damaged database "
                               "is back in place") from exc
        raise
    try:
        have = {n.path for n in notes if n.source == "conversation"}
        rebuilt = []
        conv_db = store_dir / CONVERSATIONS_DB
        if conv_db.exists() and (report.conversations == "ok" or "conversations_kept_as" in report.repaired):
            conversations = ConversationStore(conv_db, read_only=True)
            try:
                for conv in conversations.list():
                    if f"conversation:{conv.id}" in have:
                        continue
                    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conv.created))
                    for question, answer in conversations.exchanges(conv.id):
                        rebuilt.append(store.add_note_cube(conversation_note(question, answer, [], when),
                                                           source="conversation", path=f"conversation:{conv.id}",
                                                           symbol=question[:80], repo=str(root)))
            finally:
                conversations.close()
        report.repaired["conversation_notes_rebuilt"] = len(rebuilt)
    finally:
        store.close()
    if root.is_dir():
        mem = RepoMemory.open(root)
        try:
            summary = mem.index(compile=False)
            report.repaired["files_indexed"] = summary.files
            mem.store.gc_payloads()
        finally:
            mem.close()
    else:
        report.repaired["files_indexed"] = f"not indexed: {root} is gone"
