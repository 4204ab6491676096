"""Notes, one part of `RepoMemory`: change notes (which symbols an edit touched, with a short diff) and
notes an agent or the user keeps (`remember`, `edit_note`, `forget_note`),
and conversation memory (each finished exchange, kept in the conversation store and as a plaintext cube a
later session can retrieve: "what did we decide last week?").

Exchanges wait in `_unsaved_exchanges` until they are stored: when the data home cannot be written (full
disk, read-only) the answer says so, and the next exchange or `close()` saves them.

Reads from the facade: `root`, `store`, `conversations`, `_search`.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .cube import Cube
from .errors import RepomemError, StoreError
from .memory_state import MemoryState
from .text import whole_text
from .walk import secret_in_text

MAX_NOTE_CHARS = 4000

if TYPE_CHECKING:
    from .answering import Answer
    from .search_index import SearchIndex


def conversation_note(question: str, answer: str, files: list[str], when: str) -> str:
    """The text of a conversation cube (also rebuilt from the conversations by `repomem check --repair`)."""
    text = f"Conversation on {when}.\nQuestion: {question}\nAnswer: {answer}\n"
    return text + ("Files: " + ", ".join(files) + "\n" if files else "")


@dataclass
class UnsavedExchange:
    """A question and its answer on their way into the conversation and the memory."""

    question: str
    answer: Answer
    when: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M", time.localtime()))
    done: set[str] = field(default_factory=set)  # steps already stored: "user", "assistant"


class NotesMixin(MemoryState):
    _search: SearchIndex
    _unsaved_exchanges: list[UnsavedExchange]

    def _record_change(self, rel: str, old: dict[str, Cube], res) -> None:
        """A plaintext change cube: which symbols changed and a short unified diff."""
        lines, symbols = [], []
        for cid in (*res.updated, *res.created, *res.removed):
            before = old.get(cid)
            after = self.store.get(cid)
            sym = (after or before).symbol if (after or before) else None
            symbols.append(sym or "(module)")
            a = before.text.splitlines() if before else []
            b = after.text.splitlines() if (after and cid not in res.removed) else []
            diff = list(difflib.unified_diff(a, b, lineterm="", n=1))[2:40]
            lines += diff
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
        text = (f"Change to {rel} at {when}: modified {', '.join(sorted(set(symbols)))}.\n"
                + "\n".join(lines)[:3000])
        cube = self.store.add_note_cube(text, source="change", path=f"change:{rel}",
                                        symbol=", ".join(sorted(set(symbols)))[:200], repo=str(self.root),
                                        visibility=self._visibility(rel))
        self._search.add_cube(cube)

    def remember(self, note: str, paths: Sequence[str] = (), *, owner: str = "agent") -> Cube:
        """Keep a fact or decision as a note cube (MemOS: agents write memory too), searchable at once.

        `paths`: the files it is about (named in its text, so a question about them finds it). A note
        that looks like it holds a secret is refused, as the walk refuses such files; a note about a
        private path stays on this machine."""
        note = whole_text(note).strip()
        rels = [self._note_path(whole_text(p)) for p in paths if p and p.strip()]
        if not note:
            raise RepomemError("the note is empty")
        if len(note) > MAX_NOTE_CHARS:
            raise RepomemError(f"the note has {len(note):,} characters; keep it under {MAX_NOTE_CHARS:,} "
                               "(a decision or a fact, not a file)")
        text = note + ("\nFiles: " + ", ".join(rels) if rels else "")
        _refuse_secret(text)
        private = any(self.is_private(r) for r in rels)
        cube = self.store.add_note_cube(text, source="note", symbol=note.splitlines()[0][:80], repo=str(self.root),
                                        owner=owner, visibility="local" if private else "shared")
        self._search.add_cube(cube)
        return cube

    def _note_path(self, path: str) -> str:
        """A path as the repository names it (`./x`, `/abs/repo/x` -> `x`), so the private-path
        patterns see what they were written for; a path outside the repository stays as given."""
        path = path.strip().replace("\\", "/")
        if Path(path).is_absolute():
            try:
                path = Path(path).resolve().relative_to(self.root).as_posix()
            except ValueError:
                return path
        while path.startswith("./"):
            path = path[2:]
        return path

    def edit_note(self, cube_id: str, text: str) -> Cube:
        """Replace a note's text (the memory inspector); the same secret check as `remember`."""
        text = whole_text(text)
        if not text.strip():
            raise RepomemError("a note cannot be empty; forget it instead")
        _refuse_secret(text)
        cube = self.store.edit_note(cube_id, text)
        if cube is None:
            raise RepomemError(f"no note with id {cube_id}")
        self._search.add_cube(cube)
        return cube

    def forget_note(self, cube_id: str) -> None:
        """Delete a note cube now. Memories of code come and go with their files, so only notes go here."""
        cube = self.store.get(cube_id)
        if cube is None:
            raise RepomemError(f"no memory with id {cube_id}")
        if cube.source != "note":
            raise RepomemError(f"{cube_id} is a {cube.source} memory, not a note; only notes can be forgotten "
                               "here (exclude a file with .repomemignore)")
        self.store.forget(cube_id)
        self._search.refresh_ids([cube_id])

    def changes_since(self, since: float, *, limit: int = 50, allow_local: bool = True) -> list[Cube]:
        """Change notes (which file, which symbols, a short diff) recorded at or after `since` (Unix
        seconds), newest first; `allow_local=False` leaves out changes to private paths."""
        out = []
        for cube in self.store.notes_since("change", since):
            rel = cube.path.removeprefix("change:")
            if not allow_local and (cube.visibility == "local" or self.is_private(rel)):
                continue
            out.append(cube)
            if len(out) >= limit:
                break
        return out

    def _save_exchanges(self, warnings: list[str]) -> bool:
        """Save the exchanges not saved yet, oldest first; on a store error add a warning and keep them.
        Returns whether none is left."""
        while self._unsaved_exchanges:
            try:
                self._remember_exchange(self._unsaved_exchanges[0])
            except StoreError as exc:
                n = len(self._unsaved_exchanges)
                warnings.append(f"{n} exchange{'s' if n > 1 else ''} of this conversation not saved yet ({exc}); "
                                "kept in this session and saved once the data folder can be written again")
                return False
            self._unsaved_exchanges.pop(0)
        return True

    def _remember_exchange(self, ex: UnsavedExchange) -> None:
        """Conversation memory: the exchange is stored in its conversation and becomes a plaintext cube a
        later session can retrieve. Each step runs once, so a retry after a failure duplicates nothing."""
        question, ans = ex.question, ex.answer
        if ans.conversation_id is None:
            ans.conversation_id = self.conversations.create(question[:60]).id
        cid = ans.conversation_id
        if "user" not in ex.done:
            self.conversations.add(cid, "user", question)
            ex.done.add("user")
        if "assistant" not in ex.done:
            self.conversations.add(cid, "assistant", ans.answer,
                                   {"sources": [s.as_dict() for s in ans.sources], "mode": ans.mode,
                                    "ttft_s": ans.ttft_s, "evidence": ans.evidence.as_dict() if ans.evidence else None})
            ex.done.add("assistant")
        files = sorted({s.path for s in ans.sources if s.source == "code"})
        text = conversation_note(question, ans.answer, files, ex.when)
        cube = self.store.add_note_cube(text, source="conversation", path=f"conversation:{cid}",
                                        symbol=question[:80], repo=str(self.root))
        self._search.add_cube(cube)


def _refuse_secret(text: str) -> None:
    kind = secret_in_text(text)
    if kind:
        raise RepomemError(f"the note looks like it holds a secret ({kind}); secrets never become memory: "
                           "remove it and try again")
