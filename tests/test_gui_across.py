"""The chat's scope offscreen: "This repository" answers from the current repository's memory, "All open
repositories" from every open one, each source then naming its repository (real window, real stores, the
real small model)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import QUrl  # noqa: E402
from test_gui import add_and_wait, ask_and_wait, gui_home, window  # noqa: E402, F401 (fixtures)

from repomem.app.gui.main_window import MainWindow  # noqa: E402

QUESTION = "What is the invoice TAX_RATE, and what is MAX_PARCEL_KG for a parcel?"


def _repo(root: Path, rel: str, text: str) -> Path:
    root.mkdir()
    (root / rel).write_text(text)
    return root


@pytest.fixture
def repos(tmp_path: Path) -> tuple[Path, Path]:
    billing = _repo(tmp_path / "billing", "invoice.py",
                    '"""Invoices."""\n\nTAX_RATE = 0.19\n\n\ndef invoice_total(net_amount):\n'
                    '    """The net amount plus tax at TAX_RATE."""\n    return net_amount * (1 + TAX_RATE)\n')
    shipping = _repo(tmp_path / "shipping", "parcel.py",
                     '"""Parcels."""\n\nMAX_PARCEL_KG = 31\n\n\ndef parcel_fits(weight_kg):\n'
                     '    """At most MAX_PARCEL_KG kilograms."""\n    return weight_kg <= MAX_PARCEL_KG\n')
    return billing, shipping


def _ask(qtbot, win: MainWindow, scope: str):
    win.chat.set_scope(scope)
    answer, _chunks = ask_and_wait(qtbot, win, QUESTION, "text")
    return answer, win.chat.view.messages[-1]


def test_scope_all_answers_from_every_open_repository_and_names_each(qtbot, window: MainWindow, repos,  # noqa: F811
                                                                      monkeypatch: pytest.MonkeyPatch):
    billing, shipping = (add_and_wait(qtbot, window, repo) for repo in repos)
    window.sidebar.select(billing)
    pane = window.chat
    assert [pane.scope.itemText(i) for i in range(pane.scope.count())] == ["This repository",
                                                                           "All open repositories"]

    answer, shown = _ask(qtbot, window, "repo")
    assert answer.sources and {s.repo for s in answer.sources} == {billing}
    assert [s.label for s in shown.sources] == [f"{s.path}:{s.start_line}-{s.end_line}" for s in answer.sources]

    answer, shown = _ask(qtbot, window, "all")
    assert {s.repo for s in answer.sources} == {billing, shipping}
    assert [s.label for s in shown.sources] == [f"{Path(s.repo).name}: {s.path}:{s.start_line}-{s.end_line}"
                                                for s in answer.sources]
    text = pane.view.toPlainText()
    assert "billing: invoice.py:" in text and "shipping: parcel.py:" in text
    # a source of the other repository opens in that repository
    opened: list[tuple[Path, int]] = []
    monkeypatch.setattr("repomem.app.gui.main_window.open_location",
                        lambda path, line, command="": opened.append((path, line)))
    i = next(i for i, s in enumerate(shown.sources) if s.path == "parcel.py")
    pane.view._on_anchor(QUrl(f"src:{len(pane.view.messages) - 1}:{i}"))
    assert opened == [(Path(shipping) / "parcel.py", shown.sources[i].start)]
    # the exchange belongs to this repository's conversation, and reopened it still names the repositories
    conversation = window.chat_ctl.conversation_id
    qtbot.waitUntil(lambda: window.conversations.list.count() == 1, timeout=20_000)
    window.chat_ctl.open_conversation("")
    window.chat_ctl.open_conversation(conversation)
    qtbot.waitUntil(lambda: len(pane.view.messages) == 4, timeout=20_000)
    assert [s.label for s in pane.view.messages[-1].sources] == [s.label for s in shown.sources]
