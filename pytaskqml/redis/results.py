"""A producer's results: what a result entry becomes, and where it goes.

A :class:`~._redisclient.RedisClient` numbers its items 0, 1, 2, ... across its lifetime -
and across restarts under the same name. A result entry answers the items ``seq .. seq + n -
1`` of one task entry; it becomes outcomes ``(seq, kind, value)`` (:func:`outcomes`) for the
sink that entry was submitted for: a future (``submit``), a :class:`MapSink` (``map``), or the
:class:`ResumeBuffer` (entries an earlier run under the same name submitted and did not take).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from ..core.ordered import ReorderBuffer
from ..core.tasks import ERROR, OK, RUN, TIMEOUT, TaskTimeout
from ..errors import ClosedError, RemoteTraceback, TaskFailed, WorkerLostError
from .format import FLAG_ERROR, FLAG_OK, SeqSet


def remote_error(info: list[str]) -> Exception:
    """The exception a stored ``[type, message, traceback]`` stands for."""
    kind, message, tb = info
    if kind in ("WorkerLostError", "NoWorkersError"):
        return WorkerLostError(message)
    err = TaskFailed(kind, message, tb)
    if tb:
        err.__cause__ = RemoteTraceback(tb)
    return err


def outcomes(seq: int, count: int, kind: str, value: Any) -> list[tuple[int, int, Any]]:
    """The ``(seq, kind, value)`` outcomes of a parsed result entry; a timeout's value is its
    length in seconds (the sink makes the marker, which needs the item's position)."""
    if kind == "ok":
        return [(seq, OK, value)]
    if kind == "run":
        return [(seq, RUN, value)]
    if kind == "error":
        return [(seq + i, ERROR, remote_error(value)) for i in range(count)]
    if kind == "timeout":
        return [(seq + i, TIMEOUT, float(value)) for i in range(count)]
    out = []
    for i, (flag, v) in enumerate(value):
        if flag == FLAG_OK:
            out.append((seq + i, OK, v))
        elif flag == FLAG_ERROR:
            out.append((seq + i, ERROR, remote_error(v)))
        else:
            out.append((seq + i, TIMEOUT, float(v)))
    return out


class MapSink(ReorderBuffer):
    """The results of one ``map()``: a reorder buffer by position in the map. Its items'
    producer numbers need not be contiguous (another thread may submit in between), so each
    entry was registered with ``offset`` = position - number, and :attr:`origin` tells the
    iterator which number a position it hands out had. :attr:`partial` is ``(number, k)``
    while the iterator is part-way through an entry: its first k items were handed out."""

    def __init__(self, ordered: bool) -> None:
        super().__init__(ordered=ordered)
        self.abandoned = False
        self.origin: dict[int, int] = {}  # position -> producer number, until handed out
        self.partial: tuple[int, int] | None = None

    def deliver_at(self, offset: int, outs: list[tuple[int, int, Any]]) -> None:
        local = []
        origin = self.origin
        for seq, kind, value in outs:
            i = seq + offset
            origin[i] = seq
            if kind == TIMEOUT:
                value = TaskTimeout(i, value)
            local.append((i, kind, value))
        self.deliver_many(local)


class ResumeBuffer:
    """Results of the items an earlier run under the same producer name submitted and did
    not take: ``expected`` holds their numbers (the reader removes those that arrive);
    :meth:`iterate` hands them out in order. Kept per item: an entry the earlier run had
    handed out in part comes back with only the items it had not."""

    def __init__(self, expected: SeqSet) -> None:
        self.expected = expected
        self._runs = expected.runs()  # what iterate() walks through, in order
        self._arrived: dict[int, tuple[int, Any]] = {}
        self._cv = threading.Condition(threading.Lock())
        self.closed = False

    def __len__(self) -> int:
        return sum(e - s for s, e in self._runs)

    def take_over(self, outs: list[tuple[int, int, Any]]) -> bool:
        """Keep the outcomes of expected items (caller holds no lock); False if none was."""
        items: list[tuple[int, int, Any]] = []
        for seq, kind, value in outs:
            if kind == RUN:
                items.extend((seq + i, OK, v) for i, v in enumerate(value))
            else:
                items.append((seq, kind, value))
        with self._cv:
            kept = False
            for seq, kind, value in items:
                if self.expected.covers(seq, seq + 1):
                    self.expected.remove(seq, seq + 1)
                    self._arrived[seq] = (kind, value)
                    kept = True
            if kept:
                self._cv.notify_all()
        return kept

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()

    def iterate(
        self, taken: Any, timeout: float | None, raise_errors: bool
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(number, result)`` in order, calling *taken(number, 1)* as each is handed
        out. ``TimeoutError`` if the next one does not come within *timeout*."""
        while self._runs:
            run = self._runs[0]
            pos = run[0]
            with self._cv:
                if not self._cv.wait_for(
                    lambda p=pos: p in self._arrived or self.closed,  # type: ignore[misc]
                    timeout,
                ):
                    raise TimeoutError(f"the result of item {pos} did not come in time")
                if pos not in self._arrived:
                    raise ClosedError("the producer was closed")
                kind, value = self._arrived.pop(pos)
            run[0] = pos + 1
            if run[0] >= run[1]:
                self._runs.pop(0)
            taken(pos, 1)
            if kind == ERROR and raise_errors:
                raise value
            yield pos, TaskTimeout(pos, value) if kind == TIMEOUT else value
