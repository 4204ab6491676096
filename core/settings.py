"""User settings: one JSON file under the data home, read by the CLI, the GUI and the watcher alike.

Defaults that affect answer quality or speed were chosen by measurement (docs/benchmarks.md).
Unknown keys in the file are kept (a newer version may have written them); bad values fall back to
the default with a warning instead of refusing to start.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from repomem import native

from . import atomic, paths

log = logging.getLogger(__name__)

MODES = ("kv", "text", "none")
PLACEMENTS = ("parallel", "sequential")
POLICIES = ("all", "uniform", "attention", "structural")
#: what `encoding` may be: the payload encodings of an f16 cache, largest first (raw rows are kept
#: only for a quantized cache, by the compiler)
ENCODINGS = tuple(e for e in native.ENCODINGS if e != "raw")
#: what `cache_type` may be: the KV cache types compiled memory is made for
CACHE_TYPES = ("f16", "q8_0")


@dataclass
class Settings:
    model: str = ""  # catalogue name or GGUF path; "" = $REPOMEM_MODEL or the default model
    n_threads: int = 0  # 0 = automatic
    n_ctx: int = 8192
    n_gpu_layers: int = -1  # -1 = all layers when a GPU backend is present
    cache_type: str = "f16"
    mode: str = "kv"
    placement: str = "parallel"
    keep_policy: str = "all"
    keep_ratio: float = 1.0
    drop_sinks: int = 0
    key_scale: float = 1.0
    boost_top: int = 2  # kv, parallel: the N best-ranked memories are spliced twice (docs/benchmarks.md)
    encoding: str = "k4v3"  # smallest payload whose kv accuracy holds up against f16 (docs/benchmarks.md)
    top_k: int = 5
    memory_tokens: int = 3000
    max_answer_tokens: int = 384
    temperature: float = 0.0
    chunk_tokens: int = 384
    disk_budget_mb: int = 2048
    promote_after: int = 3  # a plaintext cube retrieved this often is compiled back to KV
    private_paths: list[str] = field(default_factory=list)
    endpoint_url: str = ""  # OpenAI-compatible server `repomem ask` answers through, in text mode ("" = local model)
    endpoint_model: str = ""
    endpoint_api_key_env: str = "OPENAI_API_KEY"
    editor_command: str = ""  # e.g. "code -g {path}:{line}"; "" = the system opener
    server_port: int = 7636  # repomem serve and the app's "Connect an editor" panel
    server_api_key: str = ""  # required to listen on anything but 127.0.0.1 ($REPOMEM_API_KEY overrides)
    server_cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the server
    close_to_tray: bool = True
    watcher_idle_unload_s: int = 300
    repos: list[str] = field(default_factory=list)

    def validate(self) -> Settings:
        """Replace values of the wrong type or out of range by defaults, so a hand-edited file never stops
        the app."""
        d = Settings()
        for f in fields(self):
            value, default = getattr(self, f.name), getattr(d, f.name)
            # Exact types, as JSON gives them (so a bool is not an int); an int is a fine float.
            ok = type(value) is type(default) or (type(default) is float and type(value) is int)
            if ok and isinstance(default, list):
                ok = all(isinstance(x, str) for x in value)
            if not ok:
                log.warning("setting %s=%r has the wrong type; using %r", f.name, value, default)
                setattr(self, f.name, default)
        checks = {
            "mode": self.mode in MODES, "placement": self.placement in PLACEMENTS,
            "keep_policy": self.keep_policy in POLICIES, "encoding": self.encoding in ENCODINGS,
            "keep_ratio": 0.05 <= self.keep_ratio <= 1.0, "top_k": 1 <= self.top_k <= 50,
            "boost_top": 0 <= self.boost_top <= 50,
            "n_ctx": 512 <= self.n_ctx <= 262144, "memory_tokens": 0 <= self.memory_tokens <= 200_000,
            "cache_type": self.cache_type in CACHE_TYPES,
            "server_port": 1 <= self.server_port <= 65535,
        }
        for name, ok in checks.items():
            if not ok:
                log.warning("setting %s=%r is invalid; using %r", name, getattr(self, name), getattr(d, name))
                setattr(self, name, getattr(d, name))
        return self


def settings_path() -> Path:
    return paths.home() / "settings.json"


def load() -> Settings:
    try:
        raw = json.loads(settings_path().read_text())
    except FileNotFoundError:
        return Settings()
    except (OSError, ValueError) as exc:
        log.warning("settings file unreadable (%s); using defaults", exc)
        return Settings()
    known = {f.name for f in fields(Settings)}
    s = Settings(**{k: v for k, v in raw.items() if k in known})
    return s.validate()


def save(s: Settings) -> None:
    """Atomic write that keeps keys this version does not know."""
    path = settings_path()
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError):
        existing = {}
    existing.update(asdict(s))
    atomic.write_text(path, json.dumps(existing, indent=2))
