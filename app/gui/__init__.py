"""The PySide6 desktop app: a thin shell over `repomem.core` (see docs/ARCHITECTURE.md).

Importing this package checks the Qt binding for a known reference-counting bug first (qt_compat),
because any widget code would otherwise crash the interpreter after enough Qt calls.
"""

from .qt_compat import guard_none_refcount

guard_none_refcount()
