"""Replica perturbations: a payload whose rows moved by one f16 step, for measuring how much greedy answers flip.

Greedy answers to a few dozen questions flip on perturbations far smaller than any quantization (even reordering
the spliced pieces, which only changes float summation order, changes some). So accuracies are also measured over
replicas: replica r > 0 moves every f16 value of every payload to a neighbouring f16 value with probability 1/2
(seed r). The mean over replicas is what settings can be compared on (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np

from repomem import native


def nudged_payload(buf: bytes, seed: int) -> bytes:
    """The payload with each finite nonzero value of its f16 rows moved one f16 step up or down, each with
    probability 1/4 (same cells, positions, fingerprint and encoding): a perturbation no answer should depend on.

    A lossy payload is decoded to its f16 rows, nudged there and encoded again in its own encoding."""
    info = native.payload_info(buf, verify=True)
    blob, _ = native.splice(None, [buf], mode="parallel", v_trans=False, k_type="f16", v_type="f16", verify=False)
    blob = bytearray(blob)
    rng = np.random.default_rng(seed)
    state = native.parse_state(blob)
    sections = [(off, state.k_row_bytes) for off in state.k_offsets] + [(off, state.v_row_bytes)
                                                                         for off in state.v_offsets]
    for offset, row_bytes in sections:
        bits = np.frombuffer(blob, dtype=np.uint16, count=state.n_cells * row_bytes // 2, offset=offset)
        magnitude = bits & 0x7FFF
        step = rng.choice(np.array([-1, 0, 0, 1], dtype=np.int32), size=bits.shape)
        # the bit pattern of a finite f16 moves its magnitude one step; 0 and the largest finite value stay
        step[(magnitude == 0) | (magnitude >= 0x7BFF)] = 0
        bits[...] = (bits.astype(np.int32) + step).astype(np.uint16)
    return native.extract_fragment(bytes(blob), np.arange(info.n_cells), fingerprint=info.fingerprint,
                                   encoding=info.encoding)
