"""Text as it can be stored and tokenized."""

from __future__ import annotations


def whole_text(text: str) -> str:
    """`text` with half a surrogate pair (a client that cut a string inside an emoji, a JSON `\\ud83d`) replaced:
    UTF-8, and so SQLite and the tokenizer, have no such character."""
    return text.encode("utf-8", "replace").decode("utf-8")
