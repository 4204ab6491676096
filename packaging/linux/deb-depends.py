"""Print the Depends: line of the .deb for a PyInstaller bundle: deb-depends.py BUNDLE_DIR

The bundle carries almost every library it needs; what it links to but does not carry (glibc, the
GL/EGL stack, the X11/Wayland client libraries PyInstaller leaves to the system) must come from packages.
Each missing soname is mapped to its package on this build host (`dpkg -S`), else by Debian's naming
rule (libfoo-bar.so.4 -> libfoo-bar4, libfoo2.so.1 -> libfoo2-1). glibc gets a version floor: the newest
GLIBC_x.y symbol version any bundled file asks for.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# Loaded with dlopen() at run time, so no NEEDED entry shows them.
DLOPENED = ["libxcb-cursor0"]  # Qt >= 6.5's xcb platform plugin refuses to start without it
# Debian package names that do not follow the naming rule
KNOWN = {"libGL.so.1": "libgl1", "libEGL.so.1": "libegl1", "libOpenGL.so.0": "libopengl0",
         "libGLX.so.0": "libglx0", "libxcb.so.1": "libxcb1", "libX11.so.6": "libx11-6",
         "libfontconfig.so.1": "libfontconfig1", "libfreetype.so.6": "libfreetype6",
         "libwayland-client.so.0": "libwayland-client0", "libwayland-cursor.so.0": "libwayland-cursor0",
         "libwayland-egl.so.1": "libwayland-egl1", "libgtk-3.so.0": "libgtk-3-0", "libgdk-3.so.0": "libgtk-3-0"}
# The GPU driver's own libraries: a CUDA build links to them, but the driver (any branch, often not from a
# package) is the user's, and pinning the build host's driver package would make the .deb uninstallable elsewhere.
DRIVER_SONAMES = {"libcuda.so.1", "libnvidia-ml.so.1"}
GLIBC_SONAMES = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libutil.so.1",
                 "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "libresolv.so.2", "libcrypt.so.1"}


def elf_files(root: Path) -> list[Path]:
    out = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    out.append(p)
    return out


def needed(path: Path) -> list[str]:
    res = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", res.stdout)


def glibc_floor(paths: list[Path]) -> str | None:
    best = None
    for p in paths:
        res = subprocess.run(["readelf", "-V", str(p)], capture_output=True, text=True)
        for v in re.findall(r"Name: GLIBC_(\d+(?:\.\d+)+)", res.stdout):
            key = tuple(int(x) for x in v.split("."))
            best = max(best or key, key)
    return ".".join(map(str, best)) if best else None


def package_of(soname: str) -> str:
    if soname in KNOWN:
        return KNOWN[soname]
    res = subprocess.run(["dpkg", "-S", f"*/{soname}"], capture_output=True, text=True)
    if res.returncode == 0 and res.stdout:
        return res.stdout.splitlines()[0].split(":")[0]
    m = re.match(r"lib(.+)\.so\.(\d+)", soname)
    if not m:
        return ""
    name, major = m.group(1).lower(), m.group(2)
    return f"lib{name}-{major}" if name[-1].isdigit() else f"lib{name}{major}"


def main() -> int:
    root = Path(sys.argv[1])
    files = elf_files(root)
    carried = {p.name for p in root.rglob("*")}
    missing = sorted({n for f in files for n in needed(f)} - carried)
    packages = set(DLOPENED)
    for soname in missing:
        if soname in GLIBC_SONAMES or soname in DRIVER_SONAMES:
            continue
        pkg = package_of(soname)
        if pkg:
            packages.add(pkg)
        else:
            print(f"deb-depends: no package for {soname}", file=sys.stderr)
    floor = glibc_floor(files)
    deps = [f"libc6 (>= {floor})" if floor else "libc6"] + sorted(packages - {"libc6"})
    print(", ".join(deps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
