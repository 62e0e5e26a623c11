"""Handing outcomes to their owners, and where users' callbacks run.

Outcomes are delivered by whichever thread learns of them: a worker's reader (results), the
deadline timer (timeouts), a caller (drops, cancellations). Those threads must never run user
code: a slow ``add_done_callback`` function on a reader would stall that worker's results, on
the timer every deadline. So a :class:`TaskFuture` runs its done-callbacks on the
coordinator's :class:`CallbackRunner` thread, and ``on_late`` goes there too. Waiting on a
future (``result()``, ``concurrent.futures.wait``) runs no user code and is woken directly.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import InvalidStateError
from typing import Any

from ..core.future import TaskFuture
from ..core.tasks import CANCELLED, ERROR, OK, TIMEOUT, Task, outcomes
from ..errors import ClosedError

log = logging.getLogger(__name__)

__all__ = ["CallbackRunner", "Changes", "TaskFuture", "deliver", "deliver_all"]


class CallbackRunner:
    """One daemon thread that runs callbacks in the order they were handed over.

    Started on first use. After :meth:`close` (once the coordinator has shut down and every
    future is resolved) a callback handed over runs at once in the calling thread instead.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._thread is None:
            with self._lock:
                if self._closed:
                    _run(fn, args)
                    return
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name=f"pytaskqml-callbacks-{self._name}", daemon=True
                    )
                    self._thread.start()
        self._queue.put((fn, args))

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            _run(*item)
            del item

    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued, then stop the thread (waits at most *timeout* seconds)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            self._queue.put(None)
            thread.join(timeout)


def _run(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("callback %r raised", fn)


def deliver(task: Task, kind: int, value: Any) -> None:
    """Hand a finished task's outcome to its owner. Never called with the coordinator's lock
    held: a sink may wake other threads."""
    sink = task.sink
    if sink.__class__ is not TaskFuture:
        sink.deliver_many(outcomes(task, kind, value))
        return
    try:
        # (A future the caller cancelled meanwhile refuses it: InvalidStateError, below.)
        if kind == OK:
            sink.set_result(value)
        elif kind == ERROR:
            sink.set_exception(value)
        elif sink.done():
            return
        elif kind == TIMEOUT:
            sink.set_exception(
                TimeoutError(f"task {task.id} missed its {task.timeout:.3f}s deadline")
            )
        elif kind == CANCELLED and value is not None and sink.running():
            sink.set_exception(value)
        elif not sink.cancel():
            sink.set_exception(value if value is not None else ClosedError("task cancelled"))
    except InvalidStateError:  # the caller cancelled it meanwhile
        pass


def deliver_all(tasks: Iterable[Task], kind: int, value: Any) -> None:
    """:func:`deliver` the same outcome to every task."""
    for t in tasks:
        deliver(t, kind, value)


class Changes:
    """Lets threads wait until a condition on the coordinator's state holds, re-checked at
    every :meth:`signal` - cheap when nobody waits (one attribute test)."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self.watchers = 0
        self._generation = 0

    def signal(self) -> None:
        """Something a :meth:`wait_until` predicate may depend on changed."""
        if self.watchers:
            with self._cv:
                self._generation += 1
                self._cv.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Block until *predicate()* holds; False on timeout. (A signal between a check and
        the wait is not lost: the generation it bumps is read before the check.)"""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self.watchers += 1
        try:
            while True:
                with self._cv:
                    seen = self._generation
                if predicate():
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                with self._cv:
                    if self._generation == seen:
                        self._cv.wait(remaining)
        finally:
            with self._cv:
                self.watchers -= 1
