"""The scheduling core: a state machine with no threads, sockets, processes or clocks.

It owns the task table - the bounded queue, every worker's in-flight tasks, the deadline heap -
and the counters. The threaded front (:mod:`._engine`) calls it under one lock, passes the time
in, and carries out what it returns after releasing the lock: the workers that got new tasks
(to be woken), the outcomes to deliver, the late results to report. So every transition can be
driven by a test with fake workers and a fake clock.

Credit. A worker's credit is ``window - len(inflight)``. A task enters ``inflight`` when it is
assigned (and, in the same step, the worker's ``outbox``, from which the worker's sender takes
it: so outbox order is in-flight order) and leaves it exactly once: when its result arrives,
when the sender skips it because it already finished (timed out, cancelled), or when the worker
is lost and the task goes back to the queue. So a lost worker can never hold credit, and
:meth:`Scheduler.dispatch` can never hand a worker more than its window.

Retries. A worker runs what it is sent in order, ``batch_size`` tasks at a time, so when it dies
the first ``batch_size`` tasks of its ``inflight`` were the ones running: only those are charged
an attempt. The others go back to the front of the queue free of charge. A chunk that was
running is split into one task per item (so a poison item fails alone). A task charged more
than ``max_retries`` attempts is poison and fails with :class:`WorkerLostError`.

Exactly-once delivery. Every task has a ``finished`` flag, set once, by whichever of result,
error, timeout, drop or cancellation comes first; whatever arrives for it later (a duplicate
execution's result, a result after its deadline) is dropped or becomes a late result. A result
for a task the worker does not hold is ignored.

Deadlines. A task's deadline counts either from its submission (``submit()``, streams: a frame
must not get too old) or from the start of its run (``map()``: ``run_timeout``). A task of the
second kind is sent only to a worker that can start it at once - fewer tasks in hand than it
runs at a time - so its clock never runs while it waits behind another task.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import weakref
from collections import deque
from typing import Any

from ._delivery import TaskFuture
from ._errors import TaskFailed
from ._histogram import Histogram, bucket
from ._ordered import TaskQueue
from ._tasks import CHUNK, ERROR, OK, RUN, LateResult, Task, late_results, outcomes
from ._workerstate import WorkerState

log = logging.getLogger(__name__)

# Latency samples kept for the percentiles of statistics().
LATENCY_SAMPLES = 8192

# A task's sink is a TaskFuture (submit) or a results collector of a map() or stream, which has
# deliver_many(outcomes) and an `abandoned` flag.
Outcome = tuple[int, int, Any]
# Results to hand out: (sink, outcomes in arrival order) per sink, and (task, kind, value) for
# tasks whose sink is a future.
Groups = list[tuple[Any, list[Outcome]]]
FutureOutcomes = list[tuple[Task, int, Any]]


class Scheduler:
    """The task table and its transitions. Not thread-safe: the front holds a lock around
    every call. Times (``now``) are seconds on one monotonic clock, passed in."""

    def __init__(self, *, max_queue: int, overflow: str, max_retries: int) -> None:
        self.overflow = overflow
        self.max_retries = max_retries
        self.queue: TaskQueue[Task] = TaskQueue(max_queue)
        self.workers: list[WorkerState] = []
        self.ids = itertools.count(1)  # task ids; next(ids) is the next one
        self._worker_ids = itertools.count(1)
        self.live = 0  # tasks admitted and not yet finished
        # (deadline, task id, weak reference): a finished task must not be kept alive by its
        # entry, which stays until the deadline passes or the heap is compacted.
        self.deadlines: list[tuple[float, int, weakref.ref[Task]]] = []
        self.stranded = False  # no worker, and none can come back: new work fails at once
        self.submitted = self.completed = self.failed = self.cancelled = 0
        self.timed_out = self.late = self.dropped = self.rejected = 0
        self.retried = self.poisoned = self.workers_lost = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.queue_wait, self.latency = Histogram(), Histogram()  # per item, counted inline
        self.item_time: float | None = None  # EWMA of worker seconds per item, for chunking

    # ------------------------------------------------------------------ workers

    def add_worker(
        self, name: str, *, window: int, now: float = 0.0, **options: Any
    ) -> tuple[WorkerState, list[WorkerState]]:
        """Register a worker (*options*: those of :class:`WorkerState`); returns its state and
        the workers that got tasks."""
        ws = WorkerState(next(self._worker_ids), name, window=window, now=now, **options)
        self.workers.append(ws)
        self.stranded = False
        return ws, self.dispatch(now)

    def remove_worker(
        self, ws: WorkerState, *, graceful: bool, now: float
    ) -> tuple[int, list[Task], list[WorkerState]] | None:
        """The worker is gone (``graceful``: it said goodbye, so nothing it held was running).

        Returns ``(tasks re-queued, poison tasks now failed, workers that got tasks)``, or
        ``None`` if it had already been removed.
        """
        if ws not in self.workers:
            return None
        self.workers.remove(ws)
        ws.accepting = False
        tasks = list(ws.inflight.values())
        ws.inflight.clear()
        ws.outbox.clear()
        requeue: list[Task] = []
        poison: list[Task] = []
        for i, t in enumerate(tasks):
            if t.finished:
                continue
            if not graceful and i < ws.batch_size:
                t.attempts += 1
                if t.count > 1:
                    requeue.extend(self._split(t))
                    continue
            if t.attempts > self.max_retries:
                t.finished = True
                self.live -= 1
                self.failed += t.count
                self.poisoned += t.count
                poison.append(t)
            else:
                requeue.append(t)
        self.queue.push_front(requeue)
        self.retried += len(requeue)
        if not graceful:
            self.workers_lost += 1
        return len(requeue), poison, self.dispatch(now)

    def _split(self, chunk: Task) -> list[Task]:
        """Replace a chunk by one task per item, keeping its place, attempts and deadline."""
        chunk.finished = True
        singles = []
        for i, item in enumerate(chunk.payload):
            t = Task(next(self.ids), item, 0, chunk.sink, chunk.seq + i, chunk.t_submit)
            t.attempts = chunk.attempts
            t.started = True
            t.run_timeout = chunk.run_timeout
            if chunk.deadline is not None and chunk.run_timeout is None:
                t.deadline = chunk.deadline
                self._push_deadline(t)
            singles.append(t)
        self.live += len(singles) - 1
        return singles

    # ---------------------------------------------------------------- admission

    @property
    def full(self) -> bool:
        return self.queue.full

    def admit(self, tasks: list[Task], start: int, *, timed: bool) -> tuple[int, list[Task]]:
        """Admit ``tasks[start:]`` in order, applying the overflow policy.

        *timed*: some task carries a deadline counted from submission (set in ``deadline``).
        Returns ``(index of the first task not admitted, tasks dropped to make room)``: the
        index is ``len(tasks)`` unless the policy is ``block`` and the queue filled up. Under
        ``reject`` a task that finds the queue full raises :class:`queue.Full` (the ones before
        it stay admitted).
        """
        q = self.queue
        items = q.items
        if not timed and start == 0 and len(tasks) + len(items) <= q.maxsize:
            items.extend(tasks)  # the common case: room for all, no deadlines
            self.live += len(tasks)
            self.submitted += tasks[0].count if len(tasks) == 1 else sum(t.count for t in tasks)
            return len(tasks), []
        dropped: list[Task] = []
        for i in range(start, len(tasks)):
            task = tasks[i]
            if len(items) >= q.maxsize:
                if self.overflow == "reject":
                    self.rejected += 1
                    raise queue.Full("the coordinator's queue is full")
                if self.overflow != "drop_oldest":
                    return i, dropped
                self._drop_oldest(dropped)
            if task.deadline is not None:
                self._push_deadline(task)
            items.append(task)
            self.live += 1
            self.submitted += task.count
        return len(tasks), dropped

    def _drop_oldest(self, dropped: list[Task]) -> None:
        items = self.queue.items
        while items:
            old = items.popleft()
            if not old.finished:
                self.drop(old)
                dropped.append(old)
                return

    def drop(self, task: Task) -> None:
        """Finish a task as dropped by an overflow policy (the caller delivers DROPPED)."""
        task.finished = True
        self.live -= 1
        self.dropped += task.count

    def cancel_abandoned(self) -> None:
        """A map() or stream was abandoned: finish its queued tasks now, not at dispatch."""
        keep = []
        for t in self.queue.clear():
            if t.sink.__class__ is not TaskFuture and t.sink.abandoned and not t.finished:
                self._finish_cancelled(t)
            else:
                keep.append(t)
        self.queue.push_front(keep)

    def _finish_cancelled(self, t: Task) -> None:
        t.finished = True
        self.live -= 1
        self.cancelled += 1

    # ---------------------------------------------------------------- dispatch

    def dispatch(self, now: float) -> list[WorkerState]:
        """Hand queued tasks to workers with free credit, most free credit first; returns the
        workers that got tasks (each once)."""
        items = self.queue.items
        assigned: list[WorkerState] = []
        if not items:
            return assigned
        workers = self.workers
        pop = items.popleft
        # Queue waits, counted at first dispatch; an admission's tasks share one submission time.
        waits, waited, since, b = self.queue_wait.counts, 0.0, None, 0
        while items:
            if items[0].run_timeout is not None:
                if not self._dispatch_timed(now, assigned):
                    break
                continue
            best: WorkerState | None = None
            best_free = 0
            second = 0
            for w in workers:
                f = w.window - len(w.inflight) if w.accepting else 0
                if f > best_free:
                    second = best_free
                    best_free = f
                    best = w
                elif f > second:
                    second = f
            if best is None:
                break
            # Handing the leader (best - second + 1) tasks at once is the same as handing them
            # one by one to whoever has the most credit, without rescanning per task. With
            # many free slots each (tiny tasks) hand out chunks of an eighth of the credit, so a
            # frame carries many tasks; with a small window it is strict alternation.
            n = min(max(best_free - second + 1, best_free >> 3), best_free, len(items))
            tasks = []
            for _ in range(n):
                t = pop()
                if t.run_timeout is not None:
                    items.appendleft(t)  # goes only to a worker that can start it at once
                    break
                if t.finished:
                    continue
                if not t.started:
                    t.started = True
                    if t.t_submit is not since:
                        since, b = t.t_submit, bucket(now - t.t_submit)
                    waits[b] += t.count
                    waited += (now - since) * t.count
                    s = t.sink  # is anyone still waiting for it? (inlined _still_wanted)
                    if s.__class__ is TaskFuture:
                        if not s.set_running_or_notify_cancel():
                            self._finish_cancelled(t)
                            continue
                    elif s.abandoned:
                        self._finish_cancelled(t)
                        continue
                tasks.append(t)
            if tasks:
                inflight = best.inflight
                if not inflight:
                    best.last_progress = now  # the hang clock starts with its first task
                for t in tasks:
                    inflight[t.id] = t
                best.outbox.extend(tasks)
                if best not in assigned:
                    assigned.append(best)
        self.queue_wait.sum += waited
        return assigned

    def _dispatch_timed(self, now: float, assigned: list[WorkerState]) -> bool:
        """Dispatch the task at the head of the queue, whose deadline counts from the start of
        its run, to the worker with the most room to start it at once. False if none can."""
        best: WorkerState | None = None
        best_free = 0
        for w in self.workers:
            f = min(w.concurrency, w.window) - len(w.inflight) if w.accepting else 0
            if f > best_free:
                best, best_free = w, f
        if best is None:
            return False
        t = self.queue.items.popleft()
        if t.finished:
            return True
        if not t.started:
            t.started = True
            self.queue_wait.observe(now - t.t_submit, t.count)
            if not self._still_wanted(t):
                return True
        assert t.run_timeout is not None
        t.deadline = now + t.run_timeout
        self._push_deadline(t)
        self._assign(best, [t], now, assigned)
        return True

    def _still_wanted(self, t: Task) -> bool:
        """At first dispatch: is anyone still waiting for it? (Finishes it if not.)"""
        s = t.sink
        if s.__class__ is TaskFuture:
            if not s.set_running_or_notify_cancel():
                self._finish_cancelled(t)
                return False
        elif s.abandoned:
            self._finish_cancelled(t)
            return False
        return True

    @staticmethod
    def _assign(w: WorkerState, tasks: list[Task], now: float, assigned: list[WorkerState]) -> None:
        inflight = w.inflight
        if not inflight:
            w.last_progress = now  # the hang clock starts with its first task in hand
        for t in tasks:
            inflight[t.id] = t
        w.outbox.extend(tasks)
        if w not in assigned:
            assigned.append(w)

    # ---------------------------------------------------------------- results

    def results(
        self, ws: WorkerState, entries: list[Any], busy: float | None, now: float
    ) -> tuple[Groups, FutureOutcomes, list[LateResult], list[WorkerState]]:
        """Results from a worker: ``[task id, OK | ERROR | CHUNK | RUN, value]`` rows,
        validated; *busy* is the worker's own compute time for them, when it reports one.

        Returns the outcomes to deliver - grouped per results collector, and per future - the
        late results, and the workers that got tasks with the credit freed.
        """
        futures: FutureOutcomes = []
        groups: Groups = []
        late: list[LateResult] = []
        group: list[Outcome] = []
        group_sink: Any = None
        pop = ws.inflight.pop
        record = self.latencies.append
        lat_counts, lat_sum, since, b = self.latency.counts, 0.0, None, 0
        ok = failed = items = 0
        for tid, kind, value in entries:
            t = pop(tid, None)
            if t is None:
                log.warning(
                    "worker %s returned a result for task %r it does not hold; ignored",
                    ws.name,
                    tid,
                )
                continue
            items += t.count
            if kind in (CHUNK, RUN) and (type(value) is not list or len(value) != t.count):
                kind, value = (
                    ERROR,
                    TaskFailed(
                        "ProtocolError",
                        f"worker {ws.name} answered a chunk of {t.count} "
                        f"with {len(value) if type(value) is list else 'no'} results",
                    ),
                )
            if t.finished:
                late.extend(late_results(t, kind, value))
                continue
            t.finished = True
            self.live -= 1
            latency = now - t.t_submit
            if t.t_submit is not since:  # (one bisect per admission, as in dispatch)
                since, b = t.t_submit, bucket(latency)
            lat_counts[b] += t.count
            lat_sum += latency * t.count
            sink = t.sink
            is_future = sink.__class__ is TaskFuture
            if kind == RUN:
                ok += t.count
                record(latency)  # one sample per task: a chunk counts once
                if is_future:  # only a misbehaving worker sends a run here
                    futures.append((t, OK, value[0]))
                    continue
                outcome = [(t.seq, RUN, value)]
            elif t.count == 1 and kind != CHUNK:
                if kind == OK:
                    ok += 1
                    record(latency)
                else:
                    failed += 1
                if is_future:
                    futures.append((t, kind, value))
                    continue
                outcome = [(t.seq, kind, value)]
            else:
                outcome = outcomes(t, kind, value)
                for _, k, _v in outcome:
                    if k == OK:
                        ok += 1
                        record(latency)
                    else:
                        failed += 1
                if is_future:  # only a misbehaving worker sends a chunk here
                    futures.append((t, *outcome[0][1:]))
                    continue
            if sink is group_sink:
                group.extend(outcome)
            else:
                group_sink, group = sink, outcome
                groups.append((sink, group))
        ws.completed += ok
        ws.failed += failed
        self.latency.sum += lat_sum
        self.completed += ok
        self.failed += failed
        self.late += len(late)
        if busy is not None and entries:
            ws.observe(busy, len(entries))
            per_item = busy / max(1, items)
            self.item_time = (
                per_item if self.item_time is None else 0.7 * self.item_time + 0.3 * per_item
            )
        ws.last_progress = now
        return groups, futures, late, self.dispatch(now)

    def skipped(self, ws: WorkerState, tasks: list[Task], now: float) -> list[WorkerState]:
        """The worker's sender found these tasks finished before sending them: free their
        credit."""
        for t in tasks:
            ws.inflight.pop(t.id, None)
        return self.dispatch(now)

    # ---------------------------------------------------------------- deadlines

    def _push_deadline(self, t: Task) -> None:
        dl = self.deadlines
        if len(dl) > 2 * self.live + 1024:
            # Mostly entries of tasks that finished early: drop them (amortised: the heap at
            # least halves each time).
            dl[:] = [e for e in dl if (u := e[2]()) is not None and not u.finished]
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
            if not t.started:
                self.queue.remove(t)
            expired.append(t)
        return expired, self.dispatch(now) if expired else []

    # ---------------------------------------------------------------- endings

    def cancel_queued(self) -> list[Task]:
        """Finish every queued task as cancelled (the caller delivers CANCELLED)."""
        tasks = [t for t in self.queue.clear() if not t.finished]
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
        for t in tasks:
            t.finished = True
            self.live -= 1
            self.failed += t.count
        return tasks

    @property
    def in_flight(self) -> int:
        return sum(len(w.inflight) for w in self.workers)
