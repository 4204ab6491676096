"""Persistent chat sessions per repository (their own SQLite file beside the cube store).

A conversation is a list of turns; each finished exchange is also written into the cube store as a
plaintext `conversation` cube by `RepoMemory`, which is what makes "what did we decide last week?"
retrievable from a later session.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import sqlite_utils

from .errors import ReadOnlyStoreError, storage_error
from .text import whole_text

#: the file of a repository's conversations, beside its cube store
DB_NAME = "conversations.db"


HISTORY_EXCHANGES = 3  # the last exchanges of a conversation that a new question is asked with


@dataclass
class Message:
    id: int
    conversation_id: str
    role: str  # "user" | "assistant"
    content: str
    created: float
    meta: dict = field(default_factory=dict)  # sources, mode, ttft_s for assistant turns


@dataclass
class Conversation:
    id: str
    title: str
    created: float
    updated: float


class ConversationStore:
    """A write that fails (full disk, read-only data home) raises a `StoreError` saying so and leaves
    every stored conversation as it was. In a folder this process cannot write, an existing file opens
    read-only: conversations can be read, not added to (`read_only`)."""

    @classmethod
    def in_folder(cls, store_dir: Path) -> ConversationStore:
        """The conversations of the repository whose cube store is in `store_dir`."""
        return cls(Path(store_dir) / DB_NAME)

    def __init__(self, db_path: Path, *, read_only: bool = False):
        self.path = Path(db_path)
        self.read_only = read_only or (self.path.is_file() and not os.access(self.path.parent, os.W_OK))
        if self.read_only:
            self.db = sqlite_utils.Database(self._connect_read_only())
            return
        try:
            conn = sqlite3.connect(str(db_path), timeout=10, check_same_thread=False)
            self.db = sqlite_utils.Database(conn)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA busy_timeout=5000")
            self._create_tables()
        except sqlite3.Error as exc:
            raise storage_error(exc, "cannot open the conversations", self.path.parent) from exc

    def _connect_read_only(self) -> sqlite3.Connection:
        uri = f"file:{quote(str(self.path.resolve()))}"
        for params in ("?mode=ro", "?mode=ro&immutable=1"):  # see CubeStore._open_read_only
            conn = sqlite3.connect(uri + params, uri=True, check_same_thread=False)
            try:
                conn.execute("SELECT count(*) FROM conversations").fetchone()
                return conn
            except sqlite3.Error as exc:
                conn.close()
                last = exc
        raise storage_error(last, "cannot read the conversations", self.path.parent)

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        if self.read_only:
            raise ReadOnlyStoreError(f"{what}: {self.path.parent} is read-only")
        try:
            with self.db.conn:
                yield
        except sqlite3.Error as exc:
            raise storage_error(exc, what, self.path.parent) from exc

    def _create_tables(self) -> None:
        with self.db.conn:
            self.db.execute("""CREATE TABLE IF NOT EXISTS conversations (
                id TEXT PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL)""")
            self.db.execute("""CREATE TABLE IF NOT EXISTS messages (
                id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL
                    REFERENCES conversations(id) ON DELETE CASCADE,
                role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL, meta TEXT NOT NULL DEFAULT '{}')""")
            self.db.execute("CREATE INDEX IF NOT EXISTS messages_conv ON messages(conversation_id, id)")

    def list(self) -> list[Conversation]:
        rows = self.db.execute("SELECT id, title, created, updated FROM conversations ORDER BY updated DESC")
        return [Conversation(*r) for r in rows.fetchall()]

    def create(self, title: str = "New conversation") -> Conversation:
        now = time.time()
        c = Conversation(uuid.uuid4().hex[:12], whole_text(title), now, now)
        with self._writing("cannot save the new conversation"):
            self.db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?)", (c.id, c.title, c.created, c.updated))
        return c

    def get(self, conversation_id: str) -> Conversation | None:
        row = self.db.execute("SELECT id, title, created, updated FROM conversations WHERE id = ?",
                              (conversation_id,)).fetchone()
        return Conversation(*row) if row else None

    def rename(self, conversation_id: str, title: str) -> None:
        with self._writing("cannot rename the conversation"):
            self.db.execute("UPDATE conversations SET title = ? WHERE id = ?", (whole_text(title), conversation_id))

    def delete(self, conversation_id: str) -> None:
        with self._writing("cannot delete the conversation"):
            self.db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def add(self, conversation_id: str, role: str, content: str, meta: dict | None = None) -> Message:
        now, content = time.time(), whole_text(content)
        with self._writing("cannot save the message"):
            cur = self.db.execute(
                "INSERT INTO messages (conversation_id, role, content, created, meta) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, content, now, json.dumps(meta or {})))
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
        return Message(cur.lastrowid, conversation_id, role, content, now, meta or {})

    def messages(self, conversation_id: str) -> list[Message]:
        rows = self.db.execute("SELECT id, conversation_id, role, content, created, meta FROM messages "
                               "WHERE conversation_id = ? ORDER BY id", (conversation_id,)).fetchall()
        return [Message(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    def exchanges(self, conversation_id: str, *, skip: Collection[int] = ()) -> list[tuple[str, str]]:
        """(question, answer) pairs in order, for multi-turn prompts; `skip`: message ids to leave out."""
        out, question = [], None
        for m in self.messages(conversation_id):
            if m.id in skip:
                continue
            if m.role == "user":
                question = m.content
            elif m.role == "assistant" and question is not None:
                out.append((question, m.content))
                question = None
        return out

    def recent_exchanges(self, conversation_id: str, *, skip: Collection[int] = ()) -> list[tuple[str, str]]:
        """The last exchanges a new question is asked with (`skip`: message ids to leave out)."""
        return self.exchanges(conversation_id, skip=skip)[-HISTORY_EXCHANGES:]

    def last_exchange(self, conversation_id: str) -> list[int]:
        """The ids of the last answer and its question (what "regenerate" replaces). A last question with no
        answer after it (its answer was never saved) is alone: the answer before it belongs to another."""
        msgs = self.messages(conversation_id)
        ids = []
        if msgs and msgs[-1].role == "assistant":
            ids.append(msgs.pop().id)
        if msgs and msgs[-1].role == "user":
            ids.append(msgs[-1].id)
        return ids

    def delete_messages(self, ids: Iterable[int]) -> None:
        with self._writing("cannot delete messages"):
            self.db.conn.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])

    def close(self) -> None:
        self.db.conn.close()
