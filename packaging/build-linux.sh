#!/usr/bin/env bash
# Build the Linux package of repomem: a PyInstaller onedir bundle inside a .deb.
#
#   packaging/build-linux.sh [OUT_DIR]          (default OUT_DIR: packaging/out)
#
# Environment:
#   PYTHON                     the Python whose environment is bundled (default: .venv/bin/python, else python3).
#                              Its llama-cpp-python is what the package ships: a CPU wheel, or a CUDA/Vulkan
#                              build made with packaging/build-llama-cpp.sh.
#   REPOMEM_DEB_COMPRESS       dpkg-deb compressor: xz (default; smallest), gzip (fastest), zstd, none
#   REPOMEM_DEB_REVISION       Debian revision (default 1)
#   REPOMEM_DEB_MAINTAINER     the control file's Maintainer (default: a placeholder address)
#   REPOMEM_NO_BUILD_ISOLATION=1   build the repomem wheel with the environment's setuptools (offline builds)
#   REPOMEM_KEEP_WORK=1        keep the work folder (printed at the end)
#   REPOMEM_REQUIRE_PORTABLE=1 fail (instead of warn) when llama.cpp is a CPU-native build (release builds)
#   REPOMEM_SYSTEM_CUDA=1      CUDA builds: leave libcudart/cuBLAS out of the bundle, depend on the system's
#
# Output: OUT_DIR/repomem_<version>-<rev>_<arch>.deb and OUT_DIR/repomem/ (the unpacked bundle, runnable in
# place: OUT_DIR/repomem/repomem doctor). The last line printed is the .deb's path.
#
# The .deb installs the bundle to /usr/lib/repomem, a relative symlink /usr/bin/repomem, a desktop entry
# and the icon; it needs no root to inspect: `dpkg-deb -x repomem_*.deb PREFIX` gives a runnable
# PREFIX/usr/bin/repomem (tests/test_packaging.py does exactly that).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="$(mkdir -p "${1:-$HERE/out}" && cd "${1:-$HERE/out}" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
log() { printf '\033[1m[build-linux]\033[0m %s\n' "$*" >&2; }
die() { printf '[build-linux] error: %s\n' "$*" >&2; exit 1; }
t_start=$(date +%s)

for tool in dpkg-deb readelf file strip; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install dpkg binutils file)"
done
"$PYTHON" -c 'import llama_cpp, PySide6' 2>/dev/null \
    || die "$PYTHON lacks the app's dependencies: run 'make setup' (or pip install -e .) first"

# The llama.cpp the package will carry: a CPU-native build (what `pip install llama-cpp-python` compiles)
# runs only on CPUs with the same instruction sets.
LLAMA_INFO="$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode(errors="replace"))')"
LLAMA_FLAVOUR="portable"
if [[ "$(uname -m)" == x86_64 ]] && grep -qE '(AVX512[A-Z0-9_]* = 1|AMX_[A-Z0-9]* = 1|AVX_VNNI = 1)' <<<"$LLAMA_INFO"; then
    LLAMA_FLAVOUR="native"
    msg="llama.cpp in this environment is compiled for this CPU (AVX-512/AMX/AVX-VNNI code in libggml-cpu): the"
    msg+=" package will crash with SIGILL on CPUs without them. For a package to distribute, first run"
    msg+=" packaging/build-llama-cpp.sh cpu (or cuda/vulkan) in the build environment."
    [[ "${REPOMEM_REQUIRE_PORTABLE:-0}" == 1 ]] && die "$msg"
    log "WARNING: $msg"
fi

# PyInstaller is a build tool, not a dependency of the app: install it into the build environment if missing.
if ! "$PYTHON" -c 'import PyInstaller' 2>/dev/null; then
    log "installing PyInstaller into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    "$PYTHON" -m pip install -q "pyinstaller>=6.10,<7"
fi

VERSION="$("$PYTHON" - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])
EOF
)"
REVISION="${REPOMEM_DEB_REVISION:-1}"
ARCH="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/repomem-build.XXXXXX")"
if [[ "${REPOMEM_KEEP_WORK:-0}" != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; fi
log "repomem $VERSION-$REVISION ($ARCH) with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# 1. A snapshot of the sources: what git tracks plus new files it does not ignore (never .venv, build/, ...),
#    so the build sees exactly the checkout and cannot pick up stale build products.
log "snapshot of the source tree"
mkdir -p "$WORK/src"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$WORK/src"
else
    tar -C "$REPO" --exclude=.venv --exclude=build --exclude=dist --exclude='*.egg-info' --exclude=.git \
        --exclude='*.so' --exclude=__pycache__ --exclude=packaging/out -cf - . | tar -xf - -C "$WORK/src"
fi

# 2. The repomem wheel (compiles repomem.native._kvsplice), unpacked as the staging tree the spec analyses.
log "building the repomem wheel"
wheel_args=(--no-deps -q -w "$WORK/wheel")
[[ "${REPOMEM_NO_BUILD_ISOLATION:-0}" == 1 ]] && wheel_args+=(--no-build-isolation)
"$PYTHON" -m pip wheel "${wheel_args[@]}" "$WORK/src"
mkdir -p "$WORK/stage"
"$PYTHON" -m zipfile -e "$WORK"/wheel/repomem-*.whl "$WORK/stage"

# 3. The bundle.
log "PyInstaller (onedir)"
(cd "$WORK" && REPOMEM_STAGE="$WORK/stage" REPOMEM_VERSION="$VERSION" "$PYTHON" -m PyInstaller --noconfirm --clean \
    --log-level "${REPOMEM_PYI_LOG_LEVEL:-WARN}" --distpath "$WORK/dist" --workpath "$WORK/pyi" \
    "$HERE/repomem.spec")
BUNDLE="$WORK/dist/repomem"
[[ -x "$BUNDLE/repomem" ]] || die "PyInstaller produced no $BUNDLE/repomem"

# 4. Strip what is safe to strip: ELF files with symbols, except those auditwheel patched with patchelf
#    (in a *.libs folder, or with an rpath into one): binutils' strip breaks their program headers.
log "stripping"
stripped=0
while IFS= read -r -d '' f; do
    case "$f" in */*.libs/*) continue ;; esac
    if readelf -d "$f" 2>/dev/null | grep -E 'R(UN)?PATH' | grep -q '\.libs'; then continue; fi
    if file -b "$f" | grep -q 'not stripped'; then
        strip --strip-unneeded "$f" && stripped=$((stripped + 1))
    fi
done < <(find "$BUNDLE" -type f \( -name '*.so' -o -name '*.so.*' -o -name repomem \) -print0)
log "stripped $stripped files"

# 5. Smoke test before packaging: the bundle must start and find its native extension and llama.cpp.
env -i PATH=/usr/bin:/bin HOME="$WORK" LANG=C.UTF-8 REPOMEM_HOME="$WORK/smoke-home" \
    "$BUNDLE/repomem" --version >/dev/null || die "the bundle does not start"
env -i PATH=/usr/bin:/bin HOME="$WORK" LANG=C.UTF-8 REPOMEM_HOME="$WORK/smoke-home" \
    "$BUNDLE/repomem" -m repomem.app.cli --version >/dev/null || die "the bundle cannot run 'repomem -m MODULE'"
env -i PATH=/usr/bin:/bin HOME="$WORK" LANG=C.UTF-8 REPOMEM_HOME="$WORK/smoke-home" REPOMEM_MODEL=/nonexistent \
    "$BUNDLE/repomem" doctor --json > "$WORK/doctor.json" || true
"$PYTHON" - "$WORK/doctor.json" <<'EOF' || die "bundle self-check failed"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["native"]["loaded"], d["native"]
assert d["gpu"]["backend"] is not None, d["gpu"]
print(f"[build-linux] bundle self-check: native extension loaded, llama.cpp backend {d['gpu']['backend']}",
      file=sys.stderr)
open(sys.argv[1] + ".backend", "w").write(d["gpu"]["backend"])
EOF
case "$(cat "$WORK/doctor.json.backend")/$LLAMA_FLAVOUR" in
    CPU/portable) BACKEND_NOTE="CPU backend, portable build (GGML_NATIVE=OFF)." ;;
    CPU/native) BACKEND_NOTE="CPU backend, built for the build machine's CPU only." ;;
    *) BACKEND_NOTE="$(cat "$WORK/doctor.json.backend") backend (GPU offload)." ;;
esac

# 6. The Debian package.
log "assembling the .deb"
ROOT="$WORK/deb"
mkdir -p "$ROOT/DEBIAN" "$ROOT/usr/lib" "$ROOT/usr/bin" "$ROOT/usr/share/applications" \
    "$ROOT/usr/share/icons/hicolor/scalable/apps" "$ROOT/usr/share/doc/repomem"
cp -a "$BUNDLE" "$ROOT/usr/lib/repomem"
ln -s ../lib/repomem/repomem "$ROOT/usr/bin/repomem"
install -m 644 "$HERE/linux/repomem.desktop" "$ROOT/usr/share/applications/repomem.desktop"
ICON="$REPO/app/gui/icon.svg"
[[ -f "$ICON" ]] || ICON="$HERE/linux/repomem.svg"
install -m 644 "$ICON" "$ROOT/usr/share/icons/hicolor/scalable/apps/repomem.svg"
# PNG sizes for desktops and menus that do not render SVG (rendered with the bundled Qt itself)
QT_QPA_PLATFORM=offscreen "$PYTHON" "$HERE/render-icons.py" hicolor "$ICON" "$ROOT/usr/share/icons/hicolor" \
    48 128 256 || log "warning: PNG icons not rendered (SVG icon only)"
install -m 644 "$HERE/linux/copyright" "$ROOT/usr/share/doc/repomem/copyright"

# Depends: the libraries the bundle links to but does not carry (glibc, the graphics stack, X11/Wayland
# client libraries), mapped to their packages on this build host; libxcb-cursor0 is dlopen()ed by Qt's xcb
# plugin (Qt >= 6.5 refuses to start on X11 without it).
"$PYTHON" "$HERE/linux/deb-depends.py" "$ROOT/usr/lib/repomem" > "$WORK/depends"
DEPENDS="$(cat "$WORK/depends")"
INSTALLED_KB="$(du -sk --apparent-size "$ROOT/usr" | cut -f1)"
sed -e "s/@VERSION@/$VERSION-$REVISION/" -e "s/@ARCH@/$ARCH/" -e "s/@INSTALLED_SIZE@/$INSTALLED_KB/" \
    -e "s/@DEPENDS@/$DEPENDS/" -e "s/@BACKEND_NOTE@/$BACKEND_NOTE/" -e "s/@MAINTAINER@/${REPOMEM_DEB_MAINTAINER:-repomem maintainers <maintainers@repomem.invalid>}/" \
    "$HERE/linux/control.in" > "$ROOT/DEBIAN/control"
find "$ROOT" -type d -exec chmod 755 {} +

DEB="$OUT/repomem_${VERSION}-${REVISION}_${ARCH}.deb"
rm -f "$DEB"
COMPRESS="${REPOMEM_DEB_COMPRESS:-xz}"
dpkg-deb --root-owner-group -Z"$COMPRESS" --build "$ROOT" "$DEB" >/dev/null
rm -rf "$OUT/repomem"
cp -a "$BUNDLE" "$OUT/repomem"

log "bundle: $(du -sh "$BUNDLE" | cut -f1) installed, .deb: $(du -h "$DEB" | cut -f1) ($COMPRESS), $(( $(date +%s) - t_start )) s"
[[ "${REPOMEM_KEEP_WORK:-0}" == 1 ]] && log "work folder kept: $WORK"
echo "$DEB"
