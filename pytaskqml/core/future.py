"""The :class:`concurrent.futures.Future` that ``submit()`` returns: :class:`TaskFuture`.

It lives in the core because the core tells a future from the other sinks of a task (a map's
or a stream's reorder buffer) by its class. Like every Future it holds a lock; the core starts
no thread and never waits on one. Where its done-callbacks run is the engine's business: the
engine sets ``_runner`` (a :class:`Runner`, its callback thread) on each future it creates.

Waking the caller. ``submit(x).result()`` is the round trip users time, and the last hop of
it is one thread (a worker's reader) waking another (the caller). The standard Future does
that through its :class:`threading.Condition`: ``result()`` allocates a lock and queues it in
the condition's waiters, ``set_result()`` checks the lock is held, copies the waiters and
releases each - a few microseconds of Python on both sides, and on the setter's side some of
it *after* the release, while the woken caller wants the interpreter lock the setter holds.
:class:`TaskFuture` keeps the same objects - the same condition, the same waiter list, so
``concurrent.futures.wait()``, ``as_completed()``, ``cancel()`` and ``exception()`` work
unchanged - and does the two hot calls directly: ``result()`` on a finished future reads it
without the lock (state is written last, under the lock, so a reader that sees FINISHED sees
the result), and otherwise queues one plain lock and blocks on it; the setter takes the
waiters out under the lock and releases them as its very last step. No wake-up is lost: a
waiter queues its lock while holding the future's lock and only after finding it unfinished,
and the setter marks it finished and takes the queue under the same lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, _base
from typing import Any, Protocol

_FINISHED = _base.FINISHED
_PENDING = _base.PENDING
_RUNNING = _base.RUNNING
_CANCELLED = frozenset({_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED})
_allocate_lock = threading.Lock


class Runner(Protocol):
    """Where a future's done-callbacks run (the engine's ``CallbackRunner``)."""

    def call(self, fn: Callable[..., Any], *args: Any) -> None: ...


class _Condition(threading.Condition):
    """A condition on a plain lock, for futures: ``threading.Condition`` binds five methods of
    its lock to every instance, and with a future per task those bound methods were most of
    the objects the garbage collector had to walk (200,000 pending futures: ~1,000,000 of
    them, making each full collection cost a few hundred milliseconds). The class's own
    methods do the same through ``self._lock``. A future never re-enters its lock, so a plain
    lock serves."""

    _lock: threading.Lock
    _waiters: deque[Any]

    def __init__(self) -> None:  # no super().__init__: nothing to bind
        self._lock = threading.Lock()
        self._waiters = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()


class TaskFuture(Future[Any]):
    """The :class:`concurrent.futures.Future` that ``submit()`` returns.

    It behaves as any Future, except that a done-callback added before the future finished runs
    on the coordinator's callback thread (see the module's docstring); one added to a finished
    future runs at once in the adding thread, as the standard library documents.
    """

    # Set by whoever creates it (an attribute, not an __init__ argument: one call less on the
    # path of every submit()).
    _runner: Runner
    _condition: _Condition

    def __init__(self) -> None:
        # Future.__init__'s fields, with the lighter condition.
        self._condition = _Condition()
        self._state = _base.PENDING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks: list[Callable[[Future[Any]], object]] = []

    def result(self, timeout: float | None = None) -> Any:
        if self._state is not _FINISHED:
            self._wait(timeout)
        exc = self._exception
        if exc is None:
            return self._result
        try:
            raise exc
        finally:
            # No cycle through this frame: the traceback refers to it, it to the future.
            exc = None
            del self

    def _wait(self, timeout: float | None) -> None:
        """Until finished (else CancelledError, or TimeoutError once *timeout* went by)."""
        lock = self._condition._lock
        with lock:
            state = self._state
            if state is _FINISHED:
                return
            if state in _CANCELLED:
                raise _base.CancelledError()
            waiter = _allocate_lock()
            waiter.acquire()
            self._condition._waiters.append(waiter)
        if timeout is None:
            waiter.acquire()
        else:
            # (A timeout of 0 or less looks once, as threading.Condition.wait does.)
            got = waiter.acquire(True, timeout) if timeout > 0 else waiter.acquire(False)
            if not got and self._state is not _FINISHED:
                with lock, contextlib.suppress(ValueError):  # (released meanwhile)
                    self._condition._waiters.remove(waiter)
        state = self._state
        if state is _FINISHED:
            return
        if state in _CANCELLED:
            raise _base.CancelledError()
        raise _base.TimeoutError()

    def set_running_or_notify_cancel(self) -> bool:
        # The scheduler calls it for every task it dispatches: the usual case without the
        # Condition's Python-level enter and exit.
        with self._condition._lock:
            if self._state is _PENDING:
                self._state = _RUNNING
                return True
        return super().set_running_or_notify_cancel()  # cancelled (or misused): as always

    def set_result(self, result: Any) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception)

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        cond = self._condition
        with cond._lock:
            state = self._state
            if state in _CANCELLED or state is _FINISHED:
                sleepers = None
            else:
                self._result = result
                self._exception = exception
                self._state = _FINISHED
                for w in self._waiters:  # concurrent.futures.wait() and as_completed()
                    if exception is None:
                        w.add_result(self)
                    else:
                        w.add_exception(self)
                sleepers = cond._waiters
                if sleepers:
                    cond._waiters = deque()
        if sleepers is None:  # (its repr takes the lock: raised outside it)
            raise _base.InvalidStateError(f"{state}: {self!r}")
        if self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]
        if sleepers:
            for s in sleepers:
                s.release()  # last: the woken thread wants the interpreter lock we hold

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        if self.done():
            super().add_done_callback(fn)
            return
        call = self._runner.call
        super().add_done_callback(lambda f: call(fn, f))
