"""Interrupting stale work (``Worker.interrupt_grace``) with real processes: a task past its
deadline, or whose stream was cancelled, sees ``cancelled()``; one that does not look is
replaced with its process after the grace, and is not run again."""

from __future__ import annotations

import time

import pytest
from sample_workers import Patient, Pid, Stuck

from pytaskqml import Coordinator

T = 30.0


def test_a_task_past_its_deadline_sees_cancelled_and_its_worker_serves_on() -> None:
    with Coordinator() as coord:
        (pid,) = coord.spawn(Patient, processes=1)
        coord.wait_workers(1, T)
        t0 = time.monotonic()
        slow = coord.submit(10.0, timeout=0.5)
        with pytest.raises(TimeoutError):
            slow.result(T)
        # The worker saw the flag and ended the task: it is free long before the 10 s.
        assert coord.submit(0.0).result(T) == ["done", pid]
        assert time.monotonic() - t0 < 5.0
        stats = coord.statistics()
        assert stats.workers_lost == 0 and stats.late == 1  # its "interrupted" answer


def test_a_stuck_task_of_a_cancelled_stream_costs_its_process_and_is_not_run_again() -> None:
    with Coordinator() as coord:
        (pid,) = coord.spawn(Stuck, processes=1)
        coord.wait_workers(1, T)
        stream = coord.stream()
        stream.put(10.0)
        # Sent to the worker (started there or not: told before it starts, it is still the
        # task that holds the worker when the grace is over).
        assert coord.wait_until(lambda s: s.in_flight == 1, T)
        t0 = time.monotonic()
        stream.cancel("not wanted")
        # Past the grace (0.3 s) the process is killed and a new one serves.
        again = coord.submit(0.0).result(T)
        back = time.monotonic() - t0
        assert again != pid and back < 10.0
        stats = coord.statistics()
        assert stats.workers_lost == 1 and stats.retried == 0 and stats.restarts == 1


def test_a_worker_that_did_not_opt_in_is_never_told() -> None:
    with Coordinator() as coord:
        (pid,) = coord.spawn(Pid, processes=1)
        coord.wait_workers(1, T)
        with pytest.raises(TimeoutError):
            coord.submit(["x", 1.0], timeout=0.2).result(T)
        assert coord.submit("y").result(T) == ["y", pid]  # after the slow one ended
        assert coord.statistics().workers_lost == 0


def test_the_running_task_of_an_abandoned_map_sees_cancelled() -> None:
    """A map() whose caller stops reading (closes the iterator) abandons its tasks: the one
    running on a worker that opted in is told, ends early, and the process serves on."""
    with Coordinator() as coord:
        (pid,) = coord.spawn(Patient, processes=1)
        coord.wait_workers(1, T)
        results = coord.map([0.0, 10.0], buffersize=2)
        assert next(results) == ["done", pid]
        assert coord.wait_until(lambda s: s.in_flight == 1, T)  # the 10 s item is at the worker
        t0 = time.monotonic()
        results.close()  # type: ignore[attr-defined]
        # Interrupted, not run to its end (10 s) nor replaced (the grace is 5 s).
        assert coord.submit(0.0).result(T) == ["done", pid]
        assert time.monotonic() - t0 < 5.0
        stats = coord.statistics()
        assert stats.workers_lost == 0 and stats.restarts == 0
