"""The chat transcript: one text frame per message, the streaming one re-rendered in place.

Why frames in one QTextBrowser rather than a widget per message: selection and copy work across the
whole conversation, links (copy a code block, open a source) come for free, and while an answer
streams only the last frame's contents are replaced, so the cost of a refresh grows with the answer,
not with the conversation. Refreshes are coalesced by a timer: tokens arrive far faster than anyone
reads, and re-rendering Markdown for each one would starve the GUI thread.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import QTimer, QUrl, Signal
from PySide6.QtGui import (
    QColor,
    QDesktopServices,
    QGuiApplication,
    QTextBlockFormat,
    QTextCharFormat,
    QTextCursor,
    QTextFrame,
    QTextFrameFormat,
)
from PySide6.QtWidgets import QTextBrowser

from .markdown_render import MUTED, MarkdownRenderer, numbered_code_html, plain_html
from .records import pick

USER_BG = "#e8f0fe"
ASSISTANT_BG = "#ffffff"
ERROR_BG = "#fdecea"
REFRESH_MS = 60


@dataclass
class SourceRef:
    """A `path:start-end` citation shown under an answer; clicking it opens the file at `start`. Under an
    answer across repositories it names its repository (`repo: path:start-end`) and opens the file there."""

    path: str
    start: int
    end: int
    symbol: str = ""
    repo: str = ""  # the repository's root, when the citation names it

    @property
    def label(self) -> str:
        where = f"{self.path}:{self.start}-{self.end}"
        return f"{Path(self.repo).name}: {where}" if self.repo else where

    @property
    def file(self) -> str:
        """What to open: the path in its own repository, or in the current one."""
        return str(Path(self.repo) / self.path) if self.repo else self.path

    @classmethod
    def from_core(cls, src: Any) -> SourceRef:
        return cls(str(pick(src, "path", default="?")), int(pick(src, "start_line", "start", default=1)),
                   int(pick(src, "end_line", "end", default=1)), str(pick(src, "symbol", default="") or ""))


@dataclass
class EvidenceRef(SourceRef):
    """The exact lines an answer came from: a collapsed `Evidence path:start-end` line under it that
    expands to the lines themselves, so a near miss (the neighbour of the right line) shows at a glance."""

    text: str = ""

    @classmethod
    def from_core(cls, src: Any) -> EvidenceRef:
        return replace(super().from_core(src), text=str(pick(src, "text", default="")))


@dataclass
class ChatMessage:
    role: str  # "user" | "assistant" | "error"
    text: str = ""
    sources: list[SourceRef] = field(default_factory=list)
    meta: str = ""  # one discreet line: mode, time to first token, ...
    streaming: bool = False
    code_blocks: list[str] = field(default_factory=list)
    recorded: bool = False  # this exchange is in the conversation history (regenerate must drop it)
    evidence: EvidenceRef | None = None
    evidence_shown: bool = False  # the evidence lines are expanded (collapsed until clicked)


class ChatView(QTextBrowser):
    """Shows a list of `ChatMessage`s; `open_source(path, line)` fires when a citation is clicked."""

    open_source = Signal(str, int)
    copied = Signal(str)

    def __init__(self, parent=None) -> None:  # noqa: ANN001 - Qt parent
        super().__init__(parent)
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        self.anchorClicked.connect(self._on_anchor)
        self.document().setDocumentMargin(10)
        self._renderer = MarkdownRenderer()
        self._renderer.render("```python\nx = 1\n```")  # warm-up: pygments' first use is slow
        self.messages: list[ChatMessage] = []
        self._frames: list[QTextFrame] = []
        self._refresh = QTimer(self)
        self._refresh.setSingleShot(True)
        self._refresh.setInterval(REFRESH_MS)
        self._refresh.timeout.connect(self._render_last)
        self._dirty = False

    # -- public API ---------------------------------------------------------------------------
    def set_messages(self, messages: list[ChatMessage]) -> None:
        self._refresh.stop()
        self.clear()
        self.messages, self._frames = [], []
        for m in messages:
            self.add_message(m)

    def add_message(self, message: ChatMessage) -> int:
        index = len(self.messages)
        self.messages.append(message)
        cursor = QTextCursor(self.document())
        cursor.movePosition(QTextCursor.MoveOperation.End)
        frame = cursor.insertFrame(self._frame_format(message.role))
        self._frames.append(frame)
        self._fill(index)
        self._scroll_to_end()
        return index

    def append_text(self, piece: str) -> None:
        """Streamed text for the last message; the view catches up at most every REFRESH_MS."""
        if not self.messages:
            return
        self.messages[-1].text += piece
        self._dirty = True
        if not self._refresh.isActive():
            self._refresh.start()

    def update_last(self, **changes: Any) -> None:
        """Change fields of the last message (text, sources, meta, streaming, role) and redraw it now."""
        if not self.messages:
            return
        msg = self.messages[-1]
        for k, v in changes.items():
            setattr(msg, k, v)
        if "role" in changes:
            self._frames[-1].setFrameFormat(self._frame_format(msg.role))
        self._dirty = True
        self._render_last()

    def show_evidence(self, index: int, shown: bool = True) -> None:
        """Expand (or collapse) the evidence lines under message `index`; the view stays where it was,
        except at the bottom of the conversation, where it follows what was expanded."""
        msg = self.messages[index]
        if msg.evidence is None or msg.evidence_shown == shown:
            return
        msg.evidence_shown = shown
        bar = self.verticalScrollBar()
        value, follow = bar.value(), bar.value() >= bar.maximum() - 4 and index == len(self.messages) - 1
        self._fill(index)
        if follow:
            self._scroll_to_end()
        else:
            bar.setValue(value)

    def remove_last(self) -> ChatMessage | None:
        """Drop the last message (regenerate replaces the previous answer)."""
        if not self.messages:
            return None
        self._refresh.stop()
        msg = self.messages.pop()
        frame = self._frames.pop()
        cursor = frame.firstCursorPosition()
        cursor.setPosition(frame.firstPosition() - 1)
        cursor.setPosition(frame.lastPosition() + 1, QTextCursor.MoveMode.KeepAnchor)
        cursor.removeSelectedText()
        return msg

    def flush(self) -> None:
        """Render pending streamed text now (before reading the view, e.g. for a screenshot)."""
        if self._dirty:
            self._render_last()

    # -- rendering ----------------------------------------------------------------------------
    @staticmethod
    def _frame_format(role: str) -> QTextFrameFormat:
        fmt = QTextFrameFormat()
        fmt.setBackground(QColor({"user": USER_BG, "error": ERROR_BG}.get(role, ASSISTANT_BG)))
        fmt.setPadding(8)
        fmt.setTopMargin(4)
        fmt.setBottomMargin(4)
        fmt.setBorder(1)
        fmt.setBorderBrush(QColor("#dde3ea"))
        if role == "user":
            fmt.setLeftMargin(60)
        else:
            fmt.setRightMargin(30)
        return fmt

    def _message_html(self, index: int) -> str:
        m = self.messages[index]
        who = {"user": "You", "assistant": "repomem", "error": "Error"}.get(m.role, m.role)
        head = f'<p style="margin:0"><b>{who}</b></p>'
        if m.role == "assistant":
            rendered = self._renderer.render(m.text, f"copy:{index}:")
            m.code_blocks = rendered.code_blocks
            body = rendered.html or ("" if m.streaming else "<p>(no answer)</p>")
            if m.streaming:
                body += f'<p style="color:{MUTED}">▍</p>'  # not in the Markdown: it would end up in a fence
        else:
            m.code_blocks = []
            body = f"<p>{plain_html(m.text)}</p>"
        foot = ""
        if m.sources:
            links = " &nbsp; ".join(
                f'<a href="src:{index}:{i}">{html.escape(s.label)}</a>' for i, s in enumerate(m.sources))
            foot += f'<p style="margin-top:6px; font-size:small">Sources: {links}</p>'
        if m.evidence is not None and not m.streaming:
            foot += self._evidence_html(index, m.evidence, m.evidence_shown)
        if m.meta:
            lines = "<br>".join(html.escape(line) for line in m.meta.splitlines())
            foot += f'<p style="margin:0; color:{MUTED}; font-size:small">{lines}</p>'
        return head + body + foot

    @staticmethod
    def _evidence_html(index: int, ev: EvidenceRef, shown: bool) -> str:
        toggle = f'<a href="ev:{index}" style="text-decoration:none">{"▾" if shown else "▸"} Evidence</a>'
        head = (f'<p style="margin-top:4px; margin-bottom:0; font-size:small">{toggle} '
                f'<a href="evsrc:{index}">{html.escape(ev.label)}</a></p>')
        return head + numbered_code_html(ev.text, ev.path, ev.start) if shown else head

    def _fill(self, index: int) -> None:
        frame = self._frames[index]
        cursor = frame.firstCursorPosition()
        cursor.setPosition(frame.lastPosition(), QTextCursor.MoveMode.KeepAnchor)
        cursor.beginEditBlock()
        cursor.removeSelectedText()
        # The block left behind keeps the formats of what was removed (a list item, a heading):
        # reset them, or the next render starts inside the old answer's last list. (A fresh block
        # format has no list object. Not QTextCursor.currentList(): in PySide6 6.12 each call that
        # returns None drops a reference to None and the interpreter dies at exit.)
        cursor.setBlockFormat(QTextBlockFormat())
        cursor.setCharFormat(QTextCharFormat())
        cursor.insertHtml(self._message_html(index))
        cursor.endEditBlock()

    def _render_last(self) -> None:
        if not self.messages or not self._dirty:
            return
        self._dirty = False
        bar = self.verticalScrollBar()
        follow = bar.value() >= bar.maximum() - 4
        self._fill(len(self.messages) - 1)
        if follow:
            self._scroll_to_end()

    def _scroll_to_end(self) -> None:
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())

    # -- links --------------------------------------------------------------------------------
    def _on_anchor(self, url: QUrl) -> None:
        href = url.toString()
        kind, _, rest = href.partition(":")
        if kind in ("ev", "evsrc"):
            self._on_evidence(kind, rest)
        elif kind in ("copy", "src"):
            try:
                m, i = (int(x) for x in rest.split(":"))
            except ValueError:
                return
            if not 0 <= m < len(self.messages):
                return
            msg = self.messages[m]
            if kind == "copy" and 0 <= i < len(msg.code_blocks):
                QGuiApplication.clipboard().setText(msg.code_blocks[i])
                self.copied.emit(msg.code_blocks[i])
            elif kind == "src" and 0 <= i < len(msg.sources):
                s = msg.sources[i]
                self.open_source.emit(s.file, s.start)
        elif url.scheme() in ("http", "https"):
            QDesktopServices.openUrl(url)

    def _on_evidence(self, kind: str, index: str) -> None:
        m = int(index) if index.isdigit() else -1
        if not 0 <= m < len(self.messages) or (ev := self.messages[m].evidence) is None:
            return
        if kind == "ev":
            self.show_evidence(m, not self.messages[m].evidence_shown)
        else:
            self.open_source.emit(ev.file, ev.start)
