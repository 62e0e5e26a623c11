"""What the front asks of the engine about its workers - their models, their size, their
idleness - beyond running tasks: a part of :class:`~._engine.Engine` (mixed in; the same
lock, the same scheduler)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..core.scheduler import Scheduler
from ..core.tasks import ERROR, Task
from ..core.workerstate import WorkerState
from ..errors import TaskFailed
from .delivery import deliver_all
from .handles import WorkerHandle


class WorkerOps:
    """Mixed into the Engine (which sets these up)."""

    core: Scheduler
    lock: threading.Lock
    changed: threading.Condition
    clock: Callable[[], float]
    signal: Callable[[], None]
    on_model_request: Callable[[str, WorkerHandle, str], None] | None
    on_model_status: Callable[[WorkerHandle, dict[str, Any]], None] | None

    # ------------------------------------------------------------------ models

    def model_status(self, handle: WorkerHandle, status: dict[str, Any]) -> None:
        """A worker reports a model loaded, failed or unloaded (see _models.ModelTable)."""
        ws = handle.state
        name, state = status.get("name"), status.get("state")
        if ws is None or not isinstance(name, str):
            return
        stuck: list[Task] = []
        assigned: list[WorkerState] = []
        with self.lock:
            if state == "loaded":
                assigned = self.core.model_ready(
                    ws, name, str(status.get("version") or ""), self.clock()
                )
            elif state == "failed":
                stuck = self.core.model_failed(ws, name)
            elif state == "unloaded":
                self.core.model_gone(ws, name)
            requests = self._requests()
            self.changed.notify_all()
        for w in assigned:
            w.handle.wake(False)
        if stuck:
            why = status.get("error") or "it failed to load"
            err = TaskFailed("ModelLoadError", f"model {name!r} could not be loaded: {why}")
            deliver_all(stuck, ERROR, err)
        if requests:
            self._send_requests(requests)
        if self.on_model_status is not None:
            self.on_model_status(handle, status)
        self.signal()

    def set_on_demand(self, model: str, on: bool) -> None:
        """Let the core load *model* where it needs it (workers with max_models)."""
        with self.lock:
            (self.core.router.on_demand.add if on else self.core.router.on_demand.discard)(model)
            assigned = self.core.dispatch(self.clock())
            requests = self._requests()
        for w in assigned:
            w.handle.wake(False)
        if requests:
            self._send_requests(requests)

    def _requests(self) -> list[tuple[str, WorkerState, str]]:
        """Lock held: take the model loads/unloads the core asks for."""
        router = self.core.router
        if not router.requests:
            return []
        out, router.requests = router.requests, []
        return out

    def _send_requests(self, requests: list[tuple[str, WorkerState, str]]) -> None:
        send = self.on_model_request
        for action, ws, name in requests:
            if send is not None:
                send(action, ws.handle, name)

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
            assigned = self.core.dispatch(self.clock())
        for w in assigned:
            w.handle.wake(False)

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
