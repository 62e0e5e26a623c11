"""The :class:`Pipeline`: steps (stages, each its own :class:`Coordinator`, and fan-outs of
:class:`Branches`) joined by bounded hand-offs.

Data flow of one :class:`PipelineStream`::

    put(item) ──▶ step 0 begins it ──▶ FIFO 0 ──▶ pump 0 waits for it in order ──▶ step 1 ...
                                                                  │ failed / timed out
                                                                  ▼
                                  a marker takes its place in FIFO 1 and skips the later steps
    ... last pump ──▶ results, in submission order ──▶ the consumer's iteration

Every FIFO is bounded by its stage's ``buffersize`` and ``put()`` by the stream's, so a slow
stage fills the FIFO before it and, in the end, blocks ``put()``: nothing grows without bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Literal

from ..core.histogram import Histogram, HistogramSnapshot
from ..core.stats import Statistics
from ..core.tasks import TaskTimeout
from ..engine.iterate import Inlet
from ..engine.pool import check_positive
from ..errors import ClosedError
from .stages import Branches, Done, Join, Lane, Stage, StageTimeout, plain

log = logging.getLogger(__name__)

_END = object()
_STOPPED = object()  # what a get returns once the stream was stopped
_POLL = 0.1  # how often a blocked hand-off looks whether its stream was stopped


class _Fifo:
    """A FIFO between the threads of a stream, bounded by *maxsize* (None: not bounded). A
    put or get wakes the other side only when it waits (most hand-offs find the other side
    busy), and every wait gives up once *stopped* is set: a put raises :class:`ClosedError`,
    a get on an empty FIFO returns :data:`_STOPPED`."""

    __slots__ = ("_cv", "_getters", "_items", "_max", "_putters", "_stopped")

    def __init__(self, maxsize: int | None, stopped: threading.Event) -> None:
        self._items: deque[Any] = deque()
        self._max = maxsize
        self._stopped = stopped
        self._cv = threading.Condition(threading.Lock())
        self._putters = 0
        self._getters = 0

    def put(self, what: Any) -> None:
        with self._cv:
            items = self._items
            while self._max is not None and len(items) >= self._max:
                if self._stopped.is_set():
                    raise ClosedError("the stream was stopped")
                self._putters += 1
                try:
                    self._cv.wait(_POLL)
                finally:
                    self._putters -= 1
            items.append(what)
            if self._getters:
                self._cv.notify_all()

    def get(self) -> Any:
        with self._cv:
            items = self._items
            while not items:
                if self._stopped.is_set():
                    return _STOPPED
                self._getters += 1
                try:
                    self._cv.wait(_POLL)
                finally:
                    self._getters -= 1
            what = items.popleft()
            if self._putters:
                self._cv.notify_all()
            return what

    def clear(self) -> None:
        with self._cv:
            self._items.clear()
            self._cv.notify_all()


@dataclasses.dataclass(frozen=True)
class PipelineStats:
    """A pipeline's counters: each stage coordinator's :class:`Statistics` by stage name, the
    items put into and yielded by its streams so far, and the time items took end to end
    (``latency``: a histogram of seconds from ``put()`` to the result leaving the last step;
    ``latency_max``, the longest)."""

    stages: Mapping[str, Statistics]
    items_in: int
    items_out: int
    # Per item, from put() until its result (or error) came out of the last step; None before
    # any item came out.
    latency: HistogramSnapshot | None = None
    latency_max: float | None = None
    # Put but never yielded: their stream was cancelled, or its consumer stopped reading.
    items_abandoned: int = 0


class PipelineStream(Inlet):
    """The pipeline's counterpart of :class:`pytaskqml.engine.Stream` (same interface): ``put()``
    blocks while ``buffersize`` items are outstanding and raises :class:`ClosedError` after
    :meth:`close` or :meth:`end`; iterating yields results in submission order. A failed item
    yields its exception (``on_error="return"``) or raises it (``"raise"``), its ``stage``
    attribute naming the stage; one that missed a stage's or the stream's ``timeout`` (from
    ``put()``) yields a :class:`TaskTimeout` marker."""

    def __init__(
        self,
        steps: Sequence[Stage | Branches],
        buffersize: int,
        on_error: str,
        timeout: float | None,
        name: str,
    ) -> None:
        super().__init__(buffersize)
        # Called once, when the consumer is done with it (see Pipeline._retire).
        self.retire: Callable[[PipelineStream], None] | None = None
        self._steps = list(steps)
        self._raise = on_error == "raise"
        self._timeout = timeout
        self._order = threading.RLock()  # one put() at a time begins and queues its item
        self._emitted = 0  # items that reached the end of the pipeline
        # End-to-end times of the items that reached the end, counted by the last step's
        # hand-off thread (the only writer) and read under _space.
        self._latency = Histogram()
        self._latency_max = 0.0
        self._stop = threading.Event()
        # A Lane per stage step (None for Branches, whose converge waits on Futures).
        self._lanes = [Lane(s, self._stop) if isinstance(s, Stage) else None for s in self._steps]
        self._fifos = [
            _Fifo(s.buffersize if isinstance(s, Stage) else buffersize, self._stop)
            for s in self._steps
        ]
        self._out = _Fifo(None, self._stop)  # bounded by put()'s wait
        self._pumps = [
            threading.Thread(
                target=self._pump, args=(k,), name=f"pytaskqml-pump-{name}-{k}", daemon=True
            )
            for k in range(len(self._steps))
        ]
        for t in self._pumps:
            t.start()

    # ------------------------------------------------------------ producer side

    def put(self, item: Any, *, timeout: float | None = None) -> None:
        """Submit one item (blocks while ``buffersize`` items are outstanding; raises
        :class:`queue.Full` if that lasts past *timeout*)."""
        with self._space:
            self._check_open()
            if not self._space.wait_for(
                lambda: (
                    self._count - self._consumed < self._buffersize
                    or self._closed
                    or self._ended is not None
                ),
                timeout,
            ):
                raise queue.Full("the pipeline stayed full")
            self._check_open()
        t_in = time.monotonic()
        deadline = None if self._timeout is None else t_in + self._timeout
        with self._order:
            with self._space:
                self._check_open()
                seq = self._count
                self._count += 1
            entry = self._send(0, item, seq, deadline)
            self._hand(self._fifos[0], (seq, deadline, t_in, entry))

    def close(self) -> None:
        """No more items; iteration ends after the last outstanding result."""
        with self._order:
            with self._space:
                if self._closed:
                    return
                self._closed = True
                self._space.notify_all()
            self._hand(self._fifos[0], _END)

    def stop(self, why: str) -> None:
        """end() and stop the hand-offs: what is outstanding is abandoned."""
        self._stop.set()
        self.end(why)
        for lane in self._lanes:
            if lane is not None:
                lane.collector.abandoned = True  # what is still queued is not run

    def _send(self, k: int, value: Any, seq: int, deadline: float | None) -> Any:
        lane = self._lanes[k]
        if lane is not None:
            return lane.send(value, deadline)
        step = self._steps[k]
        assert isinstance(step, Branches)
        return Join(step, value, seq)

    def cancel(self, why: str) -> None:
        """stop(), and cancel the items still waiting between steps: their tasks are taken
        off the stages' queues (what is running finishes; its result is dropped)."""
        self.stop(why)
        for lane in self._lanes:
            if lane is not None:
                lane.abandon()
        for fifo in self._fifos:  # what waits between steps goes no further
            fifo.clear()

    def settle(self, timeout: float | None = None) -> bool:
        """Block until every item put so far has reached the end of the pipeline, at most
        *timeout* seconds (default ``None``: no limit). True once they have (or the stream
        was stopped), False if *timeout* passed first."""
        with self._space:
            return self._space.wait_for(
                lambda: self._emitted >= self._count or self._stop.is_set(), timeout
            )

    def _hand(self, fifo: _Fifo, what: Any) -> None:
        try:
            fifo.put(what)
        except ClosedError:
            raise ClosedError(f"the stream was stopped: {self._ended}") from None

    # ------------------------------------------------------------ the hand-offs

    def _pump(self, k: int) -> None:
        fifo = self._fifos[k]
        last = k + 1 == len(self._steps)
        try:
            while True:
                got = fifo.get()
                if got is _STOPPED:
                    return
                if got is _END:
                    if last:
                        self._out.put(_END)
                    else:
                        self._hand(self._fifos[k + 1], _END)
                    return
                seq, deadline, t_in, entry = got
                ok, value = entry.wait(deadline)
                if not ok and (value is None or isinstance(value, StageTimeout)):
                    timeout = self._timeout if value is None else value.timeout
                    value = TaskTimeout(seq, float(timeout or 0.0))
                if last:
                    took = time.monotonic() - t_in
                    with self._space:
                        self._emitted += 1
                        self._latency.observe(took)
                        if took > self._latency_max:
                            self._latency_max = took
                        self._space.notify_all()
                    self._out.put((ok, value))
                else:
                    if ok and isinstance(entry, Join):
                        value = plain(value)  # the next stage gets JSON
                    nxt = self._send(k + 1, value, seq, deadline) if ok else Done(False, value)
                    self._hand(self._fifos[k + 1], (seq, deadline, t_in, nxt))
        except ClosedError:
            return
        except BaseException as exc:
            log.exception("pipeline hand-off %d crashed", k)
            self.end("pipeline hand-off crashed")
            self._out.put(exc)

    # ------------------------------------------------------------ consumer side

    def __enter__(self) -> PipelineStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        finished = False
        try:
            while True:
                got = self._out.get()
                if got is _STOPPED:
                    raise ClosedError(f"the stream was stopped: {self._ended}")
                if got is _END:
                    finished = True
                    return
                if isinstance(got, BaseException):
                    raise got
                ok, value = got
                with self._space:
                    self._consumed += 1
                    self._space.notify_all()
                if not ok and self._raise and not isinstance(value, TaskTimeout):
                    raise value
                yield value
        finally:
            if not finished:
                self.stop("consumer stopped iterating")
            retire, self.retire = self.retire, None
            if retire is not None:
                retire(self)

    @property
    def counts(self) -> tuple[int, int]:
        """``(items put, results taken)`` so far."""
        with self._space:
            return self._count, self._consumed

    def latency(self) -> tuple[HistogramSnapshot, float]:
        """The end-to-end times of the items that reached the end so far, and the longest."""
        with self._space:
            return self._latency.snapshot(), self._latency_max


class Pipeline:
    """Items run through *steps* in order - each a :class:`Stage` (or a Worker class,
    ``"module:Class"`` name or function, made a one-thread stage) or :class:`Branches` - and
    come out in submission order, each through every step once.

    Every stage is a :class:`Coordinator` with its own pool, started here; :meth:`shutdown`
    (or leaving a ``with`` block) stops them all. ``buffersize`` is the default for
    :meth:`map` and :meth:`stream`.

    Raises ``ValueError`` for no steps, repeated stage names, a Stage already used by another
    pipeline or a ``buffersize`` that is not positive, and whatever a stage raises when it
    starts (:class:`WorkerStartError` for a worker that cannot start).
    """

    def __init__(
        self,
        steps: Sequence[Stage | Branches | Any],
        *,
        name: str = "pipeline",
        buffersize: int = 64,
    ) -> None:
        check_positive("buffersize", buffersize, allow_none=False)
        if not steps:
            raise ValueError("a pipeline needs at least one step")
        self.name = name
        self.buffersize = buffersize
        self.steps: list[Stage | Branches] = [
            s if isinstance(s, Stage | Branches) else Stage(s) for s in steps
        ]
        self.stages: list[Stage] = [
            st for s in self.steps for st in ([s] if isinstance(s, Stage) else s.stages)
        ]
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dupes)}")
        if any(s.coordinator is not None for s in self.stages):
            raise ValueError("a Stage serves one pipeline: build new Stages for another")
        self._lock = threading.Lock()
        # The streams being read; a stream whose consumer is done leaves the list, its counts
        # and times added to these (a service makes a stream per request).
        self._streams: list[PipelineStream] = []
        self._retired = [0, 0, 0]  # items put, yielded, abandoned
        self._retired_latency: HistogramSnapshot | None = None
        self._retired_max = 0.0
        self._submitter: PipelineStream | None = None
        self._futures: queue.Queue[Future[Any]] = queue.Queue()
        self._closed = False
        started: list[Stage] = []
        try:
            for st in self.stages:
                st.start()
                started.append(st)
        except BaseException:
            for st in started:
                assert st.coordinator is not None
                st.coordinator.shutdown(wait=True, cancel_futures=True)
            raise

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r} {[s.name for s in self.steps]}>"

    def stream(
        self,
        *,
        buffersize: int | None = None,
        ordered: bool = True,
        on_error: Literal["raise", "return"] = "return",
        timeout: float | None = None,
    ) -> PipelineStream:
        """A :class:`PipelineStream`: a producer ``put()``s and ``close()``s, a consumer
        iterates results in submission order (``ordered`` is accepted for the interface of
        :meth:`Coordinator.stream`; a pipeline always keeps the order).

        ``buffersize``: items outstanding before ``put()`` blocks (default: the pipeline's).
        ``on_error``: a failed item's exception is yielded in its place (``"return"``, the
        default) or raised (``"raise"``). ``timeout``: seconds from ``put()`` within which an
        item must leave the pipeline, else a :class:`TaskTimeout` marker takes its place
        (default ``None``: no limit). ``ValueError`` for a bad size, time or ``on_error``;
        :class:`ClosedError` once the pipeline is shut down."""
        check_positive("buffersize", buffersize)
        check_positive("timeout", timeout)
        if on_error not in ("raise", "return"):
            raise ValueError("on_error must be 'raise' or 'return'")
        with self._lock:
            if self._closed:
                raise ClosedError("the pipeline is shut down")
            s = PipelineStream(
                self.steps, buffersize or self.buffersize, on_error, timeout, self.name
            )
            s.retire = self._retire
            self._streams.append(s)
        return s

    def _retire(self, s: PipelineStream) -> None:
        """*s*'s consumer is done: keep its counts and times, not the stream."""
        put, taken = s.counts
        hist, most = s.latency()
        with self._lock:
            with contextlib.suppress(ValueError):
                self._streams.remove(s)
            done = self._retired
            done[0] += put
            done[1] += taken
            done[2] += put - taken
            if hist.count:
                old = self._retired_latency
                self._retired_latency = hist if old is None else old.plus(hist)
                self._retired_max = max(self._retired_max, most)

    def map(
        self,
        iterable: Iterable[Any],
        *,
        buffersize: int | None = None,
        on_error: Literal["raise", "return"] = "raise",
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """Yield the results for *iterable* in order, reading it lazily (at most
        ``buffersize`` items ahead of the results taken; default: the pipeline's).

        ``on_error``: a failed item raises its exception at its position (``"raise"``, the
        default) or is yielded in its place (``"return"``). ``timeout``: seconds from an
        item's entry within which it must leave the pipeline, else a :class:`TaskTimeout`
        marker takes its place (default ``None``: no limit). An exception *iterable* raises
        is raised after the results of the items before it. ``ValueError`` and
        :class:`ClosedError` as for :meth:`stream`."""
        s = self.stream(buffersize=buffersize, on_error=on_error, timeout=timeout)
        failed: list[BaseException] = []

        def feed() -> None:
            try:
                for item in iterable:
                    s.put(item)
            except ClosedError:
                return
            except BaseException as exc:
                failed.append(exc)
            s.close()

        feeder = threading.Thread(target=feed, name=f"pytaskqml-feed-{self.name}", daemon=True)
        feeder.start()

        def results() -> Iterator[Any]:
            try:
                yield from s
            finally:
                s.stop("consumer stopped iterating")
                feeder.join(1.0)
            if failed:
                raise failed[0]

        return results()

    def submit(self, payload: Any) -> Future[Any]:
        """Run one item, *payload*, through the pipeline; a
        :class:`concurrent.futures.Future` of its result (its exception if a stage failed
        it). :class:`ClosedError` once the pipeline is shut down."""
        fut: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise ClosedError("the pipeline is shut down")
            if self._submitter is None:
                self._submitter = PipelineStream(
                    self.steps, self.buffersize, "return", None, self.name
                )
                self._streams.append(self._submitter)
                threading.Thread(
                    target=self._resolve,
                    args=(self._submitter,),
                    name=f"pytaskqml-submit-{self.name}",
                    daemon=True,
                ).start()
            sub = self._submitter
        with sub._order:  # the future's place in the FIFO is its item's
            sub.put(payload)
            self._futures.put(fut)
        return fut

    def _resolve(self, sub: PipelineStream) -> None:
        try:
            for value in sub:
                fut = self._futures.get()
                if isinstance(value, BaseException | TaskTimeout):
                    exc = value if isinstance(value, BaseException) else TimeoutError(value)
                    fut.set_exception(exc)
                else:
                    fut.set_result(value)
        except BaseException as exc:
            log.debug("pipeline submissions ended: %r", exc)
        while True:  # what is left never ran to the end
            try:
                fut = self._futures.get_nowait()
            except queue.Empty:
                return
            if not fut.done():
                fut.set_exception(ClosedError("the pipeline shut down"))

    def statistics(self) -> PipelineStats:
        """Each stage's :class:`Statistics` and the item counts of every stream."""
        stages = {st.name: st.coordinator.statistics() for st in self.stages if st.coordinator}
        with self._lock:
            streams = list(self._streams)
            put, taken, abandoned = self._retired
            latency: HistogramSnapshot | None = self._retired_latency
            longest: float | None = self._retired_max if latency is not None else None
        counts = [s.counts for s in streams]
        for hist, most in (s.latency() for s in streams):
            if not hist.count:
                continue
            if latency is None:
                latency, longest = hist, most
            else:
                latency = latency.plus(hist)
                longest = max(longest or 0.0, most)
        return PipelineStats(
            stages=stages,
            items_in=put + sum(c[0] for c in counts),
            items_out=taken + sum(c[1] for c in counts),
            latency=latency,
            latency_max=longest,
            items_abandoned=abandoned,
        )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new items; with ``wait`` and without ``cancel_futures``, let what was put
        reach the end of the pipeline first; then stop every stage's coordinator. A second
        Ctrl-C while it waits stops everything at once."""
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for s in streams:
            s.end("pipeline shut down")
        try:
            if wait and not cancel_futures:
                for s in streams:
                    s.settle()
        except KeyboardInterrupt:
            cancel_futures = True
            raise
        finally:
            for s in streams:
                if cancel_futures or not wait:
                    s.stop("pipeline shut down")
            for st in self.stages:
                if st.coordinator is not None:
                    st.coordinator.shutdown(wait=wait, cancel_futures=cancel_futures)
            for s in streams:
                s.stop("pipeline shut down")
