"""Open a source location in the user's editor.

Why its own module: the editor command is a user setting with placeholders, and turning it into an
argv is easy to get wrong (quoting, missing placeholders); it is tested without Qt. An empty command
means the system opener (QDesktopServices), which cannot jump to a line but works everywhere.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path


def editor_argv(command: str, path: Path, line: int) -> list[str]:
    """argv for `command` with {path}, {line} (and {file} as an alias) filled in.

    A command without any placeholder gets the path appended, so "gedit" or "subl" just work.
    """
    parts = shlex.split(command)
    if not parts:
        raise ValueError("empty editor command")
    values = {"path": str(path), "file": str(path), "line": str(max(1, line))}
    has_placeholder = any("{" in p for p in parts)
    try:
        argv = [p.format(**values) for p in parts]
    except (KeyError, IndexError) as exc:  # {column}, {0}: not a placeholder this knows
        raise ValueError(f"the editor command uses {{{exc.args[0]}}}; its placeholders are {{path}}, "
                         "{file} and {line}") from None
    if not has_placeholder:
        argv.append(str(path))
    return argv


def open_location(path: Path, line: int, command: str = "") -> None:
    """Open `path` at `line` with `command`, or with the system opener when it is empty."""
    if command.strip():
        subprocess.Popen(editor_argv(command, path, line), start_new_session=True,  # noqa: S603
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QDesktopServices

    QDesktopServices.openUrl(QUrl.fromLocalFile(str(path)))
