"""The scheduler's record of one worker: :class:`WorkerState`, its credit and its window."""

from __future__ import annotations

from collections import deque
from typing import Any

from ._tasks import Task

# An adaptive window starts here and then holds about WINDOW_BUDGET seconds of work.
INITIAL_WINDOW = 8
WINDOW_BUDGET = 0.01


class WorkerState:
    """The core's record of one worker: its credit, what it holds, what it has done.

    ``handle`` is whatever the front attached the worker with; the core never touches it.
    """

    __slots__ = (
        "accepting",
        "adaptive",
        "batch_size",
        "busy",
        "completed",
        "concurrency",
        "failed",
        "handle",
        "id",
        "inflight",
        "last_progress",
        "max_window",
        "name",
        "outbox",
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
        self.inflight: dict[int, Task] = {}  # assigned, not answered, in dispatch order
        self.outbox: deque[Task] = deque()  # assigned, not yet taken by the worker's sender
        self.accepting = True
        self.completed = 0
        self.failed = 0
        self.busy = 0.0  # seconds of work it reported, summed
        self.last_progress = now  # last result, or when it got work while holding none
        self.handle = handle

    def __repr__(self) -> str:
        return f"<WorkerState {self.name} window={self.window} in_flight={len(self.inflight)}>"

    @property
    def free(self) -> int:
        return self.window - len(self.inflight) if self.accepting else 0

    def observe(self, busy: float, tasks: int) -> None:
        """Learn how long a task takes here; size an adaptive window from it.

        The window aims at about :data:`WINDOW_BUDGET` seconds of work queued at the worker: a
        model taking 30 ms per frame gets a window of 2 (one in hand, one ready), so frames wait
        in the coordinator's queue, where drop-oldest and deadlines can act, while tiny tasks
        get a window large enough to hide the round trip.
        """
        if tasks <= 0 or busy < 0:
            return
        self.busy += busy
        per = busy / tasks
        self.task_time = per if self.task_time is None else 0.7 * self.task_time + 0.3 * per
        if self.adaptive:
            want = int(WINDOW_BUDGET / max(self.task_time, 1e-7)) + 1
            self.window = max(2, min(self.max_window, want))
