"""Running a server: in the foreground for the CLI, on a thread for the desktop app, the tests and the
benchmark, or over stdio for `repomem mcp`.

The listening socket is bound here, before uvicorn starts, so a port in use is a clear one-line error
(and port 0 gives a free port, whose number `ServerThread.port` then tells).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from pathlib import Path

import uvicorn

from repomem.core import RepomemError, Settings

from .app import build_app
from .config import ServeConfig
from .mcp_tools import build_mcp
from .queue import FairQueue
from .repos import Repositories

log = logging.getLogger(__name__)


class Service:
    """The repositories, the queue and the app of one server; `close()` stops watchers and the queue."""

    def __init__(self, repos: Repositories, config: ServeConfig):
        config.check()
        self.config, self.repos = config, repos
        self._closed = False
        self.queue = FairQueue(config.max_queue)
        self.mcp = build_mcp(repos, self.queue)
        self.app = build_app(repos, self.queue, config, self.mcp)

    @classmethod
    def open(cls, paths: list[str | Path], config: ServeConfig, *, settings: Settings | None = None,
             model: str | None = None, watch: bool = True) -> Service:
        config.check()  # before anything is opened: a refused bind leaves no trace
        repos = Repositories.open(paths, settings=settings, model=model, watch=watch, debounce_s=config.debounce_s)
        try:
            return cls(repos, config)
        except BaseException:
            repos.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.queue.close()
        self.repos.close()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise RepomemError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _uvicorn(service: Service) -> uvicorn.Server:
    config = uvicorn.Config(service.app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=3)
    return uvicorn.Server(config)


def serve_forever(service: Service) -> None:
    """Serve until Ctrl-C / SIGTERM, then close the service (watchers stop cleanly).

    uvicorn shuts down gracefully on either signal, then raises it again for the handler that was
    there before; for SIGTERM that is this one, which ends the process normally (exit 0) through the
    `finally` below instead of the default action killing it there and then."""
    sock = bind(service.config.host, service.config.port)
    previous = signal.signal(signal.SIGTERM, _exit_normally)
    try:
        _uvicorn(service).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
        service.close()


def _exit_normally(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


class ServerThread:
    """A server on a background thread (uvicorn installs no signal handlers off the main thread)."""

    def __init__(self, service: Service):
        self.service = service
        try:
            self._sock = bind(service.config.host, service.config.port)
        except BaseException:  # a busy port: the service would keep its queue and watchers running
            service.close()
            raise
        self.port = self._sock.getsockname()[1]
        self._server = _uvicorn(service)
        self._thread = threading.Thread(target=self._run, name="repomem-serve", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host = self.service.config.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RepomemError(f"the server did not start: {self.error or 'timed out'}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop serving, then close the service (watchers, queue, memories)."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()
        self.service.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and bool(self._server.started)


def run_mcp_stdio(paths: list[str | Path], *, model: str | None = None, watch: bool = True) -> None:
    """`repomem mcp`: the tools over stdin/stdout (what editors launch); logs go to stderr only."""
    repos = Repositories.open(paths, model=model, watch=watch)
    queue = FairQueue()
    try:
        build_mcp(repos, queue).run("stdio")
    finally:
        queue.close()
        repos.close()
