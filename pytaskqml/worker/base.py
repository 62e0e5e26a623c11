"""The :class:`Worker` base class, and how a worker runs the rows of a task frame.

The same subclass runs as a local thread worker, as a process the coordinator spawns, or as a
standalone process started by ``pytaskqml worker module:Class``; :func:`run_entries` is how
all three run tasks and chunks, so a result never depends on where an item ran.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Sequence
from typing import Any, Protocol

from ..wire.protocol import RESULT_CHUNK, RESULT_ERROR, RESULT_OK, RESULT_RUN

# What a task may raise and fail alone. KeyboardInterrupt too: in a worker it can only come
# from the task's own code (a spawned worker ignores SIGINT, ``pytaskqml worker`` turns Ctrl-C
# into a graceful stop, a thread worker never gets signals), and letting it end the worker
# would kill each worker the task is retried on.
TASK_ERRORS = (Exception, KeyboardInterrupt)


class Worker:
    """Subclass this and override :meth:`process` (and optionally the rest).

    The same subclass runs as a local thread worker, as a process the coordinator spawns, or as
    a standalone process started by ``pytaskqml worker module:Class``.

    Class attributes:

    ``max_batch_size``
        When above 1 the coordinator groups up to this many queued tasks into one call of
        :meth:`process_batch` (dynamic batching, for models that prefer a batch, e.g. on a GPU).
    ``max_batch_delay``
        Seconds the coordinator may hold a partial batch back waiting for it to fill.
    ``interrupt_grace``
        Opt in to interrupting stale work (``None``, the default: off). When a task this
        worker is running is no longer wanted - past its deadline, or its stream cancelled -
        the coordinator tells the worker at once (:meth:`cancelled` turns true while that task
        runs) and, if the task has not ended this many seconds later, replaces the worker's
        process (a spawned worker is killed and restarted; the task is not retried). Served
        in a worker process only (spawned or ``pytaskqml worker``).
    """

    max_batch_size: int = 1
    max_batch_delay: float = 0.0
    interrupt_grace: float | None = None
    # Set by the serve loop while the running task is no longer wanted (see cancelled()).
    _pytaskqml_cancel: threading.Event | None = None

    def cancelled(self) -> bool:
        """True while the task this worker is running is no longer wanted (its deadline
        passed, its stream was cancelled): a long :meth:`process` checks it now and then and
        returns early. Always False unless ``interrupt_grace`` is set (see the class)."""
        flag = self._pytaskqml_cancel
        return flag is not None and flag.is_set()

    def setup(self) -> None:
        """Called once per worker, before its first task (load the model here)."""

    def process(self, payload: Any) -> Any:
        """Compute the result of one task. An exception fails this task only.

        NumPy arrays in *payload* are yours: writable, and in a spawned worker often a view of
        memory shared with the coordinator, which is not reused while you still refer to it.
        Not overridden, it raises ``NotImplementedError`` (failing each task).
        """
        raise NotImplementedError(f"{type(self).__name__} must override process()")

    def process_batch(self, payloads: list[Any]) -> list[Any]:
        """Compute a batch of results, one per payload and in the same order.

        To fail one item without failing the batch, put an ``Exception`` instance in its place.
        """
        return [self.process(p) for p in payloads]

    def teardown(self) -> None:
        """Called once when the worker stops, also after ``/shutdown``."""

    def key_moved(self, key: str) -> None:
        """Tasks submitted with ``key=`` *key* come to this worker from now on, because the
        worker that had them died: rebuild the state kept for that key."""


def error_info(exc: BaseException) -> list[str]:
    """``[qualified type, message, traceback text]``: how an exception travels."""
    t = type(exc)
    message = str(exc)
    if not message and isinstance(exc, KeyboardInterrupt):
        message = "raised by the task's own code (the worker goes on)"
    name = (
        t.__qualname__
        if t.__module__ in ("builtins", "__main__")
        else f"{t.__module__}.{t.__qualname__}"
    )
    return [name, message, "".join(traceback.format_exception(t, exc, exc.__traceback__))]


class Runnable(Protocol):
    """What runs tasks: a Worker, or a loaded model version (see _models)."""

    def process(self, payload: Any) -> Any: ...

    def process_batch(self, payloads: list[Any]) -> list[Any]: ...


def run_tasks(worker: Runnable, payloads: Sequence[Any], batch: bool) -> list[tuple[bool, Any]]:
    """Run payloads through the worker: ``(True, result)`` or ``(False, exception)`` each."""
    if batch:
        try:
            results = worker.process_batch(list(payloads))
            if not isinstance(results, list) or len(results) != len(payloads):
                got = len(results) if isinstance(results, list) else type(results).__name__
                raise ValueError(
                    f"process_batch returned {got} results for {len(payloads)} payloads"
                )
        except TASK_ERRORS as exc:
            return [(False, exc)] * len(payloads)
        return [(False, r) if isinstance(r, Exception) else (True, r) for r in results]
    out: list[tuple[bool, Any]] = []
    for p in payloads:
        try:
            out.append((True, worker.process(p)))
        except TASK_ERRORS as exc:
            out.append((False, exc))
    return out


def run_entries(
    worker: Runnable, entries: Sequence[Any], batch: bool
) -> list[tuple[int, int, Any]]:
    """Run task rows ``[id, payload]`` and chunk rows ``[id, [items...], CHUNK_ROW]``.

    Returns ``(id, RESULT_OK, result)``, ``(id, RESULT_ERROR, exception)`` or, for a chunk,
    ``(id, RESULT_RUN, [result, ...])`` when every item succeeded and ``(id, RESULT_CHUNK,
    [(RESULT_OK or RESULT_ERROR, result or exception), ...])`` otherwise. With *batch* every
    item of every row goes through ``process_batch`` in slices of ``max_batch_size``.
    """
    if not batch:
        process = worker.process
        out: list[tuple[int, int, Any]] = []
        for row in entries:
            if len(row) == 3:
                out.append(run_chunk(process, row[0], row[1]))
                continue
            try:
                out.append((row[0], RESULT_OK, process(row[1])))
            except TASK_ERRORS as exc:
                out.append((row[0], RESULT_ERROR, exc))
        return out
    items: list[Any] = []
    for row in entries:
        if len(row) == 3:
            items.extend(row[1])
        else:
            items.append(row[1])
    size = max(1, int(getattr(worker, "max_batch_size", 1) or 1))
    outcomes: list[tuple[bool, Any]] = []
    for i in range(0, len(items), size):
        outcomes.extend(run_tasks(worker, items[i : i + size], batch=True))
    out = []
    pos = 0
    for row in entries:
        if len(row) == 3:
            n = len(row[1])
            part = outcomes[pos : pos + n]
            if all(ok for ok, _ in part):
                out.append((row[0], RESULT_RUN, [v for _, v in part]))
            else:
                out.append(
                    (
                        row[0],
                        RESULT_CHUNK,
                        [(RESULT_OK if ok else RESULT_ERROR, v) for ok, v in part],
                    )
                )
            pos += n
        else:
            ok, v = outcomes[pos]
            out.append((row[0], RESULT_OK if ok else RESULT_ERROR, v))
            pos += 1
    return out


def run_chunk(process: Any, tid: int, items: list[Any]) -> tuple[int, int, Any]:
    """One chunk, item by item. The loop is as plain as it can be - a chunk of tiny items costs
    about one call of ``process`` per item - until an item fails; from there on each outcome is
    recorded on its own. No item runs twice."""
    results: list[Any] = []
    append = results.append
    try:
        for item in items:
            append(process(item))
    except TASK_ERRORS as exc:
        mixed: list[tuple[int, Any]] = [(RESULT_OK, r) for r in results]
        mixed.append((RESULT_ERROR, exc))
        for item in items[len(mixed) :]:
            try:
                mixed.append((RESULT_OK, process(item)))
            except TASK_ERRORS as exc2:
                mixed.append((RESULT_ERROR, exc2))
        return tid, RESULT_CHUNK, mixed
    return tid, RESULT_RUN, results


def worker_info(worker: Worker) -> dict[str, Any]:
    batch = int(getattr(worker, "max_batch_size", 1) or 1)
    delay = float(getattr(worker, "max_batch_delay", 0.0) or 0.0)
    overridden = type(worker).process_batch is not Worker.process_batch
    return {
        "cls": f"{type(worker).__module__}.{type(worker).__qualname__}",
        "batch": batch if (batch > 1 or overridden) else 1,
        "batch_delay": delay,
        **({"interrupt": grace} if (grace := interrupt_grace(worker)) is not None else {}),
    }


def interrupt_grace(worker: Any) -> float | None:
    """The worker class's ``interrupt_grace`` if it opted in with a usable one."""
    grace = getattr(worker, "interrupt_grace", None)
    if isinstance(grace, int | float) and not isinstance(grace, bool) and 0 <= grace <= 3600:
        return float(grace)
    return None
