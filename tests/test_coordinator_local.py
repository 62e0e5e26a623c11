"""Coordinator logic on local thread workers: orderings forced with Events, never sleeps."""

from __future__ import annotations

import gc
import itertools
import queue
import threading
from concurrent.futures import CancelledError
from typing import Any

import pytest
from sample_workers import Batched, Counted, Echo, Faulty, Square

from pytaskqml import ClosedError, Coordinator, TaskFailed, TaskTimeout, Worker, WorkerStartError
from pytaskqml.core.ordered import ReorderBuffer
from pytaskqml.core.tasks import OK, RUN
from pytaskqml.errors import RemoteTraceback

T = 10  # seconds: the bound on every blocking call in these tests


class Gated(Worker):
    """Each payload names a gate; process() blocks until the test opens it."""

    def __init__(self) -> None:
        self.gates: dict[Any, threading.Event] = {}
        self.started: dict[Any, threading.Event] = {}
        self.lock = threading.Lock()
        self.threads: set[str] = set()

    def gate(self, key: Any) -> threading.Event:
        with self.lock:
            self.started.setdefault(key, threading.Event())
            return self.gates.setdefault(key, threading.Event())

    def wait_started(self, key: Any) -> bool:
        self.gate(key)
        return self.started[key].wait(T)

    def process(self, key: Any) -> Any:
        gate = self.gate(key)
        self.threads.add(threading.current_thread().name)
        self.started[key].set()
        assert gate.wait(T), f"gate {key} never opened"
        return key


def test_submit_returns_a_future() -> None:
    with Coordinator() as coord:
        coord.add_local(Square())
        assert coord.submit(7).result(T) == 49


class HeldFirst(Worker):
    """Blocks on its first task ("hold") until the test opens the gate; echoes the rest."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()

    def process(self, payload: Any) -> Any:
        if payload == "hold":
            self.started.set()
            assert self.gate.wait(T), "gate never opened"
        return payload


def test_a_payload_changed_after_submit_runs_as_it_was_submitted() -> None:
    """submit() encodes the payload once, at admission: a change made while the task waits
    for the busy worker does not reach the worker."""
    worker = HeldFirst()
    with Coordinator() as coord:
        coord.add_local(worker)
        first = coord.submit("hold")
        assert worker.started.wait(T)
        item = {"k": [1]}
        fut = coord.submit(item)
        item["k"].append(2)
        worker.gate.set()
        assert first.result(T) == "hold"
        assert fut.result(T) == {"k": [1]}


def test_map_yields_in_submission_order_when_later_items_finish_first() -> None:
    worker = Gated()
    keys = list(range(6))
    for k in keys:
        worker.gate(k)
    with Coordinator() as coord:
        coord.add_local(worker, threads=3)
        results = coord.map(keys, buffersize=6)
        out: list[int] = []
        reader = threading.Thread(target=lambda: out.extend(results))
        reader.start()
        # Let 2 and 1 finish before 0: nothing may come out until 0 is done.
        for k in (2, 1):
            assert worker.wait_started(k)
            worker.gates[k].set()
        assert worker.wait_started(0)
        assert out == []
        for k in keys:
            worker.gates[k].set()
        reader.join(T)
        assert out == keys
        assert len(worker.threads) == 3  # the three threads really ran side by side


def test_map_unordered_yields_as_completed() -> None:
    worker = Gated()
    with Coordinator() as coord:
        coord.add_local(worker, threads=2)
        it = coord.map(["slow", "fast"], ordered=False, buffersize=2)
        got: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=lambda: [got.put(x) for x in it], daemon=True).start()
        assert worker.wait_started("slow") and worker.wait_started("fast")
        worker.gates["fast"].set()
        assert got.get(timeout=T) == "fast"
        worker.gates["slow"].set()
        assert got.get(timeout=T) == "slow"


def test_map_reads_its_input_lazily() -> None:
    consumed = itertools.count()

    def endless() -> Any:
        for i in range(10_000_000):
            next(consumed)
            yield i

    with Coordinator() as coord:
        coord.add_local(Square(), threads=2)
        first = list(itertools.islice(coord.map(endless(), buffersize=8), 20))
    assert first == [i * i for i in range(20)]
    assert next(consumed) <= 20 + 8 + 1  # read no further ahead than buffersize


def test_map_with_explicit_chunks_keeps_order_and_per_item_errors() -> None:
    items = [*range(50), "boom", *range(50, 100)]
    with Coordinator() as coord:
        coord.add_local(Faulty(), threads=2)
        out = list(coord.map(items, chunksize=7, on_error="return", buffersize=64))
    assert out[:50] == list(range(50)) and out[51:] == list(range(50, 100))
    assert isinstance(out[50], TaskFailed) and out[50].remote_type == "ValueError"


def test_failure_carries_type_message_and_traceback() -> None:
    with Coordinator() as coord:
        coord.add_local(Faulty())
        fut = coord.submit("boom")
        with pytest.raises(TaskFailed) as info:
            fut.result(T)
        err = info.value
        assert err.remote_type == "ValueError" and "cannot process boom" in err.message
        assert "Traceback" in err.remote_traceback and "process" in err.remote_traceback
        assert isinstance(err.__cause__, ValueError)
        # The worker keeps serving after a failure.
        assert coord.submit("fine").result(T) == "fine"
        assert coord.statistics().failed == 1


def test_map_raises_at_the_failed_position_or_returns_the_error() -> None:
    with Coordinator() as coord:
        coord.add_local(Faulty())
        it = coord.map(["a", "boom", "c"])
        assert next(it) == "a"
        with pytest.raises(TaskFailed):
            next(it)
        out = list(coord.map(["a", "boom", "c"], on_error="return"))
        assert out[0] == "a" and isinstance(out[1], TaskFailed) and out[2] == "c"


def test_unserialisable_payload_raises_type_error_in_submit() -> None:
    with Coordinator() as coord:
        coord.add_local(Echo())
        with pytest.raises(TypeError):
            coord.submit({"a": object()})
        with pytest.raises(TypeError):
            list(coord.map([1, {2, 3}]))
        assert coord.submit("still works").result(T) == "still works"


def test_stream_producer_and_consumer_threads() -> None:
    with Coordinator() as coord:
        coord.add_local(Square(), threads=2)
        stream = coord.stream(buffersize=4)

        def produce() -> None:
            for i in range(200):
                stream.put(i, timeout=T)
            stream.close()

        producer = threading.Thread(target=produce)
        producer.start()
        assert list(stream) == [i * i for i in range(200)]
        producer.join(T)
        with pytest.raises(ClosedError):
            stream.put(1)


def test_stream_closed_while_empty_ends_iteration() -> None:
    with Coordinator() as coord:
        coord.add_local(Echo())
        stream = coord.stream()
        stream.close()
        assert list(stream) == []


def test_deadline_yields_marker_in_order_and_late_result_goes_aside() -> None:
    worker = Gated()
    late: queue.Queue[Any] = queue.Queue()
    with Coordinator(on_late=late.put) as coord:
        coord.add_local(worker, threads=2)
        worker.gate("fast").set()
        out = list(coord.map(["slow", "fast"], timeout=0.2, buffersize=2))
        assert isinstance(out[0], TaskTimeout) and out[0].index == 0 and not out[0]
        assert out[1] == "fast"
        worker.gates["slow"].set()
        item = late.get(timeout=T)
        assert item.value == "slow" and item.index == 0 and item.ok
        stats = coord.statistics()
        assert stats.timed_out == 1 and stats.late == 1


def test_submit_deadline_fails_the_future_with_timeout_error() -> None:
    worker = Gated()
    with Coordinator() as coord:
        coord.add_local(worker)
        fut = coord.submit("x", timeout=0.1)
        with pytest.raises(TimeoutError):
            fut.result(T)
        worker.gate("x").set()
        assert coord.wait_workers(1, T)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 0},
        {"window": -1},
        {"max_retries": 0},
        {"max_retries": -2},
        {"timeout": 0},
        {"timeout": -1.0},
        {"max_queue": 0},
        {"overflow": "explode"},
        {"hang_timeout": 0},
    ],
)
def test_bad_settings_are_value_errors_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Coordinator(**kwargs)


def test_bad_call_arguments_are_value_errors() -> None:
    with Coordinator() as coord:
        with pytest.raises(ValueError):
            coord.map([1], buffersize=0)
        with pytest.raises(ValueError):
            coord.submit(1, timeout=-1)
        with pytest.raises(ValueError):
            coord.add_local(Echo(), threads=0)
        with pytest.raises(TypeError):
            coord.add_local(Echo)  # type: ignore[arg-type]


def test_overflow_reject_raises_queue_full_and_counts() -> None:
    worker = Gated()
    with Coordinator(max_queue=2, overflow="reject") as coord:
        coord.add_local(worker, window=1)
        first = coord.submit("a")
        assert worker.wait_started("a")  # "a" is in the worker
        coord.submit("b")
        coord.submit("c")
        with pytest.raises(queue.Full):
            coord.submit("d")
        assert coord.statistics().rejected == 1
        for k in "abc":
            worker.gate(k).set()
        assert first.result(T) == "a"


def test_overflow_drop_oldest_keeps_the_newest_and_counts() -> None:
    worker = Gated()
    with Coordinator(max_queue=2, overflow="drop_oldest") as coord:
        coord.add_local(worker, window=1)
        stream = coord.stream()
        stream.put("first")
        assert worker.wait_started("first")
        for k in ["x1", "x2", "x3", "x4"]:
            stream.put(k)
        stream.close()
        for k in ["first", "x1", "x2", "x3", "x4"]:
            worker.gate(k).set()
        assert list(stream) == ["first", "x3", "x4"]
        assert stream.dropped == 2
        assert coord.statistics().dropped == 2


def test_overflow_drop_oldest_cancels_dropped_futures() -> None:
    worker = Gated()
    with Coordinator(max_queue=1, overflow="drop_oldest") as coord:
        coord.add_local(worker, window=1)
        coord.submit("busy")
        assert worker.wait_started("busy")
        old = coord.submit("old")
        new = coord.submit("new")
        with pytest.raises(CancelledError):
            old.result(T)
        for k in ["busy", "new"]:
            worker.gate(k).set()
        assert new.result(T) == "new"


def test_overflow_block_waits_for_room() -> None:
    worker = Gated()
    with Coordinator(max_queue=1, overflow="block") as coord:
        coord.add_local(worker, window=1)
        coord.submit("busy")
        assert worker.wait_started("busy")
        coord.submit("queued")
        blocked = threading.Event()
        done = threading.Event()

        def put() -> None:
            blocked.set()
            coord.submit("third")
            done.set()

        threading.Thread(target=put, daemon=True).start()
        assert blocked.wait(T)
        assert not done.wait(0.05)  # still blocked: the queue is full
        worker.gate("busy").set()
        assert done.wait(T)
        for k in ["queued", "third"]:
            worker.gate(k).set()


def test_batched_worker_gets_groups_and_per_item_errors() -> None:
    with Coordinator() as coord:
        coord.add_local(Batched())
        out = list(coord.map([1, 2, "bad", 4, 5, 6, 7, 8], on_error="return", buffersize=8))
    assert [o[0] for o in out if isinstance(o, list)] == [1, 2, 4, 5, 6, 7, 8]
    assert all(1 <= o[1] <= 4 for o in out if isinstance(o, list))
    assert isinstance(out[2], TaskFailed)


def test_setup_failure_in_add_local_is_a_start_error() -> None:
    from sample_workers import SetupFails

    with Coordinator() as coord, pytest.raises(WorkerStartError, match="model file missing"):
        coord.add_local(SetupFails())


def test_least_loaded_dispatch_keeps_a_fast_worker_busy_while_a_slow_one_is_stuck() -> None:
    slow, fast = Gated(), Echo()
    with Coordinator() as coord:
        coord.add_local(slow, window=1)
        first = coord.submit("stuck")
        assert slow.wait_started("stuck")
        coord.add_local(fast, window=4)
        results = [coord.submit(i).result(T) for i in range(50)]
        assert results == list(range(50))
        slow.gate("stuck").set()
        assert first.result(T) == "stuck"


def test_shutdown_cancel_futures_cancels_what_has_not_started() -> None:
    worker = Gated()
    coord = Coordinator()
    coord.add_local(worker, window=1)
    running = coord.submit("running")
    assert worker.wait_started("running")
    waiting = [coord.submit(i) for i in range(5)]
    threading.Timer(0.05, worker.gate("running").set).start()
    coord.shutdown(wait=True, cancel_futures=True)
    assert running.result(T) == "running"
    assert all(f.cancelled() for f in waiting)
    with pytest.raises(ClosedError):
        coord.submit(1)
    assert coord.statistics().cancelled == 5


def test_shutdown_drains_queued_work() -> None:
    coord = Coordinator()
    coord.add_local(Square(), threads=2)
    futs = [coord.submit(i) for i in range(100)]
    coord.shutdown(wait=True)
    assert [f.result(0) for f in futs] == [i * i for i in range(100)]


def test_shutdown_without_workers_resolves_every_future() -> None:
    coord = Coordinator()
    fut = coord.submit("nobody will run this")
    coord.shutdown(wait=True)
    assert fut.done()
    with pytest.raises((CancelledError, ClosedError)):
        fut.result(0)


def test_no_thread_left_behind_after_shutdown() -> None:
    before = {t.ident for t in threading.enumerate()}
    with Coordinator() as coord:
        coord.add_local(Echo(), threads=3)
        assert coord.submit(1).result(T) == 1
    leftover = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert leftover == []


def test_statistics_is_a_frozen_snapshot() -> None:
    with Coordinator() as coord:
        coord.add_local(Square(), threads=2)
        list(coord.map(range(100)))
        stats = coord.statistics()
    assert stats.submitted == stats.completed == 100
    assert stats.in_flight == 0 and stats.queued == 0
    assert stats.latency_p50 is not None and stats.latency_p50 <= stats.latency_p99  # type: ignore[operator]
    assert sum(w.completed for w in stats.workers) == 100
    with pytest.raises(AttributeError):
        stats.completed = 0  # type: ignore[misc]


def test_closing_a_map_early_cancels_its_queued_items() -> None:
    worker = Gated()
    with Coordinator() as coord:
        coord.add_local(worker, window=1)
        worker.gate(0).set()
        it = coord.map(range(100), buffersize=50)
        assert next(it) == 0
        it.close()  # type: ignore[attr-defined]
        for k in range(100):
            worker.gate(k).set()
        coord.shutdown(wait=True)
        stats = coord.statistics()
    assert stats.completed < 10 and stats.cancelled > 40


def test_remote_traceback_type_is_exported() -> None:
    assert str(RemoteTraceback("text")) == "text"


def test_per_task_state_does_not_outlive_the_task() -> None:
    with Coordinator() as coord:
        coord.add_local(Echo(), threads=2)
        list(coord.map(range(5000)))
        gc.collect()
        from pytaskqml.core.tasks import Task

        alive = [o for o in gc.get_objects() if isinstance(o, Task)]
        assert alive == []


@pytest.mark.parametrize("where", ["local", "spawned"])
def test_a_failing_item_fails_alone_in_its_chunk_and_nothing_runs_twice(where: str) -> None:
    items: list[Any] = [*range(30), "boom", *range(30, 60), "unencodable", *range(60, 90)]
    with Coordinator() as coord:
        if where == "local":
            coord.add_local(Counted(), threads=1)
        else:
            coord.spawn(Counted, processes=1)
        out = list(coord.map(items, chunksize=16, on_error="return"))
    good = [o for o in out if isinstance(o, list)]
    assert [o[0] for o in good] == [i for i in items if isinstance(i, int)]
    assert isinstance(out[30], TaskFailed) and out[30].remote_type == "ValueError"
    # A result that cannot travel fails its item, in a thread worker as in a process.
    assert isinstance(out[61], TaskFailed) and "not JSON serializable" in out[61].message
    # Every item ran exactly once: the call numbers of the good ones are distinct, and with
    # the two failures they account for every call.
    calls = [o[2] for o in good]
    assert len(set(calls)) == len(calls) and max(calls) == len(items)


def test_reorder_buffer_hands_out_a_run_of_results_whole() -> None:
    buf = ReorderBuffer()
    buf.deliver_many([(3, RUN, ["d", "e", "f"]), (6, OK, "g")])
    buf.deliver(0, RUN, ["a", "b"])
    assert buf.get_next(1.0) == (0, RUN, ["a", "b"])
    with pytest.raises(TimeoutError):
        buf.get_next(0.01)  # 2 is missing: the run at 3 waits
    buf.deliver(2, OK, "c")
    buf.deliver(4, OK, "dup")  # inside the run already stored: never reaches the consumer
    assert [buf.get_next(1.0) for _ in range(3)] == [
        (2, OK, "c"),
        (3, RUN, ["d", "e", "f"]),
        (6, OK, "g"),
    ]


def test_a_new_map_does_not_read_far_ahead_on_an_old_measurement() -> None:
    """After tiny items the automatic buffer is tens of thousands of items; a new map() of
    something else (video frames) must not pull that many from its iterator before its own
    results have been measured."""
    pulled = itertools.count()

    def frames() -> Any:
        for i in range(100_000):
            next(pulled)
            yield i

    with Coordinator() as coord:
        coord.add_local(Echo(), threads=2)
        assert sum(coord.map(range(200_000))) == sum(range(200_000))
        assert coord.intake.auto_buffersize(True) > 10_000  # what the tiny items taught it
        it = coord.map(frames())
        assert next(it) == 0
        assert next(pulled) <= 256 + 1
        it.close()
