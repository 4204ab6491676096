"""Markdown to Qt rich-text HTML, with highlighted code blocks that carry a copy link.

Why a module of its own: answers stream in as Markdown and are re-rendered many times while they
grow, so this must be a pure, fast function (no Qt), and the code of every block must be kept raw
next to the HTML so "Copy" puts exactly the code on the clipboard, not the highlighted markup.

Qt's rich-text engine knows only a subset of HTML/CSS: pygments runs with inline styles
(`noclasses`) and each code block is a one-cell table, which Qt draws with a background and border.
Raw HTML in model output is escaped (markdown-it `html=False`): an answer can never inject markup.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import PurePosixPath

from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_by_name
from pygments.util import ClassNotFound

CODE_BG = "#f6f8fa"
CODE_BORDER = "#d0d7de"
MUTED = "#6e7781"
_LANG_RE = re.compile(r"[\w+#.-]{1,32}")
MONO = "'DejaVu Sans Mono', 'Menlo', 'Consolas', monospace"


@dataclass
class Rendered:
    """HTML for one message plus the raw text of each code block, in order."""

    html: str
    code_blocks: list[str] = field(default_factory=list)


@lru_cache(maxsize=1)
def _formatter() -> HtmlFormatter:
    return HtmlFormatter(noclasses=True, nowrap=True, style="default")


@lru_cache(maxsize=64)
def _lexer(lang: str):
    """Lexers are slow to look up; a streamed answer asks for the same one dozens of times."""
    # Only by alias from pygments' static table: guessing scans every lexer and an unknown name makes
    # get_lexer_by_name scan plugin entry points, and a streamed fence line
    # passes through every prefix of its language name ("p", "py", "pyt"...).
    name = _aliases().get(lang) if lang and _LANG_RE.fullmatch(lang) else None
    if name is None:
        return TextLexer()
    try:
        return get_lexer_by_name(name)
    except ClassNotFound:
        return TextLexer()


@lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    from pygments.lexers._mapping import LEXERS

    out: dict[str, str] = {}
    for _module, _name, aliases, filenames, _mimes in LEXERS.values():
        if not aliases:
            continue
        for alias in aliases:
            out.setdefault(alias, aliases[0])
        for pattern in filenames:  # "*.py" -> "py", so ```rs or ```h work like their file types
            if pattern.startswith("*.") and "*" not in pattern[2:] and "[" not in pattern:
                out.setdefault(pattern[2:].lower(), aliases[0])
    return out


def highlight_code(code: str, lang: str = "") -> str:
    """Highlighted spans (no wrapper) for `code`; unknown languages come back escaped, unstyled."""
    out = highlight(code, _lexer(lang.strip().lower()), _formatter())
    return out.rstrip("\n")


def code_block_html(code: str, lang: str, copy_href: str) -> str:
    """One code block: a header row (language, Copy link) over the highlighted code."""
    label = html.escape(lang or "text")
    # Qt draws a border around every cell of a bordered table: the header and the code sit in
    # one bordered cell, the header being a borderless table of its own.
    return _boxed(
        f'<table width="100%" cellspacing="0" cellpadding="4" border="0"><tr>'
        f'<td style="color:{MUTED}; font-size:small">{label}</td>'
        f'<td align="right" style="font-size:small"><a href="{html.escape(copy_href)}">Copy</a></td></tr></table>'
        f'<pre style="font-family:{MONO}; margin-left:8px; margin-right:8px; margin-bottom:8px; margin-top:2px">'
        f"{highlight_code(code, lang)}</pre>"
    )


def numbered_code_html(code: str, path: str, first_line: int) -> str:
    """Lines of the file `path` (highlighted as its type), each after its line number counted from `first_line`."""
    # lexers strip leading and trailing newlines (pygments' stripnl): put those blank lines back,
    # or every number after them would be off
    total = code.count("\n") + 1
    lead = len(code) - len(code.lstrip("\n"))
    lines = [""] * lead + highlight_code(code, PurePosixPath(path).suffix.lstrip(".")).split("\n")
    lines += [""] * (total - len(lines))
    width = len(str(first_line + total - 1))
    numbered = "\n".join(f'<span style="color:{MUTED}">{n:>{width}}  </span>{line}'
                         for n, line in enumerate(lines, first_line))
    return _boxed(f'<pre style="font-family:{MONO}; margin:6px 8px 6px 8px">{numbered}</pre>')


def _boxed(inner: str) -> str:
    """`inner` on the code background inside a thin border (a one-cell table: Qt draws its background)."""
    return (
        f'<table width="100%" cellspacing="0" cellpadding="0" border="1" '
        f'style="background-color:{CODE_BG}; border-collapse:collapse; border-color:{CODE_BORDER}; '
        f'border-style:solid; margin-top:4px; margin-bottom:4px"><tr><td>{inner}</td></tr></table>'
    )


class MarkdownRenderer:
    """markdown-it with a fence renderer that records code blocks; one instance is reused."""

    def __init__(self) -> None:
        self._md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
        # markdown-it binds rules to its renderer (`rule.__get__(renderer)`): plain functions get it first.
        self._md.add_render_rule("fence", lambda _r, tokens, idx, _o, _e: self._fence(tokens, idx))
        self._md.add_render_rule("code_block", lambda _r, tokens, idx, _o, _e: self._fence(tokens, idx))
        self._md.add_render_rule("code_inline", lambda _r, tokens, idx, _o, _e: _code_inline(tokens[idx].content))
        self._blocks: list[str] = []
        self._prefix = ""

    def render(self, text: str, copy_prefix: str = "copy:") -> Rendered:
        """Render `text`; code block i gets the link `{copy_prefix}{i}`. Unclosed fences are fine."""
        self._blocks = []
        self._prefix = copy_prefix
        body = self._md.render(text)
        return Rendered(body, list(self._blocks))

    def _fence(self, tokens: list, idx: int) -> str:
        tok = tokens[idx]
        lang = (tok.info or "").strip().split(" ")[0] if tok.type == "fence" else ""
        code = tok.content
        self._blocks.append(code)
        return code_block_html(code.rstrip("\n"), lang, f"{self._prefix}{len(self._blocks) - 1}")


def _code_inline(code: str) -> str:
    return f'<code style="font-family:{MONO}; background-color:{CODE_BG}">{html.escape(code)}</code>'


def plain_html(text: str) -> str:
    """User messages are shown as typed: escaped, line breaks kept, no Markdown interpretation."""
    return html.escape(text).replace("\n", "<br>")
