"""The scheduler's threaded shell: one lock around the :class:`~._scheduler.Scheduler`, and
everything done with the lock released.

Callers (``submit``, ``map``, streams) admit tasks here; handles report here, through the
:class:`~._handles.WorkerEvents` interface this class implements; a timer thread of its own
expires deadlines. Each of them calls the scheduler under :attr:`Engine.lock` and carries out
the action records it returns (:mod:`pytaskqml.core.actions`) in two steps:

* still holding the lock (``_locked``): a ``Send``'s tasks are appended to its
  worker's handle's ``queue`` - so a worker is sent its tasks in the order they entered its
  ``inflight``, which retry accounting relies on; a ``WatchDeadline`` wakes the timer if it
  sleeps past the new deadline; a ``CheckStranded`` asks whether a worker can still come, and
  strands the queued work if none can;
* after releasing it (``_carry_out``), in the order given: the workers that got
  tasks are woken, outcomes delivered (``Deliver``, ``Resolve``), failures delivered as the
  marker or error their reason stands for (``Fail``), late results reported (``Late``), model
  commands sent (``LoadModel``, ``UnloadModel``).

Delivery wakes waiting threads and never runs user code (a future's done-callbacks and
``on_late`` go to the coordinator's callback thread, see :mod:`._delivery`), so the timer and
the readers keep time.

Everything outside this module reaches the scheduler through the engine's methods - task ids
(:meth:`Engine.new_ids`), sources of work (:meth:`Engine.new_source`), sizing hints
(:meth:`Engine.worker_count`, :meth:`Engine.item_time`), the handles attached - never through
:attr:`Engine.core` (``tests/test_layout.py`` checks it).

Lock order: :attr:`Engine.lock`, then a handle's condition (``wake(inline=False)`` may be called
with the lock held: it only notifies; a handle's ``queue`` is appended to under the lock, and
taken from under the handle's condition - each ``popleft`` is atomic), then the supervisor's
condition (asked whether a worker
can still come). Nothing here is called with a handle's or the supervisor's lock held.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..core.actions import (
    DROPPED_BY_POLICY,
    EXPIRED,
    LOAD_FAILED,
    POISON,
    STRANDED,
    UNLOADED,
    UNPINNED,
    Action,
    CheckStranded,
    Deliver,
    Fail,
    Late,
    LoadModel,
    Requeued,
    Resolve,
    Send,
    UnloadModel,
    WatchDeadline,
)
from ..core.scheduler import Scheduler
from ..core.stats import Statistics, WorkerStats, percentile, snapshot, worker_stats
from ..core.tasks import CANCELLED, DROPPED, ERROR, TIMEOUT, LateResult, Source, Task
from ..errors import ClosedError, TaskFailed, WorkerLostError
from .delivery import CallbackRunner, Changes, TaskFuture, deliver, deliver_all
from .handles import WorkerHandle

log = logging.getLogger(__name__)

LATE_KEPT = 10_000


def fail_unloaded(tasks: list[Task]) -> None:
    """Fail tasks whose model was unloaded before they ran."""
    for t in tasks:
        model = t.route.model if t.route is not None else None
        deliver(t, ERROR, ClosedError(f"model {model!r} was unloaded before this task ran"))


class Engine:
    """Runs one coordinator's scheduler (see the module's docstring)."""

    def __init__(
        self,
        *,
        name: str,
        max_queue: int,
        overflow: str,
        max_retries: int,
        max_window: int,
        runner: CallbackRunner,
        on_late: Callable[[LateResult], None] | None,
        reinforcements: Callable[[], bool],
        strand_error: Callable[[], BaseException],
    ) -> None:
        self.name = name
        self.core = Scheduler(max_queue=max_queue, overflow=overflow, max_retries=max_retries)
        self.max_window = max_window  # what an adaptive window may grow to
        self.max_models: int | None = None  # per worker, when models load on demand
        self.clock = time.perf_counter  # the one clock of the scheduler
        self.lock = threading.Lock()
        self.not_full = threading.Condition(self.lock)  # a blocked admission may go on
        self.changed = threading.Condition(self.lock)  # workers came or went, tasks finished
        self._timer_cv = threading.Condition(self.lock)
        self._runner = runner
        self._on_late = on_late
        self._late: deque[LateResult] = deque(maxlen=LATE_KEPT)
        self._reinforcements = reinforcements  # could a worker still come?
        self._strand_error = strand_error  # what work that nothing can run fails with
        self._blocked = 0  # admissions waiting for room
        # Set by the model registry: it sends the loads/unloads the core asks for, and hears
        # what workers report.
        self.on_model_request: Callable[[str, WorkerHandle, str], None] | None = None
        self.on_model_status: Callable[[WorkerHandle, dict[str, Any]], None] | None = None
        self.changes = Changes()  # for wait_until()
        self.signal = self.changes.signal
        self.wait_until = self.changes.wait_until
        self._next_deadline: float | None = None  # what the timer sleeps towards
        self.closed = False  # no new work
        self.stopping = False  # shutting down: losses are expected, nothing is restarted
        self._stopped = False
        self._timer = threading.Thread(
            target=self._timer_loop, name=f"pytaskqml-deadlines-{name}", daemon=True
        )
        self._timer.start()

    # ------------------------------------------------------------------ for the features

    def new_ids(self, n: int) -> range:
        """*n* fresh task ids (thread-safe: taken under the lock)."""
        with self.lock:
            return self.core.new_ids(n)

    def new_source(self, kind: str, weight: int = 1, name: str | None = None) -> Source:
        """A source of work of its own in the fair queue - a map() call, a stream, an ingress
        producer - listed in the statistics while it is alive (see
        :meth:`Scheduler.new_source`)."""
        with self.lock:
            return self.core.new_source(kind, weight, name)

    def worker_count(self) -> int:
        """Workers attached now. Reads one length without the lock, so it may be called with
        or without it (a hint: it may change the moment after)."""
        return len(self.core.workers)

    def item_time(self, kind: str | None) -> float | None:
        """Worker seconds per item measured for *kind* of work (a model's name; None: the
        workers' own process()), or None while never measured. A hint, read without the lock."""
        return self.core.kind_time.get(kind)

    def mean_item_time(self) -> float | None:
        """Worker seconds per item over all kinds of work, or None while never measured. A
        hint, read without the lock."""
        return self.core.item_time

    # ------------------------------------------------------------------ admission

    def admit(
        self,
        tasks: list[Task],
        *,
        timed: bool = False,
        routed: bool = False,
        put_timeout: float | None = None,
    ) -> None:
        """Admit *tasks* under the overflow policy and dispatch. *timed*: some carry a deadline
        counted from submission. Raises :class:`ClosedError` after shutdown, ``queue.Full``
        under ``reject`` (or ``block`` past *put_timeout*)."""
        core = self.core
        with self.lock:
            if self.closed:
                raise ClosedError("the coordinator is shut down")
            i, actions = core.admit(tasks, 0, timed=timed, routed=routed)
            if i < len(tasks):
                self._admit_blocking(tasks, i, timed, routed, put_timeout, actions)
            actions += core.dispatch(self.clock())
            if self._blocked:
                self.not_full.notify_all()
            self._locked(actions)
        self._carry_out(actions, inline=True)
        if self.changes.watchers:
            self.signal()

    def _admit_blocking(
        self,
        tasks: list[Task],
        i: int,
        timed: bool,
        routed: bool,
        put_timeout: float | None,
        actions: list[Action],
    ) -> None:
        """Lock held. Wait for room for ``tasks[i:]`` (the ``block`` policy); adds to
        *actions* what admitting them asks for."""
        core = self.core
        deadline = None if put_timeout is None else time.monotonic() + put_timeout
        while i < len(tasks):
            # What this call admitted so far must be able to leave the queue meanwhile.
            sent = core.dispatch(self.clock())
            self._locked(sent)
            for a in sent:
                if isinstance(a, Send):
                    a.worker.handle.wake(False)
                else:
                    actions.append(a)
            self._blocked += 1
            try:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                ok = self.not_full.wait_for(lambda: not core.full or self.closed, remaining)
            finally:
                self._blocked -= 1
            if self.closed:
                raise ClosedError("the coordinator is shut down")
            if not ok:
                raise queue.Full("the coordinator's queue stayed full")
            i, more = core.admit(tasks, i, timed=timed, routed=routed)
            actions += more

    def unload_model(self, name: str) -> None:
        """*name* was unloaded by name: fail its tasks that wait for a worker (and any that
        turns up later) - nothing will ever run them."""
        with self.lock:
            actions = self.core.model_unloaded(name)
            if self._blocked:
                self.not_full.notify_all()
            self.changed.notify_all()
        self._carry_out(actions)

    def declare_model(self, name: str) -> None:
        """*name* is being loaded by name: its tasks wait for a worker that has it."""
        with self.lock:
            self.core.model_declared(name)

    def drop(self, task: Task) -> bool:
        """Drop a queued task (a stream's drop-oldest); False if it already started or ended."""
        with self.lock:
            if task.finished or task.started:
                return False
            self.core.drop(task)
            self.core.queue.remove(task)
            if self._blocked:
                self.not_full.notify_all()
        deliver(task, DROPPED, None)
        return True

    def cancel_abandoned(self) -> None:
        """A map() or stream was abandoned: its queued tasks are cancelled now, and those
        running on a worker that takes interrupts are interrupted."""
        with self.lock:
            self.core.cancel_abandoned()
            stale, gone = self._stale_abandoned()
            if self._blocked:
                self.not_full.notify_all()
            if not self.core.live:
                self.changed.notify_all()
        for handle, ids in stale:
            handle.interrupt(ids)
        if gone:
            deliver_all(gone, CANCELLED, None)

    def _stale(self, tasks: list[Task]) -> list[tuple[WorkerHandle, list[int]]]:
        """Of *tasks* (just finished: timed out), those a worker that takes interrupts holds,
        per worker (lock held)."""
        out: list[tuple[WorkerHandle, list[int]]] = []
        for ws in self.core.workers:
            if ws.handle.interrupt_grace is not None and ws.inflight:
                ids = [t.id for t in tasks if t.id in ws.inflight]
                if ids:
                    out.append((ws.handle, ids))
        return out

    def _stale_abandoned(self) -> tuple[list[tuple[WorkerHandle, list[int]]], list[Task]]:
        """Tasks of abandoned maps and streams held by workers that take interrupts: finished
        as cancelled (so a replaced worker's loss does not run them again), per worker (lock
        held)."""
        out: list[tuple[WorkerHandle, list[int]]] = []
        finished: list[Task] = []
        for ws in self.core.workers:
            if ws.handle.interrupt_grace is None or not ws.inflight:
                continue
            gone = [
                t
                for t in ws.inflight.values()
                if not t.finished and t.sink.__class__ is not TaskFuture and t.sink.abandoned
            ]
            for t in gone:
                self.core._finish_cancelled(t)
            if gone:
                out.append((ws.handle, [t.id for t in gone]))
                finished += gone
        return out, finished

    # ------------------------------------------------------------------ workers

    def attach(self, handle: WorkerHandle, preload: list[Task] | None = None) -> bool:
        """Register *handle* and start it; False (and nothing started) when shutting down.
        *preload* tasks run on it before anything else."""
        window = handle.window
        with self.lock:
            if self.stopping:
                return False
            ws, actions = self.core.add_worker(
                handle.name,
                window=window if window is not None else self.max_window,
                adaptive=window is None,
                batch_size=handle.batch_size,
                concurrency=handle.concurrency,
                handle=handle,
                now=self.clock(),
                models=handle.initial_models,
                max_models=self.max_models,
                preload=preload or (),
            )
            handle.state = ws
            self._locked(actions)
            handle.start()
            self.changed.notify_all()
        self._carry_out(actions)
        self.signal()
        return True

    # ------------------------------------------------------------------ WorkerEvents

    def results(
        self,
        handle: WorkerHandle,
        entries: list[Any],
        busy: float | None,
        versions: dict[int, str] | None = None,
    ) -> None:
        ws = handle.state
        assert ws is not None
        with self.lock:
            actions = self.core.results(ws, entries, busy, self.clock(), versions)
            if self._blocked:
                self.not_full.notify_all()
            if not self.core.live:
                self.changed.notify_all()
            self._locked(actions)
        self._carry_out(actions)
        if self.changes.watchers:
            self.signal()

    def skipped(self, handle: WorkerHandle, tasks: list[Task]) -> None:
        ws = handle.state
        assert ws is not None
        with self.lock:
            actions = self.core.skipped(ws, tasks, self.clock())
            self._locked(actions)
        self._carry_out(actions)

    def lost(self, handle: WorkerHandle, error: BaseException | None, graceful: bool) -> None:
        ws = handle.state
        assert ws is not None
        with self.lock:
            actions = self.core.remove_worker(ws, graceful=graceful, now=self.clock())
            if actions is None:
                return
            handle.queue.clear()  # re-queued by the core with the rest of what it held
            self._locked(actions)
            if self._blocked:
                self.not_full.notify_all()
            self.changed.notify_all()
        requeued = poison = 0
        for a in actions:
            if isinstance(a, Requeued):
                requeued += a.count
            elif isinstance(a, Fail) and a.why == POISON:
                poison += len(a.tasks)
        self._carry_out([a for a in actions if isinstance(a, Send)])
        handle.close()
        if graceful:
            log.info("worker %s left (%d tasks re-queued)", handle.name, requeued)
        elif not self.stopping:
            log.warning(
                "lost worker %s (%s); %d tasks re-queued, %d failed as poison",
                handle.name,
                error,
                requeued,
                poison,
            )
        self._carry_out([a for a in actions if not isinstance(a, Send)], lost=(handle, error))
        owner = handle.owner
        if owner is not None:
            owner.worker_left(handle, graceful, ws.completed > 0)
        self.signal()

    # ------------------------------------------------------------------ delivery

    def _locked(self, actions: list[Action]) -> None:
        """Lock held: what must be done before it is released. A ``Send``'s tasks join its
        worker's queue - so the order a worker is sent its tasks is the order they entered its
        ``inflight``; a ``WatchDeadline`` wakes the timer if it sleeps past it; a
        ``CheckStranded`` strands the queued work if no worker can come (adding a ``Fail``)."""
        stranded: list[Task] = []
        for a in actions:
            if type(a) is Send:
                a.worker.handle.queue.extend(a.tasks)
            elif type(a) is WatchDeadline:
                nd = self._next_deadline
                if nd is None or a.at < nd:
                    self._timer_cv.notify()
            elif type(a) is CheckStranded:
                stranded += self._strand_locked()
        if stranded:
            actions.append(Fail(stranded, STRANDED))

    def _carry_out(
        self,
        actions: list[Action],
        *,
        inline: bool = False,
        lost: tuple[WorkerHandle, BaseException | None] | None = None,
        load_error: str = "it failed to load",
    ) -> None:
        """Lock released: the rest of *actions*, in order - wake the workers that got tasks
        (*inline*: the caller's thread may send), deliver outcomes and failures, report late
        results, send model commands. *lost*: the handle whose loss this is and why (the
        error of its poison tasks); *load_error*: why a model failed to load."""
        for a in actions:
            if type(a) is Send:
                a.worker.handle.wake(inline)
            elif type(a) is Resolve:
                for t, kind, value in a.outcomes:
                    deliver(t, kind, value)
            elif type(a) is Deliver:
                a.sink.deliver_many(a.outcomes)
            elif type(a) is Fail:
                self._fail(a, lost, load_error)
            elif type(a) is Late:
                self._emit_late(a.results)
            elif type(a) is LoadModel or type(a) is UnloadModel:
                send = self.on_model_request
                if send is not None:
                    verb = "load" if type(a) is LoadModel else "unload"
                    send(verb, a.worker.handle, a.model)

    def _fail(
        self, a: Fail, lost: tuple[WorkerHandle, BaseException | None] | None, load_error: str
    ) -> None:
        why = a.why
        if why == EXPIRED:
            deliver_all(a.tasks, TIMEOUT, None)
        elif why == DROPPED_BY_POLICY:
            deliver_all(a.tasks, DROPPED, None)
        elif why == UNLOADED:
            fail_unloaded(a.tasks)
        elif why == STRANDED:
            deliver_all(a.tasks, ERROR, self._strand_error())
        elif why == LOAD_FAILED:
            msg = f"model {a.model!r} could not be loaded: {load_error}"
            deliver_all(a.tasks, ERROR, TaskFailed("ModelLoadError", msg))
        elif why in (POISON, UNPINNED):
            name, error = (lost[0].name, lost[1]) if lost is not None else ("?", None)
            if why == UNPINNED:
                gone = WorkerLostError(f"worker {name} left before it ran this broadcast")
                deliver_all(a.tasks, ERROR, gone)
                return
            died = f"worker {name} died while running this task ({error})"
            for t in a.tasks:
                deliver(t, ERROR, WorkerLostError(f"{died}; it had killed {t.attempts} workers"))
        else:  # pragma: no cover - every reason is listed above
            raise AssertionError(why)

    def _emit_late(self, items: list[LateResult]) -> None:
        if self._on_late is None:
            with self.lock:
                self._late.extend(items)
            return
        for item in items:
            self._runner.call(self._on_late, item)

    def late_results(self) -> list[LateResult]:
        with self.lock:
            out = list(self._late)
            self._late.clear()
        return out

    # ------------------------------------------------------------------ stranding

    def check_stranded(self) -> None:
        """A way for workers to come back has gone (a process seat retired, a dialer gave
        up): if no worker is left, fail what nothing can run."""
        with self.lock:
            stranded = self._strand_locked() if not self.core.workers else []
            self.changed.notify_all()
        if stranded:
            deliver_all(stranded, ERROR, self._strand_error())

    def _strand_locked(self) -> list[Task]:
        core = self.core
        if core.workers or self.stopping or self._reinforcements():
            core.stranded = False
            return []
        tasks = core.strand()
        if tasks:
            log.error("no workers left and none can come back; failing %d queued tasks", len(tasks))
        self.changed.notify_all()
        return tasks

    # ------------------------------------------------------------------ deadlines

    def _timer_loop(self) -> None:
        try:
            while self._timer_once():
                pass
        except BaseException:
            log.exception("deadline thread crashed; failing outstanding work")
            self.fail_all(ClosedError("the coordinator's deadline thread crashed"))

    def _timer_once(self) -> bool:
        # One round per call, so no task stays referenced from this frame while it waits.
        with self.lock:
            if self._stopped:
                return False
            now = self.clock()
            actions = self.core.expire(now)
            if not actions:
                nd = self.core.next_deadline()
                self._next_deadline = nd
                self._timer_cv.wait(None if nd is None else max(0.0, nd - now))
                self._next_deadline = None
                return True
            if self._blocked:
                self.not_full.notify_all()
            if not self.core.live:
                self.changed.notify_all()
            self._locked(actions)
            expired = actions[0]
            assert isinstance(expired, Fail)
            stale = self._stale(expired.tasks)
        for handle, ids in stale:
            handle.interrupt(ids)
        self._carry_out(actions)
        self.signal()
        return True

    # ------------------------------------------------------------------ endings

    def close(self) -> bool:
        """No new work from now on; returns whether it was already closed."""
        with self.lock:
            already, self.closed = self.closed, True
            self.not_full.notify_all()
        return already

    def cancel_queued(self) -> None:
        with self.lock:
            tasks = self.core.cancel_queued()
            self.changed.notify_all()
        deliver_all(tasks, CANCELLED, None)

    def abandon_inflight(self, error: BaseException) -> list[WorkerHandle]:
        """Cancel every task in flight (with *error*); returns the handles that held one."""
        with self.lock:
            tasks, busy = self.core.abandon_inflight()
            self.changed.notify_all()
        deliver_all(tasks, CANCELLED, error)
        return [ws.handle for ws in busy]

    def fail_all(self, error: BaseException) -> None:
        with self.lock:
            tasks = self.core.fail_all()
            self.changed.notify_all()
        deliver_all(tasks, CANCELLED, error)

    def drain(self, timeout: float | None, can_progress: Callable[[], bool]) -> bool:
        """Wait until no task is left, or no worker can run them, or *timeout*; True if none
        is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while self.core.live and can_progress():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self.changed.wait(0.25 if remaining is None else min(remaining, 0.25))
            return not self.core.live

    def stop(self) -> None:
        """Shutting down: worker losses are expected from here on."""
        with self.lock:
            self.stopping = True

    def stop_timer(self) -> None:
        with self.lock:
            self._stopped = True
            self._timer_cv.notify_all()
            self.changed.notify_all()
        if self._timer is not threading.current_thread():
            self._timer.join(5.0)

    # ------------------------------------------------------------------ waiting

    def wait_for(self, predicate: Callable[[Scheduler], bool], timeout: float | None) -> bool:
        """Block until *predicate(scheduler)* holds (checked whenever workers come or go or
        tasks finish); False on timeout."""
        with self.lock:
            return self.changed.wait_for(lambda: predicate(self.core), timeout)

    # ------------------------------------------------------------------ statistics

    def statistics(self, **front: Any) -> Statistics:
        """A snapshot (see :func:`~._stats.snapshot`); *front* adds what the front counts."""
        with self.lock:
            lat = list(self.core.latencies)  # sorted below, with the lock released
            snap = snapshot(self.core, **front)
        lat.sort()
        return dataclasses.replace(
            snap,
            latency_p50=percentile(lat, 0.50),
            latency_p90=percentile(lat, 0.90),
            latency_p99=percentile(lat, 0.99),
            latency_max=lat[-1] if lat else None,
        )

    def workers(self) -> tuple[WorkerStats, ...]:
        with self.lock:
            return tuple(worker_stats(ws) for ws in self.core.workers)

    # ------------------------------------------------------------------ models

    def model_status(self, handle: WorkerHandle, status: dict[str, Any]) -> None:
        """A worker reports a model loaded, failed or unloaded (see _models.ModelTable)."""
        ws = handle.state
        name, state = status.get("name"), status.get("state")
        if ws is None or not isinstance(name, str):
            return
        actions: list[Action] = []
        with self.lock:
            if state == "loaded":
                actions = self.core.model_ready(
                    ws, name, str(status.get("version") or ""), self.clock()
                )
            elif state == "failed":
                actions = self.core.model_failed(ws, name)
            elif state == "unloaded":
                self.core.model_gone(ws, name)
            self._locked(actions)
            self.changed.notify_all()
        self._carry_out(actions, load_error=status.get("error") or "it failed to load")
        if self.on_model_status is not None:
            self.on_model_status(handle, status)
        self.signal()

    def set_on_demand(self, model: str, on: bool) -> None:
        """Let the core load *model* where it needs it (workers with max_models)."""
        with self.lock:
            actions = self.core.set_on_demand(model, on, self.clock())
            self._locked(actions)
        self._carry_out(actions)

    # ------------------------------------------------------------------ pools

    def model_seconds(self) -> dict[tuple[str, str], float]:
        """Latency summed over the results counted by :meth:`model_counts`, in seconds."""
        with self.lock:
            return dict(self.core.model_seconds)

    def model_counts(self) -> dict[tuple[str, str], int]:
        with self.lock:
            return dict(self.core.model_counts)

    def handles(self) -> list[WorkerHandle]:
        with self.lock:
            return [ws.handle for ws in self.core.workers]

    def starvation(self, now: float) -> tuple[float, int, float | None]:
        """(seconds the oldest waiting task has waited, tasks waiting, worker seconds per
        item) - what an autoscaler decides on."""
        with self.lock:
            core = self.core
            oldest = core.queue.items.oldest_submit()
            for q in core.router.by_model.values():
                for t in q:
                    if not t.finished:
                        oldest = t.t_submit if oldest is None else min(oldest, t.t_submit)
                        break
            waited = 0.0 if oldest is None else now - oldest
            return waited, core.queued, core.item_time

    def idle_for(self, handle: WorkerHandle, now: float) -> float:
        """How long the worker has had nothing to do (0 while it holds a task)."""
        with self.lock:
            ws = handle.state
            if ws is None or ws.inflight or ws.own or not ws.accepting:
                return 0.0
            return now - ws.last_progress

    def dismiss(self, handle: WorkerHandle) -> None:
        """The worker takes no more tasks (it is about to leave; what it holds finishes)."""
        with self.lock:
            if handle.state is not None:
                handle.state.accepting = False

    def resize(self, handle: WorkerHandle, concurrency: int, window: int) -> None:
        """The worker now runs *concurrency* tasks at a time (a thread pool that grew or
        shrank) with room for *window*."""
        with self.lock:
            ws = handle.state
            if ws is None:
                return
            ws.concurrency = max(1, concurrency)
            ws.window = ws.max_window = max(1, window)
            actions = self.core.dispatch(self.clock())
            self._locked(actions)
        self._carry_out(actions)

    def model_loading(self, handle: WorkerHandle, name: str) -> None:
        """A load of *name* was sent to the worker: its tasks wait for it rather than fail."""
        with self.lock:
            if handle.state is not None:
                handle.state.loading.add(name)

    def has_model(self, name: str) -> bool:
        with self.lock:
            return any(name in w.models or name in w.loading for w in self.core.workers)

    def model_presence(self, name: str) -> tuple[bool, list[str]]:
        """(whether a worker has *name* ready or is loading it - and it was not unloaded since -,
        the names of the workers attached now)."""
        with self.lock:
            workers = self.core.workers
            there = name not in self.core.router.gone and any(
                name in w.models or name in w.loading for w in workers
            )
            return there, [w.name for w in workers]
