"""The saved search index: reopening a store reads it instead of every cube, and never disagrees with the store.

Why these tests: the file is a cache of what the store holds. It is only worth having if an index that
comes out of `SearchIndex.open` ranks exactly like one built afresh from the store, whatever happened
since the file was written (edits, deletes, notes, a model change, another process), and if a damaged,
truncated or foreign file is rebuilt instead of trusted.
"""

from __future__ import annotations

import random
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import pytest

from repomem.core import index_file, search_index
from repomem.core import settings as settings_mod
from repomem.core.memory import RepoMemory
from repomem.core.retrieval import BM25Index
from repomem.core.search_index import SearchIndex
from repomem.core.store import CubeStore

MODULE = '''"""Payment helpers."""

RETRY_LIMIT = 4


def charge(card, amount):
    """Charge a card once."""
    return gateway.send(card, amount)


def refund(payment, reason="customer"):
    """Refund a payment in full."""
    return gateway.reverse(payment, reason)


class Ledger:
    """Keeps every booking."""

    def book(self, entry):
        self.entries.append(entry)
'''

QUERIES = ["charge a card", "refund payment reason", "Ledger book entry", "RETRY_LIMIT", "gateway send",
           "invoice total tax", "tests for refund", "what did we decide about refunds", "shipping address"]


def _write_repo(root: Path) -> None:
    root.mkdir()
    (root / "payments.py").write_text(MODULE)
    (root / "invoice.py").write_text('def total(lines, tax=0.2):\n    """Invoice total with tax."""\n'
                                     "    return sum(lines) * (1 + tax)\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_payments.py").write_text("def test_refund():\n    assert refund(1)\n")
    (root / "README.md").write_text("# Shop\n\nPayments and invoices for the shop.\n")


def _fresh(store: CubeStore) -> BM25Index:
    """What an index built from scratch out of the store's live cubes holds."""
    fresh = BM25Index()
    for c in store.cubes():
        if c.status != "archived":
            fresh.add(c.id, c.text, c.path, c.symbol or "", start_line=c.start_line, end_line=c.end_line)
    return fresh


def _assert_same(index: BM25Index, fresh: BM25Index, queries: list[str]) -> None:
    assert sorted(index.ids()) == sorted(fresh.ids())
    for doc_id in fresh.ids():
        assert index.meta(doc_id) == fresh.meta(doc_id)
    for q in queries:
        got, want = index.search(q, k=20), fresh.search(q, k=20)
        assert [h.doc_id for h in got] == [h.doc_id for h in want], q
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-9)


def _queries(store: CubeStore) -> list[str]:
    return QUERIES + sorted({c.symbol for c in store.cubes() if c.symbol})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "shop"
    _write_repo(root)
    return root


def _settings(model: Path) -> settings_mod.Settings:
    return settings_mod.Settings(model=str(model), encoding="f16")


def _indexed(repo: Path, model: Path) -> Path:
    """Index the repository (no compile) and close it; its store folder."""
    mem = RepoMemory.open(repo, settings=_settings(model))
    mem.index(compile=False)
    mem.close()
    return mem.store.dir


@pytest.mark.default_model
def test_reopened_index_equals_a_fresh_build_after_edits_deletes_notes_and_a_model_change(
        repo: Path, home: Path, test_model_path: Path, default_model_path: Path) -> None:
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    mem.index()  # plaintext, then KV with the small model; the index file is written at the end
    assert mem.store.cubes(kind="activation")
    mem.close()
    store_dir = mem.store.dir
    saved = index_file.path_for(store_dir)
    assert saved.exists()
    written = saved.stat().st_mtime_ns

    # While the file is not rewritten: edits, a new file, a deleted file, notes, a forgotten cube.
    other = RepoMemory.open(repo, settings=_settings(test_model_path))
    assert other._search.report.source == "file" and other._search.report.applied == 0
    edited = MODULE.replace("Refund a payment in full.", "Refund part of a payment.")
    edited = edited.replace('"""Payment helpers."""', '"""Payment helpers."""\n\nCURRENCY = 1\n')  # moves the rest
    (repo / "payments.py").write_text(edited)
    (repo / "shipping.py").write_text('def address(order):\n    """Shipping address of an order."""\n'
                                      "    return order.address\n")
    (repo / "invoice.py").unlink()
    other.sync_paths(["payments.py", "shipping.py", "invoice.py"], compile=False)
    other.store.add_note_cube("We decided refunds above 100 EUR need a second approval.", source="conversation")
    doomed = next(c for c in other.store.cubes() if c.symbol == "Ledger")
    other.store.forget(doomed.id)
    other.close()
    store = CubeStore.open(store_dir)
    try:  # caught up before the model change too (that one re-reads every compiled cube)
        index = SearchIndex.open(store)
        assert index.report.source == "file" and index.report.applied >= 5
        _assert_same(index.bm25, _fresh(store), _queries(store))
    finally:
        store.close()
    # Another model: the small model's payloads go stale (status changes, text does not).
    switched = RepoMemory.open(repo, settings=_settings(default_model_path))
    assert switched.engine is not None and switched.store.cubes(status="stale")
    switched.close()
    assert saved.stat().st_mtime_ns == written  # so the next open has all of that to catch up on

    store = CubeStore.open(store_dir)
    try:
        index = SearchIndex.open(store)
        assert index.report.source == "file", index.report
        assert index.report.applied >= 8  # the changed cubes only, not the whole store
        _assert_same(index.bm25, _fresh(store), _queries(store))
        assert index.search("second approval refunds")[0].doc_id == next(
            c.id for c in store.cubes(source="conversation"))
    finally:
        store.close()


def test_open_reads_only_the_changed_cubes(repo: Path, home: Path, test_model_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    store_dir = _indexed(repo, test_model_path)
    read: list[str | None] = []
    rows = CubeStore.search_rows

    def spy(self: CubeStore, ids=None, page: int = 2000):
        ids = None if ids is None else list(ids)
        read.extend([None] if ids is None else ids)
        return rows(self, ids, page)

    monkeypatch.setattr(CubeStore, "search_rows", spy)
    store = CubeStore.open(store_dir)
    try:
        assert SearchIndex.open(store).report.applied == 0
        assert read == []  # nothing changed: no cube is read at all
        refund = next(c for c in store.cubes() if c.symbol == "refund")
        store.pin(refund.id)  # no stamp change: nothing to read
        store.add_note_cube("Refunds go through the ledger.", source="change")
        store.archive(refund.id)  # a payload drop keeps the text: not a change for search either
        index = SearchIndex.open(store)
        assert index.report.applied == 1 and len(read) == 1 and read[0] is not None
        _assert_same(index.bm25, _fresh(store), _queries(store))
    finally:
        store.close()


def test_a_failed_sync_is_retried_on_the_next_one(repo: Path, home: Path, test_model_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store_dir = _indexed(repo, test_model_path)
    store = CubeStore.open(store_dir)
    other = CubeStore.open(store_dir)  # another process writing the same store
    try:
        index = SearchIndex.open(store)
        note = other.add_note_cube("Chargebacks are booked in the ledger.", source="note")
        stamps = CubeStore.cube_stamps

        def locked_once(self: CubeStore):
            monkeypatch.setattr(CubeStore, "cube_stamps", stamps)
            raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(CubeStore, "cube_stamps", locked_once)
        with pytest.raises(sqlite3.OperationalError):
            index.sync()
        assert index.sync() == 1  # the change it could not read then
        assert note.id in [h.doc_id for h in index.bm25.search("chargebacks ledger", k=3)]
    finally:
        other.close()
        store.close()


def _break_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _break_flip_byte(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("postings.body.data.npy")
    data = bytearray(path.read_bytes())
    # the member's last byte (a term frequency): the array is still well formed, only its CRC disagrees
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size - 1] ^= 0x01
    path.write_bytes(bytes(data))


def _break_garbage(path: Path) -> None:
    path.write_bytes(b"not a zip at all" * 10)


def _break_inconsistent(path: Path) -> None:
    """A well-formed file whose postings name a slot that does not exist (a bug, or a foreign file)."""
    with np.load(path) as z:
        members = {k: z[k] for k in z.files}
    members["postings.body.data"] = members["postings.body.data"].copy()
    members["postings.body.data"][0] = 10_000
    with open(path, "wb") as fh:
        np.savez(fh, **members)


@pytest.mark.parametrize("damage", [_break_truncate, _break_flip_byte, _break_garbage, _break_inconsistent])
def test_a_damaged_file_is_rebuilt_not_trusted(repo: Path, home: Path, test_model_path: Path, damage) -> None:
    store_dir = _indexed(repo, test_model_path)
    path = index_file.path_for(store_dir)
    damage(path)
    with pytest.raises(index_file.IndexFileInvalid):
        index_file.load(path)
    store = CubeStore.open(store_dir)
    try:
        index = SearchIndex.open(store)
        assert index.report.source == "rebuilt" and index.report.reason
        _assert_same(index.bm25, _fresh(store), _queries(store))
    finally:
        store.close()


def test_a_file_from_another_tokenizer_or_format_is_rebuilt(repo: Path, home: Path, test_model_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    store_dir = _indexed(repo, test_model_path)
    path = index_file.path_for(store_dir)
    monkeypatch.setattr(index_file, "tokenizer_fingerprint", lambda: "another tokenizer")
    with pytest.raises(index_file.IndexFileInvalid, match="tokenizer"):
        index_file.load(path)
    monkeypatch.undo()
    monkeypatch.setattr(index_file, "FORMAT_VERSION", index_file.FORMAT_VERSION + 1)
    with pytest.raises(index_file.IndexFileInvalid, match="format"):
        index_file.load(path)
    monkeypatch.undo()
    index_file.load(path)  # the untouched file is fine


def test_most_of_the_store_changed_means_a_rebuild(repo: Path, home: Path, test_model_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_index, "REBUILD_MIN", 2)  # this store is tiny
    store_dir = _indexed(repo, test_model_path)
    store = CubeStore.open(store_dir)
    try:
        for c in store.cubes()[: len(store.cubes()) // 2]:
            store.forget(c.id)
        index = SearchIndex.open(store)
        assert index.report.source == "rebuilt" and "changed" in index.report.reason
        _assert_same(index.bm25, _fresh(store), _queries(store))
    finally:
        store.close()


def test_a_failed_save_is_reported_and_kept_for_later(repo: Path, home: Path, test_model_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    mem.index(compile=False)
    index = mem._search
    store_dir = mem.store.dir
    index.path = store_dir / "no-such-folder" / index_file.FILE_NAME
    with CubeStore.open(store_dir) as writer:  # another connection, as the watcher's would be
        writer.add_note_cube("a note", source="change")
    assert mem.refresh() == 1
    assert index.save() is False and "could not save the search index" in caplog.text
    index.path = index_file.path_for(store_dir)
    assert index.save() is True  # the change is still owed: the next save writes it
    assert index.save() is False  # and then nothing is
    mem.close()


# --------------------------------------------------------------------------- BM25Index state round trip


def _doc(rng: random.Random) -> tuple[str, str, str]:
    words = rng.choices([f"w{i}" for i in range(40)] + ["adapter", "session", "redirect", "HTTPAdapter"],
                        k=rng.randint(0, 20))
    return " ".join(words), f"pkg{rng.randint(0, 4)}/{rng.choice(['mod', 'test_mod'])}{rng.randint(0, 5)}.py", \
        rng.choice(["", "Session.send", f"f{rng.randint(0, 9)}"])


def test_a_restored_index_keeps_working_like_the_original(tmp_path: Path) -> None:
    """Save, load, then keep editing both: the lazily restored lists must take appends, tombstones,
    purges and a renumbering exactly like the original's."""
    rng = random.Random(3)
    original = BM25Index()
    docs: dict[str, tuple[str, str, str]] = {}
    for i in range(400):
        docs[f"d{i}"] = _doc(rng)
        original.add(f"d{i}", *docs[f"d{i}"], start_line=i + 1, end_line=i + 3)
    for i in range(0, 400, 7):
        original.remove(f"d{i}")  # dead slots and tombstones in the saved state
        del docs[f"d{i}"]
    stamps = {d: (1.5, "active", 1, 1, 2) for d in docs}
    index_file.save(tmp_path / "ix.npz", original.export_state(), stamps)
    state, got_stamps = index_file.load(tmp_path / "ix.npz")
    assert got_stamps == stamps
    restored = BM25Index()
    restored.restore_state(state)
    queries = ["w1 w2", "adapter session", "HTTPAdapter", "tests w3", "pkg1 mod2.py", "Session.send w9"]
    _assert_same(restored, original, queries)
    next_id = 400
    for _step in range(1500):  # enough removals for purges and a renumbering
        op = rng.random()
        if op < 0.4 and docs:
            d = rng.choice(sorted(docs))
            docs[d] = _doc(rng)
            for ix in (original, restored):
                ix.update(d, *docs[d])
        elif op < 0.75 and docs:
            d = rng.choice(sorted(docs))
            del docs[d]
            for ix in (original, restored):
                ix.remove(d)
        else:
            docs[f"d{next_id}"] = _doc(rng)
            for ix in (original, restored):
                ix.add(f"d{next_id}", *docs[f"d{next_id}"])
            next_id += 1
    _assert_same(restored, original, queries)
    again = BM25Index()
    again.restore_state(restored.export_state())  # a restored index saves like any other
    _assert_same(again, original, queries)


def test_the_saved_file_is_a_plain_npz_without_pickles(tmp_path: Path) -> None:
    index = BM25Index()
    index.add("a", "def charge(card): pass", "pay.py", "charge", start_line=1, end_line=1)
    index_file.save(tmp_path / "ix.npz", index.export_state(), {"a": (1.0, "active", 1, 1, 1)})
    with zipfile.ZipFile(tmp_path / "ix.npz") as z:
        assert z.testzip() is None and "meta.npy" in z.namelist()
    with np.load(tmp_path / "ix.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
