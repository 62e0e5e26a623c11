"""The engine on its own: a real :class:`Engine` driving fake handles - no worker threads, no
processes, no sockets. A fake handle takes what the engine queued for it when woken, and the
test answers for it through the engine's ``results``/``lost``/``model_status`` calls, in
whatever order it needs."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from pytaskqml.core.tasks import ERROR, OK, Route, Task
from pytaskqml.engine.delivery import CallbackRunner, TaskFuture
from pytaskqml.engine.engine import Engine
from pytaskqml.engine.iterate import Collector
from pytaskqml.errors import NoWorkersError, WorkerLostError

T = 10.0  # seconds: the bound on every wait here


class FakeHandle:
    """What the engine uses of a worker handle, and nothing more: the tasks it was sent are
    taken from its ``queue`` when it is woken (as a handle's sender would) and kept in
    ``sent``, in order."""

    kind = "fake"
    pid = address = None
    restarts = 0

    def __init__(
        self,
        name: str,
        *,
        window: int = 4,
        batch_size: int = 1,
        concurrency: int | None = None,
        models: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.window: int | None = window
        self.batch_size = batch_size
        self.concurrency = window if concurrency is None else concurrency  # starts all at once
        self.initial_models = dict(models or {})
        self.interrupt_grace: float | None = None
        self.state: Any = None
        self.owner: Any = None
        self.queue: deque[Task] = deque()
        self.sent: list[Task] = []
        self.started = self.closed = False
        self.commands: list[tuple[str, str]] = []

    def start(self) -> None:
        self.started = True

    def wake(self, inline: bool = False) -> None:
        while self.queue:
            self.sent.append(self.queue.popleft())

    def close(self) -> None:
        self.closed = True

    def interrupt(self, task_ids: list[int]) -> None:
        pass

    def request_stop(self) -> None:
        self.close()

    def shared_memory(self) -> None:
        return None

    def traffic(self) -> None:
        return None

    def running(self) -> list[Task]:
        """What it holds, in the order it was sent (answered tasks drop out)."""
        held = self.state.inflight
        return [t for t in self.sent if t.id in held]


class Setup:
    def __init__(self, *, max_retries: int = 2, reinforcements: bool = True) -> None:
        self.runner = CallbackRunner("test-engine")
        self.engine = Engine(
            name="test",
            max_queue=1000,
            overflow="block",
            max_retries=max_retries,
            max_window=8,
            runner=self.runner,
            on_late=None,
            reinforcements=lambda: reinforcements,
            strand_error=lambda: NoWorkersError("no workers left"),
        )
        self.requests: list[tuple[str, FakeHandle, str]] = []
        self.engine.on_model_request = self._requested  # type: ignore[assignment]

    def _requested(self, verb: str, handle: FakeHandle, model: str) -> None:
        self.requests.append((verb, handle, model))

    def attach(self, name: str, **kw: Any) -> FakeHandle:
        h = FakeHandle(name, **kw)
        assert self.engine.attach(h)  # type: ignore[arg-type]
        assert h.started
        return h

    def future(self, payload: Any, **kw: Any) -> tuple[TaskFuture, Task]:
        f = TaskFuture()
        f._runner = self.runner
        t = Task(self.engine.new_ids(1)[0], payload, 0, f, 0, self.engine.clock())
        for k, v in kw.items():
            setattr(t, k, v)
        self.engine.admit([t], timed=t.deadline is not None, routed=t.route is not None)
        return f, t

    def answer(self, h: FakeHandle, tasks: list[Task], value: Any = None) -> None:
        rows = [[t.id, OK, t.payload if value is None else value] for t in tasks]
        self.engine.results(h, rows, None)  # type: ignore[arg-type]

    def stats(self) -> Any:
        return self.engine.statistics(restarts=0, rejected_peers=0, uptime=0.0)

    def close(self) -> None:
        self.engine.stop()
        self.engine.stop_timer()
        self.runner.close()


@pytest.fixture
def setup() -> Any:
    s = Setup()
    yield s
    s.close()


def test_tasks_are_sent_in_order_and_results_reach_their_futures(setup: Setup) -> None:
    h = setup.attach("a", window=4)
    made = [setup.future(i) for i in range(6)]
    tasks = [t for _, t in made]
    # The window holds four: they were sent in submission order, which is in-flight order.
    assert h.sent == tasks[:4] and list(h.state.inflight.values()) == tasks[:4]
    setup.answer(h, tasks[:2])
    assert h.sent == tasks  # the freed credit went to the next two, in order
    setup.answer(h, tasks[2:])
    assert [f.result(T) for f, _ in made] == list(range(6))
    assert setup.stats().completed == 6


def test_a_maps_results_reach_its_collector_in_submission_order(setup: Setup) -> None:
    a, b = setup.attach("a", window=2), setup.attach("b", window=2)
    collector = Collector(ordered=True)
    ids = setup.engine.new_ids(4)
    now = setup.engine.clock()
    tasks = [Task(ids[i], f"x{i}", 0, collector, i, now) for i in range(4)]
    setup.engine.admit(tasks)
    assert sorted(t.seq for t in a.sent + b.sent) == [0, 1, 2, 3]
    # Answered backwards, worker by worker: the collector still hands them out in order.
    for h in (b, a) if b.sent[0].seq > a.sent[0].seq else (a, b):
        setup.answer(h, list(reversed(h.running())))
    assert [collector.get_next(T)[2] for _ in range(4)] == ["x0", "x1", "x2", "x3"]


def test_a_lost_workers_running_task_is_charged_and_the_others_go_back_free() -> None:
    setup = Setup(max_retries=1)
    try:
        a = setup.attach("a", window=4)
        made = [setup.future(i) for i in range(3)]
        tasks = [t for _, t in made]
        assert a.sent == tasks
        setup.engine.lost(a, RuntimeError("killed"), False)  # type: ignore[arg-type]
        assert a.closed and not a.queue
        # Only the first (running: batch_size 1) was charged; all three wait, in order.
        assert [t.attempts for t in tasks] == [1, 0, 0]
        b = setup.attach("b", window=4)
        assert b.sent == tasks
        setup.engine.lost(b, RuntimeError("killed again"), False)  # type: ignore[arg-type]
        # Charged twice with max_retries=1: poison, failed alone; the others go on.
        err = made[0][0].exception(T)
        assert isinstance(err, WorkerLostError) and "killed 2 workers" in str(err)
        c = setup.attach("c", window=4)
        assert c.sent == tasks[1:]
        setup.answer(c, tasks[1:])
        assert [f.result(T) for f, _ in made[1:]] == [1, 2]
        stats = setup.stats()
        assert stats.poisoned == 1 and stats.retried >= 4
    finally:
        setup.close()


def test_the_last_worker_lost_with_none_to_come_fails_the_queue() -> None:
    setup = Setup(reinforcements=False)
    try:
        a = setup.attach("a", window=1)
        made = [setup.future(i) for i in range(2)]
        setup.engine.lost(a, None, True)  # type: ignore[arg-type]
        for f, _ in made:
            assert isinstance(f.exception(T), NoWorkersError)
        f, _ = setup.future("late")  # and so does what comes after, at once
        assert isinstance(f.exception(T), NoWorkersError)
    finally:
        setup.close()


def test_a_deadline_expires_a_task_the_worker_never_answers(setup: Setup) -> None:
    h = setup.attach("a", window=2)
    f, t = setup.future("slow", deadline=setup.engine.clock() + 0.05)
    assert h.sent == [t]
    assert isinstance(f.exception(T), TimeoutError)  # the engine's deadline thread
    assert t.finished and h.state.inflight == {t.id: t}  # it holds the task still
    setup.answer(h, [t])  # the answer comes after all: a late result, not delivered again
    assert setup.engine.late_results()[0].task_id == t.id
    assert not h.state.inflight  # and its credit came back with it
    assert setup.stats().timed_out == 1


def test_a_model_load_is_asked_of_a_worker_and_the_task_waits_for_it(setup: Setup) -> None:
    setup.engine.max_models = 2
    h = setup.attach("a", window=4)
    setup.engine.set_on_demand("m", True)
    f, t = setup.future("frame", route=Route(model="m"))
    assert setup.requests == [("load", h, "m")] and h.sent == []  # waits for the model
    setup.engine.model_status(h, {"name": "m", "state": "loaded", "version": "1"})  # type: ignore[arg-type]
    assert h.sent == [t]
    setup.answer(h, [t], "boxes")
    assert f.result(T) == "boxes"


def test_a_model_that_fails_to_load_fails_its_waiting_tasks(setup: Setup) -> None:
    setup.engine.max_models = 1
    h = setup.attach("a", window=4)
    setup.engine.set_on_demand("m", True)
    f, _ = setup.future("frame", route=Route(model="m"))
    status = {"name": "m", "state": "failed", "error": "no such file"}
    setup.engine.model_status(h, status)  # type: ignore[arg-type]
    err = f.exception(T)
    assert err is not None and "no such file" in str(err)


def test_an_unloaded_models_waiting_tasks_fail(setup: Setup) -> None:
    setup.attach("a", window=4)
    setup.engine.declare_model("m")
    f, _ = setup.future("frame", route=Route(model="m"))
    setup.engine.unload_model("m")
    err = f.exception(T)
    assert err is not None and "unloaded" in str(err)


def test_an_error_result_reaches_its_future(setup: Setup) -> None:
    h = setup.attach("a", window=1)
    f, t = setup.future("x")
    setup.engine.results(h, [[t.id, ERROR, ValueError("bad")]], None)  # type: ignore[arg-type]
    assert isinstance(f.exception(T), ValueError)
