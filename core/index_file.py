"""The search index on disk: one file beside `cubes.db`, so a big store opens without re-reading every cube.

What it holds: the state of a `retrieval.BM25Index` (`BM25Index.export_state`) and the *stamp* of every
cube that state reflects, as the store had it when the cube was read (`search_index.Stamp`). The stamps
are what keeps the file honest: `search_index.SearchIndex` compares them with the store's and applies
only the difference, so the file may be old, but never wrong.

Format: an uncompressed `.npz` (numpy's zip of `.npy` arrays, read without pickle). zip stores a CRC-32
of every member and `zipfile` checks it on read, so a torn or damaged file is detected, not trusted.
The `meta` member is JSON: the format version and the tokenizer fingerprint (a hash of the retrieval
module's code: another tokenizer would index other terms). Lists of strings are stored as one UTF-8
blob plus character offsets.

`load` raises `IndexFileInvalid` (with a reason for the log) for a missing, unreadable, damaged or
foreign file; the caller then rebuilds from the store. `save` replaces the file atomically (temp file +
rename); it is a cache, so it is not fsynced: a file lost to a power cut is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import marshal
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from . import retrieval

FILE_NAME = "search-index.npz"
FORMAT_VERSION = 1

# Which state members are lists of strings, and the dtype of every array member.
_STRING_KEYS = ("ids", "paths", "symbols", "stamps.ids", "stamps.status")
_ARRAY_DTYPES = {"start_line": np.int64, "end_line": np.int64, "doc_len": np.float64, "alive": np.bool_,
                 "is_test": np.bool_, "stamps.updated": np.float64, "stamps.version": np.int64,
                 "stamps.start_line": np.int64, "stamps.end_line": np.int64}
_SCALARS = ("n_slots", "n_live", "total_len")
_STAMP_COLUMNS = ("updated", "status", "version", "start_line", "end_line")
_NAMES = ("body", "symbol", "defs", "path")


class IndexFileInvalid(Exception):
    """The file cannot be used (the message says why); rebuild from the store."""


@lru_cache(maxsize=1)
def tokenizer_fingerprint() -> str:
    """A hash of the code that turns text into terms (the whole retrieval module: safe, if coarse)."""
    loader = retrieval.__spec__.loader if retrieval.__spec__ else None
    data = b""
    with contextlib.suppress(Exception):
        source = loader.get_source(retrieval.__name__)  # type: ignore[union-attr]
        data = source.encode("utf-8") if source else b""
    if not data:  # a frozen build ships code objects only
        with contextlib.suppress(Exception):
            data = marshal.dumps(loader.get_code(retrieval.__name__))  # type: ignore[union-attr]
    return hashlib.sha256(b"%d\0" % FORMAT_VERSION + data).hexdigest()


def path_for(store_dir: Path) -> Path:
    return Path(store_dir) / FILE_NAME


def _pack(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    text = "".join(strings)
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, strings), dtype=np.int64, count=len(strings)), out=offsets[1:])
    return np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8), offsets


def _unpack(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    text = blob.tobytes().decode("utf-8", "surrogatepass")
    if offsets.size == 0 or offsets[0] != 0 or offsets[-1] != len(text) or np.any(np.diff(offsets) < 0):
        raise ValueError("string offsets do not match their text")
    bounds = offsets.tolist()
    return list(map(text.__getitem__, map(slice, bounds[:-1], bounds[1:])))


def save(path: Path, state: Mapping[str, Any], stamps: Mapping[str, tuple]) -> None:
    """Write an index state (`BM25Index.export_state()`) and the cube stamps it reflects."""
    arrays: dict[str, np.ndarray] = {}
    ids = list(stamps)
    columns = list(zip(*stamps.values(), strict=True)) if stamps else [()] * len(_STAMP_COLUMNS)
    full: dict[str, Any] = {**state, "stamps.ids": ids}
    for name, col in zip(_STAMP_COLUMNS, columns, strict=True):
        full[f"stamps.{name}"] = list(col) if name == "status" else np.array(col, dtype=_ARRAY_DTYPES[f"stamps.{name}"])
    for key, value in full.items():
        if key in _SCALARS:
            continue
        if key in _STRING_KEYS or key.endswith(".terms"):
            arrays[f"{key}.text"], arrays[f"{key}.offsets"] = _pack(value)
        else:
            arrays[key] = np.asarray(value)
    meta = {"format": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(),
            **{k: int(state[k]) for k in _SCALARS}, "stamps": len(ids)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(path: Path) -> tuple[dict[str, Any], dict[str, tuple]]:
    """(index state for `BM25Index.restore_state`, {cube id: stamp}); `IndexFileInvalid` if unusable."""
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            members = {k: npz[k] for k in npz.files}
    except FileNotFoundError as exc:
        raise IndexFileInvalid("no index file yet") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise IndexFileInvalid(f"unreadable index file ({exc})") from exc
    try:
        meta = json.loads(members.pop("meta").tobytes())
    except (KeyError, ValueError) as exc:
        raise IndexFileInvalid("index file without its header") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise IndexFileInvalid(f"index file format {meta.get('format')}, this repomem writes {FORMAT_VERSION}")
    if meta.get("tokenizer") != tokenizer_fingerprint():
        raise IndexFileInvalid("index file written by another version of the tokenizer")
    try:
        state = _decode(members, meta)
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise IndexFileInvalid(f"inconsistent index file ({exc})") from exc
    stamp_ids = state.pop("stamps.ids")
    columns = [state.pop(f"stamps.{c}") for c in _STAMP_COLUMNS]
    columns = [c if isinstance(c, list) else c.tolist() for c in columns]
    stamps = dict(zip(stamp_ids, zip(*columns, strict=True), strict=True)) if stamp_ids else {}
    return state, stamps


def _decode(members: dict[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {k: int(meta[k]) for k in _SCALARS}
    for key in list(members):
        if key.endswith(".text"):
            base = key[: -len(".text")]
            state[base] = _unpack(members.pop(key), members.pop(f"{base}.offsets"))
    for key, arr in members.items():
        want = _ARRAY_DTYPES.get(key)
        if want is None:
            want = np.int64 if key.endswith((".offsets", ".df", ".dead")) else np.int32
        if arr.dtype != want or arr.ndim != 1:
            raise ValueError(f"{key} has dtype {arr.dtype}, shape {arr.shape}")
        state[key] = arr
    _check(state, int(meta["stamps"]))
    return state


def _check(state: Mapping[str, Any], n_stamps: int) -> None:
    """Shapes and ranges agree: a bug or a foreign file must not become an index that crashes later."""
    n = state["n_slots"]
    for key in ("ids", "paths", "symbols", "start_line", "end_line", "doc_len", "alive", "is_test"):
        if len(state[key]) != n:
            raise ValueError(f"{key} has {len(state[key])} entries for {n} slots")
    if int(state["alive"].sum()) != state["n_live"]:
        raise ValueError("live count disagrees with the slots")
    for name in _NAMES:
        data, offsets = state[f"tids.{name}"], state[f"tids.{name}.offsets"]
        n_terms = len(state[f"postings.{name}.terms"])
        _check_offsets(offsets, n + 1, data.size, f"tids.{name}")
        if data.size and (data.min() < 0 or data.max() >= n_terms):
            raise ValueError(f"tids.{name} names unknown terms")
        post = state[f"postings.{name}.data"]
        _check_offsets(state[f"postings.{name}.offsets"], n_terms + 1, post.size, f"postings.{name}")
        for col in ("df", "dead"):
            if state[f"postings.{name}.{col}"].size != n_terms:
                raise ValueError(f"postings.{name}.{col} does not cover the vocabulary")
        if post.size % 2 or (post.size and (post[0::2].min() < 0 or post[0::2].max() >= max(n, 1))):
            raise ValueError(f"postings.{name} name unknown slots")
    if len(state["stamps.ids"]) != n_stamps:
        raise ValueError("stamp count disagrees with the header")
    for col in _STAMP_COLUMNS:
        if len(state[f"stamps.{col}"]) != n_stamps:
            raise ValueError(f"stamps.{col} has the wrong length")


def _check_offsets(offsets: np.ndarray, count: int, size: int, what: str) -> None:
    if offsets.size != count or offsets[0] != 0 or offsets[-1] != size or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{what} offsets are inconsistent")
