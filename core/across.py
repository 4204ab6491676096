"""One question across several repositories: each searched in its own memory, one answer from all of them.

Each repository is searched in its own index under its own rules (its private paths stay out when
`allow_local` is False), the hits are merged into one ranking, and the first memory given hosts the
answer: its settings (top_k, memory budget, context size), its answer context and its conversation.
Compiled memories are spliced from their own stores into that one context, so every repository must
use the same model. This module drives the answering part of each `RepoMemory` (answering.py) the way
`RepoMemory.ask` does for one.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING

from .answering import Answer
from .cube import Cube
from .engine import SamplingParams
from .errors import RepomemError
from .retrieval import code_tokens

if TYPE_CHECKING:
    from .memory import RepoMemory


def search_across(memories: Sequence[RepoMemory], question: str, k: int, *,
                  allow_local: bool = True) -> list[tuple[Cube, RepoMemory]]:
    """The top `k` memories of all the repositories, best first, each with the memory it comes from.

    BM25 sums idf x a term-frequency part (below k1+1), and idf grows with the size of the index, so each
    score is divided by the question's idf sum in its own index (a term the index lacks counts as a term
    in no document): pieces compare by how much of the question they match, not by how big their
    repository is. Caller holds every memory's turn."""
    ranked: list[tuple[float, int, Cube, RepoMemory]] = []
    for order, mem in enumerate(memories):
        hits = mem._scored_search(question, k, allow_local=allow_local)
        weight = _question_weight(mem, question)
        ranked += [(score / weight, order, cube, mem) for score, cube in hits]
    ranked.sort(key=lambda r: (-r[0], r[1]))
    return [(cube, mem) for _, _, cube, mem in ranked[:k]]


def _question_weight(mem: RepoMemory, question: str) -> float:
    index = mem.index_
    unseen = math.log(len(index) + 0.5) - math.log(0.5)  # BM25Okapi's idf of a term in no document
    return sum(index.idf(t) or unseen for t in code_tokens(question)) or 1.0


def ask_across(memories: Sequence[RepoMemory], question: str, *, mode: str | None = None,
               conversation_id: str | None = None, on_text: Callable[[str], None] | None = None,
               cancel: threading.Event | None = None, record: bool = True, sampling: SamplingParams | None = None,
               history: Sequence[tuple[str, str]] | None = None, system: str = "",
               allow_local: bool = True) -> Answer:
    """Answer one question from the memories of several repositories at once; each source names its
    repository (`Source.repo`).

    `memories[0]` hosts the answer: its settings, its answer context, and its conversation
    (`conversation_id`, where the exchange is recorded unless `record` is False). The hits of all of them
    are merged (`search_across`) within the host's top_k and memory budget and placed in one context:
    compiled memories spliced from their own stores, the others as text. Other arguments as in
    `RepoMemory.ask`. Raises RepomemError when the repositories use different models."""
    mems = list({id(m): m for m in memories}.values())
    if not mems:
        raise RepomemError("no repository to ask")
    host = mems[0]
    question, mode = host._check_question(question, mode)
    with ExitStack() as turns:
        # One order for every question across repositories, so two of them never wait on each other.
        for mem in sorted(mems, key=lambda m: str(m.root)):
            turns.enter_context(mem._turns.question())
        _refuse_mixed_models(mems)
        s = host.settings
        if history is None:
            history = host.conversations.recent_exchanges(conversation_id) if conversation_id else []
        params = sampling or SamplingParams(temperature=s.temperature, max_tokens=s.max_answer_tokens)
        turn = host._question_turn(question, list(history), params.max_tokens, system)
        picked = search_across(mems, question, s.top_k, allow_local=allow_local) if mode != "none" else []
        prep = host._place(picked, mode, turn, params.max_tokens)
        ans = host._generate(prep, question, mode, params, conversation_id, on_text, cancel)
        host._keep(question, ans, record=record)
        for mem in mems[1:]:
            mem._promote_hot_quietly()
        return ans


def _refuse_mixed_models(mems: Sequence[RepoMemory]) -> None:
    if len({m.fingerprint for m in mems}) == 1:
        return
    uses = "; ".join(f"{m.root.name}: {m.engine.info.path.name}, {m.settings.cache_type} cache" for m in mems)
    raise RepomemError(f"these repositories use different models ({uses}); one answer cannot read memories "
                       "compiled for different models: ask them one at a time, or give them the same model")
