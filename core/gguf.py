"""Read and validate a GGUF file's header without loading it.

llama.cpp reports a bad file through its log and a NULL pointer; reading the header ourselves lets
repomem say *what* is wrong (not a GGUF, truncated, unknown version) in one line before llama.cpp
ever sees the file, and gives `doctor` the model geometry.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError

GGUF_MAGIC = b"GGUF"

# ggml type id -> (block size in elements, bytes per block); used to check the file holds all tensor data.
_GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
}

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class GGUFInfo:
    """Model geometry as stored in the GGUF metadata."""

    path: Path
    version: int
    architecture: str
    name: str
    n_layer: int
    n_ctx_train: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_base: float
    rope_dims: int
    file_type: int | None
    n_tensors: int
    metadata: dict[str, Any] = field(repr=False, default_factory=dict)


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelError(f"{self.path}: truncated GGUF header (needs {n} bytes at offset {self.pos})")

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > 1 << 24:
            raise ModelError(f"{self.path}: corrupt GGUF (string of {n} bytes)")
        self._need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if count > 1 << 28:
                raise ModelError(f"{self.path}: corrupt GGUF (array of {count} items)")
            if etype in _SCALARS and not keep:
                size = struct.calcsize(_SCALARS[etype]) * count
                self._need(size)
                self.pos += size
                return None
            items = [self.value(etype, keep) for _ in range(count)]
            return items if keep else None
        raise ModelError(f"{self.path}: corrupt GGUF (unknown value type {vtype})")


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Parse the header, metadata and tensor table; check the file is long enough for every tensor."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    size = path.stat().st_size
    if size < 24:
        raise ModelError(f"{path}: not a GGUF model file (only {size} bytes)")
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                raise ModelError(f"{path}: not a GGUF model file (bad magic)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, size)
    except OSError as exc:  # permissions, a failing disk
        raise ModelError(f"{path}: cannot read the model file ({exc.strerror or exc})") from exc


def _parse(buf: mmap.mmap, path: Path, size: int) -> GGUFInfo:
    r = _Reader(buf, path)
    r.pos = 4
    version = r.scalar("<I")
    if version not in (2, 3):
        raise ModelError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise ModelError(f"{path}: corrupt GGUF (counts {n_tensors} tensors, {n_kv} keys)")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        vtype = r.scalar("<I")
        # Token tables are huge and not needed here: skip them without building Python lists.
        meta[key] = r.value(vtype, keep=not key.startswith("tokenizer.ggml."))
    data_end = 0
    offsets: list[tuple[int, int]] = []
    for _ in range(n_tensors):
        r.string()
        n_dims = r.scalar("<I")
        if n_dims > 8:
            raise ModelError(f"{path}: corrupt GGUF (tensor with {n_dims} dims)")
        n_elems = 1
        for _ in range(n_dims):
            n_elems *= r.scalar("<Q")
        ttype, offset = r.scalar("<I"), r.scalar("<Q")
        block, nbytes = _GGML_TYPE_SIZES.get(ttype, (0, 0))
        offsets.append((offset, (n_elems // block) * nbytes if block else 0))
    alignment = int(meta.get("general.alignment", 32)) or 32
    data_start = (r.pos + alignment - 1) // alignment * alignment
    for offset, nbytes in offsets:
        data_end = max(data_end, data_start + offset + nbytes)
    if data_end > size:
        raise ModelError(
            f"{path}: truncated GGUF ({size:,} bytes on disk, tensor data needs {data_end:,}); "
            "delete it and fetch the model again"
        )
    arch = str(meta.get("general.architecture", ""))
    if not arch:
        raise ModelError(f"{path}: GGUF has no general.architecture")

    def a(key: str, default: Any = 0) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        return value[0] if isinstance(value, list) and value else value

    n_embd, n_head = int(a("embedding_length")), int(a("attention.head_count"))
    head_dim = int(a("attention.key_length", 0)) or (n_embd // n_head if n_head else 0)
    return GGUFInfo(
        path=path,
        version=version,
        architecture=arch,
        name=str(meta.get("general.name", path.stem)),
        n_layer=int(a("block_count")),
        n_ctx_train=int(a("context_length")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(a("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        rope_base=float(a("rope.freq_base", 10000.0)),
        rope_dims=int(a("rope.dimension_count", head_dim)),
        file_type=meta.get("general.file_type"),
        n_tensors=n_tensors,
        metadata=meta,
    )
