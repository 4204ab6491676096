"""The server's fair queue with real threads: round-robin per client, a bound, cancelling."""

from __future__ import annotations

import threading
import time

import pytest

from repomem.app.server.queue import FairQueue, QueueFull


def _blocker(gate: threading.Event, order: list[str], name: str):
    def job(cancel: threading.Event) -> str:
        order.append(name)
        gate.wait(10)
        return name

    return job


def _wait_running(q: FairQueue, client: str) -> None:
    deadline = time.monotonic() + 5
    while q.stats()["running"] != client:
        assert time.monotonic() < deadline, q.stats()
        time.sleep(0.01)


def test_clients_take_turns_instead_of_first_come_first_served() -> None:
    q = FairQueue(max_waiting=8)
    gate, order = threading.Event(), []
    try:
        first = q.submit("agent", _blocker(gate, order, "agent-1"))
        _wait_running(q, "agent")
        tickets = [q.submit("agent", _blocker(gate, order, f"agent-{i}")) for i in (2, 3)]
        tickets.append(q.submit("person", _blocker(gate, order, "person-1")))
        assert q.stats()["waiting_by_client"] == {"agent": 2, "person": 1}
        gate.set()
        assert [t.future.result(10) for t in [first, *tickets]] == ["agent-1", "agent-2", "agent-3", "person-1"]
        # the person waited behind one of the agent's requests, not behind all of them
        assert order == ["agent-1", "person-1", "agent-2", "agent-3"]
        assert q.stats()["served"] == 4
    finally:
        gate.set()
        q.close()


def test_a_full_queue_refuses_with_a_retry_time_and_a_cancelled_job_leaves_it() -> None:
    q = FairQueue(max_waiting=2)
    gate, order = threading.Event(), []
    try:
        q.submit("a", _blocker(gate, order, "running"))
        _wait_running(q, "a")
        waiting = q.submit("a", _blocker(gate, order, "w1"))
        q.submit("b", _blocker(gate, order, "w2"))
        with pytest.raises(QueueFull) as full:
            q.submit("c", _blocker(gate, order, "refused"))
        assert full.value.retry_after >= 1 and q.stats()["rejected"] == 1
        q.cancel(waiting)  # its client went away: the place is free at once
        assert waiting.future.cancelled() and q.stats()["waiting"] == 1
        late = q.submit("c", _blocker(gate, order, "w3"))
        gate.set()
        assert late.future.result(10) == "w3"
        assert "w1" not in order and "refused" not in order
    finally:
        gate.set()
        q.close()


def test_cancelling_a_running_job_sets_its_event() -> None:
    q = FairQueue()
    started = threading.Event()

    def long_job(cancel: threading.Event) -> str:
        started.set()
        return "stopped" if cancel.wait(10) else "ran out"

    try:
        t = q.submit("a", long_job)
        assert started.wait(5)
        t0 = time.monotonic()
        q.cancel(t)
        assert t.future.result(5) == "stopped" and time.monotonic() - t0 < 1
        deadline = time.monotonic() + 2
        while q.stats()["cancelled"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        q.close()
