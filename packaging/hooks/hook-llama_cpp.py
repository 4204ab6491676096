"""PyInstaller hook for llama-cpp-python (none ships with PyInstaller or pyinstaller-hooks-contrib).

llama_cpp loads its shared libraries with ctypes from ``<package>/lib`` (llama_cpp/llama_cpp.py, _ggml.py,
mtmd_cpp.py), so the import graph never sees them: without this hook the bundle fails at
``import llama_cpp`` with "Shared library with base name 'llama' not found".

Collected into ``llama_cpp/lib`` (the same relative place):
  * every shared library there: libllama, libggml, libggml-base, libggml-cpu and whatever backend the
    build added (libggml-cuda, libggml-metal, libggml-vulkan, ggml-*.dll, ...). Their own dependencies
    (libgomp, libstdc++, the CUDA runtime and cuBLAS of a CUDA build) are found by PyInstaller's
    dependency analysis; the CUDA *driver* (libcuda.so / nvcuda.dll) is deliberately never bundled.
  * the Metal shader source/library when the build did not embed it (GGML_METAL_EMBED_LIBRARY=OFF).
  * Windows: the OpenMP runtime ggml-cpu.dll imports (vcomp140.dll for MSVC builds, libomp140.x86_64.dll
    for clang-cl builds). PyInstaller knows vcomp140.dll only when the VC++ redistributable put it in
    System32 of the build machine and does not know the LLVM one at all; the app then dies at start with
    "Failed to load shared library ...ggml-cpu.dll" on machines without it.
"""

import glob
import os
import sys
from pathlib import Path

from PyInstaller.utils.hooks import collect_data_files, collect_dynamic_libs, logger

binaries = collect_dynamic_libs("llama_cpp")
datas = collect_data_files("llama_cpp", includes=["lib/*.metal", "lib/*.metallib", "lib/*.json"])
hiddenimports = ["llama_cpp._ggml", "llama_cpp.llama_cpp"]
excludedimports = ["llama_cpp.server"]

OPENMP_DLLS = ("vcomp140.dll", "libomp140.x86_64.dll", "libomp.dll", "libiomp5md.dll")


def _find_dll(name: str) -> str | None:
    env = os.environ
    patterns = [os.path.join(d, name) for d in env.get("PATH", "").split(os.pathsep) if d]
    patterns.append(os.path.join(env.get("SystemRoot", r"C:\Windows"), "System32", name))
    if env.get("VCToolsRedistDir"):
        redist = env["VCToolsRedistDir"]
        patterns += [os.path.join(redist, "x64", "Microsoft.VC*.OpenMP", name),
                     os.path.join(redist, "debug_nonredist", "x64", "Microsoft.VC*.OpenMP.LLVM", name)]
    if env.get("VCINSTALLDIR"):
        patterns.append(os.path.join(env["VCINSTALLDIR"], "Tools", "Llvm", "x64", "bin", name))
    for pattern in patterns:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


if sys.platform == "win32":
    from PyInstaller.depend import bindepend

    have = {Path(src).name.lower() for src, _ in binaries}
    wanted = set()
    for src, _ in binaries:
        try:
            wanted |= {n.lower() for n, _ in bindepend.get_imports(src)} & set(OPENMP_DLLS)
        except Exception:  # noqa: BLE001 - an unreadable DLL is PyInstaller's to report
            pass
    for name in sorted(wanted - have):
        found = _find_dll(name)
        if found:
            binaries.append((found, "llama_cpp/lib"))
        else:
            logger.warning("hook-llama_cpp: %s (OpenMP runtime of ggml-cpu.dll) not found; install the VC++ "
                           "redistributable or run from a VS developer prompt", name)
