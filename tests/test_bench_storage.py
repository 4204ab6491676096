"""`repomem bench storage` end to end on a tiny repository with the small model (mechanics, not accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

from repomem.core import settings as settings_mod
from repomem.core.bench_storage import bench_storage
from repomem.core.memory import RepoMemory

CODE = '''"""Connection settings."""

DEFAULT_TIMEOUT = 42


class Pool:
    """A pool of connections."""

    max_size = 10

    def acquire(self, timeout=DEFAULT_TIMEOUT):
        return self.max_size - 1
'''


def test_bench_storage_reports_every_encoding(tmp_path: Path, home: Path, test_model_path: Path) -> None:
    repo = tmp_path / "corpus" / "tiny"
    repo.mkdir(parents=True)
    (repo / "pool.py").write_text(CODE)
    qa = tmp_path / "qa.jsonl"
    rows = [{"id": "t1", "repo": "tiny", "question": "What is DEFAULT_TIMEOUT?", "answer": "42", "accept": ["42"],
             "path": "pool.py", "start_line": 3, "end_line": 3, "kind": "default"},
            {"id": "t2", "repo": "tiny", "question": "What is the max_size of a Pool?", "answer": "10",
             "accept": ["10"], "path": "pool.py", "start_line": 10, "end_line": 10, "kind": "default"}]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mine = RepoMemory.open(repo, settings=settings_mod.Settings(model=str(test_model_path), encoding="q4"))
    mine.index()
    before = {c.id: (c.encoding, c.payload_sha256) for c in mine.store.cubes(kind="activation")}
    mine.close()
    out = bench_storage(qa, tmp_path / "corpus", model=str(test_model_path), max_tokens=12,
                        encodings=("q4", "k3v3", "q2"))
    encs = out["encodings"]
    assert list(encs) == ["f16", "q4", "k3v3", "q2"]  # f16 always measured first: the fidelity reference
    assert out["cubes"] >= 1 and out["source_tokens"] > 0 and 0.0 <= out["text_accuracy"] <= 1.0
    sizes = [encs[e]["bytes_per_token"] for e in encs]
    assert sizes == sorted(sizes, reverse=True)  # f16 > q4 > k3v3 > q2
    # f16 scored on its own greedy answers: its top token is the answer's token (batched decoding may
    # break a near-tie), and no encoding predicts them better than the exact rows on average
    assert encs["f16"]["f16_answer_top1"] >= 0.8
    for e in ("q4", "k3v3", "q2"):
        assert 0.0 <= encs[e]["f16_answer_top1"] <= 1.0
        assert encs[e]["encode_gb_per_s"] > 0 and encs[e]["splice_vs_f16"] > 0
    assert encs["q2"]["f16_answer_logprob"] <= encs["f16"]["f16_answer_logprob"] + 0.05
    # the run used a store of its own: the repository's memory is as it was
    mine = RepoMemory.open(repo, settings=settings_mod.Settings(model=str(test_model_path), encoding="q4"))
    assert {c.id: (c.encoding, c.payload_sha256) for c in mine.store.cubes(kind="activation")} == before != {}
    mine.close()
