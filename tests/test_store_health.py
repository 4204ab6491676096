"""A store under stress: `repomem check [--repair]`, a full disk while compiling, a read-only data home and
a corrupted `cubes.db`.

Why: with a big repository the store holds hours of compile work and the user's conversations and notes.
Whatever breaks (a disk that fills up, a data home that becomes read-only, a damaged database), the user
must get a message that says what happened, keep asking questions, and lose no conversation or note;
compiled memory may be dropped because it can always be rebuilt.

How the conditions are made: a full disk is a real tmpfs of a few MB, filled up (when this process may
mount one: root in a container), and otherwise an OSError(ENOSPC) raised where payload files are
written (`repomem.core.atomic.write_bytes`). A read-only home is a tmpfs remounted read-only (root), or
a home whose folders lost their write permission (any other user: root ignores permissions).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from repomem.app.cli import cli
from repomem.core import atomic, index_file
from repomem.core import settings as settings_mod
from repomem.core.errors import DiskFullError, ReadOnlyStoreError, RepomemError, StoreDamagedError
from repomem.core.locks import ProcessLock
from repomem.core.memory import RepoMemory
from repomem.core.store import CubeStore
from repomem.core.store_check import check_store
from repomem.core.watch_status import lock_path

MODULE = "\n\n".join(
    f'def handler_{i}(request):\n    """Handle request kind {i}."""\n    return {{"status": {200 + i}}}\n'
    for i in range(6)
)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "service"
    root.mkdir()
    (root / "handlers.py").write_text(MODULE)
    (root / "README.md").write_text("# Service\n\nHandlers answer requests with a status.\n")
    return root


def _settings(model: Path) -> settings_mod.Settings:
    return settings_mod.Settings(model=str(model), encoding="f16", max_answer_tokens=6)


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"repomem-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


CAN_MOUNT = _can_mount()


def _mounted_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(home)], check=True)
    monkeypatch.setenv("REPOMEM_HOME", str(home))
    try:
        yield home
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


@pytest.fixture
def tmpfs_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data home on its own small tmpfs (models stay in the shared folder)."""
    if not CAN_MOUNT:
        pytest.skip("this process cannot mount a tmpfs")
    yield from _mounted_home(tmp_path, monkeypatch)


def _ask(mem: RepoMemory, question: str, conversation_id: str | None = None):
    return mem.ask(question, mode="text", conversation_id=conversation_id)


# --------------------------------------------------------------------------- full disk


def _fill(home: Path) -> Path:
    filler = home / "filler"
    st = os.statvfs(home)
    with open(filler, "wb") as fh:
        try:
            fh.write(b"\0" * (st.f_bavail * st.f_frsize))
        except OSError:
            pass
    return filler


def test_full_disk_while_compiling_keeps_answers_and_conversations(repo: Path, tmpfs_home: Path,
                                                                    test_model_path: Path) -> None:
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    try:
        mem.index(compile=False)
        before = _ask(mem, "What does handler_1 return?")
        assert before.warnings == [] and before.conversation_id
        filler = _fill(tmpfs_home)
        with pytest.raises(DiskFullError, match="is full"):
            mem.compile_pending()
        assert mem.store.check(verify=True)["missing"] == 0  # no cube points at a half-written payload
        during = _ask(mem, "What does handler_2 return?", before.conversation_id)
        assert during.answer and during.sources  # still answered, from text
        assert any("not saved yet" in w and "is full" in w for w in during.warnings)
        filler.unlink()
        after = _ask(mem, "What does handler_3 return?", before.conversation_id)
        assert not any("not saved" in w for w in after.warnings)
        questions = [m.content for m in mem.conversations.messages(before.conversation_id) if m.role == "user"]
        assert questions == ["What does handler_1 return?", "What does handler_2 return?",
                             "What does handler_3 return?"]  # the one asked while full was kept and saved
        notes = [c.symbol for c in mem.store.cubes(source="conversation")]
        assert sorted(notes) == sorted(questions)
        assert mem.compile_pending() > 0  # space again: compiling resumes
    finally:
        mem.close()


def test_no_space_for_a_payload_stops_compiling_with_a_clear_error(repo: Path, home: Path, test_model_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Any user, no mount needed: ENOSPC where payload files are written."""
    real = atomic.write_bytes

    def no_space(path: Path, data, **kw):
        if "payloads" in Path(path).parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, **kw)

    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    try:
        mem.index(compile=False)
        monkeypatch.setattr(atomic, "write_bytes", no_space)
        with pytest.raises(DiskFullError, match="is full"):
            mem.compile_pending()
        assert not mem.store.cubes(kind="activation")
        assert not list((mem.store.dir / "payloads").rglob("*.tmp"))  # nothing half-written left behind
        ans = _ask(mem, "What does handler_4 return?")
        assert ans.answer and ans.warnings == []  # the database still has room: the exchange is saved
        monkeypatch.setattr(atomic, "write_bytes", real)
        assert mem.compile_pending() > 0
    finally:
        mem.close()


# --------------------------------------------------------------------------- read-only home


def _make_read_only(home: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["mount", "-o", "remount,ro", str(home)], check=True)
    else:
        for d, _, _ in os.walk(home):
            os.chmod(d, 0o555)


@pytest.fixture
def ro_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    if os.geteuid() == 0:
        if not CAN_MOUNT:
            pytest.skip("root ignores permissions and this process cannot mount a read-only tmpfs")
        yield from _mounted_home(tmp_path, monkeypatch)
        return
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("REPOMEM_HOME", str(home))
    try:
        yield home
    finally:
        for d, _, _ in os.walk(home):
            os.chmod(d, 0o755)


def test_read_only_home_still_searches_and_answers(repo: Path, ro_home: Path, test_model_path: Path) -> None:
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    mem.index(compile=False)
    first = _ask(mem, "What does handler_5 return?")
    mem.close()
    _make_read_only(ro_home)
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    try:
        assert mem.store.read_only and mem.conversations.read_only
        assert mem.index_report.source == "file"
        assert [c.symbol for c in mem.search("handler_5 request")][:1] == ["handler_5"]
        ans = _ask(mem, "What does handler_5 return?", first.conversation_id)
        assert ans.answer and ans.sources
        assert any("read-only" in w and "not saved yet" in w for w in ans.warnings)
        assert [m.content for m in mem.conversations.messages(first.conversation_id)][0] == \
            "What does handler_5 return?"
        with pytest.raises(ReadOnlyStoreError, match="read-only"):
            mem.index(compile=False)
    finally:
        mem.close()


def test_watching_from_a_read_only_home_is_a_clear_error(repo: Path, ro_home: Path, test_model_path: Path) -> None:
    from repomem.core import Watcher

    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    mem.index(compile=False)
    mem.close()
    _make_read_only(ro_home)
    watcher = Watcher(repo, memory_factory=lambda p: RepoMemory.open(p, settings=_settings(test_model_path)))
    with pytest.raises(ReadOnlyStoreError, match="cannot watch the repository: .* is read-only"):
        watcher.start()


def test_cli_on_a_read_only_home_says_so_in_one_line(repo: Path, ro_home: Path, test_model_path: Path) -> None:
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    mem.index(compile=False)
    mem.close()
    _make_read_only(ro_home)
    env = dict(os.environ, REPOMEM_MODEL=str(test_model_path))
    proc = subprocess.run([str(Path(sys.executable).with_name("repomem")), "index", str(repo), "--plaintext-only"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert "read-only" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- corrupted cubes.db and check


def _damage_pages(db: Path) -> None:
    data = bytearray(db.read_bytes())
    for off in range(4096, len(data), 4096):  # the cell content of every page after the first
        data[off + 2048: off + 4096] = b"\xa5" * 2048
    db.write_bytes(bytes(data))


def _damage_header(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[:16] = b"not a database!!"
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_damage_header, _damage_pages])
def test_a_corrupted_database_is_reported_and_repaired_without_losing_conversations(
        repo: Path, home: Path, test_model_path: Path, damage) -> None:
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    mem.index(compile=False)
    ans = _ask(mem, "What does handler_0 return?")
    mem.store.add_note_cube("We agreed handler_0 keeps status 200.", source="change", path="change:handlers.py")
    store_dir = mem.store.dir
    mem.close()
    conversations_before = (store_dir / "conversations.db").read_bytes()
    damage(store_dir / "cubes.db")
    damaged_bytes = (store_dir / "cubes.db").read_bytes()

    report = check_store(repo)
    assert report.database == "damaged" and report.integrity and report.problems
    if damage is _damage_header:  # it does not even open: the message says what to run
        with pytest.raises(StoreDamagedError, match=r"repomem check .*service.* --repair"):
            RepoMemory.open(repo, settings=_settings(test_model_path))

    result = CliRunner().invoke(cli, ["check", str(repo), "--repair", "--json"])
    assert result.exit_code == 0, result.output
    kept = next(p for p in store_dir.iterdir() if re.fullmatch(r"cubes\.db\.damaged-[0-9-]+", p.name))
    assert kept.read_bytes() == damaged_bytes  # set aside, never deleted
    assert (store_dir / "conversations.db").read_bytes() == conversations_before  # never touched
    assert check_store(repo).problems == 0
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    try:
        assert [m.content for m in mem.conversations.messages(ans.conversation_id)][0] == "What does handler_0 return?"
        assert any("handler_0 return" in c.text for c in mem.store.cubes(source="conversation"))
        if damage is _damage_header:  # readable rows come back as they were
            assert [c.text for c in mem.store.cubes(source="change")] == ["We agreed handler_0 keeps status 200."]
        assert [c.symbol for c in mem.search("handler_3 request")][:1] == ["handler_3"]  # indexed again
    finally:
        mem.close()


def test_a_full_disk_is_not_damage_and_repair_leaves_the_database_where_it_is(
        repo: Path, tmpfs_home: Path, test_model_path: Path) -> None:
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    mem.index(compile=False)
    note = mem.remember("We decided handler_2 answers 202.", ["handlers.py"])
    store_dir = mem.store.dir
    mem.close()
    before = (store_dir / "cubes.db").read_bytes()
    filler = _fill(tmpfs_home)
    report = check_store(repo)
    assert report.database.startswith("cannot be read") and "free space" in report.database
    result = CliRunner().invoke(cli, ["check", str(repo), "--repair", "--json"])
    out = json.loads(result.stdout)
    assert result.exit_code == 1 and out["problems_left"] == 2  # neither database can be read: no repair mends it
    assert out["conversations"].startswith("cannot be read")
    report = check_store(repo, repair=True)
    assert "damaged_database_kept_as" not in report.repaired
    assert not [p for p in store_dir.iterdir() if ".damaged-" in p.name]  # nothing moved aside
    assert (store_dir / "cubes.db").read_bytes() == before
    filler.unlink()
    assert check_store(repo).problems == 0
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    try:
        assert mem.store.get(note.id).text.startswith("We decided handler_2 answers 202.")
    finally:
        mem.close()


def test_a_repair_stopped_before_the_notes_are_restored_puts_the_damaged_database_back(
        repo: Path, home: Path, test_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    mem.index(compile=False)
    mem.store.add_note_cube("We agreed handler_1 keeps status 201.", source="change", path="change:handlers.py")
    store_dir = mem.store.dir
    mem.close()
    _damage_header(store_dir / "cubes.db")
    damaged = (store_dir / "cubes.db").read_bytes()

    def interrupted(self, notes, event="salvaged"):
        raise KeyboardInterrupt  # Ctrl-C while the notes are copied into the new store

    with monkeypatch.context() as m:
        m.setattr(CubeStore, "restore_notes", interrupted)
        with pytest.raises(KeyboardInterrupt):
            check_store(repo, repair=True)
    assert (store_dir / "cubes.db").read_bytes() == damaged  # back in place, so a later repair salvages it
    assert not [p for p in store_dir.iterdir() if ".damaged-" in p.name]
    assert check_store(repo).database == "damaged"
    assert check_store(repo, repair=True).repaired["notes_salvaged"] == 1
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    try:
        assert [c.text for c in mem.store.cubes(source="change")] == ["We agreed handler_1 keeps status 201."]
    finally:
        mem.close()


def test_repair_waits_until_no_watcher_has_the_store_open(repo: Path, home: Path, test_model_path: Path) -> None:
    """A watcher (the app, `repomem watch`, `repomem serve`) keeps its connection to the database: moving
    the file aside under it would send its later notes into the damaged copy."""
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    mem.index(compile=False)
    store_dir = mem.store.dir
    mem.close()
    _damage_header(store_dir / "cubes.db")
    damaged = (store_dir / "cubes.db").read_bytes()
    with ProcessLock(lock_path(repo.resolve())):
        with pytest.raises(RepomemError, match=r"watcher \(pid \d+: .*stop it, then repair"):
            check_store(repo, repair=True)
        assert (store_dir / "cubes.db").read_bytes() == damaged  # nothing moved
        assert check_store(repo).database == "damaged"  # checking alone still works
    assert check_store(repo, repair=True).repaired["damaged_database_kept_as"]
    assert check_store(repo).problems == 0


def test_check_finds_and_repairs_payload_problems(repo: Path, home: Path, test_model_path: Path) -> None:
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    mem.index()  # compiled with the small model
    compiled = mem.store.cubes(kind="activation")
    assert len(compiled) >= 3
    store_dir = mem.store.dir
    conv = mem.conversations.create("kept")
    mem.close()
    assert check_store(repo).problems == 0
    missing, corrupt = compiled[0], compiled[1]
    mem.store.payloads.path(str(missing.payload_sha256)).unlink()
    path = mem.store.payloads.path(str(corrupt.payload_sha256))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 tells
    path.write_bytes(bytes(data))
    orphan = store_dir / "payloads" / "ab" / ("ab" * 32 + ".kv")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"left over by a crash")
    os.utime(orphan, (1, 1))  # long past the GC grace period
    recent = mem.store.payloads.path(mem.store.write_payload(b"a compile about to attach it")[0])
    torn = orphan.parent / ".half-written.tmp"
    torn.write_bytes(b"killed mid-write")
    os.utime(torn, (1, 1))
    index_file.path_for(store_dir).write_bytes(b"torn")

    report = check_store(repo)
    assert report.payloads_missing == [missing.id] and report.payloads_corrupt == [corrupt.id]
    assert report.orphans == sorted(["ab" * 32, recent.stem]) and report.orphans_recent == 1
    assert report.temp_files == 1
    assert "unreadable" in report.index_file
    result = CliRunner().invoke(cli, ["check", str(repo)])
    assert result.exit_code == 1  # problems, not repaired

    fixed = check_store(repo, repair=True)
    assert fixed.repaired["payloads_requeued"] == 2 and fixed.repaired["files_deleted"] == 2
    assert recent.exists()  # younger than the grace period: kept
    assert fixed.repaired["index_file"] == "rebuilt"
    assert check_store(repo).problems == 0
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    try:
        assert {c.id for c in mem.store.compile_queue(mem.fingerprint, limit=None)} >= {missing.id, corrupt.id}
        assert mem.compile_pending() >= 2 and check_store(repo).problems == 0
        assert mem.conversations.get(conv.id) is not None
    finally:
        mem.close()


def test_cubes_of_a_folder_never_indexed_is_an_error_that_leaves_nothing_behind(repo: Path, home: Path,
                                                                                test_model_path: Path,
                                                                                tmp_path: Path) -> None:
    typo = tmp_path / "reop"
    result = CliRunner().invoke(cli, ["cubes", str(typo)])
    assert result.exit_code == 1 and isinstance(result.exception, RepomemError)
    assert "no memory of" in str(result.exception) and "repomem index" in str(result.exception)
    assert not (home / "repos").exists() or not any((home / "repos").iterdir())  # no empty store made
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    mem.index(compile=False)
    mem.close()
    listed = CliRunner().invoke(cli, ["cubes", str(repo), "--json"])
    assert listed.exit_code == 0, listed.output
    assert {c["path"] for c in json.loads(listed.output)} == {"handlers.py", "README.md"}


@pytest.mark.parametrize("damage", [_damage_header, _damage_pages])
def test_a_damaged_conversations_db_is_set_aside_and_its_readable_turns_copied(
        repo: Path, home: Path, test_model_path: Path, damage) -> None:
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    mem.index(compile=False)
    asked = [_ask(mem, f"What does handler_{i} return?") for i in range(3)]
    store_dir = mem.store.dir
    before = {a.conversation_id: [(m.role, m.content) for m in mem.conversations.messages(a.conversation_id)]
              for a in asked}
    mem.close()
    damage(store_dir / "conversations.db")
    damaged = (store_dir / "conversations.db").read_bytes()
    if damage is _damage_header:  # the memory does not open, and the message names the command that mends it
        with pytest.raises(StoreDamagedError, match=r"repomem check .*service --repair"):
            RepoMemory.open(repo, settings=_settings(test_model_path))
    result = CliRunner().invoke(cli, ["check", str(repo), "--repair", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["problems_left"] == 0
    kept = store_dir / out["repaired"]["conversations_kept_as"]
    assert kept.read_bytes() == damaged  # set aside, never deleted
    mem = RepoMemory.open(repo, settings=_settings(test_model_path))
    try:
        after = {c.id: [(m.role, m.content) for m in mem.conversations.messages(c.id)]
                 for c in mem.conversations.list()}
        if damage is _damage_header:  # every row was readable: all of them are back, with their ids
            assert after == before
        else:  # what survived the damaged pages, never a turn that was not there
            assert all(turns == before.get(cid, turns) for cid, turns in after.items())
        assert _ask(mem, "What does handler_4 return?").answer  # and the memory answers again
    finally:
        mem.close()
