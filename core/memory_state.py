"""What every part of `RepoMemory` may read from the facade (memory.py sets it up).

The parts (indexing.py, compiling.py, answering.py, notes.py) are mixins of `RepoMemory`; each names
here, by inheriting `MemoryState`, the shared state it works on, and declares its own private state
itself.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .conversations import ConversationStore
    from .engine import Engine
    from .prompt import Layout
    from .retrieval import BM25Index
    from .settings import Settings
    from .store import CubeStore


class MemoryState:
    root: Path
    store: CubeStore
    settings: Settings
    conversations: ConversationStore
    index_: BM25Index  # the search index over the store's active cubes
    _lock: threading.RLock  # one model operation at a time per repository
    # the model, loaded on first use
    engine: Engine
    layout: Layout
    fingerprint: str  # what a payload must have been compiled with to be spliced here
    fingerprint_bytes: bytes
