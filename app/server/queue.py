"""One process, one model: every model job goes through one fair, bounded queue.

Why round-robin per client and not first-come: an agent that fires ten requests must not make the
person typing in another editor wait behind all ten. Waiting jobs sit in one line per client
(`clients.py` says who is who); the worker takes the head of the line of the client served longest
ago. A full queue refuses at once (the HTTP layer answers 503 with Retry-After) instead of letting
requests pile up for minutes.
Each job gets a `cancel` event: setting it removes a waiting job, and a running generation stops at
its next token (`RepoMemory.ask` checks it).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from repomem.core import CancelledError, RepomemError

log = logging.getLogger(__name__)
DEFAULT_JOB_S = 5.0  # Retry-After guess before any job has finished
MAX_REMEMBERED_CLIENTS = 256


class QueueFull(RepomemError):
    """Too many waiting jobs; `retry_after` is a whole number of seconds worth waiting."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are already waiting for the model; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(RepomemError):
    """The server is stopping: no new job is taken."""


@dataclass(eq=False)
class Ticket:
    client: str
    fn: Callable[[threading.Event], Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)


class FairQueue:
    """Runs `fn(cancel)` jobs on one worker thread, round-robin over clients, at most `max_waiting` waiting."""

    def __init__(self, max_waiting: int = 8, *, name: str = "repomem-serve-queue"):
        self.max_waiting = max_waiting
        self._lines: OrderedDict[str, deque[Ticket]] = OrderedDict()
        self._cond = threading.Condition()
        self._running: Ticket | None = None
        self._running_since = 0.0
        self._closed = False
        self._durations: deque[float] = deque(maxlen=16)
        self._turns: dict[str, int] = {}  # client -> when it was last served (a counter)
        self._turn = 0
        self.served = self.rejected = self.cancelled = 0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # -- callers --------------------------------------------------------------------------------
    def submit(self, client: str, fn: Callable[[threading.Event], Any]) -> Ticket:
        """Queue a job for `client`; raises QueueFull when `max_waiting` jobs already wait."""
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            waiting = self._waiting()
            if waiting >= self.max_waiting:
                self.rejected += 1
                raise QueueFull(waiting, self._retry_after(waiting))
            ticket = Ticket(client, fn)
            self._lines.setdefault(client, deque()).append(ticket)
            self._cond.notify_all()
            return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: drop the job if it waits, stop it at its next token if it runs."""
        ticket.cancel.set()
        with self._cond:
            line = self._lines.get(ticket.client)
            if line is not None and ticket in line:
                line.remove(ticket)
                if not line:
                    del self._lines[ticket.client]
                self.cancelled += 1
                ticket.future.cancel()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            running = self._running
            return {
                "running": running.client if running else None,
                "running_s": round(time.monotonic() - self._running_since, 2) if running else 0.0,
                "waiting": self._waiting(),
                "waiting_by_client": {c: len(line) for c, line in self._lines.items()},
                "max_waiting": self.max_waiting,
                "served": self.served,
                "rejected": self.rejected,
                "cancelled": self.cancelled,
            }

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what runs and what waits; wait for the worker to end."""
        with self._cond:
            self._closed = True
            if self._running is not None:
                self._running.cancel.set()
            for line in self._lines.values():
                for t in line:
                    t.cancel.set()
                    t.future.cancel()
            self._lines.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- worker ---------------------------------------------------------------------------------
    def _waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def _retry_after(self, waiting: int) -> int:
        per_job = sum(self._durations) / len(self._durations) if self._durations else DEFAULT_JOB_S
        return max(1, min(600, math.ceil(per_job * (waiting + 1))))

    def _take(self) -> Ticket | None:
        """The head of the line of the client served longest ago (or never). Caller holds _cond."""
        while not self._closed and not self._lines:
            self._cond.wait()
        if self._closed:
            return None
        client = min(self._lines, key=lambda c: self._turns.get(c, -1))  # ties: the line that formed first
        line = self._lines[client]
        ticket = line.popleft()
        if not line:
            del self._lines[client]
        self._turn += 1
        self._turns[client] = self._turn
        if len(self._turns) > MAX_REMEMBERED_CLIENTS:
            for c in sorted(self._turns, key=self._turns.__getitem__)[: len(self._turns) // 2]:
                if c not in self._lines:
                    del self._turns[c]
        return ticket

    def _work(self) -> None:
        while True:
            with self._cond:
                ticket = self._take()
                if ticket is None:
                    return
                self._running, self._running_since = ticket, time.monotonic()
            try:
                if ticket.future.set_running_or_notify_cancel():
                    self._run(ticket)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, ticket: Ticket) -> None:
        t0 = time.monotonic()
        try:
            if ticket.cancel.is_set():
                raise CancelledError("cancelled before it started")
            result = ticket.fn(ticket.cancel)
        except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the caller
            ticket.future.set_exception(exc)
            if ticket.cancel.is_set():
                self.cancelled += 1
            elif not isinstance(exc, RepomemError):
                log.exception("request failed")
        else:
            ticket.future.set_result(result)
            if ticket.cancel.is_set():  # stopped early (a generation returns what it had)
                self.cancelled += 1
            else:
                self.served += 1
                self._durations.append(time.monotonic() - t0)
