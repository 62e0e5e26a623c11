"""The scheduling core: a state machine with no threads, sockets, processes or clocks.

It owns the task table - the bounded queue, every worker's in-flight tasks, the deadline heap -
and the counters. The threaded front (:mod:`pytaskqml.engine.engine`) calls it under one lock
and passes the time in. Each transition (:meth:`~Scheduler.admit`, :meth:`~Scheduler.dispatch`,
:meth:`~Scheduler.results`, :meth:`~Scheduler.skipped`, :meth:`~Scheduler.add_worker`,
:meth:`~Scheduler.remove_worker`, :meth:`~Scheduler.expire`, the model events) returns what the
engine must do as a list of action records (:mod:`.actions`), in the order to do them:

* ``Send(worker, tasks)`` - tasks for a worker, in the order they entered its ``inflight``;
* ``Deliver(sink, outcomes)`` - a results collector's outcomes; ``Resolve(outcomes)`` - the
  futures'; ``Late(results)`` - results for tasks already finished;
* ``Fail(tasks, why)`` - tasks finished here without a result: expired, dropped by the overflow
  policy, poison, a broadcast whose worker left, a model unloaded or failing to load, stranded;
* ``LoadModel(worker, model)``, ``UnloadModel(worker, model)`` - models loaded on demand;
* ``WatchDeadline(at)`` - a new earliest deadline; ``CheckStranded()`` - no worker is there;
  ``Requeued(count)`` - what a lost worker's tasks came to.

Nothing else is left for the engine to read. The endings the engine orders at shutdown
(:meth:`~Scheduler.cancel_queued`, :meth:`~Scheduler.abandon_inflight`,
:meth:`~Scheduler.fail_all`, :meth:`~Scheduler.strand`) return the tasks they finished, for the
engine to fail with its own error. So every transition can be driven by a test with fake
workers and a fake clock.

Credit. A worker's credit is ``window - len(inflight)``. A task enters ``inflight`` when it is
assigned (and, in the same step, the ``Send`` record of its dispatch, whose tasks the engine
puts in the worker's queue before it lets go of the lock: so send order is in-flight order)
and leaves it exactly once: when its result arrives,
when the sender skips it because it already finished (timed out, cancelled), or when the worker
is lost and the task goes back to the queue. So a lost worker can never hold credit, and
:meth:`Scheduler.dispatch` can never hand a worker more than its window.

Order. The queue (:class:`~._ordered.FairQueue`) hands out the highest priority first and,
within a priority, is fair between sources of work (a stream, a map() call, an ingress
producer; every submit() together): a source that sent little lately goes next, sources with
a backlog take turns by weight. Each source's own tasks leave in order.

Work-conserving dispatch (:func:`~._workerstate.leader`): while a worker that could take a
task can start it at once, no worker gets one it would hold; once all are busy, each may hold
what :meth:`WorkerState.cap` allows by the estimate of that kind of work (``kind_time``, per
model; a kind never measured is slow: one per worker). A map's task with a deadline is never
held.

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

from ..errors import TaskFailed
from .actions import (
    CHECK_STRANDED,
    DROPPED_BY_POLICY,
    EXPIRED,
    LOAD_FAILED,
    POISON,
    UNLOADED,
    UNPINNED,
    Action,
    Deliver,
    Fail,
    Late,
    LoadModel,
    Outcome,
    Requeued,
    Resolve,
    Send,
    UnloadModel,
    WatchDeadline,
)
from .future import TaskFuture
from .histogram import Histogram, bucket
from .ordered import TaskQueue
from .routing import Router
from .tasks import (
    CHUNK,
    ERROR,
    OK,
    RUN,
    LateResult,
    ModelResult,
    Source,
    Task,
    late_results,
    outcomes,
)
from .workerstate import WorkerState, leader

log = logging.getLogger(__name__)

# Latency samples kept for the percentiles of statistics().
LATENCY_SAMPLES = 8192
# Markers for the kind of work of a results message: none seen yet, several.
_NO_KIND: Any = object()
_MIXED: Any = object()

# A task's sink is a TaskFuture (submit) or a results collector of a map() or stream, which has
# deliver_many(outcomes) and an `abandoned` flag.


class Scheduler:
    """The task table and its transitions. Not thread-safe: the front holds a lock around
    every call. Times (``now``) are seconds on one monotonic clock, passed in."""

    def __init__(self, *, max_queue: int, overflow: str, max_retries: int) -> None:
        self.overflow = overflow
        self.max_retries = max_retries
        self.queue: TaskQueue = TaskQueue(max_queue)
        self.workers: list[WorkerState] = []
        self._next_id = 1  # the next task id (see new_ids)
        self._worker_ids = itertools.count(1)
        self.live = 0  # tasks admitted and not yet finished
        # (deadline, task id, weak reference): a finished task must not be kept alive by its
        # entry, which stays until the deadline passes or the heap is compacted.
        self.deadlines: list[tuple[float, int, weakref.ref[Task]]] = []
        self.stranded = False  # no worker, and none can come back: new work fails at once
        self._earliest: float | None = None  # a new earliest deadline, not yet reported
        self.submitted = self.completed = self.failed = self.cancelled = 0
        self.timed_out = self.late = self.dropped = self.rejected = 0
        self.retried = self.poisoned = self.workers_lost = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.queue_wait, self.latency = Histogram(), Histogram()  # per item, counted inline
        self.item_time: float | None = None  # EWMA of worker seconds per item, all kinds
        # EWMA of worker seconds per item of each kind of work: a model's name, None for the
        # workers' own process(). A kind never measured is absent, and treated as slow.
        self.kind_time: dict[str | None, float] = {}
        self.router = Router()  # tasks for a model, a key, one worker (see _routing)
        # (model, version): results, and their latency summed
        self.model_counts: dict[tuple[str, str], int] = {}
        self.model_seconds: dict[tuple[str, str], float] = {}
        # Where work comes from (see _ordered.FairQueue): submit()'s tasks share one source;
        # streams, map() calls and ingress producers each have theirs, listed while alive.
        self.default_source = self.queue.items.default
        self.sources: weakref.WeakValueDictionary[int, Source] = weakref.WeakValueDictionary()
        self.sources[0] = self.default_source
        self._source_ids = itertools.count(1)

    def new_ids(self, n: int) -> range:
        """*n* task ids no task has had."""
        first = self._next_id
        self._next_id = first + n
        return range(first, first + n)

    def new_source(self, kind: str, weight: int = 1, name: str | None = None) -> Source:
        """A source of work (a stream, a map() call, an ingress producer), listed in the
        statistics while it is alive; named ``kind-N`` unless *name* is given."""
        n = next(self._source_ids)
        src = Source(name if name is not None else f"{kind}-{n}", weight)
        self.sources[n] = src
        return src

    # ------------------------------------------------------------------ workers

    def add_worker(
        self,
        name: str,
        *,
        window: int,
        now: float = 0.0,
        preload: list[Task] | tuple[Task, ...] = (),
        **options: Any,
    ) -> tuple[WorkerState, list[Action]]:
        """Register a worker (*options*: those of :class:`WorkerState`); *preload* tasks run
        on it before anything else (retained broadcasts). Returns its state and the actions."""
        ws = WorkerState(next(self._worker_ids), name, window=window, now=now, **options)
        self.workers.append(ws)
        for t in preload:
            assert t.route is not None
            t.route.pin = ws
            self.router.add(t, self.workers)
            self.live += 1
            self.submitted += t.count
        self.stranded = False
        self.router.worker_added()
        return ws, self.dispatch(now)

    def remove_worker(self, ws: WorkerState, *, graceful: bool, now: float) -> list[Action] | None:
        """The worker is gone (``graceful``: it said goodbye, so nothing it held was running).

        Returns the actions - :class:`Requeued` (how many went back), ``Fail`` of the poison
        tasks (:data:`POISON`) and of the broadcasts pinned to it (:data:`UNPINNED`), what
        dispatch does next, :class:`CheckStranded` when it was the last worker - or ``None`` if
        it had already been removed. The engine forgets the tasks it had not yet sent it.
        """
        if ws not in self.workers:
            return None
        self.workers.remove(ws)
        ws.accepting = False
        tasks = list(ws.inflight.values())
        ws.inflight.clear()
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
        routed = [t for t in requeue if t.route is not None]
        back, pinned = self.router.worker_removed(ws, routed)
        if routed:
            requeue = [t for t in requeue if t.route is None]
        self.queue.push_front(requeue)
        self.router.put_back(back, self.workers)
        for t in pinned:
            t.finished = True
            self.live -= 1
            self.failed += t.count
        self.retried += len(requeue) + len(back)
        if not graceful:
            self.workers_lost += 1
        actions: list[Action] = [Requeued(len(requeue) + len(back))]
        if poison:
            actions.append(Fail(poison, POISON))
        if pinned:
            actions.append(Fail(pinned, UNPINNED))
        actions += self.dispatch(now)
        if not self.workers:
            actions.append(CHECK_STRANDED)
        return actions

    def _split(self, chunk: Task) -> list[Task]:
        """Replace a chunk by one task per item, keeping its place, attempts and deadline."""
        chunk.finished = True
        singles = []
        ids = self.new_ids(len(chunk.payload))
        for i, item in enumerate(chunk.payload):
            t = Task(ids[i], item, 0, chunk.sink, chunk.seq + i, chunk.t_submit)
            t.attempts = chunk.attempts
            t.started = True
            t.run_timeout = chunk.run_timeout
            t.route = chunk.route
            if chunk.deadline is not None and chunk.run_timeout is None:
                t.deadline = chunk.deadline
                self._push_deadline(t)
            singles.append(t)
        self.live += len(singles) - 1
        return singles

    # ---------------------------------------------------------------- admission

    @property
    def full(self) -> bool:
        return len(self.queue.items) + self.router.waiting >= self.queue.maxsize

    @property
    def queued(self) -> int:
        return len(self.queue.items) + self.router.waiting

    def admit(
        self, tasks: list[Task], start: int, *, timed: bool, routed: bool = False
    ) -> tuple[int, list[Action]]:
        """Admit ``tasks[start:]`` in order, applying the overflow policy.

        *timed*: some task carries a deadline counted from submission (set in ``deadline``);
        *routed*: some task has a ``route`` (a model, a key, a worker).
        Returns ``(index of the first task not admitted, actions)`` - ``Fail`` of the tasks
        dropped to make room (:data:`DROPPED_BY_POLICY`), :class:`CheckStranded` while no worker
        can come, :class:`WatchDeadline`: the index is ``len(tasks)`` unless the policy is
        ``block`` and the queue filled up. Admission dispatches nothing. Under
        ``reject`` a task that finds the queue full raises :class:`queue.Full` (the ones before
        it stay admitted).
        """
        q = self.queue
        items = q.items
        waiting = self.router.waiting
        if (
            not timed
            and not routed
            and start == 0
            and len(tasks) + len(items) + waiting <= q.maxsize
        ):
            items.extend(tasks)  # the common case: room for all, no deadlines
            self.live += len(tasks)
            n = tasks[0].count if len(tasks) == 1 else sum(t.count for t in tasks)
            self.submitted += n
            # (An admission's tasks come from one source: one call of submit, put or map.)
            (tasks[0].source or self.default_source).items_in += n
            return len(tasks), [CHECK_STRANDED] if self.stranded else []
        dropped: list[Task] = []
        for i in range(start, len(tasks)):
            task = tasks[i]
            if len(items) + self.router.waiting >= q.maxsize:
                if self.overflow == "reject":
                    self.rejected += 1
                    raise queue.Full("the coordinator's queue is full")
                if self.overflow != "drop_oldest":
                    return i, self._admitted(dropped)
                self._drop_oldest(dropped, task)
            if task.deadline is not None:
                self._push_deadline(task)
            if task.route is None:
                items.append(task)
            else:
                self.router.add(task, self.workers)
            self.live += 1
            self.submitted += task.count
            (task.source or self.default_source).items_in += task.count
        return len(tasks), self._admitted(dropped)

    def _admitted(self, dropped: list[Task]) -> list[Action]:
        actions: list[Action] = [Fail(dropped, DROPPED_BY_POLICY)] if dropped else []
        if self.stranded:
            actions.append(CHECK_STRANDED)
        self._notes(actions)
        return actions

    # ---------------------------------------------------------------- dispatch

    def dispatch(self, now: float) -> list[Action]:
        """Hand queued tasks to workers with free credit, most free credit first; returns the
        actions: a :class:`Send` per worker that got tasks, then model loads and unloads it
        asks for, tasks of unloaded models to fail, a new earliest deadline."""
        items = self.queue.items
        sends: dict[WorkerState, list[Task]] = {}
        if self.router.waiting:
            self._dispatch_routed(now, sends)
        if not items:
            return self._sent(sends)
        workers = self.workers
        pop = items.popleft
        # Plain tasks all run the workers' own process(): one kind of work, one estimate.
        per_item = self.kind_time.get(None)
        # Queue waits, counted at first dispatch; an admission's tasks share one submission time.
        waits, waited, since, b = self.queue_wait.counts, 0.0, None, 0
        while items:
            head = items[0]
            if head.run_timeout is not None:
                if not self._dispatch_timed(now, sends):
                    break
                continue
            # Work-conserving (see leader); a task of a map with a deadline is never held.
            sink = head.sink
            hold = sink.__class__ is TaskFuture or not getattr(sink, "start_only", False)
            est = None if per_item is None else per_item * head.count
            best, best_free, second = leader(workers, est, hold)
            if best is None:
                break
            holding = len(best.inflight) >= min(best.concurrency, best.window)
            # Handing the leader (best - second + 1) tasks at once is the same as handing them
            # one by one to whoever has the most credit, without rescanning per task. With
            # many free slots each (tiny tasks) hand out chunks of an eighth of the credit, so a
            # frame carries many tasks; with a small window it is strict alternation.
            n = min(max(best_free - second + 1, best_free >> 3), best_free, len(items))
            tasks = []
            for _ in range(n):
                t = pop()
                if t.run_timeout is not None or (
                    holding
                    and t.sink.__class__ is not TaskFuture
                    and getattr(t.sink, "start_only", False)
                ):
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
                    best.probe = now  # ... and a round-trip measurement
                for t in tasks:
                    inflight[t.id] = t
                got = sends.get(best)
                if got is None:
                    sends[best] = tasks
                else:
                    got += tasks
        self.queue_wait.sum += waited
        items.settle()
        return self._sent(sends)

    def _sent(self, sends: dict[WorkerState, list[Task]]) -> list[Action]:
        """The actions of a dispatch: what it sends, then the notes of the transition."""
        router = self.router
        if self._earliest is None and not router.requests and not router.orphans:
            if not sends:
                return []
            if len(sends) == 1:
                for w, tasks in sends.items():
                    return [Send(w, tasks)]
        actions: list[Action] = [Send(w, tasks) for w, tasks in sends.items()]
        self._notes(actions)
        return actions

    def _notes(self, actions: list[Action]) -> None:
        """Add to *actions* what a transition left to report: the model loads and unloads the
        router asks for, the tasks of unloaded models that turned up (finished here), a new
        earliest deadline."""
        router = self.router
        if router.requests:
            for verb, w, model in router.requests:
                actions.append(LoadModel(w, model) if verb == "load" else UnloadModel(w, model))
            router.requests = []
        if router.orphans:
            orphans, router.orphans = router.orphans, []
            for t in orphans:
                t.finished = True
                self.live -= 1
                self.failed += t.count
            actions.append(Fail(orphans, UNLOADED))
        if self._earliest is not None:
            actions.append(WatchDeadline(self._earliest))
            self._earliest = None

    def _dispatch_timed(self, now: float, sends: dict[WorkerState, list[Task]]) -> bool:
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
        self._assign(best, t, now, sends)
        return True

    def _dispatch_routed(self, now: float, sends: dict[WorkerState, list[Task]]) -> None:
        def give(w: WorkerState, t: Task) -> None:
            if not t.started:
                t.started = True
                self.queue_wait.observe(now - t.t_submit, t.count)
                if not self._still_wanted(t):
                    return
            if t.run_timeout is not None:
                t.deadline = now + t.run_timeout  # its clock starts as it is sent to run
                self._push_deadline(t)
            self._assign(w, t, now, sends)

        self.router.dispatch(now, self.workers, give, self.kind_time)

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
    def _assign(w: WorkerState, t: Task, now: float, sends: dict[WorkerState, list[Task]]) -> None:
        inflight = w.inflight
        if not inflight:
            w.last_progress = now  # the hang clock starts with its first task in hand
            w.probe = now
        inflight[t.id] = t
        got = sends.get(w)
        if got is None:
            sends[w] = [t]
        else:
            got.append(t)

    # ---------------------------------------------------------------- results

    def results(
        self,
        ws: WorkerState,
        entries: list[Any],
        busy: float | None,
        now: float,
        versions: dict[int, str] | None = None,
    ) -> list[Action]:
        """Results from a worker: ``[task id, OK | ERROR | CHUNK | RUN, value]`` rows,
        validated; *busy* is the worker's own compute time for them, when it reports one.

        Returns the actions: what the credit freed dispatches (first: a worker gets its next
        tasks before anyone is told), then the outcomes - a :class:`Deliver` per results
        collector, one :class:`Resolve` for the futures - and the :class:`Late` results.
        """
        futures: list[tuple[Task, int, Any]] = []
        groups: list[Action] = []
        late: list[LateResult] = []
        group: list[Outcome] = []
        group_sink: Any = None
        pop = ws.inflight.pop
        record = self.latencies.append
        lat_counts, lat_sum, since, b = self.latency.counts, 0.0, None, 0
        ok = failed = items = 0
        default_source = self.default_source
        work: Any = _NO_KIND  # the kind of work these results are of (None: process())
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
            this = t.route.model if t.route is not None else None
            if work != this:
                work = this if work is _NO_KIND else _MIXED
            if kind in (CHUNK, RUN) and (type(value) is not list or len(value) != t.count):
                kind, value = (
                    ERROR,
                    TaskFailed(
                        "ProtocolError",
                        f"worker {ws.name} answered a chunk of {t.count} "
                        f"with {len(value) if type(value) is list else 'no'} results",
                    ),
                )
            if t.route is not None and t.route.model is not None:
                kind, value = self._model_result(t, kind, value, ws, versions, now)
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
            src = t.source or default_source
            src.processed += t.count
            src.lags.append(latency)
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
                groups.append(Deliver(sink, group))
        ws.completed += ok
        ws.failed += failed
        self.latency.sum += lat_sum
        self.completed += ok
        self.failed += failed
        self.late += len(late)
        if busy is not None and entries:
            ws.observe(busy, len(entries), now)
            per_item = busy / max(1, items)
            self.item_time = (
                per_item if self.item_time is None else 0.7 * self.item_time + 0.3 * per_item
            )
            if work is not _MIXED and work is not _NO_KIND:
                # (Results of several kinds in one message say nothing of each one's time.)
                kt = self.kind_time.get(work)
                self.kind_time[work] = per_item if kt is None else 0.7 * kt + 0.3 * per_item
        else:
            ws.probe = None  # no compute time to subtract: no round-trip sample
        ws.last_progress = now
        actions = self.dispatch(now)
        ws.pace(bool(self.queue.items or self.router.waiting))
        if groups:
            actions += groups
        if futures:
            actions.append(Resolve(futures))
        if late:
            actions.append(Late(late))
        return actions

    def skipped(self, ws: WorkerState, tasks: list[Task], now: float) -> list[Action]:
        """The worker's sender found these tasks finished before sending them: free their
        credit."""
        for t in tasks:
            ws.inflight.pop(t.id, None)
        return self.dispatch(now)

    @property
    def in_flight(self) -> int:
        return sum(len(w.inflight) for w in self.workers)

    # ---------------------------------------------------------------- models

    def _model_result(
        self,
        t: Task,
        kind: int,
        value: Any,
        ws: WorkerState,
        versions: dict[int, str] | None,
        now: float,
    ) -> tuple[int, Any]:
        """Count a model task's result and its latency by version; wrap it when the caller
        wants to know."""
        route = t.route
        assert route is not None and route.model is not None
        version = (versions or {}).get(t.id, "")
        key = (route.model, version)
        self.model_counts[key] = self.model_counts.get(key, 0) + t.count
        seconds = (now - t.t_submit) * t.count
        self.model_seconds[key] = self.model_seconds.get(key, 0.0) + seconds
        ws.model_done[route.model] = ws.model_done.get(route.model, 0) + t.count
        if route.meta and kind == OK:
            value = ModelResult(value, route.model, version, ws.name)
        return kind, value

    def model_ready(self, ws: WorkerState, model: str, version: str, now: float) -> list[Action]:
        self.router.model_ready(ws, model, version)
        return self.dispatch(now)

    def model_failed(self, ws: WorkerState, model: str) -> list[Action]:
        """A load failed: the waiting tasks of a model nobody has or loads now fail
        (:data:`LOAD_FAILED`)."""
        stuck = self.router.model_failed(ws, model, self.workers)
        for t in stuck:
            t.finished = True
            self.live -= 1
            self.failed += t.count
        return [Fail(stuck, LOAD_FAILED, model)] if stuck else []

    def model_gone(self, ws: WorkerState, model: str) -> None:
        self.router.model_gone(ws, model)

    def model_unloaded(self, model: str) -> list[Action]:
        """*model* was unloaded by name: its waiting tasks can never run, they fail
        (:data:`UNLOADED`) - and so every task of it that turns up later."""
        self.router.gone.add(model)
        self.router.orphans.extend(
            self.router.take(self.workers, lambda t: t.route is not None and t.route.model == model)
        )
        actions: list[Action] = []
        self._notes(actions)
        return actions

    def set_on_demand(self, model: str, on: bool, now: float) -> list[Action]:
        """Let the core load *model* where it needs it (workers with ``max_models``), or not."""
        (self.router.on_demand.add if on else self.router.on_demand.discard)(model)
        return self.dispatch(now)

    def model_declared(self, model: str) -> None:
        """*model* is loaded by name (again): its tasks wait for it."""
        self.router.gone.discard(model)

    # ---------------------------------------------------------------- endings

    def _drop_oldest(self, dropped: list[Task], incoming: Task) -> None:
        # The oldest task of the source that fills the queue the most: a flooding source pays
        # for its own backlog, not the others (on a tie, the source of *incoming*).
        items = self.queue.items
        while items:
            old = items.pop_from_longest(incoming)
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
        at = t.deadline
        assert at is not None
        # A new earliest deadline is reported (WatchDeadline), so the timer does not sleep past.
        if (not dl or at < dl[0][0]) and (self._earliest is None or at < self._earliest):
            self._earliest = at
        heapq.heappush(dl, (at, t.id, weakref.ref(t)))

    def next_deadline(self) -> float | None:
        return self.deadlines[0][0] if self.deadlines else None

    def expire(self, now: float) -> list[Action]:
        """Finish the tasks whose deadline has passed: returns ``Fail`` of them
        (:data:`EXPIRED`, first) and what dispatch does next (a queue that lost tasks may
        dispatch); nothing if none expired."""
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
        if not expired:
            return []
        return [Fail(expired, EXPIRED), *self.dispatch(now)]


def _unfinished(ref: weakref.ref[Task]) -> bool:
    t = ref()
    return t is not None and not t.finished
