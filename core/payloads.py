"""Where compiled payloads (the KV bytes of activation cubes) live, content-addressed by sha256.

The cube store keeps which payload a cube has (its sha256 and size, in SQLite); a `PayloadStore`
keeps the bytes. The interface is small on purpose, so a shared store (one payload compiled once for
everyone, found by its hash) can stand in for the local folder:

* `write(data) -> sha256`: complete before it returns; the same bytes written twice are stored once.
* `read(sha256, verify=False) -> memoryview`: no copy where the store can map the bytes.
* `size(sha256) -> int | None`: None when absent (the existence check).
* `delete(sha256)`, `iterate()` (every stored hash) and `gc(keep, grace_s)`.
* `age(sha256) -> float | None` and `unfinished() -> int`: what `repomem check` reports before a `gc`.

`LocalPayloads` is a folder of `<sha[:2]>/<sha>.kv` files: written with temp file, fsync, atomic
rename and folder fsync, so a killed process leaves complete files or temp files that `gc` removes.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Protocol

from . import atomic
from .errors import StoreError, storage_error

SUFFIX = ".kv"
TEMP_SUFFIX = ".tmp"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class PayloadMissing(StoreError):
    """A cube's payload is gone."""


class PayloadCorrupt(StoreError):
    """A cube's payload has the wrong size or checksum."""


class PayloadStore(Protocol):
    """Payload bytes by their sha256 (lowercase hex)."""

    def write(self, data: bytes | bytearray | memoryview) -> str: ...

    def read(self, sha256: str, *, verify: bool = False) -> memoryview: ...

    def size(self, sha256: str) -> int | None: ...

    def delete(self, sha256: str) -> bool: ...

    def iterate(self) -> Iterator[str]: ...

    def age(self, sha256: str) -> float | None:
        """Seconds since the payload was last written; None when absent."""
        ...

    def unfinished(self) -> int:
        """Leftovers that are not payloads (writes a killed process never finished); `gc` removes them."""
        ...

    def gc(self, keep: Collection[str], grace_s: float) -> int:
        """Delete payloads not in `keep` and unfinished writes, except those younger than `grace_s` (another
        process may be about to point a cube at them); returns how many went."""
        ...


class LocalPayloads:
    """A `PayloadStore` in one folder of the machine."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise PayloadMissing(f"not a payload hash: {sha256!r}")
        return self.folder / sha256[:2] / f"{sha256}{SUFFIX}"

    def write(self, data: bytes | bytearray | memoryview) -> str:
        view = memoryview(data).cast("B")
        sha = hashlib.sha256(view).hexdigest()
        final = self.path(sha)
        try:
            # Same name is same content only if the file is intact: a damaged one is replaced.
            if final.exists() and final.stat().st_size == view.nbytes and _file_sha256(final) == sha:
                os.utime(final)  # restart the GC grace period: a new reference is coming
                return sha
            final.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(final, view, temp_suffix=TEMP_SUFFIX)
        except OSError as exc:
            raise storage_error(exc, "cannot write a payload", self.folder) from exc
        return sha

    def read(self, sha256: str, *, verify: bool = False) -> memoryview:
        """A read-only memoryview over an mmap of the file; `verify` hashes every byte."""
        path = self.path(sha256)
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                view = memoryview(b"") if size == 0 else memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        except FileNotFoundError as exc:
            raise PayloadMissing(f"payload {sha256[:12]} is missing") from exc
        except OSError as exc:
            raise PayloadMissing(f"payload {sha256[:12]} cannot be read: {exc}") from exc
        if verify and hashlib.sha256(view).hexdigest() != sha256:
            raise PayloadCorrupt(f"payload {sha256[:12]} fails its checksum")
        return view

    def size(self, sha256: str) -> int | None:
        try:
            return self.path(sha256).stat().st_size
        except OSError:
            return None

    def delete(self, sha256: str) -> bool:
        try:
            self.path(sha256).unlink()
        except OSError:  # gone already, or mapped by a reader on Windows: next time
            return False
        return True

    def iterate(self) -> Iterator[str]:
        for path in self._files():
            if path.suffix == SUFFIX and _SHA256.fullmatch(path.stem):
                yield path.stem

    def age(self, sha256: str) -> float | None:
        try:
            return time.time() - self.path(sha256).stat().st_mtime
        except OSError:
            return None

    def unfinished(self) -> int:
        return sum(1 for path in self._files() if not (path.suffix == SUFFIX and _SHA256.fullmatch(path.stem)))

    def gc(self, keep: Collection[str], grace_s: float) -> int:
        cutoff = time.time() - grace_s
        removed = 0
        for path in self._files():
            if path.suffix == SUFFIX and path.stem in keep:
                continue
            try:
                if path.stat().st_mtime > cutoff:
                    continue
                path.unlink()
                removed += 1
            except OSError:
                continue
        return removed

    def _files(self) -> list[Path]:
        out: list[Path] = []
        try:
            subdirs = list(os.scandir(self.folder))
        except OSError:
            return out
        for sub in subdirs:
            try:
                if not sub.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(sub.path) as it:
                    out.extend(Path(e.path) for e in it if e.is_file(follow_symlinks=False))
            except OSError:
                continue
        return out
