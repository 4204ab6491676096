"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""

from errno import ENOLCK


class RepomemError(Exception):
    """Base class: the message is complete and meant for the user, no traceback needed."""


class ModelError(RepomemError):
    """A model file is missing, corrupt, not a GGUF, or cannot be loaded."""


class StoreError(RepomemError):
    """The MemCube store or one of its payload files is unusable."""


class ContextOverflowError(RepomemError):
    """Memory plus question do not fit in the model's context window."""


class CancelledError(RepomemError):
    """The user stopped a generation or a compile."""


class DiskFullError(StoreError):
    """The disk (or the user's quota) holding the data home is full."""


class ReadOnlyStoreError(StoreError):
    """The data home cannot be written: memory can be read and searched, not changed."""


class StoreDamagedError(StoreError):
    """A store database is corrupt; `repomem check PATH --repair` rebuilds what it can."""


_FULL_ERRNOS = {28, 122, 27}  # ENOSPC, EDQUOT, EFBIG (a file-size limit reads the same to the user)
_READ_ONLY_ERRNOS = {30, 13}  # EROFS, EACCES


def storage_error(exc: BaseException, what: str, folder: object) -> StoreError:
    """The error a user can act on for an OS or SQLite failure while `what` in `folder`."""
    errno = getattr(exc, "errno", None)
    text = str(exc).lower()
    if errno in _FULL_ERRNOS or "disk is full" in text or "disk full" in text:
        return DiskFullError(f"{what}: the disk holding {folder} is full ({exc}); free some space")
    if errno in _READ_ONLY_ERRNOS or "readonly" in text or "read-only" in text:
        return ReadOnlyStoreError(f"{what}: {folder} is read-only ({exc}); memory can be searched, not changed")
    if errno == ENOLCK:  # a network or FUSE file system that keeps no locks
        return StoreError(f"{what}: the file system holding {folder} does not support file locks ({exc}); "
                          "point REPOMEM_HOME at a folder on a local disk")
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return StoreDamagedError(f"{what}: the database in {folder} is damaged ({exc}); "
                                 "run `repomem check <repository> --repair`")
    return StoreError(f"{what}: {exc}")
