"""The evidence under an answer in the app, offscreen with real widgets: a collapsed `Evidence path:start-end`
line that expands to the exact lines (highlighted, with their line numbers) and opens the file at its first
line; it comes back when a conversation is reopened from history. The last test drives the real window
with the real small model (SmolLM2-135M); what it answers is not checked, only where its evidence shows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import QUrl  # noqa: E402

from repomem.app.gui.chat_controller import recorded_message  # noqa: E402
from repomem.app.gui.chat_view import ChatMessage, ChatView, EvidenceRef, SourceRef  # noqa: E402
from repomem.app.gui.main_window import MainWindow  # noqa: E402
from repomem.core import settings as settings_mod  # noqa: E402
from repomem.core.conversations import ConversationStore  # noqa: E402
from repomem.core.evidence import Evidence  # noqa: E402

LINES = 'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b'
EVIDENCE = EvidenceRef("src/calc.py", 12, 14, text=LINES)


def _view(qtbot, *answers: ChatMessage) -> ChatView:
    view = ChatView()
    qtbot.addWidget(view)
    view.resize(800, 600)
    for answer in answers:
        view.add_message(ChatMessage("user", "What does add return?"))
        view.add_message(answer)
    return view


def _answer(evidence: EvidenceRef | None = EVIDENCE, text: str = "It returns `a + b`.") -> ChatMessage:
    return ChatMessage("assistant", text, [SourceRef("src/calc.py", 10, 20)], "text memory", evidence=evidence)


def test_evidence_line_is_collapsed_then_expands_to_the_exact_numbered_lines(qtbot):
    view = _view(qtbot, _answer())
    text = view.toPlainText()
    assert "▸ Evidence src/calc.py:12-14" in text
    assert "Return the sum" not in text  # collapsed by default
    view._on_anchor(QUrl("ev:1"))
    text = view.toPlainText()
    assert "▾ Evidence src/calc.py:12-14" in text
    numbered = "12  def add(a, b):\n13      \"\"\"Return the sum of a and b.\"\"\"\n14      return a + b"
    assert numbered in text.replace("\u2029", "\n")
    assert "#008000" in view.toHtml()  # `def` highlighted as Python by pygments (its keyword green)
    view._on_anchor(QUrl("ev:1"))
    assert "Return the sum" not in view.toPlainText() and "▸ Evidence" in view.toPlainText()


def test_clicking_the_evidence_location_opens_its_first_line(qtbot):
    view = _view(qtbot, _answer())
    with qtbot.waitSignal(view.open_source) as sig:
        view._on_anchor(QUrl("evsrc:1"))
    assert sig.args == ["src/calc.py", 12]


def test_evidence_of_an_answer_across_repositories_opens_in_its_own_repository(qtbot, tmp_path: Path):
    billing, shipping = str(tmp_path / "billing"), str(tmp_path / "shipping")
    sources = [{"path": "rates.py", "start_line": 1, "end_line": 9, "symbol": "", "cube_id": "a1", "repo": billing},
               {"path": "rates.py", "start_line": 1, "end_line": 9, "symbol": "", "cube_id": "b2", "repo": shipping}]
    evidence = {"path": "rates.py", "start_line": 3, "end_line": 3, "text": "MAX_PARCEL_KG = 31", "cube_id": "b2"}
    record = {"role": "assistant", "content": "31 kg.", "meta": {"sources": sources, "mode": "kv",
                                                                   "evidence": evidence}}
    view = _view(qtbot, recorded_message(record, billing))  # shown in billing: the same path there is another file
    with qtbot.waitSignal(view.open_source) as sig:
        view._on_anchor(QUrl("evsrc:1"))
    assert sig.args == [str(Path(shipping) / "rates.py"), 3]


def test_an_answer_without_evidence_shows_none(qtbot):
    view = _view(qtbot, _answer(evidence=None))
    view._on_anchor(QUrl("ev:1"))
    view._on_anchor(QUrl("ev:0"))  # a question has none either
    with qtbot.assertNotEmitted(view.open_source):
        view._on_anchor(QUrl("evsrc:1"))
    assert "Evidence" not in view.toPlainText() and not view.messages[1].evidence_shown
    assert "It returns a + b." in view.toPlainText()


def test_expanding_an_earlier_answer_leaves_the_others_in_place(qtbot):
    later = EvidenceRef("src/calc.py", 30, 30, text="def multiply(a, b):")
    view = _view(qtbot, _answer(text="first answer"), _answer(later, text="second answer"))
    collapsed = view.toPlainText()
    view.show_evidence(1)
    text = view.toPlainText()
    assert text.index("first answer") < text.index("Return the sum") < text.index("second answer")
    assert "multiply" not in text  # the second answer's evidence stays collapsed
    view.show_evidence(1, False)
    assert view.toPlainText() == collapsed


def test_evidence_survives_the_conversation_store_and_old_answers_have_none(tmp_path: Path):
    convs = ConversationStore(tmp_path / "conversations.db")
    cid = convs.create("q").id
    convs.add(cid, "assistant", "old answer", {"sources": [], "mode": "text", "ttft_s": 0.1})
    ev = Evidence("src/calc.py", 12, 14, LINES, "cube1")
    convs.add(cid, "assistant", "new answer", {"sources": [], "mode": "text", "ttft_s": 0.1,
                                               "evidence": ev.as_dict()})
    convs.add(cid, "assistant", "no evidence", {"sources": [], "mode": "none", "ttft_s": 0.1, "evidence": None})
    convs.close()
    old, new, none = (recorded_message(m) for m in ConversationStore(tmp_path / "conversations.db").messages(cid))
    assert old.evidence is None and none.evidence is None
    assert new.evidence == EvidenceRef("src/calc.py", 12, 14, text=LINES)


@pytest.fixture
def window(qtbot, home: Path, test_model_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REPOMEM_MODEL", str(test_model_path))
    settings_mod.save(settings_mod.Settings(max_answer_tokens=16, n_ctx=2048, memory_tokens=800, n_threads=1))
    win = MainWindow(watch=False, tray=False)
    qtbot.addWidget(win)
    win.resize(1100, 700)
    win.show()
    yield win
    win.shutdown()


def test_answer_shows_its_evidence_opens_it_and_keeps_it_in_history(qtbot, window: MainWindow, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    repo = tmp_path / "calc"
    repo.mkdir()
    (repo / "calc.py").write_text('"""A tiny calculator."""\n\n\n' + LINES + "\n\n\ndef multiply(a, b):\n"
                                  "    return a * b\n")
    with qtbot.waitSignal(window.repos.ready, timeout=60_000):
        root = window.add_repository(repo)
    with qtbot.waitSignal(window.chat_ctl.answer_finished, timeout=180_000) as sig:
        assert window.ask("What does add return?", "text") is not None
    ev = sig.args[0].evidence
    assert ev is not None
    view = window.chat.view
    index = len(view.messages) - 1
    assert f"Evidence {ev.location}" in view.toPlainText()
    view._on_anchor(QUrl(f"ev:{index}"))
    first = ev.text.split("\n")[0]
    assert f"{ev.start_line}  {first}" in view.toPlainText().replace("\u2029", "\n")
    opened: list[tuple[Path, int]] = []
    monkeypatch.setattr("repomem.app.gui.main_window.open_location",
                        lambda path, line, command="": opened.append((path, line)))
    view._on_anchor(QUrl(f"evsrc:{index}"))
    assert opened == [(Path(root) / ev.path, ev.start_line)]
    # reopened from history: the same evidence under the same answer, collapsed again
    cid = window.chat_ctl.conversation_id
    window.chat_ctl.new_conversation()
    assert "Evidence" not in view.toPlainText()
    assert window.chat_ctl.open_conversation(cid) is not None
    qtbot.waitUntil(lambda: len(view.messages) == 2, timeout=10_000)
    again = view.messages[1].evidence
    assert (again.path, again.start, again.end, again.text) == (ev.path, ev.start_line, ev.end_line, ev.text)
    assert f"▸ Evidence {ev.location}" in view.toPlainText()
