"""Re-encode compiled payloads to another KV encoding without running the model.

An f16 payload holds the exact KV rows, so any encoding can be made from it in C: splice it alone
into a state blob (which decodes it to f16), then cut all its cells into a new payload with the target
encoding. A payload that is already lossy is not re-quantized (errors would compound): its cube goes
back to the compile queue and is compiled again from its text.
"""

from __future__ import annotations

import numpy as np

from repomem import native


def recode_payload(buf: bytes | memoryview, encoding: str) -> bytes:
    """The same cells at the same positions, in `encoding`. The source must be f16 (or raw f16)."""
    info = native.payload_info(buf, verify=True)
    if info.encoding not in ("f16", "raw") or info.k_type != native.GGML_TYPES["f16"]:
        raise ValueError(f"cannot re-encode a {info.encoding} payload losslessly; recompile it from text")
    blob, _ = native.splice(None, [buf], mode="parallel", v_trans=False, k_type="f16", v_type="f16", verify=False)
    return native.extract_fragment(blob, np.arange(info.n_cells, dtype=np.int32), fingerprint=info.fingerprint,
                                   encoding=encoding)
