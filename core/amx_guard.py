"""Guard against llama.cpp's weight-repacking crash on some CPUs (seen with AMX).

With the default `use_extra_bufts=True`, llama.cpp repacks weights into CPU-specific layouts; on some
CPUs that advertise AMX, `llama_decode` then dies with SIGSEGV, taking the whole app with it. We
cannot catch a segfault in-process, so we probe once in a child process, fall back to
`use_extra_bufts=False` when the child dies, and remember the verdict per machine and model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import atomic, paths

log = logging.getLogger(__name__)

VERDICT_FILE = "extra-bufts.json"
PROBE_TIMEOUT_S = 120


def cpu_flags() -> list[str]:
    """CPU feature flags (Linux: /proc/cpuinfo; elsewhere: what platform tells)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    import llama_cpp

    raw = "|".join([platform.system(), platform.machine(), cpu_name(), " ".join(cpu_flags()),
                    getattr(llama_cpp, "__version__", "?")])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _verdict_path() -> Path:
    return paths.machine_dir() / VERDICT_FILE


def _load() -> dict:
    try:
        return json.loads(_verdict_path().read_text())
    except (OSError, ValueError):
        return {}


def _save(data: dict) -> None:
    try:
        atomic.write_text(_verdict_path(), json.dumps(data, indent=1))
    except OSError as exc:  # a read-only or full data home: probe again next time
        log.warning("cannot remember the repacking probe's verdict: %s", exc)


def verdict(model_sha256: str) -> dict | None:
    """The remembered probe result for this machine and model, or None if never probed."""
    return _load().get(f"{machine_key()}:{model_sha256}")


def run_probe(model_path: Path) -> dict:
    """Decode a few tokens with repacking on, in a child process; report how the child ended."""
    t0 = time.perf_counter()
    env = dict(os.environ, REPOMEM_LLAMA_LOG="0")
    try:
        res = subprocess.run([sys.executable, "-m", "repomem.core.amx_guard", str(model_path)],
                             capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
        rc = res.returncode
    except subprocess.TimeoutExpired:
        rc = None
    if rc == 0:
        outcome = "ok"
    elif rc is not None and rc < 0:
        outcome = f"crashed ({signal.Signals(-rc).name})"
    else:
        outcome = "failed" if rc is not None else "timed out"
    return {"extra_bufts": rc == 0, "probe": outcome, "probed_at": time.time(),
            "probe_s": round(time.perf_counter() - t0, 2)}


def extra_bufts_allowed(model_path: Path, model_sha256: str, *, probe: bool = True) -> bool:
    """Whether repacking is safe here. `REPOMEM_EXTRA_BUFTS=0/1` overrides; unknown + no probe = off."""
    forced = os.environ.get("REPOMEM_EXTRA_BUFTS")
    if forced in ("0", "1"):
        return forced == "1"
    known = verdict(model_sha256)
    if known is None:
        if not probe:
            return False
        known = run_probe(model_path)
        data = _load()
        data[f"{machine_key()}:{model_sha256}"] = known
        _save(data)
    return bool(known["extra_bufts"])


def _child(model_path: str) -> int:
    """The probe itself: load with repacking on and decode; a crash kills only this process."""
    os.environ["REPOMEM_EXTRA_BUFTS"] = "1"
    from .engine import Engine

    engine = Engine(model_path, use_extra_bufts=True, probe=False)
    with engine.new_context(n_ctx=256, n_batch=64) as ctx:
        ctx.decode(engine.tokenize("def hello(name):\n    return"), start_pos=0)
        ctx.logits()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
