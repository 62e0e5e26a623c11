"""``map()`` and :class:`Stream`: results handed to the caller in order, and what each outcome
kind becomes for them (one definition: :func:`classify`)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from typing import Any

from ..core.ordered import ReorderBuffer
from ..core.tasks import CANCELLED, DROPPED, END, ERROR, OK, RUN, TIMEOUT, Route, span
from ..errors import ClosedError
from .intake import MAX_MAP_BUFFER, Intake, check_priority
from .progress import Progress, open_bar

# What an outcome becomes for the caller.
YIELD = 0  # the value itself: a result, a TaskTimeout marker, or an error with on_error="return"
EACH = 1  # each of the values: a chunk's results
SKIP = 2  # nothing: dropped by the overflow policy
RAISE = 3  # raised: an error or cancellation with on_error="raise"

# The value of the DROPPED outcome that fills the place of an item put() refused.
REFUSED = object()


def classify(kind: int, value: Any, raise_errors: bool) -> int:
    if kind == RUN:
        return EACH
    if kind in (OK, TIMEOUT):
        return YIELD
    if kind == DROPPED:
        return SKIP
    if kind in (ERROR, CANCELLED) and raise_errors:
        return RAISE
    return YIELD


def as_error(kind: int, value: Any) -> BaseException:
    if isinstance(value, BaseException):
        return value
    return CancelledError() if kind == CANCELLED else ClosedError("task cancelled")


class Collector(ReorderBuffer):
    """The results side of one map() or stream: a reorder buffer that can be abandoned."""

    def __init__(self, ordered: bool, *, start_only: bool = False) -> None:
        super().__init__(ordered=ordered)
        self.abandoned = False
        # Its tasks go only to a worker that can start them at once (a map with a deadline:
        # what has not started by then is cancelled, which a task a worker holds cannot be).
        self.start_only = start_only


def map_results(
    intake: Intake,
    it: Iterator[Any],
    fixed_buffersize: int | None,
    ordered: bool,
    timeout: float | None,
    on_error: str,
    chunksize: int | None,
    route: Callable[[Any], Route] | None = None,
    deadline: float | None = None,
    progress: bool | Progress | None = None,
    total: int | None = None,
    work: str | None = None,
    priority: int = 0,
    weight: int = 1,
) -> Iterator[Any]:
    """The generator behind ``Coordinator.map()`` (arguments already checked). *route* says
    where each task may run (``chunksize`` must be 1 when it depends on the item). Past
    *deadline* (``time.monotonic()``) a result not ready yet raises ``TimeoutError`` - after
    every result that was ready in time has been yielded - and the items not started yet are
    cancelled. *total*: the input's length, if it has one, for the progress bar. *work*: the
    model the items run on (None: the workers' own process()), whose measured time per item
    sizes the buffer and the chunks. *priority* and *weight*: the place of its tasks in the queue
    (the call is one source of its own)."""
    collector = Collector(ordered, start_only=deadline is not None)
    source = intake.engine.new_source("map", weight)
    raise_errors = on_error == "raise"
    seq = 0
    outstanding = 0
    exhausted = False
    # Items with a deadline go alone: a chunk would make neighbours of a slow item miss theirs.
    chunked = chunksize != 1 and timeout is None
    # The automatic buffer starts at 256 and grows at most 8-fold per refill: the time per item
    # measured so far may be another workload's (tiny words before video frames), and by the
    # time the buffer is large, this map's own results have corrected it.
    cap = 256
    # Items that are coord.buffer() arrays stay in the pool until their tasks are over, so
    # reading further ahead than the pool holds would turn the rest into plain copies (and a
    # producer reusing slots would wait on itself). The first item is read alone to learn
    # that; then the buffer is at most half of what the pool holds of such items, leaving the
    # other half to the frames the producer and the consumer still hold.
    pool_cap: int | None = None
    first = True

    def read(n: int, held: list[list[int]]) -> list[Any]:
        # Up to n items. With a buffer pool, each item's pool buffers are made read-only as
        # it is read, before the next is asked for: a producer writing every frame into one
        # buffer is stopped at its second write instead of changing the frames read before
        # (the items of a batch are admitted, and so held, only once all are read). The first
        # item is looked at whatever happens: producing it may be what made the pool.
        if n > 1 and not intake.pooled():
            return list(itertools.islice(it, n))
        out = []
        hold = intake.hold
        for item in itertools.islice(it, n):
            out.append(item)
            h = hold(item)
            if h is not None:
                held.append(h)
        return out

    def top_up() -> None:
        held: list[list[int]] = []
        try:
            fill(held)
        finally:
            if held:
                intake.unhold(held)

    def fill(held: list[list[int]]) -> None:
        # Refill once a quarter of the buffer is free: called after every result handed out,
        # so the workers keep busy while the caller works through a batch of them.
        nonlocal seq, outstanding, exhausted, cap, pool_cap, first
        items: list[Any] = []
        if first:
            first = False
            items = read(1, held)
            exhausted = not items
            fits = intake.pool_fits(items[0]) if items else None
            if fits is not None:
                pool_cap = max(2, fits // 2)
        if exhausted and not items:
            return  # (nothing more to read: no need to size the buffer)
        buffersize = fixed_buffersize or min(cap, intake.auto_buffersize(chunked, work))
        if pool_cap is not None:
            buffersize = min(buffersize, pool_cap)
        room = buffersize - outstanding - len(items)
        if not items and (exhausted or room < max(1, buffersize // 4)):
            return
        cap = min(8 * cap, MAX_MAP_BUFFER)
        if not exhausted and room > 0:
            more = read(room, held)
            exhausted = len(more) < room
            items += more
        if items:
            # The last items of the input are chunked by how many they are, not by the
            # buffer's size, so that they too spread over every worker.
            share = len(items) if exhausted else buffersize
            chunk = chunksize or (1 if not chunked else intake.auto_chunksize(share, work))
            fits = intake.many(
                items,
                collector,
                seq,
                run_timeout=timeout,
                chunk=chunk,
                route=route,
                source=source,
                priority=priority,
            )
            if fits is not None:
                pool_cap = max(2, min(fits // 2, pool_cap or fits))
            seq += len(items)
            outstanding += len(items)

    bar = open_bar(progress, total)
    try:
        while True:
            top_up()
            if outstanding == 0:
                return
            if bar is not None:
                bar.update_to(seq - outstanding)  # items handed out so far
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            # Each result leaves the batch as it is handed out (popped, never held by a local
            # across a yield): the caller's dropping a result frees it, even of a big batch.
            batch = collector.get_batch(wait)
            batch.reverse()
            while batch:
                _, kind, value = batch[-1]
                what = classify(kind, value, raise_errors)
                del value
                if what == EACH:
                    items = batch.pop()[2]
                    outstanding -= len(items)
                    # A chunk's results (tiny ones: a chunk is ~2 ms of work) are freed
                    # together once all are handed out; popping each costs ~50 ns a result.
                    yield from items
                    del items
                else:
                    outstanding -= 1
                    if what == YIELD:
                        yield batch.pop()[2]
                    elif what == RAISE:
                        _, kind, value = batch.pop()
                        raise as_error(kind, value)
                    else:
                        batch.pop()
                top_up()
    finally:
        collector.abandoned = True
        if bar is not None:
            bar.update_to(seq - outstanding)
            bar.close()
        if outstanding:
            intake.engine.cancel_abandoned()


class Inlet:
    """The producer's side every stream has - a coordinator's :class:`Stream`, a pipeline's
    stream: the items put and the results taken (at most ``buffersize`` outstanding, waited
    for on ``_space``), closed by ``close()``, or ended by :meth:`end` (the consumer stopped,
    the coordinator shut down), after which ``put()`` raises :class:`ClosedError` - also a
    ``put()`` blocked at that moment."""

    def __init__(self, buffersize: int) -> None:
        self._buffersize = buffersize
        self._space = threading.Condition(threading.Lock())
        self._count = 0  # items put
        self._consumed = 0  # results taken
        self._closed = False
        self._ended: str | None = None  # why put() is refused although close() was not called

    def put(self, item: Any, *, timeout: float | None = None) -> None:
        """Submit one item, waiting up to *timeout* seconds for room (None: as long as it
        takes)."""
        raise NotImplementedError

    def put_nowait(self, item: Any) -> None:
        """``put(item, timeout=0)``: :class:`queue.Full` at once when the stream is full (and
        the overflow policy is to wait)."""
        self.put(item, timeout=0)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("put() on a closed stream")
        if self._ended is not None:
            raise ClosedError(f"put() on a stream whose {self._ended}")

    def end(self, why: str) -> None:
        """Refuse further put()s (and wake a blocked one) with ClosedError saying *why*: the
        consumer stopped, or the coordinator shut down."""
        with self._space:
            if self._ended is None:
                self._ended = why
            self._space.notify_all()


class Stream(Inlet):
    """Put items in from a producer thread; iterate results from a consumer thread.

    ``put()`` blocks while ``buffersize`` items are outstanding (put, and their results not yet
    taken) under the ``block`` policy; under ``drop_oldest`` it never blocks: when more than
    ``buffersize`` items wait for a worker, the oldest waiting one is dropped (counted in
    :attr:`dropped`), so the newest frame wins; under ``reject`` it raises :class:`queue.Full`
    (counted in :attr:`rejected`). ``put()`` raises :class:`ClosedError` after :meth:`close`,
    once the consumer has stopped iterating, and once the coordinator shuts down - also a
    ``put()`` that is blocked at that moment.

    A ``timeout`` counts from ``put()``: a frame older than that when its result would come is
    replaced by a :class:`TaskTimeout` marker (counted in :attr:`timed_out`).
    """

    def __init__(
        self,
        intake: Intake,
        buffersize: int,
        ordered: bool,
        timeout: float | None,
        on_error: str,
        overflow: str,
        model: str | None = None,
        with_meta: bool = False,
        *,
        priority: int = 0,
        weight: int = 1,
        name: str | None = None,
    ) -> None:
        super().__init__(buffersize)
        self._intake = intake
        self._priority = priority
        # One source of its own: streams take turns in the queue (see _ordered.FairQueue).
        self.source = intake.engine.new_source("stream", weight, name)
        self._model = model
        self._meta = with_meta
        self._timeout = timeout
        self._raise = on_error == "raise"
        self._overflow = overflow
        self._collector = Collector(ordered)
        self._waiting: list[Any] = []  # our tasks that may still be queued (drop_oldest)
        self.dropped = 0
        self.rejected = 0
        self.timed_out = 0

    def put(
        self,
        item: Any,
        *,
        timeout: float | None = None,
        key: str | None = None,
        priority: int | None = None,
    ) -> None:
        """Submit one item (see the class docstring for when it blocks or raises). Under the
        ``block`` policy it waits at most *timeout* seconds for room (default ``None``: as
        long as it takes), then raises :class:`queue.Full`. Items with the same *key* go to
        the same worker while it lives (``TypeError`` if it is not a str). *priority*
        overrides the stream's for this item (higher goes first)."""
        if key is not None and not isinstance(key, str):
            raise TypeError("key must be a str")
        prio = self._priority if priority is None else check_priority(priority)
        with self._space:
            self._check_open()
            if self._overflow == "block" and not self._space.wait_for(
                lambda: (
                    self._count - self._consumed < self._buffersize
                    or self._closed
                    or self._ended is not None
                ),
                timeout,
            ):
                raise queue.Full("the stream stayed full")
            self._check_open()
            seq = self._count
            self._count += 1
        if self._overflow == "drop_oldest":
            self._make_room()
        try:
            route = (
                Route(model=self._model, key=key, meta=self._meta)
                if self._model is not None or key is not None
                else None
            )
            task = self._intake.one(
                item,
                self._collector,
                seq,
                self._timeout,
                put_timeout=timeout,
                route=route,
                source=self.source,
                priority=prio,
            )
        except BaseException as exc:
            if isinstance(exc, queue.Full):
                self.rejected += 1
            self._collector.deliver(seq, DROPPED, REFUSED)  # fill its place for the consumer
            raise
        if self._overflow == "drop_oldest":
            with self._space:
                self._waiting.append(task)

    def _make_room(self) -> None:
        """drop_oldest: at most ``buffersize`` of our items wait for a worker; drop the oldest
        waiting ones beyond that."""
        with self._space:
            waiting = [t for t in self._waiting if not (t.started or t.finished)]
            excess = len(waiting) - self._buffersize + 1
            drop, self._waiting = waiting[: max(0, excess)], waiting[max(0, excess) :]
        engine = self._intake.engine
        for t in drop:
            engine.drop(t)  # counted in `dropped` when the consumer passes it

    def close(self) -> None:
        """No more items; iteration ends after the last outstanding result."""
        with self._space:
            if self._closed:
                return
            self._closed = True
            end = self._count
            self._space.notify_all()
        self._collector.deliver(end, END, None)

    def cancel(self, why: str) -> None:
        """Abandon the stream from any thread: put()s are refused saying *why* and the items
        still queued are cancelled (their places yield ``CancelledError``)."""
        self._collector.abandoned = True
        self.end(why)
        self._intake.engine.cancel_abandoned()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        end_seen = False
        try:
            while True:
                for _, kind, value in self._collector.get_batch():
                    if kind == END:
                        end_seen = True
                        continue
                    with self._space:
                        self._consumed += span(kind, value)
                        self._space.notify()
                    what = classify(kind, value, self._raise)
                    if what == EACH:
                        yield from value
                    elif what == SKIP:
                        if value is not REFUSED:
                            self.dropped += 1
                    elif what == RAISE:
                        raise as_error(kind, value)
                    else:
                        if kind == TIMEOUT:
                            self.timed_out += 1
                        yield value
                if end_seen:
                    with self._space:
                        if self._consumed >= self._count:
                            return
        finally:
            if not end_seen:
                self._collector.abandoned = True
                self.end("consumer stopped iterating")
                self._intake.engine.cancel_abandoned()
