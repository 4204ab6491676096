"""MemCube store: identity across re-indexes, payload files, budget, GC, crash safety."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from repomem.core.chunking import Chunk, chunk_text
from repomem.core.conversations import ConversationStore
from repomem.core.cube import cube_id_for
from repomem.core.errors import StoreError
from repomem.core.store import CubeStore, PayloadCorrupt, PayloadMissing
from repomem.core.store_schema import MIGRATIONS, SCHEMA_VERSION

SRC_V1 = """
import os

LIMIT = 3


def alpha(x):
    return x + 1


def beta(y):
    return y * 2


class Gamma:
    def run(self):
        return alpha(1)
"""


def chunks(src: str, path: str = "pkg/mod.py") -> list[Chunk]:
    return chunk_text(path, textwrap.dedent(src).lstrip("\n"), "python")


@pytest.fixture
def store(tmp_path: Path):
    s = CubeStore.open(tmp_path / "store")
    yield s
    s.close()


def by_symbol(store: CubeStore, path: str = "pkg/mod.py", status: str | None = "active") -> dict:
    return {c.symbol: c for c in store.cubes(path_glob=path, status=status)}


def compile_fake(store: CubeStore, cube, data: bytes | None = None, fp: str = "model-a") -> Path:
    """Attach a payload; returns its file."""
    sha, n = store.write_payload(data if data is not None else f"kv:{cube.id}:{cube.version}".encode())
    assert store.attach_payload(cube.id, cube.content_hash, sha, n, 40, 20, fp, "f16")
    return store.payloads.path(sha)


# ---- opening and schema ----------------------------------------------------------------------


def test_open_creates_layout_wal_and_schema(tmp_path: Path) -> None:
    d = tmp_path / "s"
    with CubeStore.open(d) as s:
        assert (d / "cubes.db").is_file() and (d / "payloads").is_dir()
        assert s.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        tables = {r[0] for r in s.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"meta", "cubes", "history", "files", "skips"} <= tables and "settings_kv" not in tables
    with CubeStore.open(d) as s:  # reopening migrates nothing
        assert s.schema_version == SCHEMA_VERSION


def test_newer_schema_and_garbage_are_store_errors(tmp_path: Path) -> None:
    d = tmp_path / "s"
    CubeStore.open(d).close()
    conn = sqlite3.connect(d / "cubes.db")
    conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        CubeStore.open(d)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cubes.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        CubeStore.open(bad)


def test_schema_1_store_migrates_to_payloads_by_sha256(tmp_path: Path) -> None:
    """A store written before payloads were found by hash alone: its compiled cubes stay compiled."""
    d = tmp_path / "old"
    (d / "payloads" / "ab").mkdir(parents=True)
    data = b"an old payload"
    sha = hashlib.sha256(data).hexdigest()
    (d / "payloads" / sha[:2]).mkdir(exist_ok=True)
    (d / "payloads" / sha[:2] / f"{sha}.kv").write_bytes(data)
    conn = sqlite3.connect(d / "cubes.db", isolation_level=None)
    MIGRATIONS[0](conn)
    conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '1')")
    cols = "id, kind, path, text, content_hash, created, updated, payload_path, payload_bytes, payload_sha256"
    conn.execute(f"INSERT INTO cubes({cols}) VALUES ('c1', 'activation', 'a.py', 'x = 1', 'h1', 1, 1, ?, ?, ?)",
                 (f"payloads/{sha[:2]}/{sha}.kv", len(data), sha))
    conn.execute(f"INSERT INTO cubes({cols}) VALUES ('c2', 'activation', 'b.py', 'y = 2', 'h2', 1, 1, "
                 "'payloads/ab/lost.kv', 3, NULL)")  # a path without a hash cannot be found any more
    conn.execute("INSERT INTO settings_kv(key, value) VALUES ('k', '1')")
    conn.close()
    with CubeStore.open(d) as s:
        assert s.schema_version == SCHEMA_VERSION == 3
        columns = {r[1] for r in s.conn.execute("PRAGMA table_info(cubes)")}
        assert "payload_path" not in columns and "payload_sha256" in columns
        indexes = {r[1]: r[2] for r in s.conn.execute("PRAGMA index_list(cubes)")}
        assert {"cubes_path", "cubes_status_kind", "cubes_hash", "cubes_payload"} <= set(indexes)
        assert [r[2] for r in s.conn.execute("PRAGMA index_info(cubes_payload)")] == ["payload_sha256"]
        assert not s.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'settings_kv'").fetchone()
        cube = s.get("c1")
        assert cube.has_payload and bytes(s.read_payload(cube, verify=True)) == data
        lost = s.get("c2")
        assert lost.kind == "plaintext" and not lost.has_payload and lost.text == "y = 2"
        assert s.gc_payloads(grace_s=0) == 0  # the old file is the referenced payload


# ---- upsert identity ---------------------------------------------------------------------------


def test_upsert_create_unchanged_moved_updated_removed(store: CubeStore) -> None:
    r1 = store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "sha1", mtime=1.5, size=10)
    assert len(r1.created) == 4 and not (r1.updated or r1.unchanged or r1.removed)
    cubes1 = by_symbol(store)
    assert set(cubes1) == {"LIMIT", "alpha", "beta", "Gamma"}  # `import os` groups with LIMIT
    assert store.get_file("pkg/mod.py").sha256 == "sha1"
    assert store.get_file("pkg/mod.py").size == 10

    same = store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "sha1")
    assert sorted(same.unchanged) == sorted(r1.created) and not same.created

    # lines added at the top: everything moves, nothing is rewritten
    moved_src = "\n\n" + textwrap.dedent(SRC_V1).lstrip("\n")
    r2 = store.upsert_chunks("pkg/mod.py", chunk_text("pkg/mod.py", moved_src, "python"), "repo", "sha2")
    assert not r2.created and not r2.updated
    assert sorted(r2.moved) == sorted(r1.created)
    alpha = store.get(cubes1["alpha"].id)
    assert alpha.start_line == cubes1["alpha"].start_line + 2 and alpha.version == 1
    assert [e.event for e in store.history(alpha.id)] == ["created", "moved"]

    # alpha changes, beta disappears, delta appears
    src3 = SRC_V1.replace("return x + 1", "return x + 100").replace(
        "def beta(y):\n    return y * 2", "def delta(z):\n    return z"
    )
    r3 = store.upsert_chunks("pkg/mod.py", chunks(src3), "repo", "sha3")
    assert r3.updated == [cubes1["alpha"].id]
    assert r3.removed == [cubes1["beta"].id]
    assert len(r3.created) == 1
    alpha = store.get(cubes1["alpha"].id)
    assert alpha.version == 2 and "x + 100" in alpha.text and alpha.status == "active"
    beta = store.get(cubes1["beta"].id)
    assert beta.status == "archived"
    assert store.history(beta.id)[-1].event == "removed"
    assert store.get_file("pkg/mod.py").sha256 == "sha3"

    # beta comes back: same identity, reactivated
    r4 = store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "sha1")
    assert r4.reactivated == [cubes1["beta"].id]
    assert store.get(cubes1["beta"].id).status == "active"
    assert store.get(r3.created[0]).status == "archived"


def test_ids_are_stable_across_fresh_stores(tmp_path: Path) -> None:
    ids = []
    for name in ("a", "b"):
        with CubeStore.open(tmp_path / name) as s:
            ids.append(sorted(s.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "x").created))
    assert ids[0] == ids[1]
    ch = chunks(SRC_V1)[1]
    assert cube_id_for("repo", "pkg/mod.py", ch.symbol, ch.kind, 0) in ids[0]


def test_duplicate_identities_get_ordinals(store: CubeStore) -> None:
    src = "def f():\n    return 1\n\n\ndef f():\n    return 2\n"
    r = store.upsert_chunks("dup.py", chunk_text("dup.py", src, "python"), "repo", "s")
    assert len(set(r.created)) == 2
    # the second one changes: the first keeps its cube untouched
    r2 = store.upsert_chunks(
        "dup.py", chunk_text("dup.py", src.replace("return 2", "return 3"), "python"), "repo", "s2"
    )
    assert len(r2.unchanged) == 1 and len(r2.updated) == 1


def test_update_drops_payload_and_remove_file(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "sha1")
    alpha = by_symbol(store)["alpha"]
    compile_fake(store, alpha)
    assert store.get(alpha.id).kind == "activation"
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1.replace("x + 1", "x + 2")), "repo", "sha2")
    got = store.get(alpha.id)
    assert got.kind == "plaintext" and got.payload_sha256 is None and got.version == 2
    archived = store.remove_file("pkg/mod.py")
    assert len(archived) == 4
    assert store.cubes(status="active") == []
    assert store.get_file("pkg/mod.py") is None


# ---- payloads ----------------------------------------------------------------------------------


def test_payload_roundtrip_dedupe_and_errors(store: CubeStore) -> None:
    data = os.urandom(10_000)
    sha, n = store.write_payload(data)
    assert sha == hashlib.sha256(data).hexdigest() and n == 10_000
    file = store.dir / "payloads" / sha[:2] / f"{sha}.kv"
    assert file.read_bytes() == data and list(store.payloads.iterate()) == [sha]
    assert store.write_payload(bytearray(data)) == (sha, n)  # content-addressed: one file
    assert not list((store.dir / "payloads").rglob("*.tmp"))

    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    cube = by_symbol(store)["alpha"]
    assert store.attach_payload(cube.id, cube.content_hash, sha, n, 100, 50, "fp", "q8")
    cube = store.get(cube.id)
    assert cube.kind == "activation" and cube.has_payload and cube.tokens == 100 and cube.kept_tokens == 50
    view = store.read_payload(cube, verify=True)
    assert isinstance(view, memoryview) and bytes(view) == data
    view.release()

    # corrupt: same size, other bytes
    file.write_bytes(b"\0" * n)
    assert bytes(store.read_payload(cube)) == b"\0" * n  # not verified: cheap path
    with pytest.raises(PayloadCorrupt):
        store.read_payload(cube, verify=True)
    file.write_bytes(b"short")
    with pytest.raises(PayloadCorrupt):
        store.read_payload(cube)
    file.unlink()
    with pytest.raises(PayloadMissing):
        store.read_payload(cube)
    assert issubclass(PayloadMissing, StoreError) and issubclass(PayloadCorrupt, StoreError)


def test_attach_refuses_changed_text_and_missing_file(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    cube = by_symbol(store)["alpha"]
    sha, n = store.write_payload(b"payload")
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1.replace("x + 1", "x - 1")), "repo", "s2")
    assert not store.attach_payload(cube.id, cube.content_hash, sha, n, 1, 1, "fp", None)
    assert store.get(cube.id).kind == "plaintext"
    assert store.payloads.size(sha) is None  # nobody took it: deleted at once
    sha, n = store.write_payload(b"payload")
    with pytest.raises(PayloadMissing):
        store.attach_payload(cube.id, store.get(cube.id).content_hash, "0" * 64, n, 1, 1, "fp", None)
    with pytest.raises(PayloadCorrupt):
        store.attach_payload(cube.id, store.get(cube.id).content_hash, sha, n + 1, 1, 1, "fp", None)
    assert not store.attach_payload("nope", "x", sha, n, 1, 1, "fp", None)


def test_gc_and_check(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    cubes = by_symbol(store)
    keep = compile_fake(store, cubes["alpha"])
    lost = compile_fake(store, cubes["beta"])
    orphan = store.payloads.path(store.write_payload(b"nobody points here")[0])
    tmp = store.dir / "payloads" / "ab" / ".deadbeef.123.tmp"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_bytes(b"half a payl")
    assert store.gc_payloads() == 0  # everything is younger than the grace period
    assert store.gc_payloads(grace_s=0) == 2
    assert keep.exists() and lost.exists()
    assert not orphan.exists() and not tmp.exists()

    lost.unlink()
    report = store.check()
    assert report == {"checked": 2, "missing": 1, "corrupt": 0, "fixed": 1}
    beta = store.get(cubes["beta"].id)
    assert beta.kind == "plaintext" and beta.payload_sha256 is None
    assert store.history(beta.id)[-1].event == "demoted"
    assert store.check() == {"checked": 1, "missing": 0, "corrupt": 0, "fixed": 0}
    keep.write_bytes(b"x" * store.get(cubes["alpha"].id).payload_bytes)
    assert store.check(verify=True)["corrupt"] == 1


# ---- lifecycle -----------------------------------------------------------------------------------


def test_archive_promote_and_compile_queue(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    c = by_symbol(store)
    queue = store.compile_queue("model-a", limit=100)
    assert {q.id for q in queue} == {x.id for x in c.values()}
    assert store.compile_queue("model-a", limit=None) == queue
    assert len(store.compile_queue("model-a", limit=2)) == 2
    assert [x.symbol for x in store.cubes(path="pkg/mod.py")] == ["LIMIT", "alpha", "beta", "Gamma"]
    store.pin(c["beta"].id)
    store.touch([c["Gamma"].id, c["Gamma"].id])  # counted once per call
    store.touch([c["Gamma"].id])
    queue = store.compile_queue("model-a", limit=100)
    assert queue[0].id == c["beta"].id and queue[1].id == c["Gamma"].id
    assert store.get(c["Gamma"].id).access_count == 2

    compile_fake(store, c["alpha"])
    assert c["alpha"].id not in {q.id for q in store.compile_queue("model-a", 100)}
    assert c["alpha"].id in {q.id for q in store.compile_queue("model-b", 100)}

    assert store.archive(c["alpha"].id)
    a = store.get(c["alpha"].id)
    assert a.kind == "plaintext" and a.status == "active" and a.text and a.archived_at is not None
    assert not store.archive(c["alpha"].id)  # nothing left to drop
    assert c["alpha"].id not in {q.id for q in store.compile_queue("model-a", 100)}
    assert store.promote_candidates(min_access=1) == []
    store.touch([c["alpha"].id])
    assert [x.id for x in store.promote_candidates(min_access=1)] == [c["alpha"].id]
    assert store.promote(c["alpha"].id)
    assert c["alpha"].id in {q.id for q in store.compile_queue("model-a", 100)}
    assert [e.event for e in store.history(c["alpha"].id)] == ["created", "compiled", "archived", "promoted"]


def test_mark_stale_for_model(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    c = by_symbol(store)
    compile_fake(store, c["alpha"], fp="model-a")
    compile_fake(store, c["beta"], fp="model-b")
    assert store.mark_stale_for_model("model-a") == 1
    assert store.get(c["beta"].id).status == "stale" and store.get(c["alpha"].id).status == "active"
    assert store.get(c["beta"].id).payload_sha256 is not None  # kept in case model-b comes back
    assert c["beta"].id in {q.id for q in store.compile_queue("model-a", 100)}
    assert store.mark_stale_for_model("model-b") == 1
    assert store.get(c["beta"].id).status == "active" and store.get(c["alpha"].id).status == "stale"


def test_check_prefix_drops_payloads_compiled_after_other_instructions(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    c = by_symbol(store)
    a_file = compile_fake(store, c["alpha"], fp="model-a")
    b_file = compile_fake(store, c["beta"], fp="model-b")
    assert store.check_prefix("model-a", "p1") == 0  # first sight: recorded, nothing dropped
    assert store.check_prefix("model-a", "p1") == 0
    assert store.check_prefix("model-b", "p1") == 0
    assert store.get(c["alpha"].id).has_payload and a_file.exists()

    assert store.check_prefix("model-a", "p2") == 1
    alpha = store.get(c["alpha"].id)
    assert alpha.kind == "plaintext" and alpha.status == "active" and alpha.archived_at is None
    assert not a_file.exists()
    assert c["alpha"].id in {q.id for q in store.compile_queue("model-a", 100)}  # compiled again
    assert store.history(c["alpha"].id)[-1].detail["reason"] == "prompt prefix changed"
    assert store.get(c["beta"].id).has_payload and b_file.exists()  # another model's prefix is its own
    assert store.check_prefix("model-a", "p2") == 0


def test_check_prefix_leaves_no_stale_cube_without_a_payload(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    alpha = by_symbol(store)["alpha"]
    compile_fake(store, alpha, fp="model-a")
    assert store.check_prefix("model-a", "p1") == 0
    store.mark_stale_for_model("model-b")  # another process runs another model
    assert store.get(alpha.id).status == "stale"
    assert store.check_prefix("model-a", "p2") == 1
    dropped = store.get(alpha.id)
    assert (dropped.kind, dropped.status, dropped.archived_at) == ("plaintext", "active", None)


def test_enforce_budget_coldest_first_pinned_never(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    c = by_symbol(store)
    for i, name in enumerate(["LIMIT", "alpha", "beta", "Gamma"]):
        compile_fake(store, c[name], data=bytes([i]) * 1000)
    assert store.payload_bytes() == 4000
    store.pin(c["LIMIT"].id)  # the coldest, but pinned
    now = time.time()
    store.touch([c["Gamma"].id], at=now)
    store.touch([c["beta"].id], at=now - 100)
    store.touch([c["alpha"].id], at=now - 200)
    assert store.enforce_budget(10_000) == []
    archived = store.enforce_budget(2500)
    assert archived == [c["alpha"].id, c["beta"].id]
    assert store.payload_bytes() == 2000
    assert store.enforce_budget(0) == [c["Gamma"].id]
    assert store.get(c["LIMIT"].id).has_payload
    assert store.stats()["payload_files"] == 1  # the archived cubes' files went with them
    assert store.gc_payloads(grace_s=0) == 0


def test_payload_files_go_as_soon_as_nothing_refers_to_them(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    c = by_symbol(store)
    shared = compile_fake(store, c["alpha"], data=b"same bytes")
    assert compile_fake(store, c["beta"], data=b"same bytes") == shared  # content-addressed: one file
    assert store.archive(c["alpha"].id) and shared.exists()  # beta still has it
    assert store.forget(c["beta"].id) and not shared.exists()
    f16 = compile_fake(store, c["Gamma"], data=b"f16 rows")
    sha, n = store.write_payload(b"k4v3 rows")  # a re-encode replaces the payload
    assert store.attach_payload(c["Gamma"].id, c["Gamma"].content_hash, sha, n, 40, 20, "model-a", "k4v3")
    assert not f16.exists() and store.payloads.path(sha).exists()
    assert store.stats()["payload_files"] == 1 and store.gc_payloads(grace_s=0) == 0


def test_changed_text_shelves_its_payload_and_the_same_text_back_reuses_it(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    alpha = by_symbol(store)["alpha"]
    file = compile_fake(store, alpha, data=b"alpha kv" * 100)
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1.replace("x + 1", "x - 1")), "repo", "s2")  # branch B
    assert not store.get(alpha.id).has_payload and file.exists()
    assert store.payload_bytes() == 800 and store.stats()["shelved"] == 1  # it counts against the budget
    assert store.reuse_shelved("model-a", "f16") == []  # not the text it was compiled from
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s3")  # back to branch A
    assert store.reuse_shelved("model-b", "f16") == [] and store.reuse_shelved("model-a", "k4v3") == []
    assert store.reuse_shelved("model-a", "f16") == [alpha.id]
    back = store.get(alpha.id)
    assert back.has_payload and store.payloads.path(back.payload_sha256) == file and back.tokens == 40
    assert store.history(alpha.id)[-1].detail["reused"] and store.stats()["shelved"] == 0
    store.remove_file("pkg/mod.py")  # a file the other branch does not have: shelved too
    assert store.stats()["shelved"] == 1 and file.exists()
    assert store.gc_payloads(shelf_keep_s=0) == 0 and not file.exists()  # expired: shelf row and file go


def test_make_room_takes_the_shelf_then_colder_cubes_never_hotter_ones(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    c = by_symbol(store)
    files = {name: compile_fake(store, c[name], data=bytes([i]) * 1000)
             for i, name in enumerate(["LIMIT", "alpha", "beta", "Gamma"])}
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1.replace("return y * 2", "return y * 3")), "repo", "s2")
    assert store.payload_bytes() == 4000  # beta's payload is shelved now, still on disk
    now = time.time()
    store.touch([c["Gamma"].id], at=now)
    store.touch([c["alpha"].id], at=now - 100)
    store.touch([c["LIMIT"].id], at=now - 200)
    new_beta = store.get(c["beta"].id)
    assert store.make_room(1000, 5000, for_cube=new_beta) == (True, [])
    assert store.make_room(1000, 4000, for_cube=new_beta) == (True, [])  # the shelved payload went first
    assert not files["beta"].exists() and store.payload_bytes() == 3000
    # beta was never asked for: only colder cubes may go for it, and there are none
    assert store.make_room(1000, 3000, for_cube=new_beta) == (False, [])
    store.touch([c["beta"].id], at=now - 50)
    assert store.make_room(1000, 3000, for_cube=store.get(c["beta"].id)) == (True, [c["LIMIT"].id])
    assert not files["LIMIT"].exists() and files["alpha"].exists()
    assert store.make_room(2500, 2000) == (False, [c["alpha"].id, c["Gamma"].id])  # no cube given: any cube
    assert store.payload_bytes() == 0 and store.stats()["payload_files"] == 0


def test_compile_backlog_counts_what_the_queue_holds(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    c = by_symbol(store)
    chars = sum(len(x.text) for x in c.values())
    assert store.compile_backlog() == {"cubes": 4, "tokens": round(chars / 3.5), "tokens_per_s": None,
                                       "eta_s": None}
    compile_fake(store, c["alpha"])  # 40 tokens
    store.record_compile_rate(20.0)
    rest = chars - len(c["alpha"].text)
    got = store.compile_backlog("model-a", "f16")
    assert got["cubes"] == 3 and got["tokens"] == round(rest * 40 / len(c["alpha"].text))
    assert got["tokens_per_s"] == 20.0 and got["eta_s"] == round(got["tokens"] / 20.0, 1)
    assert store.compile_backlog("model-b", "f16")["cubes"] == 4
    assert store.compile_backlog("model-a", "k4v3")["cubes"] == 4
    assert store.compile_backlog()["cubes"] == 3 == store.stats()["compile_backlog"]["cubes"]
    assert len(store.compile_queue("model-a", limit=None, encoding="f16")) == 3


def test_pin_forget_notes_settings_skips_stats(store: CubeStore) -> None:
    store.upsert_chunks("pkg/mod.py", chunks(SRC_V1), "repo", "s")
    c = by_symbol(store)
    assert store.pin(c["alpha"].id) and store.get(c["alpha"].id).pinned
    assert store.pin(c["alpha"].id, False) and not store.get(c["alpha"].id).pinned
    assert store.forget(c["beta"].id) and store.get(c["beta"].id) is None
    assert [e.event for e in store.history(c["beta"].id)] == ["created", "forgotten"]
    assert not store.forget(c["beta"].id)

    note = store.add_note_cube("The user prefers tabs.\nAlways.", "conversation", owner="me")
    assert note.path == f"conversation:{note.id}" and note.end_line == 2 and note.visibility == "local"
    change = store.add_note_cube("alpha now adds 100", "change", path="change:pkg/mod.py", symbol="alpha")
    assert store.cubes(source="change")[0].id == change.id
    assert store.cubes(path_glob="conversation:*")[0].text.startswith("The user")
    with pytest.raises(ValueError):
        store.add_note_cube("x", "gossip")

    from repomem.core.walk import Skip

    store.set_skips([Skip(".env", "secret_name"), ("dist/", "vendored")])
    assert store.skips() == [(".env", "secret_name"), ("dist/", "vendored")]

    compile_fake(store, c["alpha"])
    st = store.stats()
    assert st["cubes"] == 5
    assert st["by_kind"] == {"activation": 1, "plaintext": 4}
    assert st["by_source"] == {"code": 3, "conversation": 1, "change": 1}
    assert st["payload_bytes"] == st["payload_bytes_on_disk"] > 0 and st["payload_files"] == 1
    assert st["skips"] == {"secret_name": 1, "vendored": 1} and st["files"] == 1
    assert st["tokens"] == 40 and st["kept_tokens"] == 20


def test_two_connections_write_concurrently(tmp_path: Path) -> None:
    d = tmp_path / "s"
    CubeStore.open(d).close()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with CubeStore.open(d) as s:
                for j in range(15):
                    src = f"def f{i}_{j}():\n    return {j}\n"
                    s.upsert_chunks(f"w{i}/{j}.py", chunk_text("x.py", src, "python"), "repo", str(j))
                    sha, n = s.write_payload(f"{i}-{j}".encode())
                    cube = s.cubes(path_glob=f"w{i}/{j}.py")[0]
                    s.attach_payload(cube.id, cube.content_hash, sha, n, 1, 1, "fp", None)
                    s.touch([cube.id])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with CubeStore.open(d) as s:
        assert s.stats()["by_kind"] == {"activation": 45}


# ---- crash safety --------------------------------------------------------------------------------

CHILD = r"""
import os, random, sys
from repomem.core.store import CubeStore
from repomem.core.chunking import chunk_text
store = CubeStore.open(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
print("ready", flush=True)
i = 0
while True:
    i += 1
    path = f"f{rng.randrange(6)}.py"
    src = "".join(f"def g{k}():\n    return {rng.randrange(3)}\n\n\n" for k in range(rng.randrange(1, 5)))
    store.upsert_chunks(path, chunk_text(path, src, "python"), "repo", str(i))
    for cube in store.compile_queue("fp", 3):
        sha, n = store.write_payload(os.urandom(rng.randrange(1, 20000)))
        store.attach_payload(cube.id, cube.content_hash, sha, n, 5, 3, "fp", "f16")
    if i % 7 == 0:
        store.enforce_budget(60000)
    if i % 11 == 0:
        store.gc_payloads(grace_s=0)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill_9_leaves_a_consistent_store(tmp_path: Path) -> None:
    d = tmp_path / "s"
    rng = random.Random(1234)
    for it in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(d), str(it)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()

    with CubeStore.open(d) as s:
        assert s.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        st = s.stats()
        assert st["cubes"] > 0
        report = s.check(verify=True)
        assert report["missing"] == 0 and report["corrupt"] == 0
        s.gc_payloads(grace_s=0)
        assert not list((d / "payloads").rglob("*.tmp"))
        on_disk = {p.stem for p in (d / "payloads").rglob("*.kv")}
        assert on_disk == s.referenced_payloads()
        assert s.check()["missing"] == 0
        # and it is still writable
        s.upsert_chunks("after.py", chunk_text("after.py", "x = 1\n", "python"), "repo", "z")


def test_last_exchange_is_the_last_question_and_only_its_answer(tmp_path: Path) -> None:
    convs = ConversationStore(tmp_path / "conversations.db")
    c = convs.create()
    for role, text in [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]:
        convs.add(c.id, role, text)
    last = convs.last_exchange(c.id)
    assert convs.recent_exchanges(c.id, skip=last) == [("q1", "a1")]  # the history a regenerate asks with
    convs.delete_messages(last)
    assert [(m.role, m.content) for m in convs.messages(c.id)] == [("user", "q1"), ("assistant", "a1")]
    # A question whose answer was never saved (the process was killed in between): regenerating it drops
    # that question alone, never the answer before it.
    convs.add(c.id, "user", "q2")
    convs.delete_messages(convs.last_exchange(c.id))
    assert [(m.role, m.content) for m in convs.messages(c.id)] == [("user", "q1"), ("assistant", "a1")]
    convs.close()


def test_half_a_surrogate_pair_in_a_title_or_message_is_stored_replaced(tmp_path: Path) -> None:
    convs = ConversationStore(tmp_path / "conversations.db")
    c = convs.create("emoji cut \ud83d")
    convs.rename(c.id, "title \udc80")
    convs.add(c.id, "user", "a question \ud83d")
    assert convs.get(c.id).title == "title ?" and convs.messages(c.id)[0].content == "a question ?"
    convs.close()


def test_editing_a_stale_note_makes_it_an_active_plain_note(tmp_path: Path) -> None:
    store = CubeStore.open(tmp_path / "s")
    note = store.add_note_cube("retries are configured in adapters.py", source="note")
    sha, size = store.write_payload(b"x" * 100)
    assert store.attach_payload(note.id, note.content_hash, sha, size, 10, 10, "model-a", None)
    assert store.mark_stale_for_model("model-b") == 1
    edited = store.edit_note(note.id, "retries are configured in sessions.py")
    assert (edited.kind, edited.status, edited.payload_sha256) == ("plaintext", "active", None)
    assert note.id in store.cube_ids(status="active")
    store.close()
