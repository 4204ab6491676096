"""Getting a model: the first-run offer, the download with progress, and "is a model usable?".

Why a module of its own: a download is half a gigabyte; it must run on a worker thread with a
progress dialog that can cancel it, and the first run must explain what is being downloaded and how
big it is before asking. core's `models.fetch` does the work (hub first, PyPI fallback, sha256).
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QLabel,
    QMessageBox,
    QProgressDialog,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .jobs import Job, run_detached


def model_problem(model: str = "") -> str:
    """Why no model can be loaded ("" when one can): missing download, bad path."""
    from repomem.core import RepomemError, resolve_model

    try:
        resolve_model(model or None)
    except RepomemError as exc:
        return str(exc)
    return ""


def _fetch(name: str | None, job: Job) -> Any:
    from repomem.core import CancelledError, models

    def progress(done: int, total: int) -> None:
        if job.cancel.is_set():
            raise CancelledError("download cancelled")  # unwinds fetch; its .part file is resumable
        job.report("download", done, total)

    return models.fetch(name, progress=progress, log=lambda msg: job.report(str(msg), -1, -1))


def start_download(parent: QWidget | None, name: str | None = None) -> Job:
    """Fetch a catalogue model on a worker thread behind a cancellable progress dialog."""
    from repomem.core import models

    spec = models.spec(name)
    dialog = QProgressDialog(f"Downloading {spec.title} ({spec.size / 1e6:,.0f} MB)…", "Cancel", 0, 1000, parent)
    dialog.setWindowTitle("repomem — model download")
    dialog.setWindowModality(Qt.WindowModality.WindowModal)
    dialog.setMinimumDuration(0)
    dialog.setAutoClose(False)
    dialog.setAutoReset(False)
    job = Job(lambda j: _fetch(spec.name, j), name="download")

    def on_progress(stage: str, done: int, total: int) -> None:
        if done < 0:  # a log line ("trying the hub", "verifying")
            dialog.setLabelText(f"{spec.title}\n{stage}")
            return
        if total > 0:
            dialog.setValue(int(done * 1000 / total))
            dialog.setLabelText(f"Downloading {spec.title}\n{done / 1e6:,.0f} of {total / 1e6:,.0f} MB")

    job.progress.connect(on_progress)
    dialog.canceled.connect(job.cancel.set)
    job.finished.connect(dialog.close)
    job.failed.connect(lambda msg: QMessageBox.warning(parent, "Download failed", msg))
    dialog.show()
    return run_detached(job)


class FirstRunDialog(QDialog):
    """No usable model: explain, then offer the download (with its size) or a GGUF file of one's own."""

    DOWNLOAD, CHOOSE, LATER = 1, 2, 0

    def __init__(self, problem: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from repomem.core import models

        spec = models.spec(None)
        self.setWindowTitle("Welcome to repomem")
        self.choice = self.LATER
        self.chosen_path = ""
        text = QLabel(
            "<h3>repomem needs a local model</h3>"
            "<p>Answers are written by a small coding model that runs on this computer; nothing leaves it.</p>"
            f"<p>Recommended: <b>{spec.title}</b> — a <b>{spec.size / 1e6:,.0f} MB</b> download "
            f"({spec.licence}), verified by its SHA-256 before use.</p>"
            f"<p style='color:#6e7781'>{problem}</p>")
        text.setWordWrap(True)
        buttons = QDialogButtonBox()
        download = QPushButton(f"Download ({spec.size / 1e6:,.0f} MB)")
        download.setDefault(True)
        choose = QPushButton("Use a GGUF file…")
        later = QPushButton("Later")
        buttons.addButton(download, QDialogButtonBox.ButtonRole.AcceptRole)
        buttons.addButton(choose, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.addButton(later, QDialogButtonBox.ButtonRole.RejectRole)
        download.clicked.connect(lambda: self._done(self.DOWNLOAD))
        choose.clicked.connect(self._choose)
        later.clicked.connect(lambda: self._done(self.LATER))
        layout = QVBoxLayout(self)
        layout.addWidget(text)
        layout.addWidget(buttons)
        self.setMinimumWidth(460)

    def _choose(self) -> None:
        path = pick_gguf(self)
        if path:
            self.chosen_path = path
            self._done(self.CHOOSE)

    def _done(self, choice: int) -> None:
        self.choice = choice
        self.accept() if choice else self.reject()


def pick_gguf(parent: QWidget | None) -> str:
    path, _ = QFileDialog.getOpenFileName(parent, "Choose a GGUF model", "", "GGUF models (*.gguf);;All files (*)")
    return path
