"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


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
