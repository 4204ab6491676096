"""A MemCube's records: the `Cube` row and what the store reports about cubes and files.

Plain data, no database: what flows from the store to retrieval, answers and the shells.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any

CUBE_KINDS = ("plaintext", "activation", "parameter")
SOURCES = ("code", "conversation", "change", "note")
VISIBILITIES = ("shared", "local")
STATUSES = ("active", "stale", "archived")

@dataclass
class Cube:
    """One memory: a row of `cubes`. Times are Unix seconds (float)."""

    id: str
    kind: str = "plaintext"
    repo: str = ""
    path: str = ""
    symbol: str | None = None
    language: str | None = None
    chunk_kind: str | None = None
    start_line: int = 1
    end_line: int = 1
    text: str = ""
    content_hash: str = ""
    version: int = 1
    created: float = 0.0
    updated: float = 0.0
    last_access: float | None = None
    access_count: int = 0
    importance: float = 0.5
    pinned: bool = False
    owner: str | None = None
    source: str = "code"
    visibility: str = "shared"
    status: str = "active"
    model_fingerprint: str | None = None
    payload_bytes: int | None = None
    payload_sha256: str | None = None
    encoding: str | None = None
    tokens: int | None = None
    kept_tokens: int | None = None
    archived_at: float | None = None

    @property
    def has_payload(self) -> bool:
        return self.kind == "activation" and self.payload_sha256 is not None

    @property
    def location(self) -> str:
        """`path:start-end`, the way answers cite memory."""
        return f"{self.path}:{self.start_line}-{self.end_line}"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Cube:
        data = {f.name: row[f.name] for f in fields(cls) if f.name in row}
        data["pinned"] = bool(data.get("pinned"))
        return cls(**data)


@dataclass(frozen=True)
class HistoryEvent:
    id: int
    cube_id: str
    version: int | None
    event: str
    at: float
    detail: dict[str, Any]
    content_hash: str | None
    start_line: int | None
    end_line: int | None


@dataclass(frozen=True)
class FileRecord:
    path: str
    sha256: str
    mtime: float | None
    size: int | None
    indexed_at: float


@dataclass
class UpsertResult:
    """What one file's re-index did, by cube id. `moved`: same text at new lines (payload kept)."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reactivated: list[str] = field(default_factory=list)


def cube_id_for(repo: str, path: str, symbol: str | None, chunk_kind: str | None, ordinal: int) -> str:
    """Stable id of a code cube: same definition in the same file -> same id across re-indexes."""
    key = "\0".join([repo, path, symbol or "", chunk_kind or "", str(ordinal)])
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
