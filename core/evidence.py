"""The lines an answer came from: a few exact lines of the memories it read, shown under the answer.

A small model that answers from several pieces sometimes quotes a neighbour of the right line (another
constant of the same table, the next exception of a list). Showing the lines that hold what the answer says
lets the user catch that at a glance. The lines are found after the fact, lexically: each line of each memory
the answer read is scored by the answer's terms it contains, weighted by how rare each term is in the
repository (idf) and counted more when the question did not already say it (a value, a name the answer
adds). The best line and its matching neighbours make the evidence; an answer that shares nothing with its
memories falls back to the question's best line in the top memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .retrieval import code_tokens

# Lines of evidence at most; how far a neighbour may be from the best line, and the share of the best line's
# score it must exceed to join (a neighbour that merely shares a word with the answer stays out).
MAX_LINES = 6
REACH = 2
JOIN_SHARE = 0.5
# Weight of an answer term the question also contains, against one the answer adds.
ECHO_WEIGHT = 0.25


@dataclass(frozen=True)
class Evidence:
    """Exact lines of one memory: `path:start_line-end_line` and their text."""

    path: str
    start_line: int
    end_line: int
    text: str
    cube_id: str

    @property
    def location(self) -> str:
        return f"{self.path}:{self.start_line}-{self.end_line}"

    def as_dict(self) -> dict:
        return {"path": self.path, "start_line": self.start_line, "end_line": self.end_line, "text": self.text,
                "cube_id": self.cube_id}


@dataclass(frozen=True)
class EvidencePiece:
    """What evidence needs of a memory the answer read (code or notes; in rank order)."""

    cube_id: str
    path: str
    start_line: int
    text: str


def find_evidence(answer: str, question: str, pieces: Sequence[EvidencePiece],
                  idf: Callable[[str], float]) -> Evidence | None:
    """The lines of `pieces` that best hold what `answer` says (None when there are no pieces)."""
    if not pieces:
        return None
    asked = set(code_tokens(question))
    said = {t: idf(t) * (ECHO_WEIGHT if t in asked else 1.0) for t in set(code_tokens(answer))}
    best = _best_lines(pieces, said)
    if best is None:  # the answer shares no term with its memories: show the top memory's best line for the question
        best = _best_lines(pieces[:1], {t: idf(t) for t in asked})
    if best is None:
        top = pieces[0]
        lines = top.text.split("\n")[:MAX_LINES]
        return Evidence(top.path, top.start_line, top.start_line + len(lines) - 1, "\n".join(lines), top.cube_id)
    piece, lo, hi = best
    lines = piece.text.split("\n")
    return Evidence(piece.path, piece.start_line + lo, piece.start_line + hi, "\n".join(lines[lo:hi + 1]),
                    piece.cube_id)


def _best_lines(pieces: Sequence[EvidencePiece], weights: dict[str, float]) -> tuple[EvidencePiece, int, int] | None:
    """(piece, first, last line index) around the best-scoring line; earlier pieces win ties."""
    best: tuple[float, EvidencePiece, list[float], int] | None = None
    for piece in pieces:
        scores = [sum(weights.get(t, 0.0) for t in set(code_tokens(line))) for line in piece.text.split("\n")]
        if not scores:
            continue
        i = max(range(len(scores)), key=scores.__getitem__)
        if scores[i] > 0 and (best is None or scores[i] > best[0]):
            best = (scores[i], piece, scores, i)
    if best is None:
        return None
    top, piece, scores, i = best
    lo = hi = i
    join = top * JOIN_SHARE
    # grow over neighbours that match nearly as well, up to REACH lines away and MAX_LINES in all
    while hi - lo + 1 < MAX_LINES:
        before = next((j for j in range(lo - 1, max(-1, lo - 1 - REACH), -1) if scores[j] > join), None)
        after = next((j for j in range(hi + 1, min(len(scores), hi + 1 + REACH)) if scores[j] > join), None)
        grow = [j for j in (before, after) if j is not None and max(hi, j) - min(lo, j) + 1 <= MAX_LINES]
        if not grow:
            break
        j = max(grow, key=scores.__getitem__)
        lo, hi = min(lo, j), max(hi, j)
    return piece, lo, hi
