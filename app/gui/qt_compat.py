"""Work around a PySide6 reference-counting bug that kills the app after a few thousand Qt calls.

Why: with PySide6 6.12 on Python 3.11, a Qt method that returns void hands back `None`, and
`Signal.emit()` hands back `True`, without taking a reference to them (harmless on Python >= 3.12,
where these singletons are immortal). None and True start with a few thousand references, so a
streaming chat view exhausts them within a minute and the interpreter aborts ("Fatal Python error:
none_dealloc" / "bool_dealloc"). We detect the bug at import time and, only when it is present,
give None, True and False a reference count they can never lose, as Python 3.12 does.
PySide6 6.11 does not have the bug.
"""

from __future__ import annotations

import ctypes
import sys

_PROBE_CALLS = 64
_IMMORTAL = 1 << 40


def singleton_refcount_leak() -> dict[str, int]:
    """References to None / True that `_PROBE_CALLS` void calls / emits lose (all 0 on a healthy binding)."""
    from PySide6.QtCore import QObject, Signal

    class _Probe(QObject):
        ping = Signal()

    obj = _Probe()
    before_none = sys.getrefcount(None)
    for _ in range(_PROBE_CALLS):
        obj.setObjectName("probe")
    after_none = sys.getrefcount(None)
    before_true = sys.getrefcount(True)
    for _ in range(_PROBE_CALLS):
        obj.ping.emit()
    after_true = sys.getrefcount(True)
    return {"None": max(0, before_none - after_none), "True": max(0, before_true - after_true)}


def guard_none_refcount() -> bool:
    """Make None, True and False effectively immortal if the binding leaks them; True if it did."""
    if sys.version_info >= (3, 12):
        return False
    leaks = singleton_refcount_leak()
    if max(leaks.values()) < _PROBE_CALLS // 2:
        return False
    for obj in (None, True, False):
        ctypes.c_ssize_t.from_address(id(obj)).value += _IMMORTAL
    return True
