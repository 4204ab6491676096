"""The `repomem doctor` report: everything needed to tell why repomem does or does not work here.

The JSON keys are a public contract (documented in README.md): add keys, never rename them.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys
from typing import Any

from . import __version__, amx_guard, models, paths, settings
from .errors import RepomemError
from .gguf import read_gguf_info

INTERESTING_FLAGS = ("avx", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16",
                     "f16c", "fma", "sse4_2", "asimd", "sve")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _native() -> dict[str, Any]:
    try:
        from repomem.native import _kvsplice

        return {"loaded": True, "version": getattr(_kvsplice, "__version__", None),
                "file": _kvsplice.__file__, "error": None}
    except Exception as exc:  # noqa: BLE001 - the report must survive a broken build
        return {"loaded": False, "version": None, "file": None, "error": f"{type(exc).__name__}: {exc}"}


def _qt() -> str | None:
    try:
        import PySide6

        return PySide6.__version__
    except Exception:  # noqa: BLE001
        return None


def _backend() -> dict[str, Any]:
    try:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode(errors="replace")
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        names = [n for n in ("CUDA", "Metal", "Vulkan", "SYCL", "HIP") if n.upper() in info.upper()]
        return {"gpu_offload": gpu, "backend": names[0] if (gpu and names) else "CPU", "system_info": info.strip()}
    except Exception as exc:  # noqa: BLE001
        return {"gpu_offload": False, "backend": None, "system_info": f"unavailable: {exc}"}


def report(model: str | None = None) -> dict[str, Any]:
    """Build the report. Never raises: problems are reported as values (`model.error`, `native.error`)."""
    flags = amx_guard.cpu_flags()
    out: dict[str, Any] = {
        "repomem": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {"repomem": __version__, "llama_cpp_python": _version("llama_cpp_python"),
                     "qt": _qt(), "numpy": _version("numpy"), "tree_sitter": _version("tree-sitter")},
        "data_home": str(paths.home()),
        "models_dir": str(paths.models_dir()),
        "cpu": {"name": amx_guard.cpu_name(), "flags": [f for f in INTERESTING_FLAGS if f in flags],
                "amx": any(f.startswith("amx") for f in flags)},
        "native": _native(),
        "gpu": _backend(),
        "models": models.installed(),
    }
    m: dict[str, Any] = {"path": None, "sha256": None, "error": None}
    try:
        # the model the other commands use: --model, else the `model` setting, else $REPOMEM_MODEL
        path = models.resolve_model(model or settings.load().model or None)
        info = read_gguf_info(path)
        sha = models.cached_sha256(path)
        known = {s.sha256: s.name for s in models.MODELS.values()}
        m.update(path=str(path), sha256=sha, catalogue_name=known.get(sha), size_bytes=path.stat().st_size,
                 architecture=info.architecture, name=info.name, n_layer=info.n_layer, n_head=info.n_head,
                 n_head_kv=info.n_head_kv, head_dim=info.head_dim, n_ctx_train=info.n_ctx_train,
                 rope_base=info.rope_base)
        if amx_guard.verdict(sha) is None:
            amx_guard.extra_bufts_allowed(path, sha, probe=True)  # probe once, in a child process
        v = amx_guard.verdict(sha)
        out["amx_guard"] = {"probed": v is not None, "extra_bufts": (v or {}).get("extra_bufts"),
                            "probe": (v or {}).get("probe"), "machine_key": amx_guard.machine_key()}
    except RepomemError as exc:
        m["error"] = str(exc)
        out["amx_guard"] = {"probed": False, "extra_bufts": None, "probe": None}
    out["model"] = m
    return out
