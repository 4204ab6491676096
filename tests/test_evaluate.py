"""`repomem eval` and `repomem bench storage` end to end on a tiny repository with the small model.

These check mechanics (records, reports, stores), not answer quality: the small model is not asked to be right."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import native_reference as native_ref
import numpy as np
import pytest
from click.testing import CliRunner

from repomem.app.cli import cli
from repomem.bench.evaluate import accepted, gold_rank, summarize
from repomem.bench.nudge import nudged_payload
from repomem.bench.splice import make_state_blob
from repomem.bench.storage import bench_storage
from repomem.core import RepoMemory
from repomem.core import settings as settings_mod
from repomem.core.models import sha256_file
from repomem.native import extract_fragment

CODE = '''"""Connection settings."""

DEFAULT_TIMEOUT = 42


class Pool:
    """A pool of connections."""

    max_size = 10

    def acquire(self, timeout=DEFAULT_TIMEOUT):
        return self.max_size - 1
'''


@pytest.fixture
def tiny_qa(tmp_path: Path) -> tuple[Path, Path]:
    """(QA file, repo root) with one repository, `tiny`, and two questions about it."""
    repo = tmp_path / "corpus" / "tiny"
    repo.mkdir(parents=True)
    (repo / "pool.py").write_text(CODE)
    qa = tmp_path / "qa.jsonl"
    rows = [{"id": "t1", "repo": "tiny", "question": "What is DEFAULT_TIMEOUT?", "answer": "42", "accept": ["42"],
             "path": "pool.py", "start_line": 3, "end_line": 3, "kind": "default"},
            {"id": "t2", "repo": "tiny", "question": "What is the max_size of a Pool?", "answer": "10",
             "accept": ["10"], "path": "pool.py", "start_line": 10, "end_line": 10, "kind": "default"}]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return qa, tmp_path / "corpus"


def test_accepted_matches_whole_numbers_and_names() -> None:
    assert accepted("It is 10 by default.", ["10"]) and not accepted("It is 100.", ["10"])
    assert accepted("Raises `MissingSchema`.", ["missingschema"])
    assert accepted("both 307/308", ["307/308"]) and not accepted("x307/3080", ["307/308"])


def test_eval_cli_writes_records_and_scores_reference_answers(tiny_qa: tuple[Path, Path], home: Path,
                                                               test_model_path: Path, tmp_path: Path) -> None:
    qa, root = tiny_qa
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["eval", str(qa), "--repo-root", str(root), "--modes", "kv,text,none",
                                   "--out", str(out), "--model", str(test_model_path), "--score"])
    assert res.exit_code == 0, res.output
    assert all(h in res.output for h in ("logp", "R@5", "P@1", "P@2", "MRR", "TTFT"))
    assert "parallel placement, boost_top 2" in res.output
    data = json.loads(out.read_text())
    recs = data["records"]
    assert sorted((r["id"], r["mode"]) for r in recs) == sorted((i, m) for i in ("t1", "t2")
                                                                for m in ("kv", "text", "none"))
    assert all(r["rank"] is not None for r in recs)  # one small file: the gold chunk is always retrieved
    assert all(r["reference_logprob"] < 0 for r in recs)
    assert all(r["sources"] == [] for r in recs if r["mode"] == "none")
    assert all(r["sources"] and r["memory_tokens"] > 0 for r in recs if r["mode"] != "none")
    # a mode's rank is where the gold span sits among the memories its answer read
    for r in recs:
        if r["mode"] != "none":
            row = next(x for x in map(json.loads, qa.read_text().splitlines()) if x["id"] == r["id"])
            assert r["rank"] == gold_rank(r["sources"], row)
    assert data["report"]["settings"]["boost_top"] == settings_mod.Settings().boost_top
    assert data["report"]["settings"]["model_sha256"] == sha256_file(test_model_path)
    report = data["report"]["modes"]
    assert report["kv"]["n"] == 2 and report["kv"]["recall_at_5"] == 1.0
    assert set(report["text"]) >= {"accuracy", "p_at_1", "p_at_2", "recall_at_5", "mrr", "median_ttft_s",
                                   "reference_logprob"}
    assert data["report"]["repos"]["tiny"] == report  # one repository: its block is the whole run


@pytest.mark.parametrize(("problem", "message"), [
    ("a line that is not JSON", r"qa\.jsonl:3: not a JSON object"),
    ("a row without its answers", r"qa\.jsonl:3: missing accept, path"),
    ("accept as one string", r"qa\.jsonl:3: accept must be a list of strings"),
    ("an unknown mode", r"unknown mode 'bogus'"),
    ("an --out folder that does not exist", r"no folder .*/no/such to write"),
])
def test_eval_refuses_bad_input_in_one_line_before_answering(problem: str, message: str, tiny_qa: tuple[Path, Path],
                                                             home: Path, test_model_path: Path, tmp_path: Path) -> None:
    """Found before the model loads, so a run of an hour does not end in a traceback."""
    qa, root = tiny_qa
    out, modes = tmp_path / "r.json", "kv"
    if problem == "a line that is not JSON":
        qa.write_text(qa.read_text() + "{not json\n")
    elif problem == "a row without its answers":
        qa.write_text(qa.read_text() + json.dumps({"id": "t3", "repo": "tiny", "question": "What?"}) + "\n")
    elif problem == "accept as one string":
        row = {**json.loads(qa.read_text().splitlines()[0]), "id": "t3", "accept": "42"}
        qa.write_text(qa.read_text() + json.dumps(row) + "\n")
    elif problem == "an unknown mode":
        modes = "kv,bogus"
    else:
        out = tmp_path / "no" / "such" / "r.json"
    res = subprocess.run([sys.executable, "-m", "repomem.app", "eval", str(qa), "--repo-root", str(root),
                          "--modes", modes, "--out", str(out), "--model", str(test_model_path)],
                         capture_output=True, text=True, timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_gold_rank_metrics_on_known_ranks() -> None:
    row = {"path": "a.py", "start_line": 10, "end_line": 12}
    src = [{"path": "b.py", "start_line": 1, "end_line": 50}, {"path": "a.py", "start_line": 1, "end_line": 9},
           {"path": "a.py", "start_line": 12, "end_line": 30}]
    assert gold_rank(src, row) == 3 and gold_rank(src[:2], row) is None and gold_rank(src[2:], row) == 1
    recs = [{"rank": 1, "correct": True, "ttft_s": 0.1}, {"rank": 2, "correct": False, "ttft_s": 0.3},
            {"rank": 4, "correct": True, "ttft_s": 0.2}, {"rank": None, "correct": False, "ttft_s": 0.9}]
    m = summarize(recs, 5)
    assert (m["n"], m["accuracy"], m["p_at_1"], m["p_at_2"], m["recall_at_5"]) == (4, 0.5, 0.25, 0.5, 0.75)
    assert m["mrr"] == (1 + 1 / 2 + 1 / 4) / 4 and m["median_ttft_s"] == 0.25
    assert summarize(recs, 3)["recall_at_3"] == 0.5


def test_eval_replicas_answer_kv_again_under_nudged_payloads_in_a_store_of_their_own(
        tiny_qa: tuple[Path, Path], home: Path, test_model_path: Path, tmp_path: Path) -> None:
    from repomem.bench.evaluate import run_eval

    qa, root = tiny_qa
    mine = RepoMemory.open(root / "tiny", settings=settings_mod.Settings(model=str(test_model_path)))
    mine.index()
    before = {c.id: c.payload_sha256 for c in mine.store.cubes(kind="activation")}
    mine.close()
    out = tmp_path / "r.json"
    report = run_eval(qa, root, ["kv", "none"], out, model=str(test_model_path),
                      settings_overrides={"max_answer_tokens": 8}, replicas=3)
    kv = report["modes"]["kv"]
    assert len(kv["accuracy_replicas"]) == 3 and kv["accuracy_replicas"][0] == kv["accuracy"]
    assert kv["accuracy_mean"] == sum(kv["accuracy_replicas"]) / 3
    assert "accuracy_replicas" not in report["modes"]["none"]
    recs = json.loads(out.read_text())["records"]
    assert sorted(r["replica"] for r in recs if r["mode"] == "kv") == [0, 0, 1, 1, 2, 2]
    assert sorted(r["replica"] for r in recs if r["mode"] == "none") == [0, 0]
    # the replicas rewrote payloads in their own store, and put them back; the repository's memory is untouched
    mine = RepoMemory.open(root / "tiny", settings=settings_mod.Settings(model=str(test_model_path)))
    assert {c.id: c.payload_sha256 for c in mine.store.cubes(kind="activation")} == before != {}
    mine.close()


def test_nudged_payload_moves_values_one_f16_step() -> None:
    blob = make_state_blob(40, n_layer=2, rng=np.random.default_rng(3), positions=np.arange(100, 140))
    payload = extract_fragment(blob, range(40), fingerprint=bytes(32))
    before = native_ref.parse_payload(payload)
    after = native_ref.parse_payload(nudged_payload(payload, 1))
    assert np.array_equal(before.positions, after.positions)
    old = np.concatenate([a.view(np.uint16).ravel() for a in before.k + before.v]).astype(np.int32)
    new = np.concatenate([a.view(np.uint16).ravel() for a in after.k + after.v]).astype(np.int32)
    assert np.abs(new - old).max() == 1 and np.array_equal(new >> 15, old >> 15)  # one step, same sign
    assert 0.45 < np.mean(new != old) < 0.55
    assert nudged_payload(payload, 1) == nudged_payload(payload, 1) != nudged_payload(payload, 2)


def test_a_lossy_payload_is_nudged_in_its_own_encoding() -> None:
    from repomem.native import payload_info

    blob = make_state_blob(40, n_layer=2, rng=np.random.default_rng(3), positions=np.arange(100, 140))
    q4 = extract_fragment(blob, range(40), fingerprint=bytes(32), encoding="q4")
    nudged = nudged_payload(q4, 1)
    a, b = payload_info(q4), payload_info(nudged)
    assert (b.encoding, b.n_cells, b.fingerprint) == ("q4", 40, bytes(32))
    assert np.array_equal(a.positions, b.positions) and nudged != q4 and nudged == nudged_payload(q4, 1)


def test_bench_storage_reports_every_encoding(tiny_qa: tuple[Path, Path], home: Path, test_model_path: Path) -> None:
    qa, root = tiny_qa
    repo = root / "tiny"
    mine = RepoMemory.open(repo, settings=settings_mod.Settings(model=str(test_model_path), encoding="q4"))
    mine.index()
    before = {c.id: (c.encoding, c.payload_sha256) for c in mine.store.cubes(kind="activation")}
    mine.close()
    out = bench_storage(qa, root, model=str(test_model_path), max_tokens=12,
                        encodings=("q4", "k3v3", "q2"), replicas=2)
    encs = out["encodings"]
    assert list(encs) == ["f16", "q4", "k3v3", "q2"]  # f16 always measured first: the fidelity reference
    assert out["cubes"] >= 1 and out["source_tokens"] > 0 and 0.0 <= out["text_accuracy"] <= 1.0
    sizes = [encs[e]["bytes_per_token"] for e in encs]
    assert sizes == sorted(sizes, reverse=True)  # f16 > q4 > k3v3 > q2
    # f16 scored on its own greedy answers: its top token is the answer's token (batched decoding may
    # break a near-tie), and no encoding predicts them better than the exact rows on average
    assert encs["f16"]["f16_answer_top1"] >= 0.8
    assert encs["f16"]["lost_vs_f16"] == encs["f16"]["gained_vs_f16"] == []
    ids = {"t1", "t2"}
    for e in ("q4", "k3v3", "q2"):
        assert 0.0 <= encs[e]["f16_answer_top1"] <= 1.0
        assert encs[e]["encode_gb_per_s"] > 0 and encs[e]["splice_vs_f16"] > 0
        lost, gained = set(encs[e]["lost_vs_f16"]), set(encs[e]["gained_vs_f16"])
        assert lost <= ids and gained <= ids and not lost & gained
        # the accuracy moves by exactly the questions that moved
        assert round(encs[e]["kv_accuracy"] - encs["f16"]["kv_accuracy"], 3) == round((len(gained) - len(lost)) / 2, 3)
    for e in encs:  # the first replica is the exact run; the mean covers the nudged one too
        first, nudged = encs[e]["kv_accuracy_replicas"]
        assert first == encs[e]["kv_accuracy"] and nudged in (0.0, 0.5, 1.0)
        assert encs[e]["kv_accuracy_mean"] == round((first + nudged) / 2, 3)
    assert encs["q2"]["f16_answer_logprob"] <= encs["f16"]["f16_answer_logprob"] + 0.05
    # the run used a store of its own: the repository's memory is as it was
    mine = RepoMemory.open(repo, settings=settings_mod.Settings(model=str(test_model_path), encoding="q4"))
    assert {c.id: (c.encoding, c.payload_sha256) for c in mine.store.cubes(kind="activation")} == before != {}
    mine.close()
