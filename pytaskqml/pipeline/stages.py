"""The steps of a :class:`~pytaskqml.Pipeline`: a :class:`Stage` (a Worker with a pool of its
own, which becomes a :class:`Coordinator`) and :class:`Branches` (several chains of stages run
on the same item, their results converged into one ``{branch: result}`` dict).

A step's work for one item is an *entry* with ``wait() -> (ok, value)``: the pipeline's pumps
wait for entries in submission order, so the order of items is the order of the FIFOs.

A stream's items reach a stage through a :class:`Lane`: each item is admitted to the stage's
coordinator with the lane's :class:`~._iterate.Collector` as its sink - no Future and no
done-callback per item - and its outcome is taken from the collector in the order sent, which
is the order of the lane's entries in the FIFO. An item that fails before it is sent (a full
queue under ``reject``, a shut-down stage, a deadline already past) gets an entry with its
outcome instead and takes no number in the lane, so every sent entry's outcome is the
collector's next one. (:meth:`Stage.begin`, with a Future per item, remains for the chains of
:class:`Branches`, whose converge waits on several of them at once.)"""

from __future__ import annotations

import contextlib
import importlib
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any

from ..coordinator import Coordinator
from ..core.ordered import OVERFLOW_POLICIES, OverflowPolicy
from ..core.tasks import ERROR, OK, TIMEOUT, TaskTimeout
from ..engine.iterate import Collector
from ..engine.pool import check_positive
from ..errors import ClosedError, TaskFailed
from ..worker.models import ModelWorker

_POLL = 0.1  # how often a lane waiting for an outcome looks whether its stream was stopped


class StageTimeout(TimeoutError):
    """A stage's item missed its ``timeout`` (becomes a :class:`TaskTimeout` marker)."""

    def __init__(self, stage: str, timeout: float) -> None:
        super().__init__(f"stage {stage!r}: no result within {timeout}s")
        self.stage = stage
        self.timeout = timeout


def resolve_worker(spec: Any) -> Any:
    """A Worker class, instance or function as given, or the object a ``module:Class`` names
    (``ValueError`` with a one-line reason when it cannot be imported)."""
    if not isinstance(spec, str):
        return spec
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"worker {spec!r} is not of the form module:Class")
    try:
        obj: Any = importlib.import_module(module)
    except Exception as exc:
        raise ValueError(f"cannot import {module!r}: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


class Stage:
    """One step of a pipeline: *worker* (a :class:`Worker` subclass, an instance, a function,
    or a ``"module:Class"`` name) on a pool of its own.

    ``threads`` (or ``(min, max)``) runs it in threads of this process; ``processes`` (or
    ``(min, max)``) in spawned processes (a class or module-level function, built with
    ``kwargs``); ``connect`` (a list of addresses) and ``listen`` (an address) add remote
    workers started with ``pytaskqml worker``. Without any of them: one thread. Batching is
    the Worker's own (``max_batch_size``/``max_batch_delay``). With ``model`` the stage sends
    its items to that named model (see :attr:`Coordinator.models`) instead of the worker's
    ``process()``; ``load`` (a :class:`~pytaskqml.Model` subclass or its ``"module:Class"``
    name) with ``config`` and ``version`` loads it on the stage's workers when the stage
    starts, and *worker* defaults to :class:`~pytaskqml.worker.ModelWorker`. ``timeout``
    bounds each item here (from when it enters the stage); ``buffersize`` is how many items
    may be in this stage at once; ``max_queue``, ``overflow``, ``window``, ``max_retries``
    and ``authkey`` are the stage coordinator's: with ``overflow="reject"`` an item that
    finds ``max_queue`` items waiting fails with :class:`queue.Full`, with ``"drop_oldest"``
    the oldest waiting one is cancelled - either way in its place, marked, and the later
    stages skip it.

    Defaults: ``name`` the model's or the worker's name, ``timeout`` ``None`` (no limit; in
    seconds), ``buffersize`` 64 items, ``max_queue`` 10,000 items, ``overflow="block"``,
    ``window`` 64 tasks, ``max_retries`` 2, ``authkey`` ``$PYTASKQML_AUTHKEY``.
    ``ValueError`` for a stage with neither a worker nor a model, an unknown ``overflow`` or
    a ``"module:Class"`` that cannot be imported.
    """

    def __init__(
        self,
        worker: Any = None,
        *,
        name: str | None = None,
        model: str | None = None,
        load: Any = None,
        config: dict[str, Any] | None = None,
        version: str | None = None,
        threads: int | tuple[int, int] | None = None,
        processes: int | tuple[int, int] | None = None,
        connect: Sequence[str | tuple[str, int]] = (),
        listen: str | tuple[str, int] | None = None,
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
        buffersize: int = 64,
        max_queue: int = 10_000,
        overflow: OverflowPolicy = "block",
        window: int = 64,
        max_retries: int = 2,
        authkey: bytes | str | None = None,
    ) -> None:
        check_positive("timeout", timeout)
        check_positive("buffersize", buffersize, allow_none=False)
        if isinstance(connect, str):
            connect = [connect]
        if model is None and (worker is None or load is not None or config is not None):
            raise ValueError("a stage needs a worker, or a model (for load= and config=)")
        self.model, self.load, self.config, self.version = model, load, config, version
        if worker is None:
            worker = ModelWorker
        self.worker = worker
        self.name = name or model or _default_name(worker)
        self.threads = threads
        self.processes = processes
        self.connect = list(connect)
        self.listen = listen
        self.kwargs = dict(kwargs or {})
        self.timeout = timeout
        self.buffersize = buffersize
        self.max_queue = max_queue
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}")
        self.overflow: OverflowPolicy = overflow
        self.window = window
        self.max_retries = max_retries
        self.authkey = authkey
        self.coordinator: Coordinator | None = None
        self.listening: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"<Stage {self.name!r}>"

    def start(self) -> Coordinator:
        """Build this stage's coordinator and its workers."""
        worker = resolve_worker(self.worker)
        coord = Coordinator(
            name=self.name,
            max_queue=self.max_queue,
            overflow=self.overflow,
            window=self.window,
            max_retries=self.max_retries,
            authkey=self.authkey,
        )
        self.coordinator = coord
        try:
            if self.processes is not None:
                coord.spawn(worker, self.processes, kwargs=self.kwargs or None)
            if self.threads is not None or (
                self.processes is None and not self.connect and self.listen is None
            ):
                local = worker(**self.kwargs) if isinstance(worker, type) else worker
                coord.add_local(local, self.threads or 1)
            if self.listen is not None:
                self.listening = coord.listen(self.listen)
            for addr in self.connect:
                coord.connect(addr)
            if self.load is not None and self.model is not None:
                coord.models.load(self.model, self.load, config=self.config, version=self.version)
        except BaseException:
            coord.shutdown(wait=True, cancel_futures=True)
            raise
        return coord

    def begin(self, value: Any) -> Future[Any]:
        """This stage's future for *value*; a failure names the stage."""
        assert self.coordinator is not None
        out: Future[Any] = Future()
        try:
            fut = self.coordinator.submit(value, timeout=self.timeout, model=self.model)
        except BaseException as exc:
            out.set_exception(mark(exc, self))
            return out

        def done(f: Future[Any]) -> None:
            if out.done():
                return  # the pipeline cancelled it
            exc = f.exception() if not f.cancelled() else None
            with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
                if f.cancelled():
                    out.cancel()
                    out.set_running_or_notify_cancel()
                elif exc is not None:
                    out.set_exception(mark(exc, self))
                else:
                    out.set_result(f.result())

        fut.add_done_callback(done)
        # Cancelling the stage's future (PipelineStream.cancel) cancels the task if it waits.
        out.add_done_callback(lambda o: fut.cancel() if o.cancelled() else None)
        return out


class Done:
    """An entry whose outcome is known: a failure carried past the later steps."""

    __slots__ = ("ok", "value")

    def __init__(self, ok: bool, value: Any) -> None:
        self.ok, self.value = ok, value

    def wait(self, deadline: float | None) -> tuple[bool, Any]:
        return self.ok, self.value


class _Sent:
    """An item sent through a lane: its outcome is the lane's next one."""

    __slots__ = ("lane", "stage_timeout")

    def __init__(self, lane: Lane, stage_timeout: bool) -> None:
        self.lane = lane
        self.stage_timeout = stage_timeout  # its deadline was the stage's, not the stream's

    def wait(self, deadline: float | None) -> tuple[bool, Any]:
        return self.lane.take(self.stage_timeout)


class Lane:
    """One stream's items on their way through *stage* (see the module docstring). One thread
    sends (the stream's ``put()`` or the pump before the stage) and one takes (the pump after
    it); *stopped* ends a wait for an outcome with :class:`ClosedError`."""

    def __init__(self, stage: Stage, stopped: threading.Event) -> None:
        coord = stage.coordinator
        assert coord is not None
        self.stage = stage
        self.coordinator = coord
        self.collector = Collector(True)
        self.stopped = stopped
        self._sent = 0
        self._ready: deque[tuple[int, int, Any]] = deque()  # taken from the collector at once

    def send(self, value: Any, deadline: float | None) -> Done | _Sent:
        """Admit *value* to the stage; its entry. Its deadline is the stage's ``timeout`` from
        now or the stream's *deadline* (``time.monotonic()``), whichever comes first."""
        stage, coord = self.stage, self.coordinator
        timeout = stage.timeout
        by_stage = True
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return Done(False, None)  # the stream's deadline: a TaskTimeout marker
            if timeout is None or left < timeout:
                timeout, by_stage = left, False
        try:
            route = coord.route_for(stage.model) if stage.model is not None else None
            coord.intake.one(value, self.collector, self._sent, timeout, route=route)
        except BaseException as exc:
            return Done(False, mark(exc, stage))
        self._sent += 1
        return _Sent(self, by_stage)

    def take(self, by_stage: bool) -> tuple[bool, Any]:
        """The next sent item's outcome: ``(True, result)``, ``(False, exception)`` naming the
        stage, ``(False, StageTimeout)`` or ``(False, None)`` for the stream's deadline."""
        ready = self._ready
        while not ready:
            try:
                ready.extend(self.collector.get_batch(_POLL))
            except TimeoutError:
                if self.stopped.is_set():
                    raise ClosedError("the stream was stopped") from None
        _, kind, value = ready.popleft()
        if kind == OK:
            return True, value
        stage = self.stage
        if kind == TIMEOUT:
            if by_stage and stage.timeout is not None:
                return False, StageTimeout(stage.name, stage.timeout)
            return False, None
        if kind == ERROR and isinstance(value, BaseException):
            return False, mark(value, stage)
        # Cancelled, or dropped by the stage's drop_oldest policy.
        return False, mark(CancelledError(), stage)

    def abandon(self) -> None:
        """Nobody will take the outcomes: the items still queued are cancelled."""
        self.collector.abandoned = True
        self.coordinator.intake.engine.cancel_abandoned()


def mark(exc: BaseException, stage: Stage) -> BaseException:
    """*exc* naming the stage it happened in (a ``stage`` attribute; a :class:`TaskFailed`'s
    message says it too)."""
    if getattr(exc, "stage", None) is not None:
        return exc
    if isinstance(exc, TimeoutError) and stage.timeout is not None:
        return StageTimeout(stage.name, stage.timeout)
    if isinstance(exc, TaskFailed):
        named = TaskFailed(
            exc.remote_type, f"{exc.message} (in stage {stage.name!r})", exc.remote_traceback
        )
        named.__cause__ = exc.__cause__
        exc = named
    with contextlib.suppress(AttributeError):
        exc.stage = stage.name  # type: ignore[attr-defined]
    return exc


def _default_name(worker: Any) -> str:
    if isinstance(worker, str):
        return worker.rpartition(":")[2] or worker
    name = getattr(worker, "__name__", None) or type(worker).__name__
    return str(name)


def chain(stages: Sequence[Stage], value: Any) -> Future[Any]:
    """Run *value* through *stages* one after the other; the last one's future (a failure
    skips the rest)."""
    out: Future[Any] = Future()

    def step(k: int, v: Any) -> None:
        if k == len(stages):
            out.set_result(v)
            return
        f = stages[k].begin(v)

        def done(f: Future[Any]) -> None:
            exc = f.exception() if not f.cancelled() else None
            if f.cancelled():
                out.cancel()
                out.set_running_or_notify_cancel()
            elif exc is not None:
                out.set_exception(exc)
            else:
                step(k + 1, f.result())

        f.add_done_callback(done)

    step(0, value)
    return out


class Branches:
    """A fan-out: every item runs through each named branch (a :class:`Stage` or a list of
    them), and a converge joins the branches' results into ``{branch: result}``.

    ``timeout`` (from when the item enters this step) bounds the wait for the branches;
    ``join`` names the branches to wait for (default: all; a branch not in it runs for its
    effect and is left out of the dict). A failed branch holds its exception in the dict, a
    late one a :class:`TaskTimeout` marker; the item goes on to the next step either way.
    ``timeout`` is in seconds (default ``None``: no limit); ``name`` labels the step
    (default ``"branches"``). ``ValueError`` for no branches or a ``join`` naming an unknown
    one, ``TypeError`` for a branch that is neither a Stage nor a non-empty list of them.
    """

    def __init__(
        self,
        branches: dict[str, Stage | Sequence[Stage]],
        *,
        name: str = "branches",
        timeout: float | None = None,
        join: Sequence[str] | None = None,
    ) -> None:
        if not branches:
            raise ValueError("Branches needs at least one branch")
        check_positive("timeout", timeout)
        self.name = name
        self.timeout = timeout
        self.paths: dict[str, list[Stage]] = {
            b: [s] if isinstance(s, Stage) else list(s) for b, s in branches.items()
        }
        for b, path in self.paths.items():
            if not path or not all(isinstance(s, Stage) for s in path):
                raise TypeError(f"branch {b!r} must be a Stage or a non-empty list of Stages")
        self.join = list(join) if join is not None else list(self.paths)
        unknown = [b for b in self.join if b not in self.paths]
        if unknown:
            raise ValueError(f"join names unknown branches: {', '.join(unknown)}")

    @property
    def stages(self) -> list[Stage]:
        """Every stage of every branch, in branch order."""
        return [s for path in self.paths.values() for s in path]

    def __repr__(self) -> str:
        return f"<Branches {self.name!r} {list(self.paths)}>"


class Join:
    """One item's branches, converged: ``wait()`` gives ``{branch: result}``."""

    def __init__(self, step: Branches, value: Any, index: int) -> None:
        self.step = step
        self.index = index
        self.deadline = None if step.timeout is None else time.monotonic() + step.timeout
        self.futures = {b: chain(path, value) for b, path in step.paths.items()}

    def wait(self, deadline: float | None = None) -> tuple[bool, Any]:
        """``{branch: result}`` once every joined branch is done or the step's timeout (or
        the earlier *deadline*, ``time.monotonic()``) has passed."""
        ends = [d for d in (self.deadline, deadline) if d is not None]
        end = min(ends) if ends else None
        out: dict[str, Any] = {}
        for b in self.step.join:
            f = self.futures[b]
            left = None if end is None else max(0.0, end - time.monotonic())
            try:
                exc = f.exception(left)
            except TimeoutError:
                f.cancel()
                out[b] = TaskTimeout(self.index, self.step.timeout or 0.0)
                continue
            except BaseException as cancelled:
                out[b] = cancelled
                continue
            if isinstance(exc, StageTimeout):
                out[b] = TaskTimeout(self.index, exc.timeout)
            else:
                out[b] = exc if exc is not None else f.result()
        return True, out


def plain(row: dict[str, Any]) -> dict[str, Any]:
    """A converged row as the next step receives it (JSON): a failed branch becomes
    ``{"error": type, "message": text, "stage": name}``, a late one ``{"timeout": seconds}``."""
    out: dict[str, Any] = {}
    for b, v in row.items():
        if isinstance(v, TaskTimeout):
            out[b] = {"timeout": v.timeout}
        elif isinstance(v, BaseException):
            out[b] = {
                "error": getattr(v, "remote_type", type(v).__name__),
                "message": getattr(v, "message", str(v)),
                "stage": getattr(v, "stage", None),
            }
        else:
            out[b] = v
    return out
