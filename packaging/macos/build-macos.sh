#!/usr/bin/env bash
# Build repomem.app (PyInstaller onedir .app bundle, llama.cpp with Metal) inside a .dmg.
# NOT RUN by the project's CI (no macOS machine there): a maintainer runs it on a Mac. See packaging/README.md.
#
#   packaging/macos/build-macos.sh [OUT_DIR]     (default OUT_DIR: packaging/out)
#
# Needs: macOS 12+ on Apple Silicon (arm64), Xcode command line tools (clang, iconutil, hdiutil,
# codesign), CMake, Python 3.11+ with the project installed in .venv (`make setup`).
#
# Environment:
#   PYTHON                      default .venv/bin/python
#   REPOMEM_SKIP_LLAMA_BUILD=1  keep the environment's llama-cpp-python as it is (otherwise it is rebuilt with
#                               Metal and the shader library embedded: packaging/build-llama-cpp.sh metal)
#   REPOMEM_CODESIGN_IDENTITY   "Developer ID Application: ..." to sign (ad-hoc signature otherwise)
#   REPOMEM_NOTARY_PROFILE      a `xcrun notarytool store-credentials` profile: notarize and staple the .dmg
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PKG="$(cd "$HERE/.." && pwd)"
REPO="$(cd "$PKG/.." && pwd)"
OUT="$(mkdir -p "${1:-$PKG/out}" && cd "${1:-$PKG/out}" && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
log() { printf '[build-macos] %s\n' "$*" >&2; }
die() { printf '[build-macos] error: %s\n' "$*" >&2; exit 1; }

[[ "$(uname -s)" == Darwin ]] || die "run this on macOS"
[[ "$(uname -m)" == arm64 ]] || log "warning: Intel Mac: Metal offload is not what llama.cpp targets there; CPU build"
"$PYTHON" -c 'import llama_cpp, PySide6' 2>/dev/null || die "$PYTHON lacks the app's dependencies: make setup"
"$PYTHON" -c 'import PyInstaller' 2>/dev/null || "$PYTHON" -m pip install -q "pyinstaller>=6.10,<7"

if [[ "${REPOMEM_SKIP_LLAMA_BUILD:-0}" != 1 && "$(uname -m)" == arm64 ]]; then
    PYTHON="$PYTHON" "$PKG/build-llama-cpp.sh" metal
fi

VERSION="$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$REPO/pyproject.toml")"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/repomem-macos.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

log "source snapshot and repomem wheel"
mkdir -p "$WORK/src" "$WORK/stage"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - -cf - 2>/dev/null) | tar -xf - -C "$WORK/src"
"$PYTHON" -m pip wheel --no-deps -q -w "$WORK/wheel" "$WORK/src"
"$PYTHON" -m zipfile -e "$WORK"/wheel/repomem-*.whl "$WORK/stage"

log "icon"
ICON_SVG="$REPO/app/gui/icon.svg"; [[ -f "$ICON_SVG" ]] || ICON_SVG="$PKG/linux/repomem.svg"
"$PYTHON" "$PKG/render-icons.py" iconset "$ICON_SVG" "$WORK/repomem.iconset"
iconutil -c icns "$WORK/repomem.iconset" -o "$WORK/repomem.icns"

log "PyInstaller (.app)"
(cd "$WORK" && REPOMEM_STAGE="$WORK/stage" REPOMEM_VERSION="$VERSION" REPOMEM_ICON="$WORK/repomem.icns" \
    "$PYTHON" -m PyInstaller --noconfirm --clean --log-level WARN --distpath "$WORK/dist" --workpath "$WORK/pyi" \
    "$PKG/repomem.spec")
APP="$WORK/dist/repomem.app"
[[ -d "$APP" ]] || die "PyInstaller produced no repomem.app"

log "self-check"
env -i PATH=/usr/bin:/bin HOME="$WORK" REPOMEM_HOME="$WORK/smoke" REPOMEM_MODEL=/nonexistent \
    "$APP/Contents/MacOS/repomem" doctor --json > "$WORK/doctor.json" || true
"$PYTHON" - "$WORK/doctor.json" <<'EOF' || die "bundle self-check failed"
import json, platform, sys
d = json.load(open(sys.argv[1]))
assert d["native"]["loaded"], d["native"]
backend = d["gpu"]["backend"]
print(f"[build-macos] native extension loaded; llama.cpp backend {backend}", file=sys.stderr)
if platform.machine() == "arm64":
    assert backend == "Metal", f"expected the Metal backend, got {backend}: {d['gpu']['system_info']}"
EOF

log "signing"
# PyInstaller signed every binary ad hoc; a Developer ID signature with the hardened runtime is what
# Gatekeeper and notarization want. --deep is acceptable for a PyInstaller .app (no nested bundles).
IDENTITY="${REPOMEM_CODESIGN_IDENTITY:--}"
codesign --force --deep --options runtime --timestamp=none --entitlements "$HERE/entitlements.plist" \
    --sign "$IDENTITY" "$APP"
codesign --verify --deep --strict "$APP"

log "disk image"
DMG="$OUT/repomem-$VERSION-macos-$(uname -m).dmg"
mkdir -p "$WORK/dmg"
cp -R "$APP" "$WORK/dmg/"
ln -s /Applications "$WORK/dmg/Applications"
rm -f "$DMG"
hdiutil create -volname "repomem $VERSION" -srcfolder "$WORK/dmg" -fs HFS+ -format UDZO -ov "$DMG" >/dev/null
if [[ "$IDENTITY" != "-" ]]; then codesign --sign "$IDENTITY" "$DMG"; fi
if [[ -n "${REPOMEM_NOTARY_PROFILE:-}" ]]; then
    xcrun notarytool submit "$DMG" --keychain-profile "$REPOMEM_NOTARY_PROFILE" --wait
    xcrun stapler staple "$DMG"
fi
log "app: $(du -sh "$APP" | cut -f1), dmg: $(du -h "$DMG" | cut -f1)"
echo "$DMG"
