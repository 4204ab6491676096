"""Code-aware BM25 retrieval over memory cubes, updated incrementally.

Why this module looks the way it does:

* Questions about code name things the way code does (``max_redirects``, ``HTTPAdapter``,
  ``requests.adapters``, ``sessions.py``) *and* the way people do ("max redirects", "adapters").
  :func:`code_tokens` therefore keeps every identifier, dotted name and file path whole and also
  emits its stemmed parts; questions and chunks go through the very same function so both meet.
* Ranking is BM25 over the chunk text (the same formula and parameters as ``rank_bm25.BM25Okapi``)
  plus small field boosts for query terms found in the chunk's *symbol* (the definition it holds),
  in the names the chunk *defines or assigns* (``DEFAULT_POOLSIZE = 10``, ``self.max_redirects =``)
  and in its *path* (file name, folders, dotted module name). A question that names a symbol, a
  setting or a module is strong evidence that a bag-of-words count over the body does not convey:
  the chunk that defines a name beats the ten that merely use it. Test files get a lower prior
  unless the question talks about tests: they repeat the product's vocabulary densely but rarely
  hold the answer to "what does X do".
* The repository changes while the app runs (the watcher re-chunks edited files), and a large
  repository has ~50K chunks. ``rank_bm25`` precomputes over a frozen corpus, so every edit would
  mean a full rebuild. We keep our own inverted index instead (design "a" of the brief): term ->
  postings ``(slot, tf)``, document lengths and document frequencies, and evaluate the BM25Okapi
  formula with numpy at query time. idf and the average document length are global quantities, so
  they are derived from live counters at query time; a sharded ``rank_bm25`` design (segments +
  delta + tombstones) would have to re-derive global idf across segments by hand and still re-run
  ``rank_bm25``'s O(corpus) precomputation on every merge. Tests check that our body scores equal
  ``rank_bm25``'s on a static corpus; ``rank_bm25`` itself is not needed at run time.
* Removal is O(terms of the document): the slot is tombstoned and document frequencies drop at
  once; dead postings are purged from a term's list only when they outnumber the live ones there,
  and slots are renumbered only when dead slots outnumber live ones, so purge work is amortised
  O(1) per removed posting. No edit ever rebuilds the whole index; :attr:`BM25Index.work` counts
  postings touched so tests can assert that structurally.

Persistence: :meth:`BM25Index.export_state` / :meth:`BM25Index.restore_state` turn the index into
flat arrays and back; ``repomem.core.index_file`` writes them to disk and ``repomem.core.search_index``
keeps the saved index in step with the store. A restored index builds each postings list lazily, on
first use, so a big index opens in well under a second.
"""

from __future__ import annotations

import math
import re
import threading
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, wraps
from itertools import chain
from typing import Any, TypeVar, cast

import numpy as np

__all__ = [
    "BM25Index",
    "DocMeta",
    "Hit",
    "code_tokens",
    "defined_names",
    "is_test_path",
    "path_tokens",
    "recall_at_k",
    "select_within_budget",
    "span_hit",
    "stem",
]

# --------------------------------------------------------------------------------------------
# Stemming (Porter 1980)
# --------------------------------------------------------------------------------------------
# Why a stemmer: questions are prose ("exceeds", "redirects", "iterate", "encoded") and code is
# not ("exceeded", "redirect", "__iter__", "encoding"). Porter's algorithm is small, deterministic
# and well understood; it is applied to single words and identifier parts only, never to whole
# identifiers, so an exact ``max_redirects`` mention still matches exactly.

_VOWELS = frozenset("aeiou")


def _is_cons(w: str, i: int) -> bool:
    c = w[i]
    if c in _VOWELS:
        return False
    if c != "y":
        return True
    # A y is a consonant first in the word or after a vowel, else a vowel: along a run of y's it alternates.
    first = i
    while first > 0 and w[first - 1] == "y":
        first -= 1
    first_is_cons = first == 0 or w[first - 1] in _VOWELS
    return first_is_cons == ((i - first) % 2 == 0)


def _measure(stem_: str) -> int:
    """Porter's m: the number of VC sequences in ``stem_``."""
    m, i, n = 0, 0, len(stem_)
    while i < n and _is_cons(stem_, i):
        i += 1
    while i < n:
        while i < n and not _is_cons(stem_, i):
            i += 1
        if i >= n:
            break
        m += 1
        while i < n and _is_cons(stem_, i):
            i += 1
    return m


def _has_vowel(stem_: str) -> bool:
    return any(not _is_cons(stem_, i) for i in range(len(stem_)))


def _ends_double(w: str) -> bool:
    return len(w) >= 2 and w[-1] == w[-2] and _is_cons(w, len(w) - 1)


def _cvc(w: str) -> bool:
    n = len(w)
    return n >= 3 and _is_cons(w, n - 3) and not _is_cons(w, n - 2) and _is_cons(w, n - 1) and w[-1] not in "wxy"


# Porter's rule tables ("suffix:replacement"), steps 2, 3 and 4.
_STEP2 = tuple(
    tuple(rule.split(":"))
    for rule in (
        "ational:ate tional:tion enci:ence anci:ance izer:ize abli:able alli:al entli:ent eli:e "
        "ousli:ous ization:ize ation:ate ator:ate alism:al iveness:ive fulness:ful ousness:ous "
        "aliti:al iviti:ive biliti:ble"
    ).split()
)
_STEP3 = tuple(tuple(rule.split(":")) for rule in "icate:ic ative: alize:al iciti:ic ical:ic ful: ness:".split())
_STEP4 = tuple("al ance ence er ic able ible ant ement ment ent ion ou ism ate iti ous ive ize".split())


_STEP2_BY_LEN = tuple(sorted(_STEP2, key=lambda x: -len(x[0])))
_STEP3_BY_LEN = tuple(sorted(_STEP3, key=lambda x: -len(x[0])))
_STEP4_BY_LEN = tuple(sorted(_STEP4, key=len, reverse=True))
_STEP2_ENDS = tuple(x for x, _ in _STEP2)
_STEP3_ENDS = tuple(x for x, _ in _STEP3)


def _longest_rule(w: str, rules: tuple[tuple[str, str], ...], ends: tuple[str, ...]) -> tuple[str, str] | None:
    """The rule with the longest suffix of ``w`` (Porter applies only that one in a step)."""
    if not w.endswith(ends):
        return None
    for suf, rep in rules:  # sorted longest first
        if w.endswith(suf):
            return suf, rep
    return None


_STEM_CACHE: dict[str, str] = {}


def stem(word: str) -> str:
    """Porter-stem one lowercase alphabetic word (other strings, words of <= 3 letters and runs longer
    than any word, which would only cost time, pass)."""
    if not 3 < len(word) <= 64 or not word.isalpha() or not word.isascii():
        return word
    hit = _STEM_CACHE.get(word)
    if hit is None:
        hit = _porter(word)
        if len(_STEM_CACHE) < 200_000:
            _STEM_CACHE[word] = hit
    return hit


def _porter(w: str) -> str:
    # Step 1a
    if w.endswith("sses"):
        w = w[:-2]
    elif w.endswith("ies"):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    # Step 1b
    extra = False
    if w.endswith("eed"):
        if _measure(w[:-3]) > 0:
            w = w[:-1]
    elif w.endswith("ed") and _has_vowel(w[:-2]):
        w, extra = w[:-2], True
    elif w.endswith("ing") and _has_vowel(w[:-3]):
        w, extra = w[:-3], True
    if extra:
        if w.endswith(("at", "bl", "iz")):
            w += "e"
        elif _ends_double(w) and w[-1] not in "lsz":
            w = w[:-1]
        elif _measure(w) == 1 and _cvc(w):
            w += "e"
    # Step 1c
    if w.endswith("y") and _has_vowel(w[:-1]):
        w = w[:-1] + "i"
    # Step 2 and 3
    for rules, ends in ((_STEP2_BY_LEN, _STEP2_ENDS), (_STEP3_BY_LEN, _STEP3_ENDS)):
        rule = _longest_rule(w, rules, ends)
        if rule is not None and _measure(w[: -len(rule[0])]) > 0:
            w = w[: -len(rule[0])] + rule[1]
    # Step 4
    if w.endswith(_STEP4):
        suf = next(x for x in _STEP4_BY_LEN if w.endswith(x))
        base = w[: -len(suf)]
        if _measure(base) > 1 and (suf != "ion" or base.endswith(("s", "t"))):
            w = base
    # Step 5
    if w.endswith("e"):
        base = w[:-1]
        m = _measure(base)
        if m > 1 or (m == 1 and not _cvc(base)):
            w = base
    if _measure(w) > 1 and _ends_double(w) and w.endswith("l"):
        w = w[:-1]
    return w


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# An "atom" is an identifier (letters, digits, underscore; not starting with a digit) or a number.
# A compound joins atoms with '.', '/', '::' (dotted names, paths, Rust/C++ scopes) or '-' when a
# letter follows (kebab names such as Content-Length; "n-1" stays apart so arithmetic is not glued).
_COMPOUND_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:(?:[./]|::)[A-Za-z0-9_]+|-[A-Za-z][A-Za-z0-9_]*)*|[0-9]+")
_SEGMENT_SPLIT_RE = re.compile(r"[./\-]|::")
# camelCase / PascalCase / acronym runs / digit runs: "HTTPAdapter" -> HTTP, Adapter; "utf8" -> utf, 8.
_CAMEL_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")

# Words that carry no retrieval signal in questions or code. Kept small on purpose: BM25's idf
# already discounts frequent words; this list removes the ones that are frequent in questions yet
# may be rare in a small corpus (question words) or pure syntax (self, def, return).
STOPWORDS: frozenset[str] = frozenset(
    """
    a an the is are was were be been being am of to in on at by for with from as and or not no nor
    but if then else than that this these those it its what which who whom whose when where why
    how do does did doing done have has had having can could should would will shall may might must
    i you he she we they me my your our their them us there here any all some each every such so too
    very just also only into onto over under about above between through during before after again
    once both few more most other own same up down out off via per e.g i.e etc eg ie vs
    self cls def return elif pass lambda import let var const func fn
    """.split()
)

_MIN_LEN = 2  # single letters and digits ("i", "x", "0", "1") match nearly everything


def _keep(tok: str) -> bool:
    return len(tok) >= _MIN_LEN and tok not in STOPWORDS


def _part(p: str) -> str | None:
    """A lowercase identifier part as indexed: stemmed, or None when it is noise."""
    if not _keep(p):
        return None
    s = stem(p)
    return s if len(s) >= _MIN_LEN else None


def _expand(raw: str) -> tuple[str, ...]:
    """Terms for one regex match: the whole (lowercased), each segment, each stemmed part."""
    out: list[str] = []
    if raw[0].isdigit():
        if len(raw) >= _MIN_LEN:
            out.append(raw)
    else:
        segments = [s for s in _SEGMENT_SPLIT_RE.split(raw) if s]
        low_raw = raw.lower()
        if len(segments) > 1 and low_raw not in STOPWORDS:
            # A compound is a real name ("self.max_redirects") even when its parts are stopwords.
            out.append(low_raw)
        for seg in segments:
            low = seg.lower()
            parts = [p.lower() for piece in seg.split("_") if piece for p in _CAMEL_RE.findall(piece)]
            if len(parts) == 1 and parts[0] == low:
                t = _part(low)  # a plain word: indexed by its stem only
                if t is not None:
                    out.append(t)
                continue
            if _keep(low):
                out.append(low)  # a multi-part identifier, whole and unstemmed
            for p in parts:
                t = _part(p)
                if t is not None:
                    out.append(t)
    return tuple(out)


class _ExpandCache(dict[str, tuple[str, ...]]):
    """raw match -> terms, filled on first use. Code repeats the same identifiers constantly, and
    looking them up through ``dict.__getitem__`` inside ``map`` keeps the common case in C: this is
    what makes indexing 50K chunks take seconds. Bounded so a huge repository cannot grow it forever.
    """

    max_size = 500_000

    def __missing__(self, raw: str) -> tuple[str, ...]:
        terms = _expand(raw)
        if len(self) < self.max_size:
            self[raw] = terms
        return terms


_EXPAND_CACHE = _ExpandCache()


def code_tokens(text: str) -> list[str]:
    """Tokenize code or a question into lowercase retrieval terms.

    Whole identifiers, dotted names and paths are kept (exact mentions are the strongest evidence)
    and also split into stemmed parts (``max_redirects`` -> ``max``, ``redirect``; ``HTTPAdapter``
    -> ``http``, ``adapt``; ``src/requests/sessions.py`` -> ``src``, ``request``, ``session``,
    ``py``) so a question written in words still meets the code. Numbers of two or more digits are
    kept (``30``, ``512``): "what is the default" questions often hinge on them. Stopwords and
    one-character tokens are dropped.
    """
    return list(chain.from_iterable(map(_EXPAND_CACHE.__getitem__, _COMPOUND_RE.findall(text))))


@lru_cache(maxsize=65536)
def _path_tokens(path: str) -> tuple[str, ...]:
    return tuple(path_tokens(path))


def path_tokens(path: str) -> list[str]:
    """Terms that name a file: its tokens plus its dotted module names (unique, in order).

    ``src/requests/sessions.py`` also yields ``sessions.py``, ``requests.sessions`` and
    ``src.requests.sessions`` so a question that says "requests.sessions" or "sessions.py" matches
    whichever way it spells the file.
    """
    norm = path.replace("\\", "/").strip("/")
    toks = code_tokens(norm)
    segs = [s for s in norm.split("/") if s]
    if segs:
        base = segs[-1]
        toks.extend(code_tokens(base))  # "sessions.py" as a whole term
        stem_ = base.rsplit(".", 1)[0] if "." in base[1:] else base
        mods = [*segs[:-1], stem_]
        for i in range(len(mods) - 1):
            toks.append(".".join(mods[i:]).lower())
    return list(dict.fromkeys(toks))


# Names a chunk defines: `def/class/fn/func/struct/... NAME` and `NAME =`, `a.b.NAME =`, `NAME :=`,
# `NAME: T =` at the start of a line, after optional modifiers (export, pub, static, const, ...).
# Language-agnostic on purpose; it only needs to be right often, the body BM25 carries the rest.
# Matched line by line, and only on lines that contain "=" or start with a keyword: one regex over
# the whole text was the slowest step of indexing.
_MODIFIERS = tuple(
    (
        "export pub async static final const let var public private protected readonly mut val global "
        "nonlocal abstract override inline unsafe extern default"
    ).split()
)
_DEF_KEYWORDS = tuple("def class function func fn struct enum trait interface type impl module".split())
_LINE_STARTERS = frozenset(_MODIFIERS + _DEF_KEYWORDS)
_NAME = r"[A-Za-z_$][\w$]*"
_DEF_LINE_RE = re.compile(
    rf"[ \t]*(?:(?:{'|'.join(_MODIFIERS)})(?:\([\w ]+\))?[ \t]+)*"
    rf"(?:(?:{'|'.join(_DEF_KEYWORDS)})[ \t]+({_NAME})"
    rf"|({_NAME}(?:\.{_NAME})*)[ \t]*(?::[^=\n]{{0,80}})?=(?!=))"
)


def defined_names(text: str) -> list[str]:
    """Names a chunk defines or assigns (unique, in order of appearance)."""
    out: list[str] = []
    match = _DEF_LINE_RE.match
    for line in text.split("\n"):
        if "=" not in line:
            s = line.lstrip()
            j = s.find(" ")
            if j <= 0 or s[:j].split("(", 1)[0] not in _LINE_STARTERS:
                continue
        m = match(line)
        if m:
            out.append(m.group(1) or m.group(2))
    return list(dict.fromkeys(out))


_TEST_DIRS = frozenset({"test", "tests", "testing", "__tests__", "spec", "specs", "testdata"})
_TEST_FILE_RE = re.compile(
    r"(^test_.*|.*_test\.\w+$|.*_tests\.\w+$|.*\.(test|spec)\.\w+$|.*Tests?\.(java|kt|cs|swift)$|^conftest\.py$)"
)


@lru_cache(maxsize=65536)
def is_test_path(path: str) -> bool:
    """True for files that are tests by the common conventions of the main languages."""
    segs = [s for s in path.replace("\\", "/").split("/") if s]
    if not segs:
        return False
    return any(s.lower() in _TEST_DIRS for s in segs[:-1]) or bool(_TEST_FILE_RE.match(segs[-1]))


_TEST_QUERY_TERMS = frozenset({"test", "pytest", "unittest", "spec", "fixtur", "conftest", "mock"})


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result: the cube id and its score (higher is better)."""

    doc_id: str
    score: float


@dataclass(frozen=True, slots=True)
class DocMeta:
    """What the index remembers about a document besides its postings (for callers and recall)."""

    path: str
    symbol: str
    start_line: int | None = None
    end_line: int | None = None


def _grow(arr: np.ndarray, need: int) -> np.ndarray:
    """Return ``arr`` or a copy with capacity >= need (doubling, so appends are amortised O(1))."""
    if need <= arr.shape[0]:
        return arr
    new = np.zeros(max(need, 2 * arr.shape[0], 64), dtype=arr.dtype)
    new[: arr.shape[0]] = arr
    return new


class _PackedArrays:
    """A list of array('i') restored from one buffer, each piece made an array when first used.

    A saved index of a big repository holds hundreds of thousands of postings lists and per-document
    term-id lists; making them all at startup was most of the time it took to open. Reading a piece
    makes (and keeps) its array, so in-place changes stick; iterating does not keep what it makes.
    """

    __slots__ = ("_raw", "_bounds", "_made")

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self._raw = np.ascontiguousarray(data, dtype=np.int32).tobytes()
        self._bounds = np.asarray(offsets, dtype=np.int64) * 4
        self._made: list[array | None] = [None] * (len(self._bounds) - 1)

    def _make(self, i: int) -> array:
        return array("i", self._raw[self._bounds[i] : self._bounds[i + 1]])

    def __getitem__(self, i: int) -> array:
        got = self._made[i]
        if got is None:
            got = self._made[i] = self._make(i)
        return got

    def __setitem__(self, i: int, value: array) -> None:
        self._made[i] = value

    def append(self, value: array) -> None:
        self._made.append(value)

    def __len__(self) -> int:
        return len(self._made)

    def __iter__(self) -> Iterator[array]:
        for i, got in enumerate(self._made):
            yield self._make(i) if got is None else got


class _PackedRows:
    """slot -> (body, *fields) term-id arrays of a restored index, made on first use (None: dead slot)."""

    __slots__ = ("_cols", "_rows")

    def __init__(self, cols: Sequence[_PackedArrays], alive: np.ndarray) -> None:
        self._cols = cols
        self._rows: list[Any] = np.where(alive, _UNMADE, None).tolist()

    def _make(self, slot: int) -> tuple[array, ...]:
        return tuple(c._make(slot) for c in self._cols)

    def __getitem__(self, slot: int) -> tuple[array, ...] | None:
        got = self._rows[slot]
        if got is _UNMADE:
            got = self._rows[slot] = self._make(slot)
        return got

    def __setitem__(self, slot: int, value: tuple[array, ...] | None) -> None:
        self._rows[slot] = value

    def append(self, value: tuple[array, ...]) -> None:
        self._rows.append(value)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[tuple[array, ...] | None]:
        for slot, got in enumerate(self._rows):
            yield self._make(slot) if got is _UNMADE else got


_UNMADE = object()


def _int_array(values: np.ndarray) -> array:
    out = array("i")
    out.frombytes(np.ascontiguousarray(values, dtype=np.int32).tobytes())
    return out


class _Postings:
    """An inverted list for one field: term -> array('i') of interleaved (slot, tf) pairs.

    ``array('i')`` rather than Python dicts/sets: a large repository's postings take an order of
    magnitude less memory this way. New documents are buffered and merged into the lists in one
    numpy pass before the next read (a per-posting Python append dominated the startup build).
    Removed documents stay in the lists as tombstones (their slot is dead) until a term's dead
    entries outnumber its live ones.
    """

    __slots__ = ("tid", "lists", "df", "dead", "_pend_slots", "_pend_tids", "_pend_tfs")

    def __init__(self) -> None:
        self.tid: dict[str, int] = {}
        self.lists: list[array] = []
        self.df = np.zeros(64, dtype=np.int64)
        self.dead = np.zeros(64, dtype=np.int64)
        # Queued documents, as three parallel lists: no per-document tuple for the garbage
        # collector to traverse again and again while 50K documents arrive.
        self._pend_slots = array("i")
        self._pend_tids: list[array] = []
        self._pend_tfs: list[array] = []

    def add(self, slot: int, counts: Mapping[str, int]) -> array:
        """Queue ``slot`` for each term's list; returns the term ids (needed for removal)."""
        tid_map, lists = self.tid, self.lists
        # set.difference(dict) probes the dict per element of the (small) set, in C; note that
        # `keys() - keys()` would walk the whole vocabulary instead.
        new_terms = set(counts).difference(tid_map)
        if new_terms:
            for term in sorted(new_terms):  # sorted: term ids do not depend on hash seeds
                tid_map[term] = len(lists)
                lists.append(array("i"))
            if len(lists) > self.df.shape[0]:
                self.df = _grow(self.df, len(lists))
                self.dead = _grow(self.dead, len(lists))
        tids = array("i", map(tid_map.__getitem__, counts))
        if tids:
            self._pend_slots.append(slot)
            self._pend_tids.append(tids)
            self._pend_tfs.append(array("i", counts.values()))
        return tids

    def flush(self) -> None:
        """Merge queued documents into the per-term lists: one sort, one append per distinct term."""
        if not self._pend_tids:
            return
        pend_tids, pend_tfs = self._pend_tids, self._pend_tfs
        slots = np.repeat(
            np.frombuffer(self._pend_slots, dtype=np.int32).copy(),
            np.fromiter(map(len, pend_tids), dtype=np.int64, count=len(pend_tids)),
        )
        tids = np.frombuffer(b"".join(map(array.tobytes, pend_tids)), dtype=np.int32)
        tfs = np.frombuffer(b"".join(map(array.tobytes, pend_tfs)), dtype=np.int32)
        self._pend_slots, self._pend_tids, self._pend_tfs = array("i"), [], []
        order = np.argsort(tids, kind="stable")  # stable: each list stays in slot order
        pairs = np.stack((slots[order], tfs[order]), axis=1)
        sorted_tids = tids[order]
        starts = np.flatnonzero(np.r_[True, sorted_tids[1:] != sorted_tids[:-1]])
        ends = np.r_[starts[1:], sorted_tids.shape[0]]
        # term ids are unique within one document, so a term's run length is its new documents
        self.df[sorted_tids[starts]] += ends - starts
        raw = pairs.tobytes()
        lists = self.lists
        for tid, a, b in zip(sorted_tids[starts].tolist(), (starts * 8).tolist(), (ends * 8).tolist(), strict=True):
            lists[tid].frombytes(raw[a:b])

    def remove(self, tids: array, alive: np.ndarray) -> int:
        """Tombstone one document's entries (its slot is already dead in ``alive``); returns work."""
        self.flush()
        work = len(tids)
        df, dead = self.df, self.dead
        for tid in tids:
            df[tid] -= 1
            dead[tid] += 1
            if df[tid] == 0:
                work += len(self.lists[tid]) // 2
                self.lists[tid] = array("i")
                dead[tid] = 0
            elif dead[tid] > df[tid] and dead[tid] >= 8:
                work += self._purge(tid, alive)
        return work

    def _purge(self, tid: int, alive: np.ndarray) -> int:
        arr = np.frombuffer(self.lists[tid], dtype=np.int32).reshape(-1, 2)
        self.lists[tid] = _int_array(arr[alive[arr[:, 0]]])
        self.dead[tid] = 0
        return arr.shape[0]

    def get(self, term: str) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(slots, tfs, df) of a term, tombstones included; None when no live document has it."""
        tid = self.tid.get(term)
        if tid is None:
            return None
        self.flush()
        if self.df[tid] == 0:
            return None
        # a copy, so no numpy view pins the array('i') buffer (it could not grow while exported)
        arr = np.frombuffer(self.lists[tid], dtype=np.int32).reshape(-1, 2).copy()
        return arr[:, 0], arr[:, 1], int(self.df[tid])

    def renumber(self, alive: np.ndarray, remap: np.ndarray) -> int:
        """Rewrite every list with compacted slot numbers (``remap``), dropping dead entries."""
        self.flush()
        work = 0
        for tid, p in enumerate(self.lists):
            if not p:
                continue
            arr = np.frombuffer(p, dtype=np.int32).reshape(-1, 2)
            arr = arr[alive[arr[:, 0]]]
            arr[:, 0] = remap[arr[:, 0]]
            self.lists[tid] = _int_array(arr)
            self.dead[tid] = 0
            work += arr.shape[0]
        return work

    def live_df(self) -> np.ndarray:
        self.flush()
        df = self.df[: len(self.lists)]
        return df[df > 0]

    def export(self) -> dict[str, Any]:
        """The lists as one array with offsets, plus the vocabulary in term-id order (for saving)."""
        self.flush()
        n = len(self.lists)
        lengths = np.fromiter(map(len, self.lists), dtype=np.int64, count=n)
        return {
            "terms": sorted(self.tid, key=self.tid.__getitem__),
            "data": np.frombuffer(b"".join(map(array.tobytes, self.lists)), dtype=np.int32),
            "offsets": np.concatenate(([0], np.cumsum(lengths))),
            "df": self.df[:n].copy(),
            "dead": self.dead[:n].copy(),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """The inverse of :meth:`export` (the state is trusted: the file layer checked it)."""
        terms = state["terms"]
        self.tid = dict(zip(terms, range(len(terms)), strict=True))
        self.lists = _PackedArrays(state["data"], state["offsets"])  # type: ignore[assignment]
        self.df = _grow(np.asarray(state["df"], dtype=np.int64).copy(), len(terms))
        self.dead = _grow(np.asarray(state["dead"], dtype=np.int64).copy(), len(terms))


_FIELDS = ("symbol", "defs", "path")

_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Serialise a public method on the index's lock: the watcher edits while the UI searches, and
    even a search mutates (it merges queued postings), so every entry point takes the lock."""

    @wraps(method)
    def wrapper(self: BM25Index, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return cast(_F, wrapper)


class BM25Index:
    """Incremental BM25Okapi index over documents keyed by a string id (the cube id).

    Scoring, for query terms q (with repeats, as ``rank_bm25`` does)::

        body(d)  = sum_q idf(q) * tf(q,d)*(k1+1) / (tf(q,d) + k1*(1 - b + b*|d|/avgdl))
        score(d) = prior(d) * (body(d) + sum_f weight_f * sum_{distinct q in field f of d} idf_f(q))

    ``idf`` is BM25Okapi's (``log(N-df+0.5) - log(df+0.5)``, negative values floored at
    ``epsilon * mean idf``), identical to ``rank_bm25.BM25Okapi`` so the body can be checked
    against it. The fields are the chunk's symbol, the names it defines, and its path; their idf
    is ``log(1 + (N-df+0.5)/(df+0.5))`` over that field: never negative and near zero for a term
    every path shares ("src", the package name), so only distinctive mentions boost. ``prior`` is
    ``test_prior`` for test files unless the question mentions tests, else 1.

    docs/benchmarks.md has what the default weights and the test prior were chosen on.

    Every public method holds one lock: the watcher edits while the UI searches, and even a search
    mutates (it merges queued postings).
    """

    def __init__(
        self,
        *,
        k1: float = 1.5,
        b: float = 0.75,
        epsilon: float = 0.25,
        symbol_weight: float = 1.0,
        defs_weight: float = 0.5,
        path_weight: float = 1.0,
        test_prior: float = 0.5,
    ) -> None:
        self.k1 = k1
        self.b = b
        self.epsilon = epsilon
        self.weights = {"symbol": symbol_weight, "defs": defs_weight, "path": path_weight}
        self.test_prior = test_prior
        self._lock = threading.RLock()

        # Slots are never reused while tombstoned postings may still name them.
        self._slot_of: dict[str, int] = {}
        self._id_of: list[str | None] = []
        self._meta: dict[str, DocMeta] = {}
        self._doc_len = np.zeros(64, dtype=np.float64)
        self._alive = np.zeros(64, dtype=bool)
        self._is_test = np.zeros(64, dtype=bool)
        self._doc_tids: list[tuple[array, ...] | None] = []  # slot -> term ids (body, *fields)
        self._n_slots = 0
        self._n_live = 0
        self._total_len = 0

        self._body = _Postings()
        self._fields = {f: _Postings() for f in _FIELDS}

        self._version = 0
        self._avg_idf_cache: tuple[int, float] | None = None
        #: Postings entries written, tombstoned or purged since construction: the work an edit
        #: costs, so tests can show an update is O(document) and never O(corpus).
        self.work = 0

    # ---------------------------------------------------------------- documents

    @_locked
    def __len__(self) -> int:
        return self._n_live

    @_locked
    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._slot_of

    @_locked
    def ids(self) -> list[str]:
        """Live document ids (no particular order)."""
        return list(self._slot_of)

    @_locked
    def meta(self, doc_id: str) -> DocMeta:
        """Path, symbol and (when given) line span of a document."""
        return self._meta[doc_id]

    @_locked
    def add(
        self,
        doc_id: str,
        text: str,
        path: str = "",
        symbol: str = "",
        *,
        start_line: int | None = None,
        end_line: int | None = None,
    ) -> None:
        """Index one document. Raises ``KeyError`` if the id is present (use :meth:`update`)."""
        if doc_id in self._slot_of:
            raise KeyError(f"document {doc_id!r} already indexed")
        toks = code_tokens(text)
        slot = self._n_slots
        self._n_slots += 1
        if slot >= self._alive.shape[0]:
            self._alive = _grow(self._alive, slot + 1)
            self._is_test = _grow(self._is_test, slot + 1)
            self._doc_len = _grow(self._doc_len, slot + 1)
        self._slot_of[doc_id] = slot
        self._id_of.append(doc_id)
        self._meta[doc_id] = DocMeta(path, symbol, start_line, end_line)
        self._alive[slot] = True
        self._is_test[slot] = is_test_path(path)
        self._doc_len[slot] = len(toks)
        self._n_live += 1
        self._total_len += len(toks)
        self._version += 1

        fields = {
            "symbol": code_tokens(symbol),
            "defs": code_tokens(" ".join(defined_names(text))),
            "path": _path_tokens(path),  # cached: every chunk of a file shares its path
        }
        tids = [self._body.add(slot, Counter(toks))]
        for f in _FIELDS:
            tids.append(self._fields[f].add(slot, dict.fromkeys(fields[f], 1)))
        self.work += sum(len(t) for t in tids)
        self._doc_tids.append(tuple(tids))

    @_locked
    def update(
        self,
        doc_id: str,
        text: str,
        path: str = "",
        symbol: str = "",
        *,
        start_line: int | None = None,
        end_line: int | None = None,
    ) -> None:
        """Replace a document, or add it if absent: O(terms of the old and the new text)."""
        if doc_id in self._slot_of:
            self.remove(doc_id)
        self.add(doc_id, text, path, symbol, start_line=start_line, end_line=end_line)

    @_locked
    def remove(self, doc_id: str) -> None:
        """Drop a document (``KeyError`` if unknown). O(terms of the document), amortised."""
        slot = self._slot_of.pop(doc_id)
        del self._meta[doc_id]
        self._version += 1
        self._alive[slot] = False
        self._id_of[slot] = None
        self._n_live -= 1
        self._total_len -= int(self._doc_len[slot])
        tids = self._doc_tids[slot]
        self._doc_tids[slot] = None
        assert tids is not None
        self.work += self._body.remove(tids[0], self._alive)
        for f, t in zip(_FIELDS, tids[1:], strict=True):
            self.work += self._fields[f].remove(t, self._alive)
        if self._n_slots - self._n_live > max(self._n_live, 1024):
            self._renumber()

    def _renumber(self) -> None:
        """Compact slot numbers once dead slots outnumber live ones (amortised over the removals)."""
        live = np.flatnonzero(self._alive[: self._n_slots])
        remap = np.full(self._n_slots, -1, dtype=np.int64)
        remap[live] = np.arange(live.shape[0])
        alive = self._alive
        self.work += self._body.renumber(alive, remap)
        for p in self._fields.values():
            self.work += p.renumber(alive, remap)
        n = int(live.shape[0])
        self._id_of = [self._id_of[i] for i in live]
        self._doc_tids = [self._doc_tids[i] for i in live]
        cap = max(64, n)
        new_len = np.zeros(cap, dtype=np.float64)
        new_len[:n] = self._doc_len[live]
        new_test = np.zeros(cap, dtype=bool)
        new_test[:n] = self._is_test[live]
        self._doc_len, self._is_test = new_len, new_test
        self._alive = np.zeros(cap, dtype=bool)
        self._alive[:n] = True
        self._slot_of = {d: i for i, d in enumerate(self._id_of) if d is not None}
        self._n_slots = n

    # ---------------------------------------------------------------- persistence

    @_locked
    def export_state(self) -> dict[str, Any]:
        """Everything the index holds as strings, scalars and flat numpy arrays: what
        ``repomem.core.index_file`` writes. Queued postings are merged first; arrays are copies."""
        n = self._n_slots
        metas = [self._meta.get(d) if d is not None else None for d in self._id_of]
        state: dict[str, Any] = {
            "n_slots": n,
            "n_live": self._n_live,
            "total_len": self._total_len,
            "ids": [d or "" for d in self._id_of],
            "paths": [m.path if m else "" for m in metas],
            "symbols": [m.symbol if m else "" for m in metas],
            # -1: no line span (documents are 1-based)
            "start_line": np.array([-1 if m is None or m.start_line is None else m.start_line for m in metas],
                                   dtype=np.int64),
            "end_line": np.array([-1 if m is None or m.end_line is None else m.end_line for m in metas],
                                 dtype=np.int64),
            "doc_len": self._doc_len[:n].copy(),
            "alive": self._alive[:n].copy(),
            "is_test": self._is_test[:n].copy(),
        }
        for i, name in enumerate(("body", *_FIELDS)):
            pieces = [t[i] if t is not None else array("i") for t in self._doc_tids]
            lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=n)
            state[f"tids.{name}"] = np.frombuffer(b"".join(map(array.tobytes, pieces)), dtype=np.int32)
            state[f"tids.{name}.offsets"] = np.concatenate(([0], np.cumsum(lengths)))
        for name, post in (("body", self._body), *self._fields.items()):
            for key, value in post.export().items():
                state[f"postings.{name}.{key}"] = value
        return state

    @_locked
    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Replace this (empty) index's contents with an :meth:`export_state`; the scoring parameters
        stay this object's own. The state is trusted: the file layer validated it."""
        if self._n_slots:
            raise ValueError("restore_state needs an empty index")
        n = int(state["n_slots"])
        alive = np.asarray(state["alive"], dtype=bool)
        ids = state["ids"]
        self._id_of = [d if alive[i] else None for i, d in enumerate(ids)]
        self._slot_of = {d: i for i, d in enumerate(self._id_of) if d is not None}
        starts, ends = state["start_line"].tolist(), state["end_line"].tolist()
        self._meta = {
            d: DocMeta(p, sym, None if a < 0 else a, None if b < 0 else b)
            for d, p, sym, a, b in zip(self._id_of, state["paths"], state["symbols"], starts, ends, strict=True)
            if d is not None
        }
        self._doc_len = _grow(np.asarray(state["doc_len"], dtype=np.float64).copy(), n)
        self._alive = _grow(alive.copy(), n)
        self._is_test = _grow(np.asarray(state["is_test"], dtype=bool).copy(), n)
        cols = [_PackedArrays(state[f"tids.{name}"], state[f"tids.{name}.offsets"]) for name in ("body", *_FIELDS)]
        self._doc_tids = _PackedRows(cols, alive)  # type: ignore[assignment]
        self._n_slots = n
        self._n_live = int(state["n_live"])
        self._total_len = int(state["total_len"])
        for name, post in (("body", self._body), *self._fields.items()):
            prefix = f"postings.{name}."
            post.restore({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self._version += 1
        self._avg_idf_cache = None

    # ---------------------------------------------------------------- scoring

    @_locked
    def flush(self) -> None:
        """Merge documents added since the last read into the postings. Searches do this
        themselves; call it to move that cost to a moment of your choosing (e.g. end of startup)."""
        self._body.flush()
        for p in self._fields.values():
            p.flush()

    def _average_idf(self) -> float:
        """Mean BM25Okapi idf over the live vocabulary (only needed to floor negative idfs)."""
        if self._avg_idf_cache is not None and self._avg_idf_cache[0] == self._version:
            return self._avg_idf_cache[1]
        df = self._body.live_df().astype(np.float64)
        n = float(self._n_live)
        avg = float(np.mean(np.log(n - df + 0.5) - np.log(df + 0.5))) if df.size else 0.0
        self._avg_idf_cache = (self._version, avg)
        return avg

    def _idf_from_df(self, df: int) -> float:
        idf = math.log(self._n_live - df + 0.5) - math.log(df + 0.5)
        return self.epsilon * self._average_idf() if idf < 0 else idf

    @_locked
    def idf(self, term: str) -> float:
        """BM25Okapi idf of a body term (0 for unknown terms), exactly as ``rank_bm25`` computes it."""
        got = self._body.get(term)
        return 0.0 if got is None else self._idf_from_df(got[2])

    def _body_scores(self, query_toks: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """BM25 body scores for every slot, and a mask of slots any query term touched."""
        n_slots = self._n_slots
        scores = np.zeros(n_slots, dtype=np.float64)
        touched = np.zeros(n_slots, dtype=bool)
        if self._n_live == 0 or self._total_len == 0:
            return scores, touched
        avgdl = self._total_len / self._n_live
        norm = self.k1 * (1 - self.b + self.b * self._doc_len[:n_slots] / avgdl)
        k1p1 = self.k1 + 1
        for term, qtf in Counter(query_toks).items():
            got = self._body.get(term)
            if got is None:
                continue
            slots, tf_i, df = got
            tf = tf_i.astype(np.float64)
            contrib = self._idf_from_df(df) * (tf * k1p1 / (tf + norm[slots]))
            scores[slots] += contrib * qtf if qtf != 1 else contrib
            touched[slots] = True
        return scores, touched

    def _field_scores(self, terms: Iterable[str], scores: np.ndarray, touched: np.ndarray) -> None:
        n = self._n_live
        for f in _FIELDS:
            weight = self.weights[f]
            if not weight:
                continue
            post = self._fields[f]
            for term in terms:
                got = post.get(term)
                if got is None:
                    continue
                slots, _, df = got
                scores[slots] += weight * math.log(1 + (n - df + 0.5) / (df + 0.5))
                touched[slots] = True

    @_locked
    def text_scores(self, query: str | Sequence[str]) -> dict[str, float]:
        """Plain BM25Okapi body score of every live document (no fields, no prior). For tests and
        diagnostics: equals ``rank_bm25.BM25Okapi(corpus).get_scores(query)`` on the same tokens."""
        toks = code_tokens(query) if isinstance(query, str) else list(query)
        scores, _ = self._body_scores(toks)
        return {d: float(scores[s]) for d, s in self._slot_of.items()}

    @_locked
    def search(
        self,
        query: str,
        k: int = 5,
        *,
        filter: Callable[[str], bool] | None = None,
    ) -> list[Hit]:
        """Top ``k`` documents for a question, best first; ``filter(doc_id)`` may veto documents.

        Only documents sharing at least one term with the query are returned (a zero score is no
        evidence). Ties are broken by doc id so results do not depend on insertion history.
        """
        if k <= 0 or self._n_live == 0:
            return []
        self.flush()
        toks = code_tokens(query)
        if not toks:
            return []
        scores, touched = self._body_scores(toks)
        uniq = list(dict.fromkeys(toks))
        self._field_scores(uniq, scores, touched)
        n_slots = self._n_slots
        if self.test_prior != 1.0 and not _TEST_QUERY_TERMS.intersection(uniq):
            scores[self._is_test[:n_slots]] *= self.test_prior
        touched &= self._alive[:n_slots]
        cand = np.flatnonzero(touched)
        if cand.size == 0:
            return []
        order = cand[np.argsort(-scores[cand], kind="stable")]
        picked: list[Hit] = []
        kth: float | None = None
        for slot in order.tolist():
            sc = float(scores[slot])
            if kth is not None and sc < kth:
                break
            doc_id = self._id_of[slot]
            assert doc_id is not None
            if filter is not None and not filter(doc_id):
                continue
            picked.append(Hit(doc_id, sc))
            if kth is None and len(picked) == k:
                kth = sc  # keep collecting exact ties so the doc-id tie-break is well defined
        picked.sort(key=lambda h: (-h.score, h.doc_id))
        return picked[:k]


# --------------------------------------------------------------------------------------------
# Budget and evaluation helpers
# --------------------------------------------------------------------------------------------


def select_within_budget(
    hits: Sequence[Hit],
    token_counts: Mapping[str, int] | Callable[[str], int],
    budget: int,
    *,
    k: int | None = None,
) -> list[Hit]:
    """Keep hits in rank order while their token counts fit ``budget`` (and at most ``k`` of them).

    A hit too large for what is left is skipped rather than ending the selection: a smaller,
    slightly lower-ranked chunk is still better context than leaving the budget unused.
    """
    count = token_counts if callable(token_counts) else token_counts.__getitem__
    out: list[Hit] = []
    left = budget
    for h in hits:
        if k is not None and len(out) >= k:
            break
        n = int(count(h.doc_id))
        if n <= left:
            out.append(h)
            left -= n
    return out


def span_hit(path: str, start: int | None, end: int | None, gold: Mapping[str, Any]) -> bool:
    """True when a retrieved span is in the gold file and overlaps the gold lines (1-based,
    inclusive). A document without a line span counts when the path matches (whole files)."""
    if path.replace("\\", "/").strip("/") != str(gold["path"]).replace("\\", "/").strip("/"):
        return False
    if start is None or end is None:
        return True
    return start <= int(gold["end_line"]) and int(gold["start_line"]) <= end


def recall_at_k(
    index: BM25Index,
    rows: Sequence[Mapping[str, Any]],
    k: int,
    *,
    span_of: Callable[[str], tuple[str, int | None, int | None]] | None = None,
) -> float:
    """Fraction of rows (``question``, ``path``, ``start_line``, ``end_line``) whose gold span is
    overlapped by one of the top ``k`` hits. Spans come from the index's own metadata unless
    ``span_of(doc_id) -> (path, start, end)`` is given (e.g. a store lookup)."""
    if not rows:
        return 0.0

    def _span(doc_id: str) -> tuple[str, int | None, int | None]:
        if span_of is not None:
            return span_of(doc_id)
        m = index.meta(doc_id)
        return m.path, m.start_line, m.end_line

    found = 0
    for row in rows:
        hits = index.search(str(row["question"]), k=k)
        if any(span_hit(*_span(h.doc_id), row) for h in hits):
            found += 1
    return found / len(rows)
