"""The :class:`concurrent.futures.Future` that ``submit()`` returns: :class:`TaskFuture`.

It lives in the core because the core tells a future from the other sinks of a task (a map's
or a stream's reorder buffer) by its class. Like every Future it holds a lock; the core starts
no thread and never waits on one. Where its done-callbacks run is the engine's business: the
engine sets ``_runner`` (a :class:`Runner`, its callback thread) on each future it creates.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, _base
from typing import Any, Protocol


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

    def __init__(self) -> None:  # no super().__init__: nothing to bind
        self._lock = threading.Lock()
        self._waiters: deque[Any] = deque()

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

    def __init__(self) -> None:
        # Future.__init__'s fields, with the lighter condition.
        self._condition = _Condition()
        self._state = _base.PENDING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks: list[Callable[[Future[Any]], object]] = []

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        if self.done():
            super().add_done_callback(fn)
            return
        call = self._runner.call
        super().add_done_callback(lambda f: call(fn, f))
