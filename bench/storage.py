"""`repomem bench storage`: what each KV payload encoding costs in bytes and buys in accuracy.

One run, in a store of its own under REPOMEM_HOME/bench/ (the repository's memory is never touched): the
cubes the QA set retrieves are compiled once in f16; every other encoding is made from
those exact rows in C (no model run), then the same questions are answered in kv mode per encoding,
and once in text mode, so all accuracies come from the same retrieval and the same model.

Greedy answers to a few dozen questions flip on perturbations far smaller than any quantization (even
reordering the spliced pieces, which only changes float summation order, changes some), so each encoding
is also scored teacher-forced on the f16 answers: the mean log-probability of their tokens and how often
the encoding's top token is f16's (the KV-quantization papers' perplexity check, on this task's answers).

For the same reason accuracy is also measured over replicas (`nudge.py`): replica r > 0 moves every f16
value of every payload to a neighbouring f16 value with probability 1/2 (seed r) before encoding. That is a
perturbation the size of f16's own rounding, well below q8's error, yet it moves f16's own accuracy
(docs/benchmarks.md has the numbers); the mean over replicas is what encodings can be compared on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from repomem import native
from repomem.core import CubeStore, RepoMemory, SamplingParams, load_settings, paths
from repomem.core.recode import recode_payload
from repomem.core.settings import ENCODINGS

from .evaluate import accepted, load_rows
from .nudge import nudged_payload


def bench_storage(qa_file: Path, repo_root: Path, *, limit: int | None = None, model: str | None = None,
                  encodings: tuple[str, ...] = ENCODINGS, max_tokens: int = 96, replicas: int = 8,
                  progress: Callable[[str], None] | None = None) -> dict:
    if replicas < 1:
        raise ValueError("replicas must be at least 1")

    rows = load_rows(qa_file, limit)
    encodings = ("f16", *[e for e in encodings if e != "f16"])  # f16 answers are the fidelity reference
    s = load_settings()
    s.encoding, s.max_answer_tokens = "f16", max_tokens
    say = progress or (lambda msg: None)
    out: dict = {"rows": len(rows), "replicas": replicas, "encodings": {}}
    # Its own store: the run re-encodes payloads back and forth, which must not touch the repository's memory.
    root = (repo_root / rows[0]["repo"]).resolve()
    mem = RepoMemory(root, CubeStore.open(paths.home() / "bench" / paths.repo_key(root)), s, model)
    try:
        mem.index(compile=False)
        retrieved = {r["id"]: [c.id for c in mem.search(r["question"], k=s.top_k)] for r in rows}
        ids = list(dict.fromkeys(i for v in retrieved.values() for i in v))
        say(f"compiling {len(ids)} cubes in f16")
        mem.reencode("f16")
        mem.compile_ids(ids)
        cubes = [c for c in (mem.store.get(i) for i in ids) if c is not None and c.has_payload]
        f16 = {c.id: bytes(mem.store.read_payload(c)) for c in cubes}
        tokens = sum(c.tokens or 0 for c in cubes)
        f16_bytes = sum(len(b) for b in f16.values())
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

        def attach(encoded: dict[str, bytes], enc: str) -> None:
            for c in cubes:
                sha, n = mem.store.write_payload(encoded[c.id])
                mem.store.attach_payload(c.id, c.content_hash, sha, n, c.tokens, c.kept_tokens,
                                         mem.fingerprint, enc)

        def encode(payloads: dict[str, bytes], enc: str) -> dict[str, bytes]:
            return {cid: (data if enc == "f16" else recode_payload(data, enc)) for cid, data in payloads.items()}

        def answers(mode: str) -> list[str]:
            return [mem.ask(r["question"], mode=mode, record=False, sampling=params).answer for r in rows]

        def right(texts: list[str]) -> list[bool]:
            return [accepted(a, r["accept"]) for a, r in zip(texts, rows, strict=True)]

        def accuracy(ok: list[bool]) -> float:
            return round(sum(ok) / len(rows), 3)

        def changed(ok: list[bool], was: list[bool], now: bool) -> list[str]:
            """Ids of the questions that this encoding answers `now` right where f16 did not (or the reverse):
            which questions move is what tells a real loss from the few that flip on any perturbation."""
            return [r["id"] for r, a, b in zip(rows, was, ok, strict=True) if b == now and a != now]

        def fidelity(reference: list[str]) -> dict:
            """Teacher-forced on the f16 answers: what greedy accuracy over a few dozen questions is too coarse to
            show."""
            lps: list[float] = []
            top1: list[bool] = []
            for r, a in zip(rows, reference, strict=True):
                if a.strip():
                    sc = mem.score_answer(r["question"], a, mode="kv")
                    lps += sc.logprobs
                    top1 += sc.top1
            return {"f16_answer_logprob": round(sum(lps) / max(1, len(lps)), 4),
                    "f16_answer_top1": round(sum(top1) / max(1, len(top1)), 4)}

        say("text mode")
        out["text_accuracy"] = accuracy(right(answers("text")))
        reference: list[str] = []
        f16_right: list[bool] = []
        for enc in encodings:
            t0 = time.perf_counter()
            encoded = encode(f16, enc)
            encode_s = time.perf_counter() - t0
            attach(encoded, enc)
            payloads = list(encoded.values())
            t0 = time.perf_counter()
            native.splice(None, payloads, mode="parallel", v_trans=True, k_type="f16", v_type="f16", verify=False)
            splice_s = time.perf_counter() - t0
            say(f"kv mode, {enc}")
            texts = answers("kv")
            ok = right(texts)
            if enc == "f16":  # f16 comes first
                reference, f16_right = texts, ok
            fid = fidelity(reference)
            replica_accuracy = [accuracy(ok)]
            for seed in range(1, replicas):
                say(f"kv mode, {enc}, replica {seed + 1}/{replicas}")
                attach(encode({cid: nudged_payload(data, seed) for cid, data in f16.items()}, enc), enc)
                replica_accuracy.append(accuracy(right(answers("kv"))))
            out["encodings"][enc] = {
                "bytes_per_token": round(sum(len(p) for p in payloads) / max(1, tokens), 1),
                "encode_gb_per_s": round(f16_bytes / 1e9 / encode_s, 2) if enc != "f16" else None,
                "splice_s": round(splice_s, 4),
                "decode_gb_per_s": round(f16_bytes / 1e9 / splice_s, 2),
                "kv_accuracy": accuracy(ok),
                "kv_accuracy_replicas": replica_accuracy,
                "kv_accuracy_mean": round(sum(replica_accuracy) / replicas, 3),
                "lost_vs_f16": changed(ok, f16_right, False),
                "gained_vs_f16": changed(ok, f16_right, True),
                **fid,
            }
        out["cubes"], out["source_tokens"] = len(cubes), tokens
        base = out["encodings"].get("f16", {}).get("splice_s")
        for v in out["encodings"].values():
            v["splice_vs_f16"] = round(v["splice_s"] / base, 2) if base else None
    finally:
        mem.close()
    return out
