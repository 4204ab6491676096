"""repomem core: engine, models, memory compiler, MemCube store, retrieval, answering, watch.

Nothing here imports Qt: the GUI and the CLI in `repomem.app` are thin shells over this package.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("repomem")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
