"""`repomem bench splice`: the native splice timed on synthetic payloads, and an in-process fuzzer.

Numbers are printed by the CLI, never asserted. The data is synthetic but format-valid: state blobs built
exactly as llama.cpp 0.3.36 writes them (`make_state_blob`, which tests use too), by default for the
default model's geometry (Qwen2.5-Coder-0.5B: 24 layers, 2 KV heads x 64 = 128 values per K and V row,
f16 cache).
"""

from __future__ import annotations

import struct
import time

import numpy as np

from repomem.native import (
    ENCODINGS,
    STATE_MAGIC,
    empty_state,
    extract_fragment,
    parse_state,
    payload_info,
    splice,
)


def make_state_blob(
    n_cells: int,
    *,
    n_layer: int = 24,
    n_embd_k: int = 128,
    n_embd_v: int = 128,
    v_trans: bool = True,
    positions: np.ndarray | None = None,
    seq_id: int = 0,
    rng: np.random.Generator | None = None,
    scale: float = 1.0,
) -> bytes:
    """A format-valid f16 ``llama_state_seq_get_data`` blob with random K/V (normal, times ``scale``)."""
    rng = rng or np.random.default_rng(0)
    if n_cells == 0:
        return empty_state(seq_id)
    pos = np.arange(n_cells, dtype=np.int32) if positions is None else np.asarray(positions, np.int32)
    parts = [struct.pack("<IiiI", STATE_MAGIC, seq_id, 1, n_cells)]
    meta = np.empty((n_cells, 3), np.int32)
    meta[:, 0] = pos
    meta[:, 1] = 1
    meta[:, 2] = seq_id
    parts.append(meta.tobytes())
    parts.append(struct.pack("<II", int(v_trans), n_layer))
    for _ in range(n_layer):
        parts.append(struct.pack("<iQ", 1, 2 * n_embd_k))
        parts.append((rng.standard_normal((n_cells, n_embd_k), np.float32) * scale).astype(np.float16).tobytes())
    for _ in range(n_layer):
        v = (rng.standard_normal((n_cells, n_embd_v), np.float32) * scale).astype(np.float16)
        if v_trans:
            parts.append(struct.pack("<iII", 1, 2, n_embd_v))
            parts.append(np.ascontiguousarray(v.T).tobytes())
        else:
            parts.append(struct.pack("<iQ", 1, 2 * n_embd_v))
            parts.append(v.tobytes())
    return b"".join(parts)


def bench_splice(
    fragments: int = 64,
    cells_per_fragment: int = 512,
    *,
    prefix_cells: int = 32,
    mode: str = "sequential",
    encoding: str = "f16",
    n_layer: int = 24,
    n_embd: int = 128,
    v_trans: bool = True,
    repeat: int = 3,
    seed: int = 0,
) -> dict:
    """Time the splice of ``fragments`` payloads of ``cells_per_fragment`` cells onto a prefix.

    ``mode='sequential'`` (default) includes the RoPE re-rotation of every key (NEOX, base 1e6 as Qwen2);
    ``'parallel'`` is pure data movement (+ V transposition when ``v_trans``). Best of ``repeat`` runs each.
    ``gb_per_s`` = output blob bytes / seconds.
    """
    rng = np.random.default_rng(seed)
    fp = bytes(32)
    prefix = make_state_blob(prefix_cells, n_layer=n_layer, n_embd_k=n_embd, n_embd_v=n_embd, v_trans=v_trans,
                             rng=rng)
    # a handful of distinct source blobs; each payload is its own bytes object (no cache sharing)
    n_src = min(fragments, 4)
    srcs = [
        make_state_blob(cells_per_fragment, n_layer=n_layer, n_embd_k=n_embd, n_embd_v=n_embd, v_trans=v_trans,
                        positions=np.arange(prefix_cells, prefix_cells + cells_per_fragment), rng=rng)
        for _ in range(n_src)
    ]
    cells = np.arange(cells_per_fragment, dtype=np.int32)
    payloads = [extract_fragment(srcs[i % n_src], cells, fingerprint=fp, encoding=encoding, user=i)
                for i in range(fragments)]
    kw = dict(mode=mode, rope_base=1e6, rope_dims=64, head_dim=64, rope_neox=True, v_trans=v_trans)

    def best(fn) -> tuple[float, tuple[bytes, int]]:
        t_best, out = float("inf"), None
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            out = fn()
            t_best = min(t_best, time.perf_counter() - t0)
        return t_best, out

    native_s, (blob, next_pos) = best(lambda: splice(prefix, payloads, verify=False, **kw))
    verify_s, _ = best(lambda: splice(prefix, payloads, verify=True, **kw))
    buf = bytearray()
    reuse_s, _ = best(lambda: splice(prefix, payloads, verify=False, out=buf, **kw))
    n = len(blob)
    return {
        "fragments": fragments,
        "cells_per_fragment": cells_per_fragment,
        "mode": mode,
        "encoding": encoding,
        "output_bytes": n,
        "next_pos": next_pos,
        # fresh output bytes, payload checksums not verified
        "native_s": native_s,
        "gb_per_s": n / native_s / 1e9,
        # with payload checksums verified (the default of splice())
        "native_verify_s": verify_s,
        # into a reused bytearray (splice(out=...)): no page faults / kernel zeroing of a fresh output
        "native_reuse_s": reuse_s,
        "gb_per_s_reuse": n / reuse_s / 1e9,
    }


def fuzz(n: int = 10_000, seed: int = 0) -> dict:
    """Throw ``n`` mutated/truncated blobs and payloads at the parsers and splice, in this process.

    Every call must either succeed or raise ValueError (StateFormatError / PayloadError); anything else
    (or a crash) is a bug. Returns counts."""
    rng = np.random.default_rng(seed)
    fp = bytes(range(32))
    blob = make_state_blob(6, n_layer=2, n_embd_k=64, n_embd_v=64, v_trans=True, rng=rng)
    blob_nt = make_state_blob(5, n_layer=2, n_embd_k=64, n_embd_v=64, v_trans=False, rng=rng)
    payloads = [extract_fragment(blob, [0, 2, 3], fingerprint=fp, encoding=e) for e in ENCODINGS if e != "raw"]
    seeds = [blob, blob_nt, *payloads]
    ok = rejected = 0
    for i in range(n):
        base = bytearray(seeds[i % len(seeds)])
        kind = rng.integers(0, 4)
        if kind == 0 and len(base) > 0:  # truncate
            base = base[: int(rng.integers(0, len(base)))]
        elif kind == 1:  # flip bytes
            for _ in range(int(rng.integers(1, 8))):
                j = int(rng.integers(0, len(base)))
                base[j] = int(rng.integers(0, 256))
        elif kind == 2:  # overwrite a 4-byte field with an extreme value
            j = int(rng.integers(0, max(1, len(base) - 4)))
            base[j : j + 4] = struct.pack("<I", int(rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000])))
        else:  # random junk
            base = bytearray(rng.integers(0, 256, int(rng.integers(0, 256)), dtype=np.uint8).tobytes())
        data = bytes(base)
        try:
            if data[:8] == b"RMKVFRAG" or i % 2:
                payload_info(data, verify=bool(i % 3))
                splice(empty_state(), [data], v_trans=True, verify=bool(i % 3))
            else:
                parse_state(data)
                splice(data, payloads[:1], mode="sequential", rope_dims=64, rope_base=1e4)
            ok += 1
        except ValueError:
            rejected += 1
    return {"cases": n, "accepted": ok, "rejected": rejected}

