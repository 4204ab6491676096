"""The public surface: what `repomem.core` exports, and the shells and benchmarks using only that."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import repomem.core as core

ROOT = Path(__file__).resolve().parent.parent
# where a shell may still reach behind the surface, and why
ALLOWED = {
    "repomem.core.settings": "the settings dialog lists the allowed values (ENCODINGS, CACHE_TYPES, MODES)",
}
_IMPORT = re.compile(r"^\s*from (repomem\.core\.[\w.]+) import", re.MULTILINE)
# `from repomem.core import a, b as c` (one line or parenthesised) and `import repomem.core.x`
_FROM_CORE = re.compile(r"^\s*from repomem\.core import (\([^)]*\)|[^\n]*)", re.MULTILINE)
_IMPORT_MODULE = re.compile(r"^\s*import (repomem\.core\.[\w.]+)", re.MULTILINE)


def test_every_exported_name_resolves() -> None:
    assert len(core.__all__) == len(set(core.__all__))
    assert set(core.__all__) - {"__version__", *core._MODULES} == set(core._EXPORTS)
    # in a fresh process: a module name must resolve even when nothing imported that module yet
    code = ("import repomem.core as core; "
            "print([n for n in core.__all__ if getattr(core, n, None) is None])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_importing_core_loads_neither_qt_nor_the_model_runtime() -> None:
    code = ("import sys; from repomem.core import RepoMemory, CubeStore, watcher_status, paths, models; "
            "print(sorted(m for m in ('PySide6', 'llama_cpp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_shells_and_benchmarks_import_core_through_its_surface() -> None:
    reached = {}
    for folder in ("app", "bench"):
        for py in sorted((ROOT / folder).rglob("*.py")):
            for module in _IMPORT.findall(py.read_text()):
                if module not in ALLOWED:
                    reached.setdefault(module, []).append(py.relative_to(ROOT).as_posix())
    # the measurement package drives lower layers on purpose (compiler, chunking, walk, prompt, recode,
    # retrieval, watch.open_memory); the shells do not
    shells = {m: files for m, files in reached.items() if any(f.startswith("app/") for f in files)}
    assert shells == {}
    assert all(not name.rsplit(".", 1)[-1].startswith("_") for name in reached)


def _names_from_core(text: str) -> list[str]:
    names = []
    for group in _FROM_CORE.findall(text):
        for item in group.strip("()").split(","):
            if name := item.split("#")[0].split(" as ")[0].strip():
                names.append(name)
    return names


def test_shells_and_benchmarks_take_only_exported_names_from_core() -> None:
    # `from repomem.core import settings` reaches a module behind the surface as if it were part of it
    unexported = {}
    for folder in ("app", "bench"):
        for py in sorted((ROOT / folder).rglob("*.py")):
            text = py.read_text()
            names = [n for n in _names_from_core(text) if n not in core.__all__] + _IMPORT_MODULE.findall(text)
            if names:
                unexported[py.relative_to(ROOT).as_posix()] = names
    assert unexported == {}


def test_benchmarks_need_no_test_oracle_and_no_private_names() -> None:
    for py in sorted((ROOT / "bench").rglob("*.py")):
        text = py.read_text()
        imports = "\n".join(re.findall(r"^\s*(?:from|import) .*$", text, re.MULTILINE))
        assert "reference" not in imports, py
        assert not re.search(r"(?<!self)\._[a-z]\w*", text), (py, re.search(r"(?<!self)\._[a-z]\w*", text))
