"""Priorities in the routed queues (tasks for a named model, for a key, for one worker): the
scheduling core alone, with fake workers and a fake clock. A higher priority leaves first, as in
the main queue; within a priority, first come first served; a pinned task (a broadcast) is
never overtaken by a task put behind it; the overflow policy drops the lowest priority first;
a lost worker's tasks come back in priority order."""

from __future__ import annotations

from typing import Any

from pytaskqml.core.actions import DROPPED_BY_POLICY, Action, Fail
from pytaskqml.core.scheduler import Scheduler
from pytaskqml.core.tasks import OK, Route, Task
from pytaskqml.core.workerstate import WorkerState


class Sink:
    """A results collector as the core sees one."""

    def __init__(self) -> None:
        self.abandoned = False


def routed(core: Scheduler, name: str, priority: int = 0, **route: Any) -> Task:
    t = Task(core.new_ids(1)[0], name, 0, Sink(), 0, 0.0)
    t.route = Route(**route)
    t.priority = priority
    return t


def admit(core: Scheduler, *tasks: Task) -> list[Action]:
    return core.admit(list(tasks), 0, timed=False, routed=True)[1]


def run_all(core: Scheduler, w: WorkerState, now: float = 0.0) -> list[str]:
    """The worker finishes what it holds, one task at a time, until nothing is left: the
    payloads in the order it ran them."""
    order: list[str] = []
    core.dispatch(now)
    while w.inflight:
        now += 0.02
        done = list(w.inflight.values())
        order += [t.payload for t in done]
        core.results(w, [[t.id, OK, None] for t in done], 0.02 * len(done), now)
    return order


def one_worker(**options: Any) -> tuple[Scheduler, WorkerState]:
    core = Scheduler(max_queue=100, overflow=options.pop("overflow", "block"), max_retries=2)
    # A kind of work never measured: the worker holds one task at a time.
    ws, _ = core.add_worker("w", window=8, now=0.0, **options)
    return core, ws


def test_a_models_queue_gives_the_higher_priority_first() -> None:
    core, w = one_worker(models={"m": "1"})
    admit(core, routed(core, "low0", model="m"))
    core.dispatch(0.0)  # low0 runs
    admit(core, *[routed(core, f"low{i}", model="m") for i in range(1, 4)])
    admit(core, routed(core, "high0", 5, model="m"))
    admit(core, routed(core, "mid", 2, model="m"), routed(core, "high1", 5, model="m"))
    assert [t.payload for t in w.inflight.values()] == ["low0"]
    assert run_all(core, w, 0.0) == ["low0", "high0", "high1", "mid", "low1", "low2", "low3"]


def test_a_keys_queue_gives_the_higher_priority_first_but_not_ahead_of_a_broadcast() -> None:
    core, w = one_worker()
    admit(core, routed(core, "k0", key="cam"))
    core.dispatch(0.0)  # k0 runs; the rest wait in the worker's own queue
    admit(core, routed(core, "k1", key="cam"))
    admit(core, routed(core, "broadcast", pin=w))
    admit(core, routed(core, "k2", key="cam"), routed(core, "urgent", 3, key="cam"))
    # The urgent task passes k2, which came after the broadcast, but not the broadcast, which
    # was put before it (a broadcast runs where it was put: a new setting before what follows).
    assert run_all(core, w) == ["k0", "k1", "broadcast", "urgent", "k2"]


def test_keyed_tasks_waiting_for_a_worker_keep_priority_order() -> None:
    core = Scheduler(max_queue=100, overflow="block", max_retries=2)
    # No worker yet: keyed tasks wait unrouted.
    admit(core, *[routed(core, f"low{i}", key="k") for i in range(3)])
    admit(core, routed(core, "high", 1, key="k"))
    w, _ = core.add_worker("w", window=8, now=0.0)
    assert run_all(core, w) == ["high", "low0", "low1", "low2"]


def test_drop_oldest_in_a_models_queue_drops_the_lowest_priority_first() -> None:
    core = Scheduler(max_queue=4, overflow="drop_oldest", max_retries=2)
    # No worker holds the model yet: its tasks wait.
    admit(core, routed(core, "high", 5, model="m"))
    admit(core, *[routed(core, f"low{i}", model="m") for i in range(3)])
    actions = admit(core, routed(core, "low3", model="m"))
    dropped = [t.payload for a in actions if isinstance(a, Fail) for t in a.tasks]
    assert dropped == ["low0"]
    assert all(a.why == DROPPED_BY_POLICY for a in actions if isinstance(a, Fail))
    w, _ = core.add_worker("w", window=8, now=0.0, models={"m": "1"})
    assert run_all(core, w) == ["high", "low1", "low2", "low3"]


def test_a_lost_workers_tasks_come_back_in_priority_order() -> None:
    core = Scheduler(max_queue=100, overflow="block", max_retries=2)
    a, _ = core.add_worker("a", window=8, now=0.0, models={"m": "1"})
    core.kind_time["m"] = 1e-6  # measured quick: a worker may hold several
    a.ahead = a.max_window
    admit(core, *[routed(core, f"low{i}", model="m") for i in range(2)])
    admit(core, routed(core, "high", 4, model="m"))
    core.dispatch(0.0)
    held = [t.payload for t in a.inflight.values()]
    assert held == ["high", "low0", "low1"]
    admit(core, routed(core, "waiting-high", 4, model="m"), routed(core, "waiting-low", model="m"))
    core.remove_worker(a, graceful=True, now=0.1)
    b, _ = core.add_worker("b", window=1, now=0.1, models={"m": "1"})
    # What a held goes back ahead of what waits at its own priority, behind higher ones.
    assert run_all(core, b, 0.1) == ["high", "waiting-high", "low0", "low1", "waiting-low"]


def test_one_priority_keeps_first_come_first_served() -> None:
    core, w = one_worker(models={"m": "1"})
    admit(core, *[routed(core, f"t{i}", 7, model="m") for i in range(5)])
    assert run_all(core, w) == [f"t{i}" for i in range(5)]
