"""Read fields of core records whatever their shape (dataclass, sqlite row dict, named tuple).

Why: the GUI shows records that core owns (cubes, conversations, messages, answers). Reading them
through one helper keeps the shell from breaking when core returns a dict where a dataclass was
expected, or renames a field to one of the listed aliases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def pick(obj: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` that `obj` has (as a key or an attribute) and that is not None."""
    for name in names:
        if isinstance(obj, Mapping):
            value = obj.get(name)
        else:
            value = getattr(obj, name, None)
        if value is not None:
            return value
    return default

