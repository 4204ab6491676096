"""Notes, one part of `RepoMemory`: change notes (which symbols an edit touched, with a short diff) and
conversation memory (each finished exchange, kept in the conversation store and as a plaintext cube a
later session can retrieve: "what did we decide last week?").

Reads from the facade: `root`, `store`, `conversations`; calls `_index_cube` (indexing).
"""

from __future__ import annotations

import difflib
import time
from typing import TYPE_CHECKING

from .memory_state import MemoryState
from .store import Cube

if TYPE_CHECKING:
    from .answering import Answer


class NotesMixin(MemoryState):
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
                                        symbol=", ".join(sorted(set(symbols)))[:200], repo=str(self.root))
        self._index_cube(cube)

    def _remember_exchange(self, question: str, ans: Answer) -> None:
        """Conversation memory: the exchange becomes a plaintext cube a later session can retrieve."""
        if ans.conversation_id is None:
            ans.conversation_id = self.conversations.create(question[:60]).id
        cid = ans.conversation_id
        self.conversations.add(cid, "user", question)
        self.conversations.add(cid, "assistant", ans.answer,
                               {"sources": [s.as_dict() for s in ans.sources], "mode": ans.mode,
                                "ttft_s": ans.ttft_s})
        files = sorted({s.path for s in ans.sources if s.source == "code"})
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
        text = f"Conversation on {when}.\nQuestion: {question}\nAnswer: {ans.answer}\n"
        if files:
            text += "Files: " + ", ".join(files) + "\n"
        cube = self.store.add_note_cube(text, source="conversation", path=f"conversation:{cid}",
                                        symbol=question[:80], repo=str(self.root))
        self._index_cube(cube)
