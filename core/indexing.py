"""Indexing, one part of `RepoMemory`: files -> chunks -> plaintext cubes, and the search index over them.

Every chunk becomes searchable at once as a plaintext cube (no model run); compilation to KV is the
compile part's job (`compiling.py`). `index()` walks the whole repository, `sync_paths()` re-reads the
files the watcher names; unchanged files cost a hash. `refresh()` follows cubes other processes wrote.

Reads from the facade: `root`, `store`, `settings`, `_search`, `_lock`, `_rules`; calls `_compile_into`
(compiling) and `_record_change` (notes).
"""

from __future__ import annotations

import fnmatch
import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .chunking import CHUNKING_VERSION, chunk_text
from .errors import CancelledError
from .memory_state import MemoryState
from .search_index import SAVE_AFTER_CHANGES, SearchIndex
from .walk import IgnoreRules, RepoFile, is_unicode_name, load_file, walk_repo

Progress = Callable[[str, int, int], None]  # (stage, done, total)

# A sync of more files than this (a branch switch, a rebase, a regenerated tree) records no per-file change
# notes, as a walk of the whole repository records none: they would be noise, and each would be compiled.
CHANGE_NOTES_MAX_FILES = 20


@dataclass
class IndexSummary:
    files: int = 0
    chunks: int = 0
    compiled: int = 0
    recoded: int = 0  # payloads brought to the configured encoding in C, without a model run
    reused: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    kept_tokens: int = 0
    payload_bytes: int = 0
    payloads_reused: int = 0  # shelved payloads given back to cubes whose text came back (no model run)
    kept_as_text: int = 0  # queued cubes left as text: they failed to compile or did not fit the disk budget
    seconds: float = 0.0
    changed_paths: list[str] = field(default_factory=list)
    removed_paths: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class IndexingMixin(MemoryState):
    _rules: IgnoreRules | None
    _search: SearchIndex
    _hashes: dict[str, tuple[tuple[int, int], str]]  # rel -> ((mtime_ns, size), sha256)

    def refresh(self) -> int:
        """Bring the search index up to date with cubes other processes (the watcher) changed.

        A no-op unless the database changed under another connection; then only changed cubes are
        re-indexed. Returns how many were.
        """
        return self._search.sync()

    def _visibility(self, rel: str) -> str:
        return "local" if self.is_private(rel) else "shared"

    def is_private(self, rel: str) -> bool:
        """Whether a path matches the `private_paths` setting: its memories never leave the machine."""
        return any(fnmatch.fnmatch(rel, pat) for pat in self.settings.private_paths)

    def _chunking(self) -> str:
        return f"{CHUNKING_VERSION}/{self.settings.chunk_tokens}"

    def _file_sha(self, rel: str) -> str | None:
        rec = self.store.get_file(rel)
        return rec.sha256 if rec else None

    def _ingest(self, rel: str, text: str, language: str | None, file_sha: str, summary: IndexSummary,
                record_change: bool) -> None:
        old = {c.id: c for c in self.store.cubes(path=rel, source="code")} if record_change else {}
        chunks = chunk_text(rel, text, language, max_tokens=self.settings.chunk_tokens)
        res = self.store.upsert_chunks(rel, chunks, repo=str(self.root), file_sha=file_sha,
                                       visibility=self._visibility(rel))
        summary.chunks += len(chunks)
        self._search.refresh_ids([*res.created, *res.updated, *res.reactivated, *res.moved, *res.removed])
        if res.created or res.updated or res.removed:
            summary.changed_paths.append(rel)
            if record_change and old:
                self._record_change(rel, old, res)

    def index(self, *, compile: bool = True, progress: Progress | None = None,
              cancel: threading.Event | None = None) -> IndexSummary:
        """Walk the repository, refresh plaintext cubes of changed files, then compile what is pending."""
        t0 = time.perf_counter()
        summary = IndexSummary()
        with self._lock:
            chunking = self._chunking()
            # Another chunking (a new version, another chunk budget) re-chunks unchanged files too; cubes whose
            # text comes out the same keep their identity and payload.
            rechunk = self.store.chunked_with() != chunking
            result = walk_repo(self.root, extra_ignores=())
            summary.skipped = result.counts_by_reason()
            self.store.set_skips(result.skipped)
            seen = set()
            total = len(result.files)
            for i, f in enumerate(result.files):
                if cancel is not None and cancel.is_set():
                    raise CancelledError("indexing cancelled")
                seen.add(f.rel)
                summary.files += 1
                if self._file_sha(f.rel) == f.sha256 and not rechunk:
                    summary.reused += 1
                else:
                    self._ingest(f.rel, f.text, f.language, f.sha256, summary, record_change=False)
                if progress:
                    progress("read", i + 1, total)
            for rel in list(self.store.files()):
                if rel not in seen:
                    self._search.refresh_ids(self.store.remove_file(rel))
                    summary.removed_paths.append(rel)
            if rechunk:
                self.store.set_chunked_with(chunking)
            self._search.save()  # the next start opens this index instead of rebuilding it
        if compile:
            self._compile_into(summary, progress=progress, cancel=cancel)
        summary.seconds = round(time.perf_counter() - t0, 3)
        return summary

    def sync_paths(self, rel_paths: Iterable[str], *, compile: bool = True,
                   cancel: threading.Event | None = None, progress: Progress | None = None) -> IndexSummary:
        """Re-read exactly these files (changed, created or deleted), as the watcher reports them."""
        t0 = time.perf_counter()
        summary = IndexSummary()
        rels = list(dict.fromkeys(rel_paths))
        notes = len(rels) <= CHANGE_NOTES_MAX_FILES
        with self._lock:
            if self._rules is None:
                self._rules = IgnoreRules(self.root)
            for rel in rels:
                if cancel is not None and cancel.is_set():
                    break
                if not is_unicode_name(rel):  # skipped by the walk too: the store never held it
                    summary.skipped["encoding"] = summary.skipped.get("encoding", 0) + 1
                    continue
                got = load_file(self.root, rel, rules=self._rules)
                if not isinstance(got, RepoFile):
                    # Deleted, now ignored, or no longer text: its cubes leave the memory.
                    removed = self.store.remove_file(rel)
                    self._search.refresh_ids(removed)
                    if removed:
                        summary.removed_paths.append(rel)
                    if (self.root / rel).exists():
                        summary.skipped[got.reason] = summary.skipped.get(got.reason, 0) + 1
                    continue
                summary.files += 1
                if self._file_sha(rel) == got.sha256:
                    continue
                self._ingest(rel, got.text, got.language, got.sha256, summary, record_change=notes)
        self._search.save(min_changes=SAVE_AFTER_CHANGES)  # e.g. after a branch switch
        if compile and summary.changed_paths:
            self._compile_into(summary, progress=progress, cancel=cancel)
        summary.seconds = round(time.perf_counter() - t0, 3)
        return summary

    def reload_ignores(self) -> None:
        """.gitignore or .repomemignore changed: the next `sync_paths` reads the rules again."""
        self._rules = None

    def indexed_paths(self) -> list[str]:
        """The files this memory holds cubes of."""
        return sorted(self.store.files())

    def file_is_current(self, rel: str) -> bool:
        """Whether a file still has the content it was indexed with (False: edited since, deleted, or
        never indexed). A stat per call; the file is hashed again only when its size or mtime moved."""
        rec = self.store.get_file(rel)
        if rec is None:
            return False
        path = self.root / rel
        try:
            st = path.stat()
            key = (st.st_mtime_ns, st.st_size)
            seen = self._hashes.get(rel)
            if seen is None or seen[0] != key:
                seen = (key, hashlib.sha256(path.read_bytes()).hexdigest())
                self._hashes[rel] = seen
        except OSError:
            return False
        return seen[1] == rec.sha256

    def stale_files(self) -> list[str]:
        """Indexed files whose content changed since (the watcher has not synced them yet)."""
        return [rel for rel in self.store.files() if not self.file_is_current(rel)]
