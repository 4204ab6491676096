"""The prompt layout shared by compile time and question time.

KV mode and text mode see the same token stream: prefix, memory pieces, then the question turn.
Only where the memory comes from differs (spliced KV vs. decoded text), which keeps the two modes
comparable and lets a compiled payload stand in exactly for its text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .engine import Engine
from .errors import ModelError

SYSTEM = (
    "You are repomem, an assistant that answers questions about a code repository. "
    "Excerpts of the repository and of earlier conversations follow, each starting with its file path "
    "and lines. Answer from them, quote exact names and values, and name the file you used."
)
_MEM = "@@REPOMEM_MEMORY@@"
_Q = "@@REPOMEM_QUESTION@@"
_SYS2 = "@@REPOMEM_INSTRUCTIONS@@"


@dataclass(frozen=True)
class Layout:
    """Chat-template pieces around the memory and the question, rendered by the model's own template."""

    prefix: str  # everything before the memory (system turn opening + instructions)
    between: str  # closes the system turn and opens the user turn
    suffix: str  # closes the user turn and opens the assistant turn
    turn_sep: str  # closes an assistant turn and opens the next user turn
    system_turn: str = ""  # closes the memory's system turn and opens a second one ("": the template has none)

    def question_text(self, question: str, history: Sequence[tuple[str, str]] = (), system: str = "") -> str:
        """The text decoded after the memory: the client's own instructions (`system`), prior turns of
        this conversation, then the question.

        The memory was compiled after repomem's own system text, so a client's system message cannot
        replace it: it follows the memory, in a second system turn where the template has one, else at
        the head of the first user turn."""
        return "".join(text for text, _ in self.question_parts(question, history, system))

    def question_parts(self, question: str, history: Sequence[tuple[str, str]] = (),
                       system: str = "") -> list[tuple[str, bool]]:
        """`question_text` in pieces, each with whether it is the template's (True) or the user's (False)."""
        parts: list[tuple[str, bool]] = []
        if system and self.system_turn:
            parts += [(self.system_turn, True), (system, False), (self.between, True)]
        elif system:
            parts += [(self.between, True), (system + "\n\n", False)]
        else:
            parts.append((self.between, True))
        for i, (q, a) in enumerate(history):
            if i:
                parts.append((self.turn_sep, True))
            parts += [(q, False), (self.suffix, True), (a, False)]
        if history:
            parts.append((self.turn_sep, True))
        parts += [(question, False), (self.suffix, True)]
        return parts

    def question_tokens(self, engine: Engine, question: str, history: Sequence[tuple[str, str]] = (),
                        system: str = "") -> list[int]:
        """`question_text`'s tokens: the template's control tokens parsed, the user's text read as text (a
        question about `<|im_end|>` does not end its turn; instructions cannot open a turn of their own)."""
        return _tokens(engine, self.question_parts(question, history, system))

    def system_tokens(self, engine: Engine, system: str) -> list[int]:
        """The second system turn holding a client's instructions, tokenized as `question_tokens` does."""
        return _tokens(engine, [(self.system_turn, True), (system, False)])


def _tokens(engine: Engine, parts: Sequence[tuple[str, bool]]) -> list[int]:
    """Each part's tokens in turn: control tokens parsed in the template's parts only."""
    return [t for text, template in parts if text
            for t in engine.tokenize(text, add_special=False, parse_special=template)]


def make_layout(engine: Engine) -> Layout:
    """The prefix is the same for every repository, so one compiled payload fits any question."""
    system = SYSTEM + "\n\n" + _MEM
    rendered = engine.apply_chat([{"role": "system", "content": system}, {"role": "user", "content": _Q}])
    i, j = rendered.index(_MEM), rendered.index(_Q)
    two = engine.apply_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}])
    turn_sep = two[two.index("A1") + 2: two.index("U2")]
    between = rendered[i + len(_MEM): j]
    return Layout(prefix=rendered[:i], between=between, suffix=rendered[j + len(_Q):], turn_sep=turn_sep,
                  system_turn=_second_system_turn(engine, between))


def _second_system_turn(engine: Engine, between: str) -> str:
    """What separates two system turns, if the template renders a second one as a turn of its own
    (ChatML does; templates that fold system text into the user turn do not)."""
    try:
        rendered = engine.apply_chat([{"role": "system", "content": _MEM}, {"role": "system", "content": _SYS2},
                                      {"role": "user", "content": _Q}])
    except ModelError:  # a template llama.cpp cannot render this way has no such turn
        return ""
    i, k, j = rendered.find(_MEM), rendered.find(_SYS2), rendered.find(_Q)
    if not 0 <= i < k < j or rendered[k + len(_SYS2): j] != between:
        return ""
    return rendered[i + len(_MEM): k]


def memory_text(path: str, start_line: int, end_line: int, symbol: str | None, text: str) -> str:
    """How one memory piece reads to the model, in KV and text mode alike."""
    head = f"# {path}:{start_line}-{end_line}" + (f" ({symbol})" if symbol else "")
    return f"{head}\n{text.rstrip()}\n\n"


def memory_tokens(engine: Engine, text: str) -> list[int]:
    """One memory piece's tokens, the same at compile time and in text mode. Its text is read as text:
    a file that spells a control token (`<|im_end|>`) cannot end a turn of the prompt."""
    return engine.tokenize(text, add_special=False, parse_special=False)
