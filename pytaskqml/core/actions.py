"""What the scheduling core asks the engine to do: the records its transitions return.

A transition of :class:`~.scheduler.Scheduler` returns a list of these, in the order they are
to be carried out; the engine (:mod:`pytaskqml.engine.engine`) carries them out. They are plain
frozen records: the core does no IO, and keeps no side channel for the engine to read.

Under the engine's lock (their order matters, or they need the lock):

* :class:`Send` - these tasks go to this worker, in this order: the order they entered its
  ``inflight`` (retry accounting charges the first ``batch_size`` tasks of a lost worker's
  ``inflight``), so they join the worker's queue before the lock is released; the worker is
  woken after.
* :class:`WatchDeadline` - a deadline earlier than all before it was set: the timer must not
  sleep past it.
* :class:`CheckStranded` - work came in, or the last worker left, while no worker is there: if
  none can come back, the engine calls :meth:`~.scheduler.Scheduler.strand`.

After releasing it:

* :class:`Deliver` - outcomes for one results collector (a map() or stream), in arrival order;
  :class:`Resolve` - outcomes for tasks whose sink is a future.
* :class:`Late` - results that arrived for tasks already finished.
* :class:`Fail` - tasks the core finished without a result, and why (:data:`EXPIRED`,
  :data:`DROPPED_BY_POLICY`, :data:`POISON`, :data:`UNPINNED`, :data:`UNLOADED`,
  :data:`LOAD_FAILED`, :data:`STRANDED`): the engine delivers the marker or the error the
  reason stands for.
* :class:`LoadModel`, :class:`UnloadModel` - send this model command to this worker (models
  loaded on demand).
* :class:`Requeued` - how many tasks a worker's loss put back (for the log).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from .tasks import LateResult, Task
from .workerstate import WorkerState

# Why a Fail's tasks ended.
EXPIRED = "expired"  # their deadline passed
DROPPED_BY_POLICY = "dropped"  # the overflow policy made room
POISON = "poison"  # charged more than max_retries attempts by lost workers
UNPINNED = "unpinned"  # broadcasts whose worker left before running them
UNLOADED = "unloaded"  # their model was unloaded by name before they ran
LOAD_FAILED = "load-failed"  # their model failed to load and no worker has or loads it
STRANDED = "stranded"  # no worker is left and none can come back

Outcome = tuple[int, int, Any]  # (seq, kind, value), for a results collector


@dataclass(frozen=True, slots=True)
class Send:
    """Tasks for *worker*, in its in-flight order (one record per worker per dispatch)."""

    worker: WorkerState
    tasks: list[Task]


@dataclass(frozen=True, slots=True)
class WatchDeadline:
    """The earliest deadline is now *at*."""

    at: float


@dataclass(frozen=True, slots=True)
class CheckStranded:
    """No worker is there: ask whether one can still come."""


CHECK_STRANDED = CheckStranded()  # (it carries nothing: one will do)


@dataclass(frozen=True, slots=True)
class Deliver:
    """Outcomes for one results collector (``sink.deliver_many(outcomes)``)."""

    sink: Any
    outcomes: list[Outcome]


@dataclass(frozen=True, slots=True)
class Resolve:
    """``(task, kind, value)`` for tasks whose sink is a future, in arrival order."""

    outcomes: list[tuple[Task, int, Any]]


@dataclass(frozen=True, slots=True)
class Late:
    """Results for tasks that had already finished (timed out, say)."""

    results: list[LateResult]


@dataclass(frozen=True, slots=True)
class Fail:
    """Tasks finished without a result, all for the same reason *why*; *model* names the
    model for :data:`LOAD_FAILED`."""

    tasks: list[Task]
    why: str
    model: str | None = None


@dataclass(frozen=True, slots=True)
class LoadModel:
    """Load *model* on *worker* (its ``loading`` already says so)."""

    worker: WorkerState
    model: str


@dataclass(frozen=True, slots=True)
class UnloadModel:
    """Unload *model* from *worker*, to make room for another."""

    worker: WorkerState
    model: str


@dataclass(frozen=True, slots=True)
class Requeued:
    """A lost worker's tasks put back in the queue: *count* of them."""

    count: int


Action: TypeAlias = (
    Send
    | WatchDeadline
    | CheckStranded
    | Deliver
    | Resolve
    | Late
    | Fail
    | LoadModel
    | UnloadModel
    | Requeued
)
