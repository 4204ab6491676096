"""Tests for repomem.core.retrieval: tokenizer, BM25 parity with rank_bm25, incremental updates,
field boosts, budget selection and recall.

Why these tests: retrieval quality rests on the tokenizer meeting questions and code halfway, the
BM25 numbers being the textbook ones (checked against rank_bm25, the reference implementation),
and edits never leaving the index different from a fresh build, nor costing a rebuild.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from repomem.core.retrieval import (
    BM25Index,
    Hit,
    _Postings,
    code_tokens,
    defined_names,
    is_test_path,
    path_tokens,
    recall_at_k,
    select_within_budget,
    span_hit,
    stem,
)

# --------------------------------------------------------------------------- tokenizer


def test_identifiers_are_kept_whole_and_split() -> None:
    toks = code_tokens("max_redirects HTTPAdapter")
    assert "max_redirects" in toks and "max" in toks and "redirect" in toks
    assert "httpadapter" in toks and "http" in toks and "adapt" in toks


def test_dotted_names_and_paths_are_kept_whole_with_parts() -> None:
    toks = code_tokens("see requests.adapters and src/requests/sessions.py")
    assert "requests.adapters" in toks
    assert "src/requests/sessions.py" in toks
    assert {"request", "adapt", "session", "src", "py"} <= set(toks)


def test_camel_snake_kebab_and_acronyms() -> None:
    assert code_tokens("parseHTTPResponse") == ["parsehttpresponse", "pars", "http", "respons"]
    toks = code_tokens("Content-Length")
    assert toks[0] == "content-length" and "length" in toks
    assert "__iter__" in code_tokens("def __iter__(self):")
    assert "iter" in code_tokens("def __iter__(self):")


def test_numbers_kept_noise_dropped() -> None:
    toks = code_tokens("What is the default of x? It is 30, not 1 or 10. return self.x")
    assert "30" in toks and "10" in toks
    for noise in ("the", "what", "is", "of", "1", "x", "return", "self", "it", "not"):
        assert noise not in toks
    # a compound is a real name even when made of stopwords and single letters
    assert "self.x" in toks


def test_arithmetic_is_not_glued_into_kebab_names() -> None:
    assert code_tokens("n-1") == []
    assert code_tokens("size-offset")[0] == "size-offset"


def test_question_words_meet_code_identifiers() -> None:
    q = set(code_tokens("How many redirects does a session follow at most?"))
    code = set(code_tokens("self.max_redirects = DEFAULT_REDIRECT_LIMIT  # Session"))
    assert {"redirect", "session"} <= q & code
    assert "iter" in set(code_tokens("iterate over it")) & set(code_tokens("def __iter__(self):"))


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("caresses", "caress"),
        ("ponies", "poni"),
        ("agreed", "agre"),
        ("hopping", "hop"),
        ("relational", "relat"),
        ("generalizations", "gener"),
        ("adjustment", "adjust"),
        ("controlling", "control"),
        ("sky", "sky"),
        ("redirects", "redirect"),
        ("exceptions", "except"),
        ("toys", "toi"),
        ("enjoying", "enjoi"),
        ("sayyyy", "sayyyi"),  # along a run of y's, consonant and vowel alternate
    ],
)
def test_porter_stemmer(word: str, expected: str) -> None:
    assert stem(word) == expected


@pytest.mark.parametrize("run", ["y" * 1200, "Y" * 1200, "ay" * 5000])
def test_long_letter_runs_are_indexed_whole(run: str) -> None:
    """A padding string or a test fixture of thousands of letters is no word: it is neither stemmed nor
    allowed to exhaust the stack (every later open of the memory re-reads it)."""
    assert run.lower() in code_tokens(f"PAD = '{run}'")


def test_path_tokens_include_module_names() -> None:
    toks = path_tokens("src/requests/sessions.py")
    for t in ("sessions.py", "requests.sessions", "src.requests.sessions", "session", "src/requests/sessions.py"):
        assert t in toks
    assert len(toks) == len(set(toks))


def test_defined_names() -> None:
    text = (
        "DEFAULT_POOLSIZE = 10\n"
        "def send(self, timeout=None):\n"
        "    self.max_redirects = LIMIT\n"
        "    x: int = 5\n"
        "    if a == b:\n"
        "        count += 1\n"
        "pub(crate) fn parse() {}\n"
        "export default function App() {}\n"
        "a class or type for prose\n"
    )
    assert defined_names(text) == ["DEFAULT_POOLSIZE", "send", "self.max_redirects", "x", "parse", "App"]


def test_is_test_path() -> None:
    for p in ("tests/test_api.py", "pkg/foo_test.go", "web/a.spec.ts", "src/test/java/FooTest.java", "conftest.py"):
        assert is_test_path(p), p
    for p in ("src/requests/sessions.py", "testing.py", "src/contest.py"):
        assert not is_test_path(p), p


# --------------------------------------------------------------------------- BM25 parity

CORPUS = {
    "a": "def get_adapter(self, url):\n    for prefix, adapter in self.adapters.items():\n        return adapter",
    "b": "class HTTPAdapter(BaseAdapter):\n    def send(self, request, timeout=None): pass",
    "c": "DEFAULT_POOLSIZE = 10\nDEFAULT_RETRIES = 0\nDEFAULT_POOL_TIMEOUT = None",
    "d": "def mount(self, prefix, adapter):\n    self.adapters[prefix] = adapter",
    "e": "self.max_redirects = DEFAULT_REDIRECT_LIMIT\nself.trust_env = True",
    "f": "raise TooManyRedirects(f'Exceeded {self.max_redirects} redirects.', response=resp)",
    "g": "adapter adapter adapter url url",
    "h": "",
    "i": "def iter_content(self, chunk_size=1, decode_unicode=False):\n    return adapter",
}
QUERIES = [
    "adapter",
    "get_adapter url",
    "adapter adapter prefix",  # repeated query terms count twice, as in rank_bm25
    "max redirects exceeded",
    "DEFAULT_POOLSIZE",
    "nothing-matches-this zzz",
    "chunk size adapter url prefix self",
]


def _fresh(docs: dict[str, str], **kw: float) -> BM25Index:
    index = BM25Index(**kw)
    for doc_id, text in docs.items():
        index.add(doc_id, text)
    return index


def _assert_matches_rank_bm25(index: BM25Index, docs: dict[str, str]) -> None:
    ids = list(docs)
    ref = BM25Okapi([code_tokens(docs[i]) for i in ids])
    for q in QUERIES:
        qt = code_tokens(q)
        ours = index.text_scores(qt)
        expected = ref.get_scores(qt)
        got = np.array([ours[i] for i in ids])
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, err_msg=q)


def test_scores_equal_rank_bm25_on_static_corpus() -> None:
    index = _fresh(CORPUS)
    # "adapter" is in more than half the documents: its idf is negative and gets rank_bm25's floor
    assert index.idf("adapt") == pytest.approx(0.25 * index._average_idf())
    _assert_matches_rank_bm25(index, CORPUS)


def test_scores_equal_rank_bm25_after_edits() -> None:
    index = _fresh(CORPUS)
    index.remove("g")
    index.update("a", "def get_adapter(self, url): return url")
    index.add("z", "adapter mount prefix prefix")
    docs = {k: v for k, v in CORPUS.items() if k != "g"}
    docs["a"] = "def get_adapter(self, url): return url"
    docs["z"] = "adapter mount prefix prefix"
    _assert_matches_rank_bm25(index, docs)


# --------------------------------------------------------------------------- incremental == fresh

_VOCAB = [f"w{i}" for i in range(60)] + ["adapter", "session", "redirect", "chunk_size", "HTTPAdapter"]


def _random_doc(rng: random.Random) -> tuple[str, str, str]:
    words = rng.choices(_VOCAB, k=rng.randint(0, 25))
    path = f"pkg{rng.randint(0, 6)}/mod{rng.randint(0, 9)}.py"
    symbol = rng.choice(["", "Session.send", "get_adapter", "HTTPAdapter", f"f{rng.randint(0, 30)}"])
    return " ".join(words), path, symbol


def _ranking(index: BM25Index, queries: list[str]) -> list[list[tuple[str, float]]]:
    return [[(h.doc_id, round(h.score, 9)) for h in index.search(q, k=10)] for q in queries]


def test_incremental_edits_rank_like_a_fresh_build(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"purge": 0, "renumber": 0}
    purge, renumber = _Postings._purge, BM25Index._renumber

    def spy_purge(self: _Postings, *a: Any) -> int:
        calls["purge"] += 1
        return purge(self, *a)

    def spy_renumber(self: BM25Index) -> None:
        calls["renumber"] += 1
        renumber(self)

    monkeypatch.setattr(_Postings, "_purge", spy_purge)
    monkeypatch.setattr(BM25Index, "_renumber", spy_renumber)
    rng = random.Random(7)
    index = BM25Index()
    state: dict[str, tuple[str, str, str]] = {}
    next_id = 0
    for _ in range(300):
        doc = _random_doc(rng)
        index.add(f"d{next_id}", *doc)
        state[f"d{next_id}"] = doc
        next_id += 1
    # enough removals to trigger per-term purges and a slot renumbering
    for step in range(2500):
        op = rng.random()
        if op < 0.45 and state:
            doc_id = rng.choice(sorted(state))
            doc = _random_doc(rng)
            index.update(doc_id, *doc)
            state[doc_id] = doc
        elif op < 0.75 and state:
            doc_id = rng.choice(sorted(state))
            index.remove(doc_id)
            del state[doc_id]
        else:
            doc = _random_doc(rng)
            index.add(f"d{next_id}", *doc)
            state[f"d{next_id}"] = doc
            next_id += 1
        if step % 500 == 0:
            index.search("w1", k=1)  # reads between edits exercise the lazy merge
    assert len(index) == len(state)
    assert sorted(index.ids()) == sorted(state)
    assert calls["purge"] > 0 and calls["renumber"] > 0  # the compaction paths were exercised

    fresh = BM25Index()
    for doc_id in sorted(state, reverse=True):  # another insertion order on purpose
        fresh.add(doc_id, *state[doc_id])
    queries = ["w1 w2 w3", "adapter session", "HTTPAdapter", "chunk size", "redirect w7 w7", "mod3.py pkg2"]
    assert _ranking(index, queries) == _ranking(fresh, queries)
    ids = sorted(state)
    ref = BM25Okapi([code_tokens(state[i][0]) for i in ids])
    got = index.text_scores("w1 adapter w9 session")
    np.testing.assert_allclose([got[i] for i in ids], ref.get_scores(code_tokens("w1 adapter w9 session")), rtol=1e-12)


def test_update_touches_only_the_document() -> None:
    """Structural: on 50K documents an edit writes O(terms of the document) postings entries and
    leaves every other term's postings list object untouched (no rebuild, not even partial)."""
    rng = random.Random(1)
    vocab = [f"t{i}" for i in range(5000)]
    index = BM25Index()
    for i in range(50_000):
        index.add(f"c{i}", " ".join(rng.choices(vocab, k=30)), f"src/m{i % 500}.py", f"f{i}")
    index.flush()
    build_work = index.work
    assert build_work >= 50_000 * 25

    def snapshot() -> dict[str, tuple[int, int]]:
        return {t: (id(index._body.lists[tid]), len(index._body.lists[tid])) for t, tid in index._body.tid.items()}

    before = snapshot()
    old_terms = {t for t in index._body.tid if index._body.tid[t] in set(index._doc_tids[index._slot_of["c123"]][0])}
    work0 = index.work
    new_text = "t1 t2 t3 brand_new_term"
    index.update("c123", new_text, "src/m123.py", "f123")
    index.search("t1", k=3)
    after = snapshot()
    changed = {t for t in before if after[t] != before[t]}
    assert changed <= old_terms | set(code_tokens(new_text))  # every other term's list is untouched
    assert "brand_new_term" in after and index.search("brand_new_term", k=1)[0].doc_id == "c123"
    assert index.work - work0 < 200  # old doc's ~30 terms + new doc's terms + 3 fields

    # many edits: amortised purges keep the average far below a rebuild
    work0 = index.work
    for _ in range(1000):
        i = rng.randrange(50_000)
        index.update(f"c{i}", " ".join(rng.choices(vocab, k=30)), f"src/m{i % 500}.py", f"f{i}")
    assert (index.work - work0) / 1000 < 200
    assert len(index) == 50_000


# --------------------------------------------------------------------------- boosts and search


def _boost_corpus(**kw: float) -> BM25Index:
    index = BM25Index(**kw)
    for i, other in enumerate(["parse the header bytes", "open a socket to the host", "write cookies to a jar"]):
        index.add(f"other{i}", other, f"src/other{i}.py", f"other{i}")
    body = "value = compute(value, limit)\nreturn value + limit"
    index.add("sess", body, "src/requests/sessions.py", "Session.resolve_redirects")
    index.add("adap", body, "src/requests/adapters.py", "HTTPAdapter.send")
    index.add("mod", body, "src/requests/models.py", "Response.iter_content")
    index.add("util", body + "\nlimit", "src/requests/utils.py", "get_limit")
    return index


@pytest.mark.parametrize(
    ("query", "winner"),
    [
        ("where is resolve_redirects computing the limit value", "sess"),
        ("what does HTTPAdapter.send compute", "adap"),
        ("how does iter_content use the limit", "mod"),
        ("limit value in requests.adapters", "adap"),
        ("limit value in sessions.py", "sess"),
        ("what value does the models module compute", "mod"),
    ],
)
def test_symbol_and_path_mentions_rank_their_document_first(query: str, winner: str) -> None:
    hits = _boost_corpus().search(query, k=4)
    assert hits[0].doc_id == winner
    assert hits[0].score > hits[1].score


def test_without_boosts_the_body_decides() -> None:
    index = _boost_corpus(symbol_weight=0, defs_weight=0, path_weight=0)
    assert index.search("limit value in requests.adapters", k=1)[0].doc_id == "util"


def test_the_defining_chunk_beats_chunks_that_use_the_name() -> None:
    index = BM25Index()
    index.add("use1", "pool = make(DEFAULT_POOLSIZE, DEFAULT_POOLSIZE)\nreturn pool", "a.py", "make_pool")
    index.add("use2", "size = DEFAULT_POOLSIZE or DEFAULT_POOLSIZE\nreturn size", "b.py", "pool_size")
    index.add("def", "import os\nimport sys\nDEFAULT_POOLSIZE = 10\nDEFAULT_RETRIES = 0\nTIMEOUT = None", "a.py", "")
    assert index.search("What is DEFAULT_POOLSIZE?", k=1)[0].doc_id == "def"


def test_test_files_rank_lower_unless_the_question_is_about_tests() -> None:
    index = BM25Index()
    body = "def retry_request(url):\n    return send(url, retries=3)"
    index.add("src", body, "src/app/net.py", "retry_request")
    index.add("test", body + "\nassert retry_request(url)", "tests/test_net.py", "test_retry_request")
    assert index.search("how does retry_request send", k=2)[0].doc_id == "src"
    assert index.search("which test covers retry_request", k=2)[0].doc_id == "test"


def test_search_filter_k_ties_and_edge_cases() -> None:
    index = BM25Index()
    assert index.search("anything") == []
    for i in range(6):
        index.add(f"id{5 - i}", "alpha beta", "x.py", "")
    hits = index.search("alpha", k=3)
    assert [h.doc_id for h in hits] == ["id0", "id1", "id2"]  # exact ties: by doc id
    hits = index.search("alpha", k=3, filter=lambda d: d not in {"id0", "id2"})
    assert [h.doc_id for h in hits] == ["id1", "id3", "id4"]
    assert index.search("the what is", k=3) == []  # only stopwords
    assert index.search("gamma", k=3) == []  # no shared term: no evidence, no hit
    assert index.search("alpha", k=0) == []
    with pytest.raises(KeyError):
        index.add("id1", "dup")
    with pytest.raises(KeyError):
        index.remove("missing")
    index.update("new", "gamma")  # update of an unknown id adds it
    assert len(index) == 7 and "new" in index
    assert index.search("gamma", k=3)[0].doc_id == "new"


def test_select_within_budget() -> None:
    hits = [Hit("a", 9.0), Hit("b", 8.0), Hit("c", 7.0), Hit("d", 6.0)]
    counts = {"a": 300, "b": 500, "c": 150, "d": 100}
    assert [h.doc_id for h in select_within_budget(hits, counts, 500)] == ["a", "c"]
    assert [h.doc_id for h in select_within_budget(hits, counts.__getitem__, 2000, k=2)] == ["a", "b"]
    assert select_within_budget(hits, counts, 50) == []


# --------------------------------------------------------------------------- recall


def test_span_hit_and_recall_at_k() -> None:
    gold = {"path": "src/a.py", "start_line": 10, "end_line": 12}
    assert span_hit("src/a.py", 12, 40, gold)
    assert not span_hit("src/a.py", 13, 40, gold)
    assert not span_hit("src/b.py", 1, 40, gold)
    assert span_hit("src/a.py", None, None, gold)

    index = BM25Index()
    index.add("x", "def connect(host): open_socket(host)", "src/a.py", "connect", start_line=10, end_line=11)
    index.add("y", "def close(sock): sock.shutdown()", "src/a.py", "close", start_line=20, end_line=21)
    index.add("z", "def close_all(): close(all_socks)", "src/b.py", "close_all", start_line=1, end_line=2)
    rows = [
        {"question": "how does connect open a socket", "path": "src/a.py", "start_line": 10, "end_line": 10},
        {"question": "what calls sock.shutdown", "path": "src/a.py", "start_line": 20, "end_line": 21},
        {"question": "shutdown", "path": "src/c.py", "start_line": 1, "end_line": 5},
    ]
    assert recall_at_k(index, rows, 1) == pytest.approx(2 / 3)
    spans = {"x": ("src/c.py", 1, 2), "y": ("src/c.py", 3, 4), "z": ("src/c.py", 9, 9)}
    assert recall_at_k(index, rows, 3, span_of=spans.__getitem__) == pytest.approx(1 / 3)
    assert recall_at_k(index, [], 3) == 0.0
