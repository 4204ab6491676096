"""Render the SVG app icon for the platform packages (Qt's SVG renderer, offscreen; no other tool).

  render-icons.py hicolor ICON.svg THEME_DIR SIZE...   THEME_DIR/<n>x<n>/apps/repomem.png (Linux)
  render-icons.py iconset ICON.svg OUT.iconset         the PNG set `iconutil -c icns` turns into an .icns (macOS)
  render-icons.py ico ICON.svg OUT.ico                 a 256x256 Windows icon (Windows scales it down)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtGui import QGuiApplication, QImage, QPainter  # noqa: E402
from PySide6.QtSvg import QSvgRenderer  # noqa: E402


def render(renderer: QSvgRenderer, size: int) -> QImage:
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    return image


def save(image: QImage, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not image.save(str(path), fmt):
        raise SystemExit(f"render-icons: cannot write {path} ({fmt})")


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    mode, svg, out = argv[0], argv[1], Path(argv[2])
    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])  # noqa: F841 - QPainter needs one
    renderer = QSvgRenderer(svg)
    if not renderer.isValid():
        print(f"render-icons: cannot read {svg}", file=sys.stderr)
        return 1
    if mode == "hicolor":
        for size in (int(s) for s in argv[3:]):
            save(render(renderer, size), out / f"{size}x{size}" / "apps" / "repomem.png", "PNG")
    elif mode == "iconset":
        for size in (16, 32, 128, 256, 512):
            save(render(renderer, size), out / f"icon_{size}x{size}.png", "PNG")
            save(render(renderer, size * 2), out / f"icon_{size}x{size}@2x.png", "PNG")
    elif mode == "ico":
        save(render(renderer, 256), out, "ICO")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
