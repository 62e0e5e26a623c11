"""Coordinator-side drivers of workers: the one place that knows *where* a worker runs.

A handle takes the tasks the engine put in its ``queue`` (the scheduler's ``Send`` records, see
:mod:`pytaskqml.core.actions`) and gets them run - by threads of this process
(:class:`LocalHandle`) or over a connection (:class:`~._remote.RemoteHandle`) - and reports back
through a :class:`WorkerEvents` object. The coordinator sees only this interface:

* ``name``, ``kind``, ``pid``, ``address``, ``batch_size``, ``batch_delay``, ``concurrency``,
  ``window``/``adaptive`` (the window it asked for) - read once, to register the worker;
* ``state`` - its :class:`~._scheduler.WorkerState`, set when it is registered;
* ``owner`` - whoever keeps it alive (a process seat, a dialer), told when it leaves;
* ``queue`` - the tasks sent to it, not yet taken: the engine appends to it under its lock, in
  the worker's in-flight order, and clears it when the worker is lost;
* ``start()``; ``wake(inline)`` after tasks were added to its queue; ``request_stop()`` (leave
  gracefully: finish what is running, hand back the rest); ``abort(reason)`` (drop it now);
  ``close()``; ``join(timeout)``; ``shared_memory()`` (counters, or ``None``); ``traffic()``
  (bytes through the socket and shared memory, or ``None``); ``restarts`` (of its process).

Lock order: the coordinator's lock, then a handle's condition. A handle never calls its
:class:`WorkerEvents` while holding its own condition, and ``wake`` is called with the
coordinator's lock released (``wake(inline=False)`` may be called with it held).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from ..core.tasks import CHUNK, ERROR, OK, Task
from ..errors import TaskFailed
from ..wire.codec import as_sent
from ..wire.protocol import CHUNK_ROW
from ..worker.base import Worker, error_info
from ..worker.models import ModelTable, run_rows

if TYPE_CHECKING:
    from ..core.workerstate import WorkerState

log = logging.getLogger(__name__)

_handle_ids = itertools.count(1)
_local_ids = itertools.count(1)


class WorkerEvents(Protocol):
    """What a handle reports, from its own threads (never holding its condition)."""

    def results(
        self,
        handle: WorkerHandle,
        entries: list[Any],
        busy: float | None,
        versions: dict[int, str] | None = None,
    ) -> None:
        """Result rows ``(task id, kind, value)`` (``value`` already an exception for ERROR);
        *busy* is the worker's compute time for them, when known; *versions* the model
        version that ran each task addressed to a model."""

    def model_status(self, handle: WorkerHandle, status: dict[str, Any]) -> None:
        """A model loaded, failed to load, or was unloaded on the worker."""

    def skipped(self, handle: WorkerHandle, tasks: list[Task]) -> None:
        """Tasks taken from the queue but not sent, because they had finished meanwhile."""

    def lost(self, handle: WorkerHandle, error: BaseException | None, graceful: bool) -> None:
        """The worker is gone: *graceful* if it said goodbye (nothing it held was running).
        Called once per handle."""


class WorkerOwner(Protocol):
    """Whoever keeps a worker alive: told, after the coordinator has dealt with it, that the
    worker left."""

    def worker_left(self, handle: WorkerHandle, graceful: bool, did_work: bool) -> None: ...


class WorkerHandle:
    """The part every handle shares: taking tasks from its queue, with batching."""

    kind = "?"

    def __init__(
        self,
        events: WorkerEvents,
        *,
        name: str,
        window: int | None,
        batch_size: int = 1,
        batch_delay: float = 0.0,
        concurrency: int = 1,
    ) -> None:
        self.events = events
        self.id = next(_handle_ids)
        self.name = name
        self.window = window  # None: adaptive
        self.batch_size = max(1, batch_size)
        self.batch_delay = max(0.0, batch_delay)
        self.concurrency = max(1, concurrency)
        self.pid: int | None = None
        self.address: str | None = None
        self.owner: WorkerOwner | None = None
        self.state: WorkerState | None = None
        self.initial_models: dict[str, str] = {}  # models it came with: {name: version}
        self.restarts = 0  # how often its seat's process was started again before this one
        # Seconds a task no longer wanted may go on running after the worker was told, before
        # its process is replaced (the worker class's interrupt_grace); None: not interrupted.
        self.interrupt_grace: float | None = None
        # Sent to it, not yet taken (the engine appends under its lock; see the module's doc).
        self.queue: deque[Task] = deque()
        self._cv = threading.Condition(threading.Lock())
        self._idle = 0  # threads waiting in _take()
        self._closing = False
        self._leaving = 0  # threads asked to end (a thread pool shrinking)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def start(self) -> None:
        raise NotImplementedError

    def interrupt(self, task_ids: list[int]) -> None:
        """These tasks it holds are no longer wanted: tell the worker, and replace it if it
        still runs one after :attr:`interrupt_grace` (only workers in a process do)."""

    def shared_memory(self) -> tuple[int, int, int] | None:
        """(buffers placed, fallbacks to the socket, slots in use), or None without it."""
        return None

    def traffic(self) -> tuple[int, int, int | None] | None:
        """(bytes sent and received through the socket, bytes sent through shared memory or
        None without it), or None for a worker in this process."""
        return None

    def wake(self, inline: bool = False) -> None:
        """Tasks were added to the queue: make sure a thread takes them. With *inline* the
        caller's thread may do the work itself where that saves a hand-off.

        Why no wake-up is lost: a taker announces ``_idle`` *before* it looks at the queue,
        under ``_cv``, and the tasks were appended before this call. So either it sees them, or
        we see it idle and notify - and the notify cannot slip in between its look and its
        wait, because it holds ``_cv`` for both.
        """
        if self._idle:
            with self._cv:
                self._cv.notify()

    def _take(self, limit: int) -> list[Task] | None:
        """Wait for tasks in the queue; ``None`` once closing. Holds back a partial batch for up
        to ``batch_delay`` so it can fill."""
        out = self.queue
        with self._cv:
            if self._leaving:
                self._leaving -= 1
                return None  # this thread is the one to go
            self._idle += 1
            try:
                while not out and not self._closing and not self._leaving:
                    self._cv.wait()
            finally:
                self._idle -= 1
            if self._closing:
                return None
            if self._leaving and not out:
                self._leaving -= 1
                return None
            if self.batch_size > 1 and self.batch_delay > 0 and len(out) < self.batch_size:
                self._cv.wait_for(
                    lambda: len(out) >= self.batch_size or self._closing, self.batch_delay
                )
                if self._closing:
                    return None
            # popleft one by one: the engine may append concurrently (without _cv), and each
            # popleft is atomic where a copy-then-clear would not be.
            pop = out.popleft
            taken = [pop() for _ in range(min(len(out), limit))]
            if out and self._idle:
                self._cv.notify()  # more left over: wake another thread of a local worker
        return taken

    def _take_live(self, limit: int) -> list[Task] | None:
        """:meth:`_take`, minus tasks that finished while waiting (timed out, cancelled): their
        credit goes straight back."""
        tasks = self._take(limit)
        if tasks is None:
            return None
        live = [t for t in tasks if not t.finished]
        if len(live) != len(tasks):
            self.events.skipped(self, [t for t in tasks if t.finished])
        return live

    def request_stop(self) -> None:
        self.close()

    def model_command(self, cmd: dict[str, Any]) -> None:
        """Load or unload a model on the worker (see _models.ModelTable.command)."""

    def abort(self, reason: str) -> None:
        self.close()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()

    def join(self, timeout: float) -> None:
        pass


class LocalHandle(WorkerHandle):
    """Thread workers inside the coordinator's process, sharing one :class:`Worker` instance.

    A GIL-releasing model (OpenCV, NumPy, PyTorch) runs at full speed in them. Payloads and
    results cross as they would cross a connection (copies, JSON's types), so a thread worker
    and a process compute the same thing from the same item.
    """

    kind = "local"

    def __init__(
        self, events: WorkerEvents, worker: Worker, *, threads: int, window: int | None
    ) -> None:
        batch = int(getattr(worker, "max_batch_size", 1) or 1)
        super().__init__(
            events,
            name=f"local-{type(worker).__name__}-{next(_local_ids)}",
            window=window or 2 * threads,
            batch_size=batch,
            batch_delay=float(getattr(worker, "max_batch_delay", 0.0) or 0.0),
            concurrency=threads * batch,
        )
        self.worker = worker
        # Thread workers trust their coordinator with the classes of models, as with the
        # worker's own: it is the same program.
        self.models = ModelTable(None, lambda status: self.events.model_status(self, status))
        self.threads = [self._thread(i) for i in range(threads)]
        self.size = threads
        self.fixed_window = window is not None
        self._lost = False
        self._lost_lock = threading.Lock()

    def _thread(self, i: int) -> threading.Thread:
        return threading.Thread(
            target=self._run, name=f"pytaskqml-local-{self.id}-{i}", daemon=True
        )

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def add_threads(self, n: int) -> None:
        """n more threads (the pool grows)."""
        new = [self._thread(len(self.threads) + i) for i in range(n)]
        self.threads.extend(new)
        self.size += n
        for t in new:
            t.start()

    def remove_thread(self) -> None:
        """One thread ends once its task in hand, if any, is done (the pool shrinks)."""
        with self._cv:
            self.size -= 1
            self._leaving += 1
            self._cv.notify_all()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        try:
            while self._run_once():
                pass
        except BaseException as exc:
            log.exception("local worker thread %s crashed", threading.current_thread().name)
            with self._lost_lock:
                first, self._lost = not self._lost, True
            if first:
                self.events.lost(self, exc.with_traceback(None), False)

    def _run_once(self) -> bool:
        live = self._take_live(self.batch_size)
        if live is None:
            return False
        if not live:
            return True
        # A thread worker gets what a process would decode, and its results become what the
        # caller would get from a process (see _codec.as_sent): the result never depends on
        # where an item ran, and nothing is shared with the caller's objects.
        rows: list[list[Any]] = []
        failed: list[Any] = []
        for t in live:
            try:
                if t.text is not None and t.buffers is None:
                    payload = json.loads(t.text)
                else:
                    payload = as_sent(t.payload)
            except (TypeError, ValueError) as exc:  # mutated after submit
                failed.append((t.id, ERROR, TaskFailed(type(exc).__name__, str(exc))))
                continue
            if t.route is not None:
                rows.append([t.id, payload, t.route.options(t.count > 1)])
            else:
                rows.append([t.id, payload] if t.count == 1 else [t.id, payload, CHUNK_ROW])
        t0 = time.perf_counter()
        done, versions = run_rows(self.worker, self.models, rows, self.batch_size > 1)
        busy = time.perf_counter() - t0
        del rows
        entries = [_as_received(tid, flag, value) for tid, flag, value in done]
        self.events.results(self, failed + entries if failed else entries, busy, versions or None)
        return True

    def model_command(self, cmd: dict[str, Any]) -> None:
        self.models.command(cmd)

    def close(self) -> None:
        super().close()
        self.models.close()  # a version still running a task is unloaded when it is done


def _as_received(tid: int, flag: int, value: Any) -> tuple[int, int, Any]:
    """A thread worker's result row as the caller would receive it from a process."""
    if flag == ERROR:
        return tid, ERROR, _local_error(value)
    if flag == CHUNK:
        return tid, CHUNK, [_item_received(k, v) for k, v in value]
    try:
        return tid, flag, as_sent(value)  # a result, or a RUN's list of results
    except (TypeError, ValueError) as exc:
        if flag == OK:
            return tid, ERROR, _local_error(exc)
        return tid, CHUNK, [_item_received(OK, v) for v in value]


def _item_received(kind: int, value: Any) -> tuple[int, Any]:
    if kind == ERROR:
        return ERROR, _local_error(value)
    try:
        return OK, as_sent(value)
    except (TypeError, ValueError) as exc:
        return ERROR, _local_error(exc)


def _local_error(exc: BaseException) -> TaskFailed:
    kind, message, tb = error_info(exc)
    err = TaskFailed(kind, message, tb)
    err.__cause__ = exc
    return err
