"""An exclusive, process-lifetime lock on a file (one watcher per repository).

Why an OS lock and not a pid file: the kernel drops an flock/msvcrt lock when its process dies, even
on SIGKILL or a power cut, so a crashed watcher never leaves a stale "already running" behind and
nobody has to guess whether a recorded pid was reused. The pid written into the file is only for
messages ("watcher already running (pid 123)").

Probing (`holder`) briefly takes the lock itself when it is free; `ProcessLock.acquire` therefore
retries for a moment before refusing, so a GUI that polls the status cannot make a starting watcher fail.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import errno
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            # Only "another process holds it" means held; a file system without locks (ENOLCK) is an error.
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


class LockHeld(Exception):
    """The lock belongs to another live process (its pid, when readable, is in `.pid`)."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is held by pid {pid}")
        self.path, self.pid = path, pid


def _read_pid(path: Path) -> int | None:
    # Windows locks byte 0 exclusively, so the pid lives after a padding line (byte 0 is never read).
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for word in text.split():
        if word.isdigit():
            return int(word)
    return None


class ProcessLock:
    """Hold `path` exclusively for as long as this object (or the process) lives."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, retry_s: float = 0.5) -> None:
        """Take the lock or raise LockHeld; retries briefly to ride out concurrent `holder()` probes."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + retry_s
        try:
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise LockHeld(self.path, _read_pid(self.path))
                time.sleep(0.02)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f" \n{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            _unlock(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> ProcessLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(path: Path) -> int | None:
    """The pid holding `path` (0 if held but unreadable), or None when nobody holds it (or nobody can: a
    file system without locks)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            _unlock(fd)
            return None
        return _read_pid(path) or 0
    except OSError:
        return None
    finally:
        os.close(fd)
