"""Reliability proofs with real processes, beyond test_processes.py and test_coordinator_local.py:
memory over a million tasks, dial-in reconnection to a new coordinator, kill -9 under deadlines
and inside chunks, heartbeat detection of a frozen worker, the restart limit, draining shutdown
through a kill, overflow counters with spawned workers, and a small chaos run."""

from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import threading
import time
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs, free_port, join_threads, pid_alive, read_line_with, wait_for
from reliability_workers import Crash, FileGate
from sample_workers import Echo, Pid, Slow

from benchmark.chaos import format_table, run_chaos
from pytaskqml import Coordinator, LateResult, TaskTimeout, WorkerLostError
from pytaskqml.core.tasks import Task
from pytaskqml.engine.remote import RemoteHandle
from pytaskqml.wire import auth as _auth
from pytaskqml.wire import connection as _connection

T = 20.0  # seconds: the bound on every blocking call here


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tasks() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Task))


def spawned_pids(coord: Coordinator) -> list[int]:
    return [w.pid for w in coord.workers if w.kind == "spawned" and w.pid is not None]


# ----------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_a_million_tiny_tasks_through_map_grow_rss_by_less_than_10_mb() -> None:
    """The issue's memory bound, on the real case: two spawned workers, chunked map()."""
    with Coordinator() as coord:
        coord.spawn(Echo, processes=2)
        for i, r in enumerate(coord.map(range(50_000))):  # warm-up: pools, windows, chunk size
            assert r == i
        before = rss_bytes()
        n = 1_000_000
        bad = count = 0
        for i, r in enumerate(coord.map(range(n))):
            count += 1
            if r != i:
                bad += 1
        grown = rss_bytes() - before
        assert count == n and bad == 0
        assert grown < 10 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"
        stats = coord.statistics()
        assert stats.completed == n + 50_000 and stats.in_flight == 0 and stats.queued == 0
        assert live_tasks() == 0


@pytest.mark.slow
def test_finished_tasks_with_a_deadline_do_not_stay_in_memory() -> None:
    """A finished task must not wait in the deadline heap until its deadline passes: 100k
    tasks with a 60 s deadline (one task per item, no chunks) keep RSS flat too."""
    with Coordinator() as coord:
        coord.add_local(Echo(), threads=2)
        assert list(coord.map(range(10_000), timeout=60.0)) == list(range(10_000))
        gc.collect()
        before = rss_bytes()
        bad = 0
        for i, r in enumerate(coord.map(range(100_000), timeout=60.0)):
            bad += r != i
        gc.collect()
        grown = rss_bytes() - before
        assert bad == 0 and coord.statistics().timed_out == 0
        assert live_tasks() == 0
        assert grown < 10 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- reconnection


def test_dial_in_worker_reconnects_to_a_new_coordinator_on_the_same_port(procs: Procs) -> None:
    port = free_port()
    first = Coordinator(name="first")
    try:
        assert first.listen(("127.0.0.1", port)) == ("127.0.0.1", port)
        worker = procs.cli(
            "worker", "sample_workers:Echo", "--connect", f"127.0.0.1:{port}", "--no-control"
        )
        read_line_with(worker, "dialling")
        assert first.wait_workers(1, T)
        (stats,) = first.workers
        assert stats.kind == "dial-in" and stats.pid == worker.pid
        assert first.submit("to the first").result(T) == "to the first"
    finally:
        first.shutdown(timeout=T)  # its listener and the connection go away
    assert worker.poll() is None  # the worker stays up, dialling again with backoff
    with Coordinator(name="second") as second:
        second.listen(("127.0.0.1", port))  # SO_REUSEADDR: the same port at once
        pending = second.submit("to the second")  # queued before the worker is back
        assert second.wait_workers(1, T)
        assert pending.result(T) == "to the second"
        (stats,) = second.workers
        assert stats.pid == worker.pid and stats.kind == "dial-in"
        assert list(second.map(range(100))) == list(range(100))
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(T) == 0


def test_a_worker_that_reconnects_many_times_leaves_no_handle_behind() -> None:
    earlier = set(threading.enumerate())
    with Coordinator() as coord:
        _, port = coord.listen(("127.0.0.1", 0))
        for _ in range(200):
            conn = _connection.Connection(_connection.dial(("127.0.0.1", port), timeout=T))
            _auth.client_handshake(conn, b"", timeout=T)
            conn.send("hello", {"name": "flapping", "pid": 1})
            assert coord.wait_workers(1, T)
            conn.abort()
            assert coord.wait_until(lambda s: not s.workers, 15), "the loss"
        join_threads("pytaskqml-reader-", "pytaskqml-writer-", besides=earlier)
        gc.collect()
        assert sum(1 for o in gc.get_objects() if isinstance(o, RemoteHandle)) == 0


# ----------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_during_a_stream_with_deadlines_delivers_each_item_once_in_order() -> None:
    """Every item comes out exactly once, at its place: its value or a TaskTimeout marker.
    Late results of timed-out items go to late_results(), each at most once, never for an item
    that was delivered as a value."""
    n = 300
    slow = {50, 150, 250}  # these sleep past the deadline: always markers
    deadline = 0.5
    with Coordinator(heartbeat_timeout=3.0) as coord:
        pids = coord.spawn(Pid, processes=2)
        stream = coord.stream(buffersize=16, timeout=deadline)

        def produce() -> None:
            for i in range(n):
                stream.put([i, deadline + 0.3 if i in slow else 0.002], timeout=T)
            stream.close()

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        out: list[Any] = []
        killed = False
        for r in stream:
            out.append(r)
            if len(out) == 80:
                busy = [w for w in coord.workers if w.in_flight] or list(coord.workers)
                os.kill(busy[0].pid or pids[0], signal.SIGKILL)
                killed = True
        producer.join(T)
        assert killed and not producer.is_alive()

        assert len(out) == n
        markers = {r.index for r in out if isinstance(r, TaskTimeout)}
        for i, r in enumerate(out):
            if isinstance(r, TaskTimeout):
                assert r.index == i and r.timeout == pytest.approx(deadline)
            else:
                assert r[0] == i, (i, r)
        assert slow <= markers
        values = set(range(n)) - markers

        stats = coord.statistics()
        assert stats.workers_lost == 1
        assert stats.timed_out == len(markers) == stream.timed_out
        assert stats.completed == len(values)
        # Each slow item runs (or is cut short by the kill) and then answers late.
        assert coord.wait_until(lambda s: s.late >= 2, 15), "late results of the slow items"
        late: list[LateResult] = coord.late_results()
        late_idx = [item.index for item in late]
        assert len(late_idx) == len(set(late_idx))
        assert set(late_idx) <= markers
        assert all(item.ok and item.value[0] == item.index for item in late)
        assert coord.late_results() == []  # drained


def test_kill_9_during_a_chunked_map_of_tiny_tasks_loses_and_repeats_nothing() -> None:
    """Tiny tasks travel in chunks; a chunk in the dead worker is split and re-run item by
    item (test_processes covers 3 ms tasks, which travel one by one)."""
    n = 200_000
    with Coordinator() as coord:
        coord.spawn(Echo, processes=2)
        kills = 0
        prev = -1
        count = 0
        for r in coord.map(range(n), buffersize=4096):
            assert r == prev + 1, (prev, r)
            prev = r
            count += 1
            # From 40k (and again from 120k) on, kill the first worker seen with work in hand.
            if count >= (40_000, 120_000, n + 1)[kills]:
                busy = [w.pid for w in coord.workers if w.in_flight and w.pid is not None]
                if busy:
                    os.kill(busy[0], signal.SIGKILL)
                    kills += 1
        assert count == n and kills == 2
        stats = coord.statistics()
        assert stats.workers_lost == kills and stats.poisoned == 0
        assert stats.completed == n
        assert live_tasks() == 0


def test_eof_of_a_killed_idle_worker_is_noticed_without_waiting_for_heartbeats() -> None:
    with Coordinator(heartbeat_timeout=30.0) as coord:  # only the EOF can tell it
        (pid,) = coord.spawn(Echo, processes=1)
        assert coord.submit(1).result(T) == 1
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        assert coord.wait_until(lambda s: s.workers_lost == 1, T), "the loss"
        # Far below the 30 s heartbeat timeout: the EOF told (it takes milliseconds; the
        # bound leaves room for a loaded machine).
        assert time.monotonic() - started < 10.0
        assert coord.wait_workers(1, T)
        assert coord.submit(2).result(T) == 2


@pytest.mark.slow
def test_a_frozen_worker_is_declared_lost_by_heartbeat_and_its_tasks_run_elsewhere() -> None:
    """SIGSTOP: the connection stays open but the worker says nothing. Heartbeats catch it
    (hang_timeout is off), it is killed, its tasks finish on the other worker, it restarts."""
    with Coordinator(heartbeat_interval=0.2, heartbeat_timeout=1.0, hang_timeout=None) as coord:
        frozen, _other = coord.spawn(Pid, processes=2)
        futs = [coord.submit([i, 0.01]) for i in range(100)]
        assert futs[0].result(T)[0] == 0
        started = time.monotonic()
        os.kill(frozen, signal.SIGSTOP)
        try:
            assert coord.wait_until(lambda s: s.workers_lost == 1, T), "the loss"
            noticed = time.monotonic() - started
            assert noticed > 0.5  # it waited for the silence, and then declared it lost
            assert [f.result(T)[0] for f in futs] == list(range(100))
            wait_for(lambda: not pid_alive(frozen), what="the frozen worker to be killed")
            assert coord.wait_workers(2, T)
            assert frozen not in spawned_pids(coord)
        finally:
            if pid_alive(frozen):
                os.kill(frozen, signal.SIGKILL)


# ----------------------------------------------------------------------------- restarts


class _Seen(logging.Handler):
    """Sets an event when a log record containing *needle* is emitted."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.event.set()


def test_restart_limit_leaves_the_slot_down_and_fails_the_stranded_work() -> None:
    """A crash loop retires the slot after max_restarts; with no worker left and none that can
    come back, the queued work fails with WorkerLostError instead of waiting forever."""
    retired = _Seen("not restarting it again")
    logger = logging.getLogger("pytaskqml.engine.supervisor")
    logger.addHandler(retired)
    coord = Coordinator(max_restarts=2, max_retries=10)  # retries outlast the restarts
    try:
        (first,) = coord.spawn(Crash, processes=1)
        futs = [coord.submit(i) for i in range(5)]
        results: queue.Queue[list[Any]] = queue.Queue()
        mapper = threading.Thread(
            target=lambda: results.put(list(coord.map(range(3), on_error="return"))), daemon=True
        )
        mapper.start()
        assert retired.event.wait(T)
        for f in futs:
            assert isinstance(f.exception(T), WorkerLostError)
        out = results.get(timeout=T)
        assert len(out) == 3 and all(isinstance(r, WorkerLostError) for r in out)
        stats = coord.statistics()
        assert stats.restarts == 2 and stats.workers == () and stats.queued == 0
        assert stats.failed == 8 and stats.poisoned == 0
        assert not pid_alive(first)
        mapper.join(T)
        # New work does not wait for a worker that cannot come: it fails at once too...
        assert isinstance(coord.submit("late").exception(T), WorkerLostError)
        # ...until a worker is added again.
        coord.add_local(Echo())
        assert coord.submit("again").result(T) == "again"
    finally:
        logger.removeHandler(retired)
        coord.shutdown(timeout=T)
    assert coord.statistics().restarts == 2  # the slot stayed down


# ----------------------------------------------------------------------------- shutdown


@pytest.mark.slow
def test_shutdown_drains_queued_work_on_spawned_workers_through_a_kill() -> None:
    """shutdown() waits for queued work even when a worker dies during the drain: the slot is
    restarted, every future gets its result, and every process and thread is gone after."""
    threads_before = {t.ident for t in threading.enumerate()}
    coord = Coordinator()
    pids = coord.spawn(Slow, processes=2, kwargs={"delay": 0.01})
    futs: list[Future[Any]] = [coord.submit(i) for i in range(600)]
    all_pids = set(pids)
    stopper = threading.Thread(target=coord.shutdown, kwargs={"timeout": T})
    stopper.start()
    try:
        assert coord.wait_until(lambda s: s.completed >= 50, 15), "the drain to start"
        os.kill(pids[0], signal.SIGKILL)
        assert coord.wait_until(lambda s: len(set(spawned_pids(coord)) - all_pids) == 1, 15), (
            "the restart"
        )
        all_pids.update(spawned_pids(coord))
    finally:
        stopper.join(T * 2)
    assert not stopper.is_alive()
    assert [f.result(0) for f in futs] == list(range(600))
    stats = coord.statistics()
    assert stats.workers_lost == 1 and stats.restarts == 1
    assert stats.cancelled == 0 and stats.completed == 600
    assert len(all_pids) == 3
    for pid in all_pids:
        assert not pid_alive(pid), pid
    leftover = [t for t in threading.enumerate() if t.ident not in threads_before]
    assert leftover == []


# ----------------------------------------------------------------------------- overflow


def _gated(tmp_path: Path, value: Any) -> list[Any]:
    return [str(tmp_path / "open"), value]


def test_overflow_reject_with_a_spawned_worker_raises_and_counts(tmp_path: Path) -> None:
    with Coordinator(max_queue=2, overflow="reject") as coord:
        coord.spawn(FileGate, processes=1, window=1)
        held = coord.submit(_gated(tmp_path, "a"))  # in flight at once: the worker has credit
        assert coord.statistics().in_flight == 1
        queued = [coord.submit(_gated(tmp_path, v)) for v in "bc"]
        for v in "de":
            with pytest.raises(queue.Full):
                coord.submit(_gated(tmp_path, v))
        stats = coord.statistics()
        assert (stats.submitted, stats.rejected, stats.queued, stats.in_flight) == (3, 2, 2, 1)
        (tmp_path / "open").touch()
        assert [f.result(T) for f in [held, *queued]] == ["a", "b", "c"]
        stats = coord.statistics()
        assert (stats.completed, stats.rejected, stats.dropped, stats.cancelled) == (3, 2, 0, 0)


def test_overflow_drop_oldest_with_a_spawned_worker_cancels_and_counts(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    with Coordinator(max_queue=2, overflow="drop_oldest") as coord:
        coord.spawn(FileGate, processes=1, window=1)
        held = coord.submit([str(first), "a"])
        assert coord.statistics().in_flight == 1
        futs = {v: coord.submit([str(first), v]) for v in "bcde"}  # b and c are dropped
        stats = coord.statistics()
        assert (stats.submitted, stats.dropped, stats.queued, stats.in_flight) == (5, 2, 2, 1)
        for v in "bc":
            with pytest.raises(CancelledError):
                futs[v].result(T)
        first.touch()
        assert [f.result(T) for f in (held, futs["d"], futs["e"])] == ["a", "d", "e"]

        # The same through a stream, which counts its own drops.
        held = coord.submit([str(second), "x"])
        assert coord.statistics().in_flight == 1
        stream = coord.stream()
        for v in "fghi":
            stream.put([str(second), v])
        stream.close()
        second.touch()
        assert held.result(T) == "x"
        assert list(stream) == ["h", "i"] and stream.dropped == 2
        stats = coord.statistics()
        assert (stats.submitted, stats.completed, stats.dropped) == (10, 6, 4)
        assert stats.rejected == 0 and stats.cancelled == 0 and stats.queued == 0


# ----------------------------------------------------------------------------- chaos


@pytest.mark.slow
def test_chaos_smoke_kill_9_twice_during_an_ordered_map() -> None:
    res = run_chaos(3000, workers=2, kill_every=0.4, task_ms=1.0, seed=3, max_kills=2)
    table = format_table(res)
    assert res.kills == 2, table
    assert (res.lost, res.duplicated, res.out_of_order, res.failed) == (0, 0, 0, 0), table
    assert res.received == 3000 and res.workers_lost == 2, table
    assert res.restarts >= 1 and sum(res.rate_per_bucket) == 3000, table
    assert res.ok and "verdict" in table


def test_a_restart_that_cannot_start_a_process_is_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Out of descriptors or processes for a moment: the restart fails, is logged, and is
    tried again with backoff instead of taking the coordinator down."""
    with Coordinator() as coord:
        (pid,) = coord.spawn(Echo, processes=1)
        real = coord._pool.supervisor._start
        calls: list[int] = []

        def flaky(slot: Any) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise OSError(24, "Too many open files")
            real(slot)

        coord._pool.supervisor._start = flaky  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="pytaskqml"):
            os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda: any(w.pid not in (None, pid) for w in coord.statistics().workers),
                what="the second restart attempt to attach",
            )
        assert len(calls) == 2
        assert "could not restart worker" in caplog.text and "Too many open files" in caplog.text
        assert coord.submit("still here").result(20) == "still here"
