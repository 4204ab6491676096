"""Start the desktop app: `repomem gui [PATH]`, or its scripted mode (`--ask`, `--screenshot`).

Why separate from the window: the application object, signal handling, the first-run offer and the
exit code are process concerns; the window stays constructible many times in one process (tests).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from PySide6.QtCore import QTimer, QtMsgType, qInstallMessageHandler
from PySide6.QtWidgets import QApplication

from .icons import app_icon

_QUIET = ("propagateSizeHints",)  # the offscreen platform's notice, printed once per window


def _qt_messages(kind: QtMsgType, _context: object, message: str) -> None:
    """Qt's own warnings go to stderr as usual, minus known noise that would garble a one-line error."""
    if kind == QtMsgType.QtDebugMsg or any(q in message for q in _QUIET):
        return
    print(f"qt: {message}", file=sys.stderr)


def _application() -> QApplication:
    qInstallMessageHandler(_qt_messages)
    app = QApplication.instance()
    if app is None:
        app = QApplication(sys.argv[:1])
    app.setApplicationName("repomem")
    app.setApplicationDisplayName("repomem")
    app.setOrganizationName("repomem")
    app.setWindowIcon(app_icon())
    return app  # type: ignore[return-value]


def _let_python_handle_signals(app: QApplication) -> QTimer:
    """Ctrl+C in the terminal quits: Qt's loop must hand control to Python now and then to see it."""
    signal.signal(signal.SIGINT, lambda *_: app.quit())
    timer = QTimer()
    timer.start(250)
    timer.timeout.connect(lambda: None)
    return timer


def _first_run(window) -> None:  # noqa: ANN001 - MainWindow
    """No usable model: explain and offer the download (or a GGUF file) before anything else."""
    from .model_setup import FirstRunDialog, model_problem, start_download

    problem = model_problem(window.settings.model)
    if not problem:
        return
    dialog = FirstRunDialog(problem, window)
    dialog.exec()
    if dialog.choice == FirstRunDialog.DOWNLOAD:
        job = start_download(window)
        job.succeeded.connect(lambda _p: window._show_model())
    elif dialog.choice == FirstRunDialog.CHOOSE and dialog.chosen_path:
        s = window.settings
        s.model = dialog.chosen_path
        window.save_settings(s)


def run_gui(path: str | None = None, *, ask: str | None = None, screenshot: str | None = None,
            mode: str | None = None, timeout_s: float = 0, panel: str | None = None) -> int:
    """Run the app; returns the process exit code. Scripted when `ask` or `screenshot` is given."""
    app = _application()
    from .main_window import MainWindow

    scripted = bool(ask or screenshot)
    if scripted and not path:
        print("error: --ask/--screenshot need a repository PATH", file=sys.stderr)
        return 2
    if path and not Path(path).expanduser().is_dir():
        print(f"error: not a folder: {path}", file=sys.stderr)
        return 2
    if scripted:
        window = MainWindow(watch=False, restore_repos=False, persist=False, tray=False)
    else:
        window = MainWindow()
    if mode:
        window.chat.set_mode(mode)
    app.aboutToQuit.connect(window.shutdown)
    app.setQuitOnLastWindowClosed(not (window.settings.close_to_tray and window.tray and window.tray.available))
    keep = _let_python_handle_signals(app)
    window.resize(1280, 820)
    window.show()
    if scripted:
        from .scripted import ScriptedRun

        run = ScriptedRun(window, path or "", ask, screenshot, mode, timeout_s, panel=panel)
        QTimer.singleShot(0, run.start)
        code = app.exec()
        window.shutdown()
        if run.exit_code is None:
            run.exit_code, run.message = 1, "the window was closed before the answer arrived"
        if run.exit_code:
            print(f"error: {run.message}", file=sys.stderr)
        elif screenshot:
            print(str(Path(screenshot).expanduser().resolve()))
        del keep
        return run.exit_code or code
    if path:
        QTimer.singleShot(0, lambda: window.add_repository(path))
    QTimer.singleShot(0, lambda: _first_run(window))
    code = app.exec()
    window.shutdown()
    del keep
    return code
