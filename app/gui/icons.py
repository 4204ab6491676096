"""The app's icon (an SVG shipped in this package, see pyproject package-data)."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtGui import QIcon, QPixmap

ICON_PATH = Path(__file__).with_name("icon.svg")


def app_icon() -> QIcon:
    """The window and tray icon; a plain square if the SVG plugin is missing, never an empty icon."""
    icon = QIcon(str(ICON_PATH))
    if icon.isNull() or not icon.availableSizes() and icon.pixmap(32, 32).isNull():
        pix = QPixmap(32, 32)
        pix.fill()
        icon = QIcon(pix)
    return icon
