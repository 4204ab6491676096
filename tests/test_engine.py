"""Engine mechanics on the real small test model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from repomem.core import amx_guard
from repomem.core.engine import Engine, SamplingParams
from repomem.core.errors import ContextOverflowError, ModelError

PROMPT = [{"role": "user", "content": "Write a Python function that returns the sum of a list."}]


def _greedy(engine: Engine, max_tokens: int = 24) -> tuple[list[int], str]:
    with engine.new_context(n_ctx=512) as ctx:
        g = ctx.generate(engine.tokenize(engine.apply_chat(PROMPT)), start_pos=0,
                         params=SamplingParams(max_tokens=max_tokens))
    return g.tokens, g.text


def test_info_matches_gguf(test_engine: Engine) -> None:
    info = test_engine.info
    assert info.architecture == "llama"
    assert info.n_layer == test_engine.gguf.n_layer == 30
    assert info.n_head_kv == 3 and info.head_dim == 64
    assert info.n_ctx_train == 8192
    assert len(info.fingerprint) == 32


def test_greedy_is_deterministic(test_engine: Engine) -> None:
    first, text = _greedy(test_engine)
    second, _ = _greedy(test_engine)
    assert len(first) == 24 and first == second
    assert text.strip()


def test_streaming_pieces_join_to_text(test_engine: Engine) -> None:
    pieces: list[str] = []
    with test_engine.new_context(n_ctx=512) as ctx:
        g = ctx.generate(test_engine.tokenize(test_engine.apply_chat(PROMPT)), start_pos=0,
                         params=SamplingParams(max_tokens=16), on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == g.text
    assert g.ttft_s > 0 and g.total_s >= g.ttft_s


def test_a_long_stop_string_stops_generation(test_engine: Engine) -> None:
    """A stop string longer than a few pieces (a whole line an agent ends on) is found wherever it starts."""
    prompt = test_engine.tokenize(test_engine.apply_chat(PROMPT))
    with test_engine.new_context(n_ctx=512) as ctx:
        pieces: list[str] = []
        free = ctx.generate(prompt, start_pos=0, params=SamplingParams(max_tokens=48), on_text=pieces.append)
    assert len(pieces) >= 24, free.text
    start = sum(map(len, pieces[:4]))
    stop = "".join(pieces[4:16])  # twelve pieces long
    with test_engine.new_context(n_ctx=512) as ctx:
        g = ctx.generate(prompt, start_pos=0, params=SamplingParams(max_tokens=48, stop=[stop]))
    assert g.stop_reason == "stop" and len(g.tokens) < len(free.tokens)
    assert g.text.find(stop) == start


def test_cancel_stops_generation(test_engine: Engine) -> None:
    cancel = threading.Event()
    seen: list[str] = []

    def on_text(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            cancel.set()

    with test_engine.new_context(n_ctx=512) as ctx:
        g = ctx.generate(test_engine.tokenize(test_engine.apply_chat(PROMPT)), start_pos=0,
                         params=SamplingParams(max_tokens=200), on_text=on_text, cancel=cancel)
    assert g.stop_reason == "cancelled"
    assert len(g.tokens) <= 4


def test_temperature_sampling_is_seeded(test_engine: Engine) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12)
    outs = []
    for _ in range(2):
        with test_engine.new_context(n_ctx=512) as ctx:
            outs.append(ctx.generate(test_engine.tokenize(test_engine.apply_chat(PROMPT)), start_pos=0,
                                     params=params).tokens)
    assert outs[0] == outs[1]


def test_state_round_trip_gives_same_logits(test_engine: Engine) -> None:
    toks = test_engine.tokenize("def add(a, b):\n    return a + b\n\nprint(add(2, 3))")
    head, last = toks[:-1], toks[-1:]
    with test_engine.new_context(n_ctx=512) as ctx:
        ctx.decode(head, start_pos=0)
        blob = ctx.state_get()
        ctx.decode(last, start_pos=len(head))
        want = ctx.logits()
    with test_engine.new_context(n_ctx=512) as ctx:
        ctx.state_set(blob)
        assert ctx.pos_max() == len(head) - 1
        assert ctx.state_get() == blob
        ctx.decode(last, start_pos=len(head))
        np.testing.assert_array_equal(ctx.logits(), want)


def test_decode_at_explicit_positions(test_engine: Engine) -> None:
    toks = test_engine.tokenize("x = 1")
    with test_engine.new_context(n_ctx=512) as ctx:
        ctx.decode(toks, start_pos=100)
        assert ctx.pos_max() == 100 + len(toks) - 1


def test_context_overflow_is_a_clear_error(test_engine: Engine) -> None:
    with test_engine.new_context(n_ctx=256) as ctx:
        with pytest.raises(ContextOverflowError, match="context holds"):
            ctx.generate(list(range(300, 600)), start_pos=0)


def test_quantized_v_cache_needs_flash_attention(test_engine: Engine) -> None:
    with pytest.raises(ModelError, match="flash attention"):
        test_engine.new_context(n_ctx=256, cache_type="q8_0", flash_attn=False)
    with test_engine.new_context(n_ctx=256, cache_type="q8_0", flash_attn=True) as ctx:
        ctx.decode(test_engine.tokenize("hello world"), start_pos=0)
        assert ctx.v_trans is False


def test_amx_guard_verdict_is_what_the_probe_child_does(home, test_model_path) -> None:
    engine = Engine(test_model_path)
    v = amx_guard.verdict(engine.sha256)
    assert v is not None, "loading must have probed and stored a verdict"
    # Run the probe child again by hand: the stored verdict must say how it ends on this machine.
    rc = subprocess.run([sys.executable, "-m", "repomem.core.amx_guard", str(test_model_path)], capture_output=True,
                        timeout=amx_guard.PROBE_TIMEOUT_S, env=dict(os.environ, REPOMEM_LLAMA_LOG="0")).returncode
    want = "ok" if rc == 0 else f"crashed ({signal.Signals(-rc).name})" if rc < 0 else "failed"
    assert (v["probe"], v["extra_bufts"]) == (want, rc == 0)
    assert engine.use_extra_bufts is v["extra_bufts"]
    again = Engine(test_model_path)  # remembered: no second probe
    assert amx_guard.verdict(engine.sha256) == v and again.use_extra_bufts is v["extra_bufts"]


def test_amx_guard_failed_probe_turns_repacking_off(home, tmp_path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))  # the probe child cannot load it: exits non-zero
    sha = "0" * 64
    assert amx_guard.extra_bufts_allowed(broken, sha) is False
    v = amx_guard.verdict(sha)
    assert v is not None and v["probe"] == "failed" and v["extra_bufts"] is False
