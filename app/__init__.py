"""repomem's shells: the `repomem` CLI (`cli.py`) and the desktop app (`gui/`). All logic lives in core."""
