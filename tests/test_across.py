"""One question across several repositories: real stores, real files, the real small model.

What the small model says is not checked; what is checked is where the answer's memory came from (both
repositories, each source naming its own), that each repository's private paths keep their rules, that
memories of different models are refused, and that a question across repositories takes every memory's
question turn (before any background compile step) in one fixed order.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from test_question_first import _wait

from repomem.core import RepomemError, RepoMemory, Settings, ask_across
from repomem.core.across import search_across

INVOICE = '''"""Invoices of the billing service."""

TAX_RATE = 0.19


def invoice_total(net_amount):
    """Total of an invoice: the net amount plus tax at TAX_RATE."""
    return round(net_amount * (1 + TAX_RATE), 2)
'''

PARCEL = '''"""Parcels of the shipping service."""

MAX_PARCEL_KG = 31


def parcel_fits(weight_kg):
    """Whether a parcel is light enough to ship: at most MAX_PARCEL_KG kilograms."""
    return weight_kg <= MAX_PARCEL_KG
'''

BOTH = "What is the invoice TAX_RATE, and what is MAX_PARCEL_KG for a parcel?"


def _settings(model: Path, **kw: object) -> Settings:
    return Settings(model=str(model), max_answer_tokens=6, encoding="f16", n_threads=1, n_ctx=2048, **kw)


def _repo(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture
def billing(tmp_path: Path) -> Path:
    return _repo(tmp_path / "a_billing", {
        "invoice.py": INVOICE,
        "internal/pricing.md": "# Pricing\n\nThe internal wholesale discount of billing is 12 percent.\n"})


@pytest.fixture
def shipping(tmp_path: Path) -> Path:
    return _repo(tmp_path / "b_shipping", {
        "parcel.py": PARCEL,
        "internal/pricing.md": "# Pricing\n\nThe internal wholesale discount of shipping is 8 percent.\n"})


@pytest.fixture
def mems(billing: Path, shipping: Path, home: Path, test_model_path: Path):
    """Billing marks `internal/*` private; shipping does not."""
    a = RepoMemory.open(billing, settings=_settings(test_model_path, private_paths=["internal/*"]))
    b = RepoMemory.open(shipping, settings=_settings(test_model_path))
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("mode", ["kv", "text"])
def test_an_answer_across_two_repositories_cites_both_and_names_each(mems, mode: str) -> None:
    a, b = mems
    a.index(compile=mode == "kv")
    b.index(compile=mode == "kv")
    ans = ask_across([a, b], BOTH, mode=mode, record=False)
    by_repo = {(s.repo, s.path) for s in ans.sources}
    assert (str(a.root), "invoice.py") in by_repo and (str(b.root), "parcel.py") in by_repo
    assert {s.repo for s in ans.sources} == {str(a.root), str(b.root)}
    assert all(d["repo"] in (str(a.root), str(b.root)) for d in ans.as_dict()["sources"])
    assert len(ans.sources) <= a.settings.top_k and ans.memory_tokens <= a.settings.memory_tokens
    if mode == "kv":  # each payload came from its own store into the one context
        assert ans.spliced == len(ans.sources) and ans.as_text == 0


def test_an_answer_of_one_repository_names_it_too(mems) -> None:
    a, _ = mems
    a.index(compile=False)
    ans = a.ask("What is the invoice TAX_RATE?", mode="text", record=False)
    assert ans.sources and {s.repo for s in ans.sources} == {str(a.root)}
    assert {d["repo"] for d in ans.as_dict()["sources"]} == {str(a.root)}


def test_each_repository_keeps_its_own_private_paths(mems) -> None:
    a, b = mems
    a.index(compile=False)
    b.index(compile=False)
    question = "What is the internal wholesale discount in pricing?"
    shared = ask_across([a, b], question, mode="text", record=False, allow_local=False)
    cited = {(s.repo, s.path) for s in shared.sources}
    assert (str(a.root), "internal/pricing.md") not in cited  # private in billing
    assert (str(b.root), "internal/pricing.md") in cited  # the same path is not private in shipping
    local = ask_across([a, b], question, mode="text", record=False)
    assert (str(a.root), "internal/pricing.md") in {(s.repo, s.path) for s in local.sources}


def test_repositories_of_different_models_are_refused(mems, tmp_path: Path, test_model_path: Path) -> None:
    a, b = mems
    a.index(compile=False)
    b.index(compile=False)
    other = tmp_path / "other-model.gguf"  # the same weights with other bytes: another model to a payload
    shutil.copyfile(test_model_path, other)
    with other.open("ab") as f:
        f.write(b"\0" * 32)
    c = RepoMemory.open(b.root, settings=_settings(other))
    try:
        with pytest.raises(RepomemError, match="different models"):
            ask_across([a, c], BOTH, mode="text", record=False)
    finally:
        c.close()
    assert ask_across([a, b], BOTH, mode="text", record=False).sources  # same model: answered


def test_the_answer_is_recorded_in_the_first_repositorys_conversation(mems) -> None:
    a, b = mems
    a.index(compile=False)
    b.index(compile=False)
    ans = ask_across([a, b], BOTH, mode="text")
    assert ans.conversation_id and a.conversations.exchanges(ans.conversation_id)
    stored = [m for m in a.conversations.messages(ans.conversation_id) if m.role == "assistant"]
    assert {s["repo"] for s in stored[-1].meta["sources"]} == {str(a.root), str(b.root)}


def test_the_merge_compares_how_much_of_the_question_each_piece_matches(tmp_path: Path, home: Path,
                                                                       test_model_path: Path) -> None:
    """A small repository's piece that matches the whole question ranks above a big repository's piece
    that matches one word of it, though that word's idf, and so its raw score, is higher in the big one."""
    small = _repo(tmp_path / "small", {f"filler_{i}.md": f"# Filler {i}\n\nnothing {i} here\n" for i in range(4)}
                  | {"both.md": "# Notes\n\nthe zorbel quanta\n"})
    big = _repo(tmp_path / "big", {f"page_{i}.md": f"# Page {i}\n\nplain words number {i}\n" for i in range(80)}
                | {"one.md": "# Notes\n\nthe zorbel\n"})
    a = RepoMemory.open(small, settings=_settings(test_model_path))
    b = RepoMemory.open(big, settings=_settings(test_model_path))
    try:
        a.index(compile=False)
        b.index(compile=False)
        question = "zorbel quanta"
        raw = sorted([(sc, "small", c.path) for sc, c in a._scored_search(question, 5, allow_local=True)]
                     + [(sc, "big", c.path) for sc, c in b._scored_search(question, 5, allow_local=True)],
                     reverse=True)
        assert raw[0][1:] == ("big", "one.md")  # what merging raw scores would put first
        merged = search_across([a, b], question, 5)
        assert [(m.root.name, c.path) for c, m in merged][:2] == [("small", "both.md"), ("big", "one.md")]
    finally:
        a.close()
        b.close()


def test_a_question_across_takes_its_turn_before_a_background_compile_step(mems) -> None:
    """The shipping memory is in a background step (a compile of one cube) when the question comes: the
    question runs right after that step, before the next one."""
    a, b = mems
    a.index(compile=False)
    b.index(compile=False)
    log: list[str] = []
    in_step, go = threading.Event(), threading.Event()

    def background() -> None:
        for i in range(3):
            with b._turns.background_step():
                log.append(f"step{i}")
                if i == 0:
                    in_step.set()
                    assert go.wait(30)

    def answering(_piece: str) -> None:  # streamed inside the question's turn
        if "question" not in log:
            log.append("question")

    worker = threading.Thread(target=background, daemon=True)
    worker.start()
    assert in_step.wait(30)
    asker = threading.Thread(target=lambda: ask_across([a, b], BOTH, mode="text", record=False, on_text=answering),
                             daemon=True)
    asker.start()
    _wait(lambda: b._turns._questions == 1, 30, "the question to wait for the step under way")
    go.set()
    asker.join(120)
    worker.join(30)
    assert log == ["step0", "question", "step1", "step2"]


def test_a_question_across_takes_the_turns_in_one_order(mems) -> None:
    """Asked as [shipping, billing] while billing is busy, the question waits for billing's turn before it
    takes shipping's: every question across repositories takes them in one order (by root), so two such
    questions, each holding one memory and waiting for the other, cannot happen."""
    a, b = mems
    a.index(compile=False)
    b.index(compile=False)
    done = threading.Event()
    with a._lock:
        asker = threading.Thread(target=lambda: (ask_across([b, a], BOTH, mode="none", record=False), done.set()),
                                 daemon=True)
        asker.start()
        _wait(lambda: a._turns._questions == 1, 30, "the question to wait for billing")
        assert b._turns._questions == 0  # shipping's turn not taken while it waits
    asker.join(120)
    assert done.is_set()
