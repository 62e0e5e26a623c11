"""Pipelines: stages on pools of their own joined in order, fan-out and converge, back-pressure,
and kill -9 of a stage's worker mid-stream."""

from __future__ import annotations

import os
import queue
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pipeline_workers import FailOdd, Gate, Pause, Tag
from sample_workers import Echo, Faulty, Square

from pytaskqml import Branches, ClosedError, Pipeline, Stage, TaskFailed, TaskTimeout
from pytaskqml.engine import delivery as _delivery


def test_items_come_out_in_order_through_every_stage() -> None:
    with Pipeline([Stage(Tag(tag="a"), threads=3), Stage(Tag(tag="b"), threads=2, name="b")]) as p:
        out = list(p.map(range(500)))
        stats = p.statistics()
    assert out == [[i, "a", "b"] for i in range(500)]
    assert set(stats.stages) == {"Tag", "b"}
    assert stats.stages["b"].completed == 500
    assert stats.items_in == 500 and stats.items_out == 500


def test_a_failed_item_raises_at_its_position_naming_the_stage() -> None:
    with Pipeline([Stage(Echo, name="first"), Stage(Faulty, name="check"), Square]) as p:
        it = p.map([2, 3, "boom", 4])
        assert next(it) == 4
        assert next(it) == 9
        with pytest.raises(TaskFailed) as info:
            next(it)
        assert "check" in str(info.value)
        assert getattr(info.value, "stage", None) == "check"
        out = list(p.map([2, "boom", 3], on_error="return"))
    assert out[0] == 4 and out[2] == 9
    assert isinstance(out[1], TaskFailed) and out[1].stage == "check"  # type: ignore[attr-defined]


def test_the_stream_has_the_interface_of_a_coordinator_stream() -> None:
    with Pipeline([Stage(Square, threads=2), Stage(Tag(tag="x"))]) as p:
        s = p.stream(buffersize=4)
        got: list[Any] = []
        consumer = threading.Thread(target=lambda: got.extend(s))
        consumer.start()
        s.put_nowait(0)
        for i in range(1, 50):
            s.put(i, timeout=10)
        s.close()
        consumer.join(10)
        assert not consumer.is_alive()
        assert got == [[i * i, "x"] for i in range(50)]
        with pytest.raises(ClosedError):
            s.put(1)
        s2 = p.stream()
        s2.end("the producer went away")
        with pytest.raises(ClosedError, match="producer went away"):
            s2.put(1)


def test_submit_returns_a_future_and_failures_are_its_exception() -> None:
    with Pipeline([Stage(Square), Stage(Faulty, name="f")]) as p:
        futs = [p.submit(i) for i in range(20)]
        bad = p.submit("boom")
        assert [f.result(10) for f in futs] == [i * i for i in range(20)]
        with pytest.raises(TaskFailed, match="Square"):
            bad.result(10)  # Square fails on a str before Faulty sees it
    with pytest.raises(ClosedError):
        p.submit(1)


def test_a_stage_timeout_gives_a_marker_in_place() -> None:
    gate = Gate()
    with Pipeline([Stage(Echo), Stage(gate, timeout=0.2, name="gate"), Tag]) as p:
        out = list(p.map([1, 2], on_error="raise"))
        gate.release.set()
    assert all(isinstance(o, TaskTimeout) for o in out)
    assert [o.index for o in out] == [0, 1]


def test_converge_joins_branches_of_different_speed_and_marks_a_failed_one() -> None:
    steps = [
        Stage(Echo, name="in"),
        Branches(
            {
                "fast": Stage(Square, threads=2, name="square"),
                "slow": [
                    Stage(Pause(delay=0.002), threads=2, name="pause"),
                    Stage(FailOdd, name="even"),
                ],
            },
            name="both",
            timeout=30,
        ),
        Stage(Echo, name="out"),
    ]
    with Pipeline(steps) as p:
        out = list(p.map(range(200), on_error="raise"))
    assert len(out) == 200
    for i, row in enumerate(out):
        assert set(row) == {"fast", "slow"}
        assert row["fast"] == i * i
        if i % 2:  # a stage after the converge gets the failure as JSON
            assert row["slow"]["error"] == "ValueError" and row["slow"]["stage"] == "even"
        else:
            assert row["slow"] == i * 10


def test_a_converge_as_the_last_step_holds_the_exception() -> None:
    with Pipeline([Branches({"ok": Stage(Echo), "odd": Stage(FailOdd)})]) as p:
        out = list(p.map([1, 2]))
    assert out[0]["ok"] == 1 and isinstance(out[0]["odd"], TaskFailed)
    assert out[1] == {"ok": 2, "odd": 20}


def test_a_late_branch_is_marked_and_the_item_still_comes_out() -> None:
    gate = Gate()
    with Pipeline(
        [Branches({"quick": Stage(Echo), "stuck": Stage(gate, name="g")}, timeout=0.3)]
    ) as p:
        out = list(p.map(["a", "b"]))
        gate.release.set()
    assert [o["quick"] for o in out] == ["a", "b"]
    assert [o["stuck"].index for o in out] == [0, 1]
    assert all(isinstance(o["stuck"], TaskTimeout) for o in out)


@pytest.mark.slow
def test_a_slow_last_stage_bounds_what_is_read_ahead() -> None:
    gate = Gate()
    read = 0
    reached = threading.Event()
    buffersize = 8

    def items() -> Iterator[int]:
        nonlocal read
        for i in range(10_000):
            read += 1
            if read == 4 * buffersize:
                reached.set()
            yield i

    with Pipeline([Stage(Echo, buffersize=4), Stage(gate, buffersize=4, name="gate")]) as p:
        it = p.map(items(), buffersize=buffersize)
        first: list[Any] = []
        consumer = threading.Thread(target=lambda: first.append(next(it)))
        consumer.start()
        # Everything that can move has moved once the first stage finished what it was given.
        assert p.statistics().stages  # the stages are up
        stage1 = p.stages[0].coordinator
        assert stage1 is not None
        assert stage1.wait_until(lambda s: s.completed >= buffersize - 4, timeout=10)
        assert stage1.wait_idle(timeout=10)
        assert not reached.is_set()
        assert read <= buffersize + 1
        gate.release.set()
        consumer.join(10)
        rest = list(it)
    assert first + rest == list(range(10_000))


def _three_stages() -> list[Stage]:
    return [
        Stage(Tag, threads=2, kwargs={"tag": "a"}, name="a"),
        Stage(Tag, processes=2, kwargs={"tag": "b"}, name="b"),
        Stage(Tag, threads=2, kwargs={"tag": "c"}, name="c"),
    ]


@pytest.mark.slow
def test_three_stages_over_10000_items_lose_nothing() -> None:
    with Pipeline(_three_stages()) as p:
        out = list(p.map(range(10_000)))
    assert out == [[i, "a", "b", "c"] for i in range(10_000)]


@pytest.mark.slow
def test_kill_9_of_a_middle_stage_worker_loses_and_duplicates_nothing() -> None:
    with Pipeline(_three_stages(), buffersize=256) as p:
        middle = p.stages[1].coordinator
        assert middle is not None
        pids = [w.pid for w in middle.workers if w.pid]
        assert len(pids) == 2
        out: list[Any] = []
        for row in p.map(range(10_000), on_error="raise"):
            out.append(row)
            if len(out) == 3_000:  # gated on progress: mid-stream
                os.kill(pids[0], signal.SIGKILL)
        assert middle.wait_until(lambda s: s.restarts >= 1, timeout=30)
    assert out == [[i, "a", "b", "c"] for i in range(10_000)]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_over_a_long_run_the_read_ahead_stays_bounded_and_memory_flat() -> None:
    buffersize = 32
    taken = 0
    ahead: list[int] = []
    rss: list[int] = []
    payload = "x" * 10_000  # 10 kB per item: 100 MB if the pipeline held all of them

    def items() -> Iterator[str]:
        for i in range(10_000):
            ahead.append(i - taken)
            yield payload + str(i)  # a new 10 kB string per item

    steps = [Stage(Echo, threads=2, buffersize=8), Stage(Pause(delay=0.0002), name="slow")]
    with Pipeline(steps) as p:
        for _ in p.map(items(), buffersize=buffersize):
            taken += 1
            if taken in (2_000, 10_000):
                rss.append(_rss_bytes())
    assert taken == 10_000
    assert max(ahead) <= buffersize + 1
    assert rss[1] - rss[0] < 30 * 2**20  # flat: far below the 80 MB the later items weigh


def test_a_stage_that_rejects_when_full_marks_the_item_in_its_place() -> None:
    gate = Gate()
    stage = Stage(gate, name="gate", max_queue=1, overflow="reject", window=1)
    with Pipeline([Stage(Echo), stage]) as p:
        s = p.stream(buffersize=16)
        for i in range(6):
            s.put(i)
        coord = stage.coordinator
        assert coord is not None
        # What the worker holds and one waiting are taken; the rest find the queue full.
        assert coord.wait_until(lambda st: st.submitted + st.rejected >= 6, timeout=10)
        taken = coord.statistics().submitted
        gate.release.set()
        s.close()
        out = list(s)
    assert 1 <= taken < 6
    assert out[:taken] == list(range(taken))
    assert all(isinstance(o, queue.Full) and o.stage == "gate" for o in out[taken:])


@pytest.mark.slow
def test_ctrl_c_in_the_with_block_cancels_instead_of_waiting() -> None:
    gate = Gate()  # never opened before the with block ends: waiting would take 60 s
    stopped = threading.Event()
    streams: list[Any] = []

    def body() -> None:
        try:
            with Pipeline([Stage(Echo), Stage(gate, name="g")]) as p:
                s = p.stream()
                streams.append(s)
                for i in range(5):
                    s.put(i)
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            stopped.set()

    t = threading.Thread(target=body)
    t.start()
    try:
        assert stopped.wait(30)
        with pytest.raises(ClosedError, match="shut down"):
            streams[0].put(6)
    finally:
        gate.release.set()
        t.join(30)


def test_cancel_takes_waiting_items_off_the_stages_queues() -> None:
    """What a producer that went away leaves behind is cancelled, not left to run."""
    gate = Gate()
    with Pipeline([Stage(gate, threads=1, buffersize=8, window=1)]) as p:
        coord = p.stages[0].coordinator
        assert coord is not None
        s = p.stream(buffersize=8)
        for i in range(5):
            s.put(i)
        assert coord.wait_until(lambda st: st.in_flight >= 1 and st.queued >= 1, timeout=10)
        s.cancel("producer went away")
        gate.release.set()
        assert coord.wait_idle(10)
        st = coord.statistics()
        assert st.completed + st.cancelled == 5
        assert st.cancelled >= 1  # without cancel() every item would have run


def test_items_pass_between_stages_without_a_future_or_a_callback_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stage takes a stream's items through a collector of the stream's own: no Future is
    made for an item at any stage and no done-callback runs for it (each cost a hop through
    the coordinator's callback thread), and the items still come out in order."""
    made: list[object] = []
    callbacks: list[object] = []
    make, call = _delivery.TaskFuture.__init__, _delivery.CallbackRunner.call

    def counted_future(self: _delivery.TaskFuture) -> None:
        made.append(self)
        make(self)

    def counted_call(self: _delivery.CallbackRunner, fn: Any, *args: Any) -> None:
        callbacks.append(fn)
        call(self, fn, *args)

    steps = [Stage(Tag(tag="a"), threads=2), Stage(Tag(tag="b"), threads=2, name="b")]
    with Pipeline(steps) as p:
        monkeypatch.setattr(_delivery.TaskFuture, "__init__", counted_future)
        monkeypatch.setattr(_delivery.CallbackRunner, "call", counted_call)
        out = list(p.map(range(300)))
        s = p.stream()
        for i in range(50):
            s.put(i)
        s.close()
        assert list(s) == [[i, "a", "b"] for i in range(50)]
    assert out == [[i, "a", "b"] for i in range(300)]
    assert made == [] and callbacks == []


def test_a_pipeline_keeps_the_counts_of_finished_streams_not_the_streams() -> None:
    """A service makes a stream per request: a stream whose consumer is done must not stay
    in memory (about 12 KB each), while its items stay counted, timed and - when its consumer
    stopped early - counted as abandoned, not as still inside the pipeline."""
    with Pipeline([Stage(Tag, threads=1, kwargs={"tag": "t"})]) as p:
        for i in range(200):
            s = p.stream(buffersize=2)
            s.put(i)
            s.put(i + 1)
            s.close()
            assert list(s) == [[i, "t"], [i + 1, "t"]]
        early = p.stream(buffersize=4)
        for i in range(3):
            early.put(i)
        it = iter(early)
        assert next(it) == [0, "t"]
        it.close()  # the consumer stops reading: the rest is abandoned
        assert p._streams == []
        stats = p.statistics()
        assert (stats.items_in, stats.items_out, stats.items_abandoned) == (403, 401, 2)
        assert stats.latency is not None and stats.latency.count >= 401
