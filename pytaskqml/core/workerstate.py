"""The scheduler's record of one worker: :class:`WorkerState`, its credit and its window."""

from __future__ import annotations

from collections import deque
from typing import Any

from .tasks import Task

# An adaptive window starts here and then holds about WINDOW_BUDGET seconds of work beyond
# what the worker's round trip takes.
INITIAL_WINDOW = 8
WINDOW_BUDGET = 0.01
MAX_ROUND_TRIP = 1.0  # a longer sample is a stall, not the network


class WorkerState:
    """The core's record of one worker: its credit, what it holds, what it has done.

    ``handle`` is whatever the front attached the worker with; the core never touches it.
    """

    __slots__ = (
        "accepting",
        "adaptive",
        "ahead",
        "batch_size",
        "busy",
        "completed",
        "concurrency",
        "failed",
        "handle",
        "id",
        "inflight",
        "last_progress",
        "loading",
        "max_models",
        "max_window",
        "model_done",
        "model_used",
        "models",
        "name",
        "own",
        "probe",
        "round_trip",
        "task_time",
        "window",
    )

    def __init__(
        self,
        wid: int,
        name: str,
        *,
        window: int,
        adaptive: bool = False,
        batch_size: int = 1,
        concurrency: int = 1,
        handle: Any = None,
        now: float = 0.0,
        models: dict[str, str] | None = None,
        max_models: int | None = None,
    ) -> None:
        self.id = wid
        self.name = name
        self.batch_size = max(1, batch_size)  # tasks that run as one call
        self.concurrency = max(1, concurrency)  # tasks it runs at the same time
        # A batching worker needs room for a batch in hand and one filling behind it.
        self.max_window = max(window, 2 * self.batch_size) if self.batch_size > 1 else window
        self.adaptive = adaptive
        self.window = min(self.max_window, INITIAL_WINDOW) if adaptive else self.max_window
        self.task_time: float | None = None  # EWMA of seconds of work per task (or chunk)
        # Tasks it may hold beyond those it runs at once (see Scheduler.dispatch): none while
        # it has not shown it is kept busy; doubled by each result that finds every worker
        # busy, back to none once it runs dry with nothing queued.
        self.ahead = 0
        self.inflight: dict[int, Task] = {}  # assigned, not answered, in dispatch order
        self.accepting = True
        self.completed = 0
        self.failed = 0
        self.busy = 0.0  # seconds of work it reported, summed
        self.last_progress = now  # last result, or when it got work while holding none
        # When it last got work while holding none (the scheduler sets it), and what the
        # first result after that showed of the time a task spends on its way there and back.
        self.probe: float | None = None
        self.round_trip: float | None = None
        self.handle = handle
        # Named models (see _routing): ready {name: version}, being loaded, when each was last
        # given a task, and how many it has done.
        self.models: dict[str, str] = dict(models or {})
        self.loading: set[str] = set()
        self.model_used: dict[str, float] = {}
        self.model_done: dict[str, int] = {}
        self.max_models = max_models  # None: as many as it is told to load
        # Tasks for this worker only: its share of keyed tasks, and broadcasts pinned to it.
        self.own: deque[Task] = deque()

    def __repr__(self) -> str:
        return f"<WorkerState {self.name} window={self.window} in_flight={len(self.inflight)}>"

    @property
    def free(self) -> int:
        return self.window - len(self.inflight) if self.accepting else 0

    @property
    def slots(self) -> int:
        """How many tasks it runs at the same time (no more than its window)."""
        return min(self.concurrency, self.window)

    def cap(self, per_task: float | None) -> int:
        """How many tasks it may hold while every worker is busy, for tasks estimated at
        *per_task* seconds each (``None``: never measured, so assumed slow): those it runs,
        plus at most :attr:`ahead` more and about :data:`WINDOW_BUDGET` seconds beyond its
        round trip of them - enough to hide the round trip, never a queue that another worker
        could have emptied."""
        slots = min(self.concurrency, self.window)
        if per_task is None or not self.ahead:
            return slots
        budget = WINDOW_BUDGET + (self.round_trip or 0.0)
        extra = int(budget / per_task) if per_task > 1e-7 else self.ahead
        return min(self.window, slots + min(self.ahead, extra))

    def pace(self, waiting: bool) -> None:
        """After its results, and the dispatch they allowed: *waiting* - work still waits, so
        every worker that could take it is busy - doubles :attr:`ahead`; having run dry with
        nothing waiting resets it, so the next burst starts one task per worker again."""
        if waiting:
            self.ahead = min(self.max_window, 2 * self.ahead or 1)
        elif not self.inflight:
            self.ahead = 0

    def observe(self, busy: float, tasks: int, now: float | None = None) -> None:
        """Learn how long a task takes here (and, with *now*, its round trip); size an
        adaptive window from it.

        The window aims at about :data:`WINDOW_BUDGET` seconds of work queued at the worker
        beyond what covers its round trip: a model taking 30 ms per frame on this host gets a
        window of 2 (one in hand, one ready), so frames wait in the coordinator's queue, where
        drop-oldest and deadlines can act, while tiny tasks get a window large enough to hide
        the round trip. A worker 50 ms away gets 50 ms of work more - otherwise it would sit
        idle for most of each round trip, and get a fraction of the share its speed earns.

        The round trip is measured when a worker that held nothing gets work: the time until
        its first result, less the compute time it reports for it. A worker kept busy is not
        measured again, and does not need to be: should its link get slower, its window runs
        dry, it idles, and the next sample corrects it.
        """
        if tasks <= 0 or busy < 0:
            return
        self.busy += busy
        if now is not None and self.probe is not None:
            sample = now - self.probe - busy
            self.probe = None
            if 0 <= sample <= MAX_ROUND_TRIP:
                rt = self.round_trip
                self.round_trip = sample if rt is None else 0.5 * rt + 0.5 * sample
        per = busy / tasks
        self.task_time = per if self.task_time is None else 0.7 * self.task_time + 0.3 * per
        if self.adaptive:
            budget = WINDOW_BUDGET + (self.round_trip or 0.0)
            want = int(budget / max(self.task_time, 1e-7)) + 1
            self.window = max(2, min(self.max_window, want))


def leader(
    workers: list[WorkerState], per_task: float | None, hold: bool = True
) -> tuple[WorkerState | None, int, int]:
    """Work-conserving choice of the worker for the next task: ``(worker, its room, the
    runner-up's room)``, or ``(None, 0, 0)`` when none may take it now.

    While any of *workers* has a free slot (it can start the task at once), only such workers
    count, by free slots: so no worker holds a task it has not started while another idles.
    Only when every one is busy - and the task may wait in a worker's hands (*hold*) - they
    count by the room :meth:`WorkerState.cap` leaves for tasks of *per_task* seconds.
    """
    best: WorkerState | None = None
    best_free = second = 0
    for w in workers:
        f = min(w.concurrency, w.window) - len(w.inflight) if w.accepting else 0
        if f > best_free:
            best, best_free, second = w, f, best_free
        elif f > second:
            second = f
    if best is not None or not hold:
        return best, best_free, second
    for w in workers:
        n = len(w.inflight)
        f = w.cap(per_task) - n if w.accepting and n < w.window else 0
        if f > best_free:
            best, best_free, second = w, f, best_free
        elif f > second:
            second = f
    return best, best_free, second
