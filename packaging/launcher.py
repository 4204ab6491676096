"""Entry point of the frozen bundle (PyInstaller runs this as the executable's main script).

It is `repomem = repomem.app.cli:main` plus the few things a frozen app must do itself:

* ``repomem -m MODULE [ARGS...]`` behaves like ``python -m MODULE``. repomem re-launches itself with
  ``[sys.executable, "-m", ...]`` (the AMX crash probe in ``repomem.core.amx_guard``, the detached
  watcher in ``repomem.core.watch_status``); inside a bundle ``sys.executable`` is this executable,
  so it has to understand ``-m``. Only modules that are in the bundle can run.
* Models beside the bundle: when ``REPOMEM_MODELS_DIR`` is not set and a ``models`` folder sits next
  to the install (``<bundle>/models``; for a macOS ``.app`` also ``<folder of the .app>/models``),
  it becomes ``REPOMEM_MODELS_DIR``. A portable copy (USB stick, unpacked archive) then carries its
  models with it, and nothing is downloaded.
* Linux: the system's CA certificates (``SSL_CERT_FILE``) instead of only the bundled certifi list, as a
  distribution's Python would, so downloads work behind a proxy whose CA the administrator installed.
* macOS: ``GGML_METAL_PATH_RESOURCES`` for a llama.cpp whose Metal shaders are not embedded.
* Child processes that are *not* repomem (a browser opened by Qt, ``xdg-open``, ``git``) must not
  inherit the bundle's ``LD_LIBRARY_PATH``: the bootloader set it for this process only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _bundle_roots() -> list[Path]:
    exe_dir = Path(sys.executable).resolve().parent
    roots = [exe_dir]
    # macOS: <X>.app/Contents/MacOS/repomem -> also look beside <X>.app
    if exe_dir.name == "MacOS" and exe_dir.parent.name == "Contents" and exe_dir.parent.parent.suffix == ".app":
        roots.append(exe_dir.parent.parent.parent)
    return roots


def _models_beside_bundle() -> None:
    if os.environ.get("REPOMEM_MODELS_DIR"):
        return
    for root in _bundle_roots():
        candidate = root / "models"
        if candidate.is_dir():
            os.environ["REPOMEM_MODELS_DIR"] = str(candidate)
            return


def _clean_child_environment() -> None:
    """Undo the bootloader's LD_LIBRARY_PATH for children (this process already resolved its libraries).

    repomem's own children re-enter the bootloader, which sets it again for them."""
    if sys.platform.startswith("linux") or sys.platform.startswith("freebsd"):
        orig = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
        if orig is not None:
            os.environ["LD_LIBRARY_PATH"] = orig
        elif os.environ.get("LD_LIBRARY_PATH") == getattr(sys, "_MEIPASS", None):
            del os.environ["LD_LIBRARY_PATH"]


_SYSTEM_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Arch, Gentoo
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # Alpine
)


def _system_certificates() -> None:
    """Trust what the system trusts (Linux): httpx would otherwise use the bundled certifi list only, and a
    model download behind a TLS-inspecting proxy with a company CA (installed system-wide) would fail."""
    if not sys.platform.startswith("linux") or os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        return
    for ca in _SYSTEM_CA_FILES:
        if os.path.isfile(ca):
            os.environ["SSL_CERT_FILE"] = ca
            return


def _metal_resources() -> None:
    """macOS: a llama.cpp built without GGML_METAL_EMBED_LIBRARY looks for ggml-metal.metal/default.metallib
    next to the running executable, not next to libggml-metal; point it at the bundled llama_cpp/lib."""
    if sys.platform != "darwin" or os.environ.get("GGML_METAL_PATH_RESOURCES"):
        return
    lib = Path(getattr(sys, "_MEIPASS", "")) / "llama_cpp" / "lib"
    if (lib / "ggml-metal.metal").is_file() or (lib / "default.metallib").is_file():
        os.environ["GGML_METAL_PATH_RESOURCES"] = str(lib)


def _run_module(argv: list[str]) -> None:
    """`python -m MODULE ARGS...`: the module runs as __main__ with sys.argv[0] set to its file."""
    import runpy

    if not argv:
        sys.exit("repomem: -m needs a module name")
    module, rest = argv[0], argv[1:]
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    sys.exit(0)


def _gui_by_default() -> bool:
    """The windowed Windows executable (`repomem-gui.exe`) and a double-clicked macOS `.app` start the GUI."""
    exe = Path(sys.executable)
    return exe.stem.endswith("-gui") or any(p.suffix == ".app" for p in exe.resolve().parents)


def _windowed_output() -> None:
    """A windowed executable has no console: sys.stdout/sys.stderr are None and any print would fail."""
    if sys.stdout is not None and sys.stderr is not None:
        return
    try:
        from repomem.core import paths

        log = open(paths.home() / "gui.log", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    except Exception:  # noqa: BLE001
        log = open(os.devnull, "w")  # noqa: SIM115
    sys.stdout = sys.stdout or log
    sys.stderr = sys.stderr or log


def main() -> None:
    if sys.platform == "darwin":  # old Finder launches add a process serial number argument
        sys.argv[1:] = [arg for arg in sys.argv[1:] if not arg.startswith("-psn_")]
    args = sys.argv[1:]
    if getattr(sys, "frozen", False):
        _models_beside_bundle()
        _clean_child_environment()
        _system_certificates()
        _metal_resources()
        _windowed_output()
        if not args and _gui_by_default():
            sys.argv.append("gui")
            args = ["gui"]
    if args[:1] == ["-m"]:
        _run_module(args[1:])
    if args[:1] and args[0].startswith("-m") and len(args[0]) > 2:  # `-mMODULE`, as python accepts
        _run_module([args[0][2:], *args[1:]])
    from repomem.app.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
