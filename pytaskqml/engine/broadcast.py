"""Broadcasts: one payload run on every worker (or on one), retained ones replayed to every
worker that joins later.

A broadcast to all is one task per worker, pinned to it (see :mod:`._routing`): it does not
run elsewhere if that worker goes, it fails. A *retained* broadcast is also kept, in order,
and run on each worker that joins or is restarted, before that worker takes any other task -
for state every worker must have (a threshold, a lookup table). :meth:`Broadcasts.withdraw`
stops replaying one.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..core.tasks import Route, Task
from ..errors import NoWorkersError
from .delivery import CallbackRunner, TaskFuture
from .handles import WorkerHandle
from .intake import Encoded, Intake

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Broadcast:
    """What :meth:`Coordinator.broadcast` returns: ``results``, each worker's result (or the
    exception it raised) by worker name; ``errors``, the exceptions alone, by worker name;
    and ``id``, to :meth:`~Coordinator.withdraw` a retained one (``None`` if not retained)."""

    results: dict[str, Any]
    id: int | None = None
    errors: dict[str, BaseException] = field(default_factory=dict)


class Broadcasts:
    def __init__(self, intake: Intake, runner: CallbackRunner) -> None:
        self._intake = intake
        self._runner = runner
        self._lock = threading.Lock()
        self._retained: OrderedDict[int, tuple[Any, str | None]] = OrderedDict()
        self._ids = itertools.count(1)

    def broadcast(
        self,
        payload: Any,
        *,
        mode: str = "all",
        model: str | None = None,
        retain: bool = False,
        timeout: float | None = None,
    ) -> Broadcast:
        if mode not in ("all", "any"):
            raise ValueError("mode must be 'all' or 'any'")
        encoded = self._intake.payload_text(payload)  # checked and encoded once for all
        engine = self._intake.engine
        handles = engine.handles()
        if not handles:
            raise NoWorkersError("no workers to broadcast to")
        if mode == "any":
            handles = [min(handles, key=lambda h: len(h.state.inflight) if h.state else 0)]
        futures = [(h.name, self._pinned(payload, encoded, model, h)) for h in handles]
        bid = None
        if retain:
            with self._lock:
                bid = next(self._ids)
                self._retained[bid] = (payload, model)
        results: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}
        for name, fut in futures:
            exc = fut.exception(timeout)
            if exc is None:
                results[name] = fut.result()
            else:
                results[name] = exc
                errors[name] = exc
        return Broadcast(results, bid, errors)

    def withdraw(self, bid: int) -> bool:
        """Stop replaying a retained broadcast; False if there was none with that id."""
        with self._lock:
            return self._retained.pop(bid, None) is not None

    def retained(self) -> list[tuple[Any, str | None]]:
        with self._lock:
            return list(self._retained.values())

    def preload(self, handle: WorkerHandle) -> list[Task]:
        """The retained broadcasts as tasks for a worker that joins (pinned to it by the core
        before it takes anything else); a failure is logged."""
        tasks = []
        name = handle.name
        for payload, model in self.retained():
            fut = self._future()
            fut.add_done_callback(lambda f: _log_failure(f, name))
            t = self._intake.task(payload, fut, Route(model=model))
            tasks.append(t)
        return tasks

    def _pinned(
        self,
        payload: Any,
        encoded: Encoded,
        model: str | None,
        handle: WorkerHandle,
    ) -> TaskFuture:
        fut = self._future()
        route = Route(model=model, pin=handle.state)
        self._intake.one(payload, fut, 0, None, route=route, encoded=encoded)
        return fut

    def _future(self) -> TaskFuture:
        fut = TaskFuture()
        fut._runner = self._runner
        return fut


def _log_failure(fut: Future[Any], worker: str) -> None:
    exc = fut.exception()
    if exc is not None:
        log.warning("a retained broadcast failed on worker %s: %s", worker, exc)
