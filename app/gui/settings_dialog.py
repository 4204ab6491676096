"""The settings dialog: model, threads, context, GPU layers, KV type, memory mode, payload encoding, keep
ratio, editor.

Why it edits a copy: the dialog returns a new `Settings` only on OK; the main window saves it with
`core.settings.save` (the same JSON file the CLI and the watcher read) and reopens the memories with
it. Every field's tooltip says what it changes, because most users never read a manual.
"""

from __future__ import annotations

import copy
import os

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from repomem.core.settings import CACHE_TYPES, ENCODINGS, MODES

from .model_setup import pick_gguf, start_download


class SettingsDialog(QDialog):
    def __init__(self, settings, parent: QWidget | None = None) -> None:  # noqa: ANN001 - core Settings
        super().__init__(parent)
        self.setWindowTitle("repomem — Settings")
        self.original = settings
        self.setMinimumWidth(640)

        self.model = QComboBox()
        self.model.setObjectName("modelCombo")
        self.model.setToolTip("The GGUF model that answers and compiles memories")
        self.model.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model.setMinimumContentsLength(28)
        self._fill_models(settings.model)
        add = QPushButton("Add GGUF…")
        add.clicked.connect(self._add_gguf)
        fetch = QPushButton("Download default…")
        fetch.setToolTip("Fetch the recommended model (verified by SHA-256)")
        fetch.clicked.connect(self._download)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model, 1)
        model_row.addWidget(add)
        model_row.addWidget(fetch)

        self.threads = QSpinBox()
        self.threads.setRange(0, 256)
        self.threads.setSpecialValueText("automatic")
        self.threads.setValue(settings.n_threads)
        self.threads.setToolTip("CPU threads for the model (0 = automatic)")
        self.n_ctx = QSpinBox()
        self.n_ctx.setRange(512, 262144)
        self.n_ctx.setSingleStep(1024)
        self.n_ctx.setValue(settings.n_ctx)
        self.n_ctx.setToolTip("Context window in tokens: memory + question + answer must fit")
        self.gpu_layers = QSpinBox()
        self.gpu_layers.setRange(-1, 999)
        self.gpu_layers.setSpecialValueText("all (when a GPU is present)")
        self.gpu_layers.setValue(settings.n_gpu_layers)
        self.gpu_layers.setToolTip("Model layers offloaded to the GPU (-1 = all, 0 = CPU only)")
        self.cache_type = QComboBox()
        self.cache_type.addItems(CACHE_TYPES)
        self.cache_type.setCurrentText(settings.cache_type)
        self.cache_type.setToolTip("KV cache precision of the model context (q8_0 halves its memory)")
        self.mode = QComboBox()
        self.mode.addItems(MODES)
        self.mode.setCurrentText(settings.mode)
        self.mode.setToolTip("kv: splice compiled memory (fast) · text: memory as prompt text · none: no memory")
        self.encoding = QComboBox()
        for name in ENCODINGS:
            self.encoding.addItem(name, name)
        self.encoding.setCurrentIndex(max(0, self.encoding.findData(settings.encoding)))
        self.encoding.setToolTip("How compiled memories are stored, from the largest (f16, exact) to the smallest "
                                 "(q2): smaller keeps more of a repository compiled on the disk budget. Changing "
                                 "it re-encodes existing memories in the background.")
        self.keep_ratio = QDoubleSpinBox()
        self.keep_ratio.setRange(0.05, 1.0)
        self.keep_ratio.setSingleStep(0.05)
        self.keep_ratio.setDecimals(2)
        self.keep_ratio.setValue(settings.keep_ratio)
        self.keep_ratio.setToolTip("Share of each memory's tokens kept when compiling to KV (1.0 = all)")
        self.top_k = QSpinBox()
        self.top_k.setRange(1, 50)
        self.top_k.setValue(settings.top_k)
        self.top_k.setToolTip("Memories retrieved per question")
        self.editor = QLineEdit(settings.editor_command)
        self.editor.setPlaceholderText("system opener — or e.g.  code -g {path}:{line}")
        self.editor.setToolTip("Command that opens a source at a line; {path} and {line} are filled in")
        self.close_to_tray = QCheckBox("Keep watching in the tray when the window is closed")
        self.close_to_tray.setChecked(settings.close_to_tray)

        form = QFormLayout()
        form.addRow("Model:", model_row)
        form.addRow("Threads:", self.threads)
        form.addRow("Context size:", self.n_ctx)
        form.addRow("GPU layers:", self.gpu_layers)
        form.addRow("KV cache type:", self.cache_type)
        form.addRow("Memory mode:", self.mode)
        form.addRow("Memory encoding:", self.encoding)
        form.addRow("Keep ratio:", self.keep_ratio)
        form.addRow("Memories per question:", self.top_k)
        form.addRow("Editor command:", self.editor)
        form.addRow("", self.close_to_tray)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(buttons)

    def _fill_models(self, current: str) -> None:
        from repomem.core import models

        self.model.clear()
        env = os.environ.get("REPOMEM_MODEL")
        self.model.addItem(f"Automatic ({'$REPOMEM_MODEL' if env else 'default model'})", "")
        for m in models.installed():
            tag = " — default" if m["default"] else ""
            state = "" if m["state"] == "ok" else f" ({m['state']})"
            self.model.addItem(f"{m['title']}{tag}{state}", m["name"])
        if current and self.model.findData(current) < 0:
            self.model.addItem(current, current)
        self.model.setCurrentIndex(max(0, self.model.findData(current)))

    def _add_gguf(self) -> None:
        path = pick_gguf(self)
        if path:
            if self.model.findData(path) < 0:
                self.model.addItem(path, path)
            self.model.setCurrentIndex(self.model.findData(path))

    def _download(self) -> None:
        job = start_download(self)
        job.succeeded.connect(lambda _path: self._fill_models(str(self.model.currentData() or "")))

    def result_settings(self):  # noqa: ANN201 - core Settings
        """A copy of the original settings with the dialog's values (validated by core)."""
        s = copy.deepcopy(self.original)
        s.model = str(self.model.currentData() or "")
        s.n_threads = self.threads.value()
        s.n_ctx = self.n_ctx.value()
        s.n_gpu_layers = self.gpu_layers.value()
        s.cache_type = self.cache_type.currentText()
        s.mode = self.mode.currentText()
        s.encoding = str(self.encoding.currentData())
        s.keep_ratio = round(self.keep_ratio.value(), 2)
        s.top_k = self.top_k.value()
        s.editor_command = self.editor.text().strip()
        s.close_to_tray = self.close_to_tray.isChecked()
        return s.validate()
