"""How a coordinator stops: draining, the grace of cancelled work, and the order in which its
workers, threads and endpoints go (see :meth:`Coordinator.shutdown`)."""

from __future__ import annotations

from concurrent.futures import CancelledError
from typing import TYPE_CHECKING

from .errors import ClosedError
from .worker.bootstrap import call_teardown

if TYPE_CHECKING:
    from .coordinator import Coordinator


def finish_shutdown(self: Coordinator, timeout: float | None, cancel: bool) -> None:
    """Drain (or, with *cancel*, give running work its grace), then stop everything. (A
    KeyboardInterrupt while draining goes to the caller, which stops at once.)"""
    engine = self._engine
    if cancel:
        grace = self.cancel_grace if timeout is None else min(timeout, self.cancel_grace)
        engine.drain(grace, self._can_progress)
    else:
        engine.drain(timeout, self._can_progress)
    teardown(self, cancel=cancel)


def teardown(self: Coordinator, *, cancel: bool) -> None:
    """Stop every worker, thread and endpoint of the coordinator; resolve what is left. Runs
    once (a later call returns at once); a KeyboardInterrupt while it waits for worker
    processes kills them instead, and is raised again at the end."""
    with self._stats_lock:
        if self._torn_down:
            return
        self._torn_down = True
    engine = self._engine
    engine.stop()
    busy = engine.abandon_inflight(CancelledError("abandoned at shutdown")) if cancel else []
    engine.fail_all(ClosedError("the coordinator shut down before this task ran"))
    for scaler in self._autoscalers:
        scaler.stop()
    seats = self._supervisor.stop()
    for d in self._dialers:
        d.stop()
    for a in self._acceptors:
        a.stop()
    handles = [ws.handle for ws in list(engine.core.workers)]
    if cancel:
        for s in seats:
            self._supervisor.kill(s)  # whatever they run is no longer wanted
    else:
        for s in seats:
            if s.handle is not None:
                s.handle.request_stop()  # spawned workers leave; standalone ones stay up
    interrupted = False
    try:
        self._supervisor.reap(seats, 0.5 if cancel else 5.0)
    except KeyboardInterrupt:
        interrupted = cancel = True
        for s in seats:
            self._supervisor.kill(s)
        self._supervisor.reap(seats, 0.5)
    for h in handles:
        h.close()
    for local in self._locals:
        local.close()
        local.join(0.5 if cancel or local in busy else 5.0)
        call_teardown(local.worker)
    for h in handles:
        h.join(2.0)
    if self._feed is not None:
        self._feed.close()  # results written, the rest released for other coordinators
    if self._control is not None:
        self._control.stop()
    self._stop_ingress()
    self._heartbeats.stop()
    self._buffers.close()
    engine.stop_timer()
    self._runner.close()
    self._stopped.set()
    if interrupted:
        raise KeyboardInterrupt
