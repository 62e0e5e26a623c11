"""Scheduling with real worker processes: work-conserving dispatch, results that travel when
ready, map(timeout=), and the lifecycle states a task must survive (see DESIGN.md, Scheduling
principles). Orderings are forced with files (see sched_funcs), never with sleeps."""

from __future__ import annotations

import os
import signal
import socket
import threading
from concurrent.futures import FIRST_COMPLETED, Future, TimeoutError, wait
from pathlib import Path
from typing import Any

import pytest
import sched_funcs
from conftest import wait_for
from sched_funcs import GateModel, arrive, gate, quick, ran

from pytaskqml import ClosedError, Coordinator, Executor, Worker
from pytaskqml.wire import protocol as _protocol
from pytaskqml.wire.connection import Connection
from pytaskqml.worker.serve import WorkerServer

T = 60.0


def test_two_calls_on_two_idle_workers_run_at_once_on_two_processes(tmp_path: Path) -> None:
    """Executor(max_workers=2), a function never called before: one call per worker. Each
    call waits for the other to arrive from another process, so they return only if they ran
    at the same time on different workers."""
    with Executor(max_workers=2) as ex:
        ex.coordinator.wait_workers(2, T)
        assert ex.submit(quick, 1).result(T) == 1  # another function, measured quick
        (tmp_path / "a").mkdir()
        first = [ex.submit(arrive, str(tmp_path / "a"), 2) for _ in range(2)]
        assert len({f.result(T) for f in first}) == 2
        # Again, once the function has been measured.
        (tmp_path / "b").mkdir()
        again = [ex.submit(arrive, str(tmp_path / "b"), 2) for _ in range(2)]
        assert len({f.result(T) for f in again}) == 2


def test_after_one_quick_call_a_burst_of_slow_calls_uses_both_processes(tmp_path: Path) -> None:
    """spawn(fn, processes=2): one quick call teaches the core the function is quick; the
    burst that follows (slow arguments) must still start on both workers, not queue in one
    worker's window."""
    with Coordinator() as coord:
        coord.spawn(sched_funcs.arrive_or_quick, processes=2)
        coord.wait_workers(2, T)
        coord.submit(None).result(T)
        futures = [coord.submit([str(tmp_path), 2]) for _ in range(6)]
        pids = [f.result(T) for f in futures]
        assert len(set(pids)) == 2


def test_after_a_fast_map_a_slow_map_uses_both_workers(tmp_path: Path) -> None:
    """The same function, measured quick by a map of 2,000 items: the next map's 20 items
    (which wait for each other across processes) are chunked so that both workers get some."""
    with Coordinator() as coord:
        coord.spawn(sched_funcs.arrive_or_quick, processes=2)
        coord.wait_workers(2, T)
        assert len(list(coord.map(range(2000)))) == 2000
        pids = list(coord.map([[str(tmp_path), 2]] * 20))
        assert len(pids) == 20 and len(set(pids)) == 2


def test_an_executor_map_of_a_new_function_after_a_fast_map_uses_both_workers(
    tmp_path: Path,
) -> None:
    with Executor(max_workers=2) as ex:
        assert list(ex.map(quick, range(2000))) == list(range(2000))
        pids = list(ex.map(arrive, [str(tmp_path)] * 20, [2] * 20))
        assert len(set(pids)) == 2


def test_wait_first_completed_answers_with_the_quick_call_while_a_slow_one_runs(
    tmp_path: Path,
) -> None:
    """One worker: the quick call's result arrives while the slow call after it still runs
    there (CPython's test_first_completed, on one worker)."""
    opened = tmp_path / "gate"
    with Executor(max_workers=1) as ex:
        fast = ex.submit(quick, 42)
        slow = ex.submit(gate, str(opened))
        try:
            done, pending = wait([fast, slow], timeout=T, return_when=FIRST_COMPLETED)
            assert done == {fast} and pending == {slow} and fast.result() == 42
        finally:
            opened.touch()
        assert slow.result(T) == str(opened)


class _Gated(Worker):
    """process("slow") waits for the event; anything else returns at once."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def process(self, payload: Any) -> Any:
        if payload == "slow":
            assert self.event.wait(T)
        return payload


def test_a_worker_sends_a_finished_result_without_waiting_for_the_rest_of_its_frame() -> None:
    """A frame of three tasks - quick, slow, quick: the first result reaches the coordinator
    while the slow task still runs; the last comes after it."""
    event = threading.Event()
    ours, theirs = socket.socketpair()
    server = WorkerServer(_Gated(event))
    coord_side = Connection(ours)
    th = threading.Thread(target=server.serve_connection, args=(Connection(theirs),), daemon=True)
    th.start()
    try:
        assert coord_side.recv_within(T).op == "hello"
        header = '{"op":"run","t":[[1,"quick"],[2,"slow"],[3,"after"]]}'
        coord_side.send_frame(_protocol.encode_frame(header))
        first = _next_results(coord_side)
        assert [row[0] for row in first] == [1]  # the slow task is still running
        assert not event.is_set()
        event.set()
        rest = _next_results(coord_side)
        while len(rest) < 2:
            rest += _next_results(coord_side)
        assert [row[0] for row in rest] == [2, 3]
    finally:
        event.set()
        server.request_stop()
        coord_side.abort()
        th.join(T)


def _next_results(conn: Connection) -> list[Any]:
    while True:
        msg = conn.recv_within(T)
        if msg.op == "done":
            rows: list[Any] = msg.header["r"]
            return rows


def test_map_timeout_yields_what_was_ready_then_raises_and_cancels_what_never_started(
    tmp_path: Path,
) -> None:
    """As concurrent.futures: map(fn, [quick, quick, slow, x, y], timeout=) yields the two
    quick results, raises TimeoutError, and x and y - not started by then - never run."""
    runs = tmp_path / "runs"
    runs.mkdir()
    opened = tmp_path / "gate"
    with Executor(max_workers=1) as ex:
        assert ex.submit(quick, 0).result(T) == 0  # the worker is up
        names = ["a", "b", "slow", "x", "y"]
        gates = [None, None, str(opened), None, None]
        got = []
        it = ex.map(ran, [str(runs)] * 5, names, gates, timeout=3.0)
        try:
            with pytest.raises(TimeoutError):
                for value in it:
                    got.append(value)
        finally:
            opened.touch()
        assert got == ["a", "b"]
        assert ex.coordinator.wait_idle(T)
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "slow"]


# ------------------------------------------------------------------ lifecycle


def test_unloading_a_model_with_queued_tasks_leaves_no_future_pending(tmp_path: Path) -> None:
    opened = tmp_path / "gate"
    with Coordinator() as coord:
        coord.spawn(sched_funcs.arrive_or_quick, processes=1)
        config = {"directory": str(tmp_path), "gate": str(opened)}
        coord.models.load("gated", GateModel, config=config)
        running = coord.submit("first", model="gated")
        wait_for(lambda: (tmp_path / "started").exists(), T, "the first task to start")
        queued = [coord.submit(i, model="gated") for i in range(400)]
        try:
            coord.models.unload("gated")
            _, pending = wait(queued, timeout=T)
            assert not pending
            for f in queued:
                with pytest.raises(ClosedError, match="'gated' was unloaded"):
                    f.result(0)
        finally:
            opened.touch()
        assert running.result(T) == "first"  # it had started: it finishes on its version
        with pytest.raises(ValueError, match="no model named"):
            coord.submit(1, model="gated")


def test_the_next_executor_call_after_its_worker_was_killed_works() -> None:
    with Executor(max_workers=1) as ex:
        pid = ex.submit(os.getpid).result(T)
        os.kill(pid, signal.SIGKILL)
        assert ex.coordinator.wait_until(lambda s: s.workers_lost >= 1, T)
        # No worker has the function now; the call waits for the restarted one.
        after = ex.submit(os.getpid)
        fresh = ex.submit(quick, 7)  # a function the new worker never loaded either
        assert after.result(T) != pid and fresh.result(T) == 7


def test_submitting_while_a_models_workers_restart_does_not_fail(tmp_path: Path) -> None:
    (tmp_path / "gate").touch()
    with Coordinator() as coord:
        coord.spawn(sched_funcs.arrive_or_quick, processes=2)
        config = {"directory": str(tmp_path), "gate": str(tmp_path / "gate")}
        coord.models.load("m", GateModel, config=config)
        pids = {w.pid for w in coord.workers}
        lost = coord.statistics().workers_lost
        futures: list[Future[Any]] = []
        for p in pids:
            assert p is not None
            os.kill(p, signal.SIGKILL)
        # Submitted while the workers die, are noticed and come back: none fails.
        futures += [coord.submit(i, model="m") for i in range(20)]
        assert coord.wait_until(lambda s: s.workers_lost >= lost + 2, T)
        futures += [coord.submit(i, model="m") for i in range(20, 40)]
        assert sorted(f.result(T) for f in futures) == list(range(40))


def test_a_light_streams_frame_goes_before_a_flooding_streams_backlog(tmp_path: Path) -> None:
    """Two streams on one spawned worker: while it runs the flooder's first frame (held by a
    gate), the flooder queues 30 more and a light source puts one. The light frame runs next,
    and each stream's results come back in its own order; statistics().sources counts each."""
    log, gate_path = str(tmp_path / "log"), str(tmp_path / "gate")
    with Coordinator() as coord:
        coord.spawn(sched_funcs.logged, processes=1)
        coord.wait_workers(1, T)
        flood = coord.stream(name="flood", buffersize=100)
        light = coord.stream(name="light")
        flood.put([log, "f0", gate_path])
        for i in range(1, 31):
            flood.put([log, f"f{i}", None])
        light.put([log, "l0", None])
        light.close()
        flood.close()
        Path(gate_path).touch()
        assert list(light) == ["l0"]
        assert list(flood) == [f"f{i}" for i in range(31)]
        order = Path(log).read_text().split()
        assert order[:2] == ["f0", "l0"]
        sources = {s.name: s for s in coord.statistics().sources}
        assert sources["flood"].items_in == sources["flood"].processed == 31
        assert sources["light"].items_in == sources["light"].processed == 1
        assert sources["light"].lag_p50 is not None


def test_a_high_priority_task_goes_before_a_queue_of_low_priority_ones(tmp_path: Path) -> None:
    log, gate_path = str(tmp_path / "log"), str(tmp_path / "gate")
    with Coordinator() as coord:
        coord.spawn(sched_funcs.logged, processes=1)
        coord.wait_workers(1, T)
        first = coord.submit([log, "low0", gate_path])
        low = [coord.submit([log, f"low{i}", None]) for i in range(1, 20)]
        high = coord.submit([log, "high", None], priority=5)
        Path(gate_path).touch()
        assert high.result(T) == "high" and first.result(T) == "low0"
        assert [f.result(T) for f in low] == [f"low{i}" for i in range(1, 20)]
        assert Path(log).read_text().split()[:2] == ["low0", "high"]
