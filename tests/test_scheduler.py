"""The scheduling core on its own: fake workers, a fake clock, no threads.

Orderings that are hard to force with processes - a result after its worker was declared
lost, a duplicate after a retry, a deadline expiring between dispatch and result - are plain
sequences of calls here.
"""

from __future__ import annotations

import logging
import queue
from typing import Any

import pytest

from pytaskqml.core.actions import (
    DROPPED_BY_POLICY,
    EXPIRED,
    POISON,
    UNLOADED,
    Action,
    Deliver,
    Fail,
    Late,
    LoadModel,
    Requeued,
    Resolve,
    Send,
)
from pytaskqml.core.scheduler import Scheduler
from pytaskqml.core.tasks import CHUNK, ERROR, OK, RUN, Route, Task
from pytaskqml.core.workerstate import WorkerState
from pytaskqml.engine.delivery import CallbackRunner, TaskFuture
from pytaskqml.errors import TaskFailed


class Sink:
    """A results collector as the core sees one."""

    def __init__(self) -> None:
        self.abandoned = False


RUNNER = CallbackRunner("test")


def make(core: Scheduler, sink: Any = None, *, seq: int = 0, count: int = 1) -> Task:
    payload: Any = list(range(count)) if count > 1 else f"p{seq}"
    return Task(core.new_ids(1)[0], payload, 0, sink or Sink(), seq, 0.0, count)


def fut() -> TaskFuture:
    f = TaskFuture()
    f._runner = RUNNER
    return f


def core_with(*windows: int, max_queue: int = 100, overflow: str = "block", **kw: Any) -> Any:
    core = Scheduler(max_queue=max_queue, overflow=overflow, max_retries=kw.pop("retries", 2))
    workers = [core.add_worker(f"w{i}", window=w, now=0.0, **kw)[0] for i, w in enumerate(windows)]
    return core, workers


def warm(core: Scheduler, per_item: float = 1e-6) -> None:
    """As after a run of quick tasks that kept every worker busy: the kind of work of plain
    tasks is measured, and every worker may hold as many as its window (see
    WorkerState.cap)."""
    core.kind_time[None] = per_item
    for w in core.workers:
        w.ahead = w.max_window


def ids(ws: WorkerState) -> list[int]:
    return list(ws.inflight)


def sent(actions: list[Action]) -> list[WorkerState]:
    """The workers a transition sent tasks to."""
    return [a.worker for a in actions if isinstance(a, Send)]


def told(actions: list[Action]) -> tuple[list[Any], list[Any], list[Any]]:
    """The outcomes in *actions*: ``(sink, outcomes)`` per collector, ``(task, kind, value)``
    per future, the late results."""
    groups = [(a.sink, a.outcomes) for a in actions if isinstance(a, Deliver)]
    futures = [o for a in actions if isinstance(a, Resolve) for o in a.outcomes]
    late = [r for a in actions if isinstance(a, Late) for r in a.results]
    return groups, futures, late


def failed(actions: list[Action] | None, why: str) -> list[Task]:
    return [t for a in actions or [] if isinstance(a, Fail) and a.why == why for t in a.tasks]


def requeued(actions: list[Action] | None) -> int:
    return sum(a.count for a in actions or [] if isinstance(a, Requeued))


def test_admit_and_dispatch_fill_the_least_loaded_worker_up_to_its_window() -> None:
    core, (a, b) = core_with(2, 3)
    warm(core)
    tasks = [make(core, seq=i) for i in range(10)]
    assert core.admit(tasks, 0, timed=False) == (10, [])
    actions = core.dispatch(1.0)
    assert set(sent(actions)) == {a, b} and len(actions) == 2  # one Send per worker
    assert len(a.inflight) == 2 and len(b.inflight) == 3  # never more than the window
    for s in actions:  # send order is in-flight order
        assert isinstance(s, Send) and s.tasks == list(s.worker.inflight.values())
    assert len(core.queue) == 5 and core.live == 10 and core.submitted == 10
    assert core.dispatch(2.0) == []  # no credit left: nothing moves


def test_window_one_alternates_strictly() -> None:
    core, (a, b) = core_with(1, 1)
    core.admit([make(core, seq=i) for i in range(4)], 0, timed=False)
    core.dispatch(0.0)
    first = {ids(a)[0], ids(b)[0]}
    assert first == {1, 2}
    assigned = sent(core.results(a, [[ids(a)[0], OK, "r"]], None, 1.0))
    assert assigned == [a] and len(a.inflight) == 1 and ids(a) == [3]


def test_a_result_is_delivered_once_and_unknown_or_duplicate_ids_are_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core, (a,) = core_with(4)
    sink = Sink()
    t = make(core, sink)
    core.admit([t], 0, timed=False)
    core.dispatch(0.0)
    groups, futures, late = told(core.results(a, [[t.id, OK, "x"]], 0.001, 0.5))
    assert groups == [(sink, [(0, OK, "x")])] and not futures and not late
    assert core.completed == 1 and core.live == 0 and core.latencies[-1] == 0.5
    with caplog.at_level(logging.WARNING, logger="pytaskqml"):
        again = core.results(a, [[t.id, OK, "x"], [999, OK, "y"]], None, 0.6)
    assert again == [] and core.completed == 1
    assert "does not hold" in caplog.text


def test_futures_get_their_outcome_apart_from_collectors() -> None:
    core, (a,) = core_with(4)
    f = fut()
    t = make(core, f)
    core.admit([t], 0, timed=False)
    core.dispatch(0.0)
    assert f.running()  # set_running_or_notify_cancel at first dispatch
    _, futures, _ = told(core.results(a, [[t.id, ERROR, TaskFailed("E", "m")]], None, 1.0))
    assert futures[0][0] is t and futures[0][1] == ERROR and core.failed == 1


def test_a_future_cancelled_while_queued_is_finished_at_dispatch() -> None:
    core, _ = core_with(4)
    f = fut()
    t = make(core, f)
    core.admit([t], 0, timed=False)
    assert f.cancel()
    assert core.dispatch(0.0) == [] and t.finished and core.cancelled == 1 and core.live == 0


def test_a_result_arriving_after_its_worker_was_declared_lost_is_ignored() -> None:
    core, (a, b) = core_with(1, 1)
    sink = Sink()
    t = make(core, sink)
    core.admit([t], 0, timed=False)
    core.dispatch(0.0)
    holder, other = (a, b) if t.id in a.inflight else (b, a)
    actions = core.remove_worker(holder, graceful=False, now=1.0)
    assert requeued(actions) == 1 and not failed(actions, POISON) and t.attempts == 1
    assert sent(actions or []) == [other]
    assert core.workers_lost == 1 and core.retried == 1
    # The lost worker's result comes in anyway (it was slow, not dead): not delivered.
    assert core.results(holder, [[t.id, OK, "from the lost worker"]], None, 1.5) == []
    groups, _, _ = told(core.results(other, [[t.id, OK, "retry"]], None, 2.0))
    assert groups == [(sink, [(0, OK, "retry")])]
    # A duplicate after the retry finished: not delivered a second time.
    assert core.results(other, [[t.id, OK, "dup"]], None, 2.5) == []
    assert core.completed == 1
    assert core.remove_worker(holder, graceful=False, now=3.0) is None  # once only


def test_only_the_running_batch_is_charged_and_a_poison_task_fails_alone() -> None:
    core, (a,) = core_with(4, retries=1)
    warm(core)
    tasks = [make(core, seq=i) for i in range(3)]
    core.admit(tasks, 0, timed=False)
    core.dispatch(0.0)
    actions = core.remove_worker(a, graceful=False, now=1.0)
    assert requeued(actions) == 3 and [t.attempts for t in tasks] == [1, 0, 0]
    assert [t.id for t in core.queue.items] == [t.id for t in tasks]  # back at the front, in order
    b, _ = core.add_worker("b", window=4, now=1.0)
    b.ahead = 4
    core.dispatch(1.0)
    actions = core.remove_worker(b, graceful=False, now=2.0)
    assert failed(actions, POISON) == [tasks[0]] and tasks[0].finished and core.poisoned == 1
    assert requeued(actions) == 2


def test_a_graceful_departure_charges_nothing() -> None:
    core, (a,) = core_with(4)
    tasks = [make(core, seq=i) for i in range(3)]
    core.admit(tasks, 0, timed=False)
    core.dispatch(0.0)
    core.remove_worker(a, graceful=True, now=1.0)
    assert [t.attempts for t in tasks] == [0, 0, 0] and core.workers_lost == 0


def test_a_running_chunk_of_a_lost_worker_is_split_into_single_items() -> None:
    core, (a,) = core_with(4)
    sink = Sink()
    chunk = make(core, sink, seq=10, count=3)
    core.admit([chunk], 0, timed=False)
    core.dispatch(0.0)
    core.remove_worker(a, graceful=False, now=1.0)
    singles = list(core.queue.items)
    assert chunk.finished and [t.seq for t in singles] == [10, 11, 12]
    assert [t.payload for t in singles] == [0, 1, 2] and all(t.attempts == 1 for t in singles)
    assert core.live == 3


def test_chunk_results_in_one_run_and_with_mixed_outcomes() -> None:
    core, (a,) = core_with(4)
    warm(core)
    sink = Sink()
    c1, c2 = make(core, sink, seq=0, count=2), make(core, sink, seq=2, count=2)
    core.admit([c1, c2], 0, timed=False)
    core.dispatch(0.0)
    err = TaskFailed("E", "m")
    groups, _, _ = told(
        core.results(
            a, [[c1.id, RUN, ["a", "b"]], [c2.id, CHUNK, [(OK, "c"), (ERROR, err)]]], 0.002, 1.0
        )
    )
    assert groups == [(sink, [(0, RUN, ["a", "b"]), (2, OK, "c"), (3, ERROR, err)])]
    assert core.completed == 3 and core.failed == 1 and core.item_time == pytest.approx(0.0005)


def test_a_chunk_answered_with_the_wrong_number_of_results_fails() -> None:
    core, (a,) = core_with(4)
    sink = Sink()
    c = make(core, sink, count=3)
    core.admit([c], 0, timed=False)
    core.dispatch(0.0)
    groups, _, _ = told(core.results(a, [[c.id, RUN, ["only one"]]], None, 1.0))
    kinds = [k for _, k, _ in groups[0][1]]
    assert kinds == [ERROR] * 3 and "answered a chunk of 3" in str(groups[0][1][0][2])


def test_a_deadline_expiring_between_dispatch_and_result_makes_the_result_late() -> None:
    core, (a,) = core_with(4)
    sink = Sink()
    t = make(core, sink)
    t.deadline = 5.0
    core.admit([t], 0, timed=True)
    core.dispatch(0.0)
    assert core.next_deadline() == 5.0
    assert core.expire(4.9) == []
    expired = failed(core.expire(5.0), EXPIRED)
    assert expired == [t] and t.finished and core.timed_out == 1 and core.live == 0
    groups, _, late = told(core.results(a, [[t.id, OK, "too late"]], None, 6.0))
    assert not groups and len(late) == 1 and late[0].value == "too late" and core.late == 1
    assert not a.inflight  # its credit came back with the late result


def test_a_queued_task_past_its_deadline_leaves_the_queue() -> None:
    core, _ = core_with()
    t = make(core)
    t.deadline = 1.0
    core.admit([t], 0, timed=True)
    assert failed(core.expire(2.0), EXPIRED) == [t] and len(core.queue) == 0


def test_a_run_timeout_starts_at_dispatch_and_only_on_a_worker_that_can_start_it() -> None:
    core, (a,) = core_with(4)  # runs one task at a time
    tasks = [make(core, seq=i) for i in range(3)]
    for t in tasks:
        t.run_timeout = 1.0
    core.admit(tasks, 0, timed=False)
    core.dispatch(10.0)
    assert ids(a) == [tasks[0].id] and tasks[0].deadline == 11.0 and tasks[1].deadline is None
    core.results(a, [[tasks[0].id, OK, 0]], None, 10.5)
    assert ids(a) == [tasks[1].id] and tasks[1].deadline == 11.5  # its clock starts now
    assert core.expire(11.4) == []


def test_overflow_block_stops_at_the_bound() -> None:
    core, _ = core_with(max_queue=3)
    tasks = [make(core, seq=i) for i in range(5)]
    assert core.admit(tasks, 0, timed=False) == (3, [])
    assert core.full and core.live == 3


def test_overflow_reject_raises_and_counts() -> None:
    core, _ = core_with(max_queue=1, overflow="reject")
    core.admit([make(core)], 0, timed=False)
    with pytest.raises(queue.Full):
        core.admit([make(core)], 0, timed=False)
    assert core.rejected == 1 and core.live == 1


def test_overflow_drop_oldest_drops_and_counts() -> None:
    core, _ = core_with(max_queue=2, overflow="drop_oldest")
    tasks = [make(core, seq=i) for i in range(4)]
    n, actions = core.admit(tasks, 0, timed=False)
    assert n == 4 and failed(actions, DROPPED_BY_POLICY) == tasks[:2] and core.dropped == 2
    assert list(core.queue.items) == tasks[2:] and core.live == 2


def test_skipped_tasks_give_their_credit_back() -> None:
    core, (a,) = core_with(1)
    t1, t2 = make(core), make(core)
    core.admit([t1, t2], 0, timed=False)
    core.dispatch(0.0)
    t1.finished = True  # e.g. timed out while waiting in the worker's queue
    assert sent(core.skipped(a, [t1], 1.0)) == [a] and ids(a) == [t2.id]


def test_an_abandoned_collector_loses_its_queued_tasks() -> None:
    core, _ = core_with()
    gone, kept = Sink(), Sink()
    core.admit([make(core, gone), make(core, kept), make(core, gone)], 0, timed=False)
    gone.abandoned = True
    core.cancel_abandoned()
    assert [t.sink for t in core.queue.items] == [kept] and core.cancelled == 2


def test_endings_cancel_queued_abandon_in_flight_and_strand() -> None:
    core, (a,) = core_with(1)
    tasks = [make(core, seq=i) for i in range(3)]
    core.admit(tasks, 0, timed=False)
    core.dispatch(0.0)
    running, busy = core.abandon_inflight()
    assert running == [tasks[0]] and busy == [a] and core.cancelled == 1
    assert core.cancel_queued() == tasks[1:] and core.live == 0
    core.remove_worker(a, graceful=True, now=1.0)
    more = [make(core), make(core)]
    core.admit(more, 0, timed=False)
    assert core.strand() == more and core.stranded and core.failed == 2
    core.add_worker("new", window=1, now=2.0)
    assert not core.stranded


def test_adaptive_window_follows_the_measured_task_time() -> None:
    core = Scheduler(max_queue=10, overflow="block", max_retries=1)
    ws, _ = core.add_worker("w", window=64, adaptive=True, now=0.0)
    assert ws.window == 8
    ws.observe(0.030, 1)  # 30 ms per task: one in hand, one ready
    assert ws.window == 2
    for _ in range(20):
        ws.observe(0.00001, 100)  # tiny tasks: up to the cap
    assert ws.window == 64


def test_finished_tasks_do_not_pile_up_in_the_deadline_heap() -> None:
    core, (a,) = core_with(10_000)
    for _ in range(5):
        warm(core)  # (a worker that ran dry with nothing queued starts again at one task)
        tasks = [make(core, seq=i) for i in range(1000)]
        for t in tasks:
            t.deadline = 1e9
        core.admit(tasks, 0, timed=True)
        core.dispatch(0.0)
        core.results(a, [[t.id, OK, 0] for t in tasks], None, 1.0)
    assert core.live == 0 and len(core.deadlines) <= 2 * 1000 + 1024


def test_an_adaptive_window_covers_the_measured_round_trip() -> None:
    """A worker 50 ms away, 3 ms per task: the window holds the round trip's worth of tasks
    on top of the usual 10 ms, so the worker does not sit idle waiting for its next task."""
    core, (near, far) = core_with(64, 64, adaptive=True)
    warm(core, 0.003)
    core.admit([make(core, seq=i) for i in range(200)], 0, timed=False)
    core.dispatch(0.0)  # both idle: each gets work, and a round-trip probe
    t_near, t_far = ids(near)[0], ids(far)[0]
    core.results(near, [[t_near, OK, 0]], 0.003, 0.0035)  # answered 0.5 ms after it was sent
    core.results(far, [[t_far, OK, 0]], 0.003, 0.053)  # 53 ms: 50 of them on the way
    assert near.round_trip == pytest.approx(0.0005) and far.round_trip == pytest.approx(0.050)
    assert near.window == int(0.0105 / 0.003) + 1 == 4
    assert far.window == int(0.060 / 0.003) + 1 == 21
    # Busy workers are not probed again: a later result does not change the estimate.
    core.results(far, [[ids(far)[0], OK, 0]], 0.003, 0.5)
    assert far.round_trip == pytest.approx(0.050)


# ---------------------------------------------------------------- work-conserving dispatch


def routed(core: Scheduler, model: str, seq: int = 0) -> Task:
    t = make(core, seq=seq)
    t.route = Route(model=model)
    return t


@pytest.mark.parametrize("n", [2, 4])
def test_a_burst_of_slow_tasks_on_idle_workers_spreads_one_per_worker(n: int) -> None:
    """Never measured, so assumed slow: one task per worker, the rest wait in the queue for
    whichever worker finishes first - even with windows of 64."""
    core, workers = core_with(*[64] * n, adaptive=True)
    tasks = [make(core, seq=i) for i in range(3 * n)]
    core.admit(tasks, 0, timed=False)
    assert set(sent(core.dispatch(0.0))) == set(workers)
    assert [len(w.inflight) for w in workers] == [1] * n
    assert len(core.queue) == 2 * n
    # The first to finish takes the next one; nobody else gets one to hold.
    first = workers[-1]
    core.results(first, [[ids(first)[0], OK, 0]], 1.0, 1.0)
    assert [len(w.inflight) for w in workers] == [1] * n and len(core.queue) == 2 * n - 1
    assert core.kind_time[None] == pytest.approx(1.0)
    assert first.cap(core.kind_time[None]) == 1  # measured slow: still one at a time


def test_after_quick_tasks_a_burst_still_spreads_over_every_worker() -> None:
    """Quick tasks taught the core that plain tasks are quick; the workers then ran dry. The
    next burst (the same function, slow arguments) must not go to one worker's window."""
    core, (a, b) = core_with(64, 64, adaptive=True)
    t = make(core)
    core.admit([t], 0, timed=False)
    core.dispatch(0.0)
    holder = a if a.inflight else b
    core.results(holder, [[t.id, OK, 0]], 0.00001, 0.001)
    assert core.kind_time[None] == pytest.approx(0.00001) and holder.ahead == 0
    burst = [make(core, seq=i) for i in range(6)]
    core.admit(burst, 0, timed=False)
    core.dispatch(0.002)
    assert len(a.inflight) == 1 and len(b.inflight) == 1 and len(core.queue) == 4


def test_windows_grow_only_while_every_worker_is_busy() -> None:
    core, (a, b) = core_with(64, 64, adaptive=True)
    core.kind_time[None] = 0.0001  # quick: 100 tasks cover the window budget
    core.admit([make(core, seq=i) for i in range(2)], 0, timed=False)
    core.dispatch(0.0)
    # Nothing waits: b's result does not let it hold more, and it runs dry.
    core.results(b, [[ids(b)[0], OK, 0]], 0.0001, 0.001)
    assert b.ahead == 0 and not b.inflight
    # Plenty waits while both run: each result doubles what its worker may hold.
    core.admit([make(core, seq=i) for i in range(2, 500)], 0, timed=False)
    core.dispatch(0.002)
    assert len(a.inflight) == 1 and len(b.inflight) == 1  # a free slot each, no more
    core.results(b, [[ids(b)[0], OK, 0]], 0.0001, 0.003)
    assert b.ahead == 1 and len(b.inflight) == 1  # grown after this dispatch: used next time
    core.results(b, [[ids(b)[0], OK, 0]], 0.0001, 0.004)
    assert b.ahead == 2 and len(b.inflight) == 2  # one running, one ready behind it
    core.results(b, [[ids(b)[0], OK, 0]], 0.0001, 0.005)
    assert b.ahead == 4 and len(b.inflight) == 3
    # The rest is cancelled: b drains, and once it has run dry it starts again at one.
    for t in core.queue.clear():
        t.finished = True
    for _ in range(3):
        core.results(b, [[ids(b)[0], OK, 0]], 0.0001, 0.006)
    assert not b.inflight and b.ahead == 0


def test_each_model_has_its_own_estimate() -> None:
    """Plain tasks measured quick say nothing about a model never measured: its burst goes one
    per worker holding it, the rest wait for whichever worker finishes first."""
    core, (a, b) = core_with(64, 64, adaptive=True, models={"slow": "1"})
    warm(core)  # plain tasks: quick, and every worker may hold its window of them
    burst = [routed(core, "slow", i) for i in range(5)]
    core.admit(burst, 0, timed=False, routed=True)
    core.dispatch(0.0)
    assert len(a.inflight) == 1 and len(b.inflight) == 1 and core.queued == 3
    holder = a
    core.results(holder, [[ids(holder)[0], OK, 0]], 2.0, 2.0)
    assert core.kind_time["slow"] == pytest.approx(2.0) and core.kind_time[None] == 1e-6
    assert len(a.inflight) == 1 and len(b.inflight) == 1 and core.queued == 2


def test_an_idle_worker_loads_an_on_demand_model_whose_tasks_wait() -> None:
    """With models loaded on demand, a model's tasks must not all wait for the one worker
    that has it while another worker has nothing to do: the idle one loads it too."""
    core, (a, b) = core_with(8, 8, max_models=2)
    core.router.on_demand.add("m")
    core.admit([routed(core, "m", i) for i in range(4)], 0, timed=False, routed=True)
    loads = [(a.worker, a.model) for a in core.dispatch(0.0) if isinstance(a, LoadModel)]
    assert len(loads) == 1  # one load at a time
    first = loads[0][0]
    other = b if first is a else a
    actions = core.model_ready(first, "m", "1", 0.1)
    assert len(first.inflight) == 1
    # Tasks wait and the other worker is idle: it is asked to load the model too.
    assert [(a.worker, a.model) for a in actions if isinstance(a, LoadModel)] == [(other, "m")]
    core.model_ready(other, "m", "1", 0.2)
    assert len(other.inflight) == 1 and core.queued == 2


def test_unloading_a_model_finishes_its_waiting_tasks_and_any_that_comes_back() -> None:
    core, (a,) = core_with(8, models={"m": "1"})
    tasks = [routed(core, "m", i) for i in range(5)]
    core.admit(tasks, 0, timed=False, routed=True)
    core.dispatch(0.0)
    assert len(a.inflight) == 1 and core.queued == 4
    stuck = failed(core.model_unloaded("m"), UNLOADED)
    assert stuck == tasks[1:] and all(t.finished for t in stuck)
    assert core.queued == 0 and core.live == 1 and core.failed == 4
    # The worker dies: its task comes back for a model that is gone - it fails too.
    assert failed(core.remove_worker(a, graceful=False, now=1.0), UNLOADED) == [tasks[0]]
    assert core.live == 0
    # Loaded again by name: its tasks wait for it once more.
    core.model_declared("m")
    late = routed(core, "m", 9)
    _, actions = core.admit([late], 0, timed=False, routed=True)
    assert core.queued == 1 and not failed(actions, UNLOADED)


def test_tasks_of_a_map_with_a_deadline_are_never_held_by_a_busy_worker() -> None:
    """map(total_timeout=): what has not started when it expires is cancelled, which a task
    a worker holds cannot be - so they go only to a worker that can start them at once."""
    core, (a,) = core_with(8)
    warm(core)
    sink = Sink()
    sink.start_only = True  # type: ignore[attr-defined]
    core.admit([make(core, sink, seq=i) for i in range(4)], 0, timed=False)
    core.dispatch(0.0)
    assert len(a.inflight) == 1 and len(core.queue) == 3


# ------------------------------------------------------------------ fair share, priorities


def sourced(core: Scheduler, src: Any, seq: int, *, priority: int = 0, t: float = 0.0) -> Task:
    task = Task(core.new_ids(1)[0], f"{src.name}{seq}", 0, Sink(), seq, t)
    task.source, task.priority = src, priority
    return task


def finish(core: Scheduler, w: WorkerState, now: float) -> list[Task]:
    """The worker answers every task it holds; returns them."""
    done = list(w.inflight.values())
    core.results(w, [[t.id, OK, None] for t in done], 0.02 * len(done), now)
    return done


def test_a_flooding_source_does_not_delay_the_light_sources_next_task() -> None:
    core, (a, b) = core_with(2, 2, max_queue=1000)
    warm(core, 0.02)
    flood = core.new_source("stream")
    light = [core.new_source("stream") for _ in range(3)]
    # The flooder's backlog is there first: 200 frames.
    core.admit([sourced(core, flood, i) for i in range(200)], 0, timed=False)
    core.dispatch(0.0)
    now = 0.0
    for frame in range(5):
        # Each light source puts its next frame behind the flooder's backlog.
        mine = [sourced(core, s, frame, t=now) for s in light]
        for t in mine:
            core.admit([t], 0, timed=False)
        core.admit([sourced(core, flood, 200 + frame, t=now)], 0, timed=False)
        # The light frames take the next free slots (two per task time here), although
        # 190-odd frames of the flooder are older: none of those goes before them.
        flood_sent = 0
        for _ in range(2):
            now += 0.02
            for w in (a, b):
                finish(core, w, now)
                flood_sent += sum(1 for t in w.inflight.values() if t.source is flood)
            if all(t.started for t in mine):
                break
        assert all(t.started for t in mine), f"frame {frame}: light sources waited"
        assert flood_sent <= 1  # (the one slot left over after the third light frame)
        assert len(core.queue) > 150  # the flooder's backlog is still there
    assert all(s.processed >= 4 for s in light)
    assert flood.items_in == 205


def test_each_source_keeps_its_own_order_and_sources_take_turns() -> None:
    core, (a,) = core_with(1, max_queue=1000)
    x, y = core.new_source("stream"), core.new_source("stream")
    core.admit([sourced(core, x, i) for i in range(4)], 0, timed=False)
    core.admit([sourced(core, y, i) for i in range(2)], 0, timed=False)
    order = []
    now = 0.0
    core.dispatch(now)
    while a.inflight:
        order += [t.payload for t in finish(core, a, now)]
        now += 0.02
    assert order == ["stream-10", "stream-20", "stream-11", "stream-21", "stream-12", "stream-13"]


def test_a_weight_gives_a_source_that_share_of_the_turns() -> None:
    core, (a,) = core_with(1, max_queue=1000)
    heavy, plain = core.new_source("s", weight=3), core.new_source("s")
    core.admit([sourced(core, heavy, i) for i in range(6)], 0, timed=False)
    core.admit([sourced(core, plain, i) for i in range(6)], 0, timed=False)
    got = []
    core.dispatch(0.0)
    while a.inflight:
        got += [t.source is heavy for t in finish(core, a, 0.0)]
    assert sum(got[:8]) == 6  # three to one while both have work
    assert got[8:] == [False] * 4  # (the heavy source has run dry)


def test_higher_priority_goes_first_and_low_priority_waits_while_high_keeps_coming() -> None:
    core, (a,) = core_with(1, max_queue=1000)
    low, high = core.new_source("low"), core.new_source("high")
    core.admit([sourced(core, low, i) for i in range(5)], 0, timed=False)
    core.dispatch(0.0)  # the first low task is running
    now = 0.0
    # A sustained flow of high-priority work: one new task per task finished. Priorities are
    # strict (documented): the waiting low tasks get nothing while it lasts.
    for i in range(20):
        core.admit([sourced(core, high, i, priority=5)], 0, timed=False)
        now += 0.02
        done = finish(core, a, now)
        assert all(t.source is high for t in done) or i == 0
    assert low.processed == 1 and high.processed == 19
    # Once it stops, the low tasks run, in their order.
    rest = []
    while a.inflight:
        now += 0.02
        rest += finish(core, a, now)
    assert [t.seq for t in rest if t.source is low] == [1, 2, 3, 4]


def test_drop_oldest_drops_from_the_source_that_fills_the_queue() -> None:
    core, _ = core_with(1, max_queue=10, overflow="drop_oldest")
    flood, light = core.new_source("flood"), core.new_source("light")
    core.admit([sourced(core, light, 0)], 0, timed=False)
    core.dispatch(0.0)  # runs at once
    core.admit([sourced(core, light, 1)], 0, timed=False)
    core.admit([sourced(core, flood, i) for i in range(9)], 0, timed=False)
    dropped = failed(core.admit([sourced(core, flood, 9)], 0, timed=False)[1], DROPPED_BY_POLICY)
    assert [t.source for t in dropped] == [flood] and dropped[0].seq == 0
    assert flood.dropped == 1 and light.dropped == 0


def test_drop_oldest_between_live_sources_keeps_each_ones_newest() -> None:
    """Two cameras, a queue of 2, a worker far slower than they are: whichever source's new
    frame needs the room drops its own older one when the two hold as many, so each source
    always has its newest frame waiting (none is starved of results)."""
    core, _ = core_with(1, max_queue=2, overflow="drop_oldest")
    a, b = core.new_source("a"), core.new_source("b")
    core.admit([sourced(core, a, 0)], 0, timed=False)
    core.dispatch(0.0)  # the worker is busy with a's first frame from here on
    for i in range(1, 8):
        for src in (a, b) if i % 3 else (b, a):  # either may come first
            core.admit([sourced(core, src, i)], 0, timed=False)
        waiting = {(t.source is a, t.seq) for t in core.queue.items}
        assert waiting == {(True, i), (False, i)}
    assert a.dropped == 6 and b.dropped == 6


def test_the_fair_queue_puts_back_the_task_it_just_gave_and_forgets_idle_sources() -> None:
    import gc
    import weakref

    from pytaskqml.core.ordered import MAX_IDLE_LANES, FairQueue
    from pytaskqml.core.tasks import Source

    q = FairQueue()
    a, b = Source("a"), Source("b")
    core = Scheduler(max_queue=10, overflow="block", max_retries=1)
    q.extend([sourced(core, a, i) for i in range(3)])
    q.extend([sourced(core, b, i) for i in range(3)])
    first = q.popleft()
    q.appendleft(first)  # as dispatch does with a task no worker can start at once
    assert q[0] is first and [q.popleft().seq for _ in range(6)] == [0, 0, 1, 1, 2, 2]
    q.settle()
    # Sources come and go (a stream per HTTP request): the lanes of those with nothing
    # waiting are forgotten, so a source is not kept alive by the queue.
    ref = weakref.ref(a)
    del a, first
    for i in range(MAX_IDLE_LANES + 1):
        s = Source(f"s{i}")
        q.append(sourced(core, s, 0))
        q.popleft()
    q.settle()
    gc.collect()
    assert ref() is None and len(q) == 0
