"""How a scheduler's tasks end other than by a result - deadlines, cancellation, abandoned
work, drops by the overflow policy, stranding: part of the sans-IO core
(:class:`~._scheduler.Scheduler` mixes this in; the same lock, the same counters)."""

from __future__ import annotations

import heapq
import weakref

from .future import TaskFuture
from .ordered import TaskQueue
from .routing import Router
from .tasks import Source, Task
from .workerstate import WorkerState


class Endings:
    """Cancelling, abandoning, stranding (see the methods); mixed into the Scheduler."""

    queue: TaskQueue
    default_source: Source
    router: Router
    workers: list[WorkerState]
    live: int
    failed: int
    cancelled: int
    dropped: int
    stranded: bool
    timed_out: int
    deadlines: list[tuple[float, int, weakref.ref[Task]]]

    def dispatch(self, now: float) -> list[WorkerState]:
        raise NotImplementedError

    def _drop_oldest(self, dropped: list[Task]) -> None:
        # The oldest task of the source that fills the queue the most: a flooding source pays
        # for its own backlog, not the others.
        items = self.queue.items
        while items:
            old = items.pop_from_longest()
            if old is not None and not old.finished:
                self.drop(old)
                dropped.append(old)
                return
        routed = self.router.pop_oldest()
        if routed is not None:
            self.drop(routed)
            dropped.append(routed)

    def drop(self, task: Task) -> None:
        """Finish a task as dropped by an overflow policy (the caller delivers DROPPED)."""
        task.finished = True
        self.live -= 1
        self.dropped += task.count
        (task.source or self.default_source).dropped += task.count

    def cancel_abandoned(self) -> None:
        """A map() or stream was abandoned: finish its queued tasks now, not at dispatch."""
        keep = []
        for t in self.queue.clear():
            if t.sink.__class__ is not TaskFuture and t.sink.abandoned and not t.finished:
                self._finish_cancelled(t)
            else:
                keep.append(t)
        self.queue.push_front(keep)
        if self.router.waiting:
            gone = lambda t: t.sink.__class__ is not TaskFuture and t.sink.abandoned  # noqa: E731
            for t in self.router.take(self.workers, gone):
                self._finish_cancelled(t)

    def _finish_cancelled(self, t: Task) -> None:
        t.finished = True
        self.live -= 1
        self.cancelled += 1

    def cancel_queued(self) -> list[Task]:
        """Finish every queued task as cancelled (the caller delivers CANCELLED)."""
        tasks = [t for t in self.queue.clear() if not t.finished]
        tasks.extend(self.router.take(self.workers))
        for t in tasks:
            self._finish_cancelled(t)
        return tasks

    def abandon_inflight(self) -> tuple[list[Task], list[WorkerState]]:
        """Finish every task in flight as cancelled; returns them and the workers that were
        running one (to be stopped: their work is no longer wanted)."""
        tasks: list[Task] = []
        busy: list[WorkerState] = []
        for w in self.workers:
            held = [t for t in w.inflight.values() if not t.finished]
            if held:
                busy.append(w)
                tasks.extend(held)
        for t in tasks:
            self._finish_cancelled(t)
        return tasks, busy

    def fail_all(self) -> list[Task]:
        """Finish every unfinished task, queued or in flight, as cancelled."""
        return self.cancel_queued() + self.abandon_inflight()[0]

    def strand(self) -> list[Task]:
        """No worker is left and none can come back: fail what is queued (the caller delivers
        the error) and every later admission, until a worker is added."""
        self.stranded = True
        tasks = [t for t in self.queue.clear() if not t.finished]
        tasks.extend(self.router.take(self.workers))
        for t in tasks:
            t.finished = True
            self.live -= 1
            self.failed += t.count
        return tasks

    def _push_deadline(self, t: Task) -> None:
        dl = self.deadlines
        if len(dl) > 2 * self.live + 1024:
            # Mostly entries of tasks that finished early: drop them (amortised: the heap at
            # least halves each time).
            dl[:] = [e for e in dl if _unfinished(e[2])]
            heapq.heapify(dl)
        assert t.deadline is not None
        heapq.heappush(dl, (t.deadline, t.id, weakref.ref(t)))

    def next_deadline(self) -> float | None:
        return self.deadlines[0][0] if self.deadlines else None

    def expire(self, now: float) -> tuple[list[Task], list[WorkerState]]:
        """Finish the tasks whose deadline has passed; the caller delivers their markers.
        Returns them and the workers that got tasks (a queue that lost tasks may dispatch)."""
        expired: list[Task] = []
        dl = self.deadlines
        while dl and dl[0][0] <= now:
            t = heapq.heappop(dl)[2]()
            if t is None or t.finished:
                continue
            t.finished = True
            self.live -= 1
            self.timed_out += t.count
            if not t.started and t.route is None:
                self.queue.remove(t)
            expired.append(t)
        return expired, self.dispatch(now) if expired else []


def _unfinished(ref: weakref.ref[Task]) -> bool:
    t = ref()
    return t is not None and not t.finished
