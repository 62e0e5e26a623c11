"""Tasks and their outcomes: the data every other layer passes around.

A :class:`Task` lives from admission until its outcome is delivered. An *outcome* is a pair
``(kind, value)``; for a sink that wants submission order it travels as ``(seq, kind, value)``.
The kinds that also travel as result flags on the wire (OK, ERROR, CHUNK, RUN) have the
values of the wire's ``RESULT_*`` flags (:mod:`pytaskqml.wire.protocol`), so a result row's
flag is its outcome kind; the core imports nothing from the wire, and tests/test_protocol.py
checks that the two agree.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

# Outcome kinds.
OK = 0  # value: the result
ERROR = 1  # value: the exception (TaskFailed, WorkerLostError, ...)
CHUNK = 2  # value: [(OK or ERROR, value), ...], one per item of a chunk
TIMEOUT = 3  # value: a TaskTimeout marker
DROPPED = 4  # value: None; dropped by the overflow policy (or never admitted)
CANCELLED = 5  # value: None or the reason (an exception)
RUN = 6  # value: [result, ...] of a chunk whose items all succeeded
END = 99  # value: None; a stream's end, after its last item


class Source:
    """Where queued work comes from - one stream, one ``map()`` call, one ingress producer, or
    ``submit()`` - and its own figures. The queue is fair between sources (``weight`` tasks
    per turn, see :class:`FairQueue`); the counters are kept by the scheduler under its
    lock."""

    __slots__ = (
        "__weakref__",
        "dropped",
        "items_in",
        "lags",
        "name",
        "processed",
        "vfinish",
        "weight",
    )

    def __init__(self, name: str, weight: int = 1) -> None:
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            raise ValueError("weight must be an int >= 1")
        self.name = name
        self.weight = weight
        self.items_in = 0  # admitted
        self.processed = 0  # a result or an error came back
        self.dropped = 0  # by an overflow policy
        self.lags: deque[float] = deque(maxlen=SOURCE_LAG_SAMPLES)  # submission to result
        self.vfinish = 0.0  # the queue's virtual time at which its last task was served

    def __repr__(self) -> str:
        return f"<Source {self.name!r} weight={self.weight}>"


# Latency samples kept per source for its percentiles.
SOURCE_LAG_SAMPLES = 2048


def span(kind: int, value: Any) -> int:
    """How many sequence numbers an outcome covers: a RUN covers one per result."""
    return len(value) if kind == RUN else 1


@dataclass(frozen=True)
class TaskTimeout:
    """Yielded by ``map()``/``stream`` in place of a result that missed its deadline.

    It is falsy, so ``if result:`` skips it; ``index`` is the item's position in its map or
    stream and ``timeout`` the deadline it missed, in seconds.
    """

    index: int
    timeout: float

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class LateResult:
    """A result that arrived after its task's deadline had already been reported (its future
    failed with ``TimeoutError``, or its ``map()``/stream yielded a :class:`TaskTimeout`).

    ``task_id`` is the task's id in this coordinator; ``index`` the item's position in its
    ``map()`` or stream (0 for ``submit()``); ``ok`` whether it ran without raising; ``value``
    its result, or the :class:`~pytaskqml.TaskFailed` it raised when ``ok`` is False."""

    task_id: int
    index: int
    ok: bool
    value: Any


class Task:
    """One unit of work: a payload, or a chunk of ``count`` items run as one task."""

    __slots__ = (
        "__weakref__",
        "attempts",
        "buffers",
        "count",
        "deadline",
        "finished",
        "id",
        "nbytes",
        "payload",
        "priority",
        "route",
        "run_timeout",
        "seq",
        "sink",
        "source",
        "started",
        "t_submit",
        "text",
    )

    def __init__(
        self,
        tid: int,
        payload: Any,
        nbytes: int,
        sink: Any,
        seq: int,
        t_submit: float,
        count: int = 1,
        text: str | None = None,
        buffers: list[Any] | None = None,
    ) -> None:
        self.id = tid
        # Checked encodable at admission; encoded again when framed unless `text` holds its
        # JSON. For a chunk (count > 1) the list of its items, which are seq, seq + 1, ...
        # seq + count - 1 of their map().
        self.payload = payload
        self.count = count
        self.nbytes = nbytes  # raw buffer bytes inside the payload, to size frames
        self.sink = sink  # a TaskFuture, or a results collector (deliver_many, abandoned)
        self.seq = seq
        self.attempts = 0  # how many workers died while running it
        # Absolute time past which it times out; set at admission for a deadline counted from
        # submission, at dispatch for one counted from the start of its run (run_timeout).
        self.deadline: float | None = None
        self.run_timeout: float | None = None
        self.finished = False  # its outcome was delivered (result, error, timeout, drop...)
        self.started = False  # dispatched at least once
        self.t_submit = t_submit
        # The payload's JSON, when it was encoded at admission: framed as it is instead of being
        # encoded a second time. With `buffers`, the sources of the raw buffers its markers
        # stand for, in order (see _codec.encode_kept); None when it holds none.
        self.text = text
        self.buffers = buffers
        # Where it may run, when that is not "any worker" (see _routing); None for most tasks.
        self.route: Route | None = None
        # Its place in the queue (see _ordered.FairQueue): higher priority first, and turns
        # between sources (a stream, a map() call, an ingress producer; None: submit()).
        self.priority = 0
        self.source: Source | None = None

    def __repr__(self) -> str:
        return f"<Task {self.id} seq={self.seq} count={self.count}>"

    @property
    def timeout(self) -> float:
        """The length of its deadline, for the timeout marker."""
        if self.run_timeout is not None:
            return self.run_timeout
        return (self.deadline or self.t_submit) - self.t_submit


class Route:
    """Where a task may run: on workers holding *model*, on the worker that owns *key*, or on
    *pin* alone (a broadcast). *meta*: its result comes back as a :class:`ModelResult`."""

    __slots__ = ("key", "meta", "model", "moved", "pin")

    def __init__(
        self,
        *,
        model: str | None = None,
        key: str | None = None,
        pin: Any = None,
        meta: bool = False,
    ) -> None:
        self.model = model
        self.key = key
        self.pin = pin  # a WorkerState
        self.meta = meta
        self.moved = False  # the first task of its key on a new worker: the worker is told

    def options(self, chunk: bool) -> dict[str, Any]:
        """The task row's options on the wire (see _protocol: CHUNK_ROW)."""
        opts: dict[str, Any] = {}
        if chunk:
            opts["c"] = 1
        if self.model is not None:
            opts["m"] = self.model
        if self.key is not None:
            opts["k"] = self.key
        if self.moved:
            opts["mv"] = 1
        return opts


@dataclass(frozen=True)
class ModelResult:
    """A result with where it came from: ``submit()``/``map()``/``stream()`` with
    ``model=M, with_meta=True`` give these. ``value`` is the model's result, ``model`` its
    name, ``version`` the version of the model that computed it (as loaded on that worker) and
    ``worker`` the name of the worker that ran it."""

    value: Any
    model: str
    version: str
    worker: str


def outcomes(t: Task, kind: int, value: Any) -> list[tuple[int, int, Any]]:
    """Per-item ``(seq, kind, value)`` of a task's outcome (a chunk has one per item)."""
    if kind == RUN:
        return [(t.seq + i, OK, v) for i, v in enumerate(value)]
    if kind == CHUNK:
        return [(t.seq + i, k, v) for i, (k, v) in enumerate(value)]
    if kind == TIMEOUT:
        return [(t.seq + i, TIMEOUT, TaskTimeout(t.seq + i, t.timeout)) for i in range(t.count)]
    return [(t.seq + i, kind, value) for i in range(t.count)]


def late_results(t: Task, kind: int, value: Any) -> list[LateResult]:
    """The :class:`LateResult` records of an outcome that came after the task finished."""
    return [LateResult(t.id, seq, k == OK, v) for seq, k, v in outcomes(t, kind, value)]
