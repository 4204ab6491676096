#!/usr/bin/env bash
# Rebuild llama-cpp-python (the pinned 0.3.36) for the backend a package should ship, and install it into
# the build environment. Run this before build-linux.sh / macos/build-macos.sh.
#
#   packaging/build-llama-cpp.sh BACKEND
#
#   cpu     portable CPU build (GGML_NATIVE=OFF): x86-64 with AVX2/FMA/F16C (Haswell, Zen 1 and newer),
#           generic ARMv8 on aarch64. What a distributed Linux package must ship.
#   native  tuned for *this* CPU only (what a plain `pip install llama-cpp-python` compiles): fastest here,
#           SIGILL elsewhere. Fine for a package that is only used on the build machine.
#   cuda    NVIDIA GPUs: -DGGML_CUDA=on, needs the CUDA toolkit (nvcc) at build time. Architectures from
#           CUDA_ARCHS (default "75;80;86;89;90": Turing to Hopper); the bundle then carries libcudart and
#           cuBLAS (~600 MB) unless REPOMEM_SYSTEM_CUDA=1 is set for the bundle build (see packaging/README.md).
#   metal   Apple Silicon GPUs: -DGGML_METAL=on with the shader library embedded in libggml-metal
#           (no default.metallib file to lose when bundling).
#   vulkan  any Vulkan 1.2 GPU: -DGGML_VULKAN=on, needs the Vulkan SDK (glslc) at build time.
#
# Environment: PYTHON (default .venv/bin/python), LLAMA_CMAKE_ARGS_EXTRA (appended to CMAKE_ARGS),
# CUDA_ARCHS, OUT (wheel folder, default packaging/out/wheels/BACKEND).
# The wheel is built with --no-cache-dir: pip's wheel cache is keyed by the source, not by CMAKE_ARGS, so a
# cached build for another backend would otherwise be installed silently.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
BACKEND="${1:?usage: build-llama-cpp.sh cpu|native|cuda|metal|vulkan}"
LLAMA_VERSION="0.3.36"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
OUT="${OUT:-$HERE/out/wheels/$BACKEND}"

case "$BACKEND" in
    cpu)    args="-DGGML_NATIVE=OFF" ;;
    native) args="-DGGML_NATIVE=ON" ;;
    cuda)   args="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-75;80;86;89;90}"
            command -v nvcc >/dev/null || [[ -n "${CUDACXX:-}" ]] \
                || { echo "nvcc not found: install the CUDA toolkit or set CUDACXX" >&2; exit 1; } ;;
    metal)  [[ "$(uname -s)" == Darwin ]] || { echo "metal builds run on macOS" >&2; exit 1; }
            args="-DGGML_METAL=on -DGGML_METAL_EMBED_LIBRARY=on -DGGML_NATIVE=OFF" ;;
    vulkan) args="-DGGML_VULKAN=on -DGGML_NATIVE=OFF"
            command -v glslc >/dev/null || { echo "glslc not found: install the Vulkan SDK" >&2; exit 1; } ;;
    *) echo "unknown backend $BACKEND (cpu, native, cuda, metal, vulkan)" >&2; exit 2 ;;
esac
export CMAKE_ARGS="$args ${LLAMA_CMAKE_ARGS_EXTRA:-}"
export FORCE_CMAKE=1
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"

echo "[build-llama-cpp] llama-cpp-python==$LLAMA_VERSION backend=$BACKEND CMAKE_ARGS='$CMAKE_ARGS'" >&2
rm -rf "$OUT" && mkdir -p "$OUT"
"$PYTHON" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$OUT" \
    "llama-cpp-python==$LLAMA_VERSION"
"$PYTHON" -m pip install --no-deps --no-cache-dir --force-reinstall "$OUT"/llama_cpp_python-*.whl
"$PYTHON" - <<'PY'
import llama_cpp
info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
print(f"[build-llama-cpp] installed: gpu_offload={bool(llama_cpp.llama_supports_gpu_offload())} {info}")
PY
