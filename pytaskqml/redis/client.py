"""A producer on a :class:`~._redisqueue.RedisQueue`: :class:`RedisClient`.

It mirrors the coordinator's ``submit()`` and ``map()``: the tasks go to the shared stream
instead of a coordinator's memory, and whichever coordinator runs them, the results come back
through this producer's own result stream, in submission order, once each.

Exactly once, in order. The producer numbers its items; a result entry names the numbers it
answers. A number that already has its result (an entry that ran twice, because the
coordinator running it died after writing the result and before acknowledging the entry) is
dropped, and its entry deleted. Results are handed over by number: ``map()`` through a reorder
buffer, ``submit()`` by its future.

Restarts. The producer's *cursor* - the next number, and the numbers whose results were handed
over ("taken") - lives in Redis. Every ``commit_interval`` seconds, and at :meth:`close`, the
producer writes the numbers taken since, and in the same transaction deletes their result
entries. A producer started again under the same ``name`` reads its cursor: every number below
its next one that was not taken is *expected*, and :meth:`RedisClient.resume` yields those
results in order, whether they were already in the result stream or are still being computed.
After a :meth:`close` nothing is repeated; after a crash (``kill -9``) the results handed over
in the last ``commit_interval`` are handed over again - at least once, never lost.

Lost entries. Redis restarted without persistence (or with a snapshot older than the last
writes), or the stream deleted, takes the producer's entries with it: no coordinator will
ever run them, and without a check ``map()`` would wait forever. So once a second, while it
has items outstanding, the reader thread looks for the oldest and the newest of its entries
in the task stream, and for its cursor; if one is missing it checks every outstanding entry.
An entry is *lost* when it is not in the stream and, reading the result stream after that
look, its result has not come: a coordinator deletes an entry only after it wrote the result,
so a missing entry without a result is not merely finished. A lost entry is submitted again
under the same numbers (``on_lost="resubmit"``; a result of the first submission that still
comes is a duplicate, dropped as any other), or its items fail with
:class:`~pytaskqml.errors.EntryLostError` (``on_lost="fail"``). While Redis does not answer at all,
nothing can be checked: after ``lost_timeout`` seconds of that the outstanding items fail
with :class:`~pytaskqml.errors.EntryLostError` instead of waiting on.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from ..core.tasks import ERROR, OK, TIMEOUT, Task
from ..engine.delivery import CallbackRunner, TaskFuture, deliver
from ..engine.iterate import EACH, RAISE, YIELD, as_error, classify
from ..errors import ClosedError, EntryLostError
from ..wire import codec as _codec
from ..wire.endpoints import Backoff
from .format import (
    BadEntry,
    Body,
    Fields,
    SeqSet,
    check_name,
    encode_body,
    parse_result,
    stream_entries,
    task_fields,
)
from .results import MapSink, ResumeBuffer, outcomes
from .settings import QueueSettings, require_redis

log = logging.getLogger(__name__)

ENTRY_TIME = 0.005  # automatic chunks: about this much of the measured throughput per entry
MAX_CHUNK = 4096
CHUNK_BYTES = 1 << 20  # ... and at most this much data per entry
BUFFER_TIME = 0.2  # map()'s automatic buffer: about this much of the measured throughput
MAX_BUFFER = 65_536
LOST_CHECK_EVERY = 1.0  # seconds between looks for lost entries while items are outstanding
CHECK_BATCH = 500  # entries looked up per pipeline in a full check


@dataclass(frozen=True)
class ProducerStats:
    """A producer's counters: items ``submitted`` and ``taken`` (results handed over) in this
    run, ``duplicates`` (second results dropped), ``outstanding`` (submitted here, no result
    yet), ``expected`` (items of an earlier run under this name still to be resumed),
    ``rate`` (items answered per second, recent), ``lost`` (entries Redis lost, see the
    module's docstring) and ``resubmitted`` (of those, the ones submitted again)."""

    name: str
    submitted: int
    taken: int
    duplicates: int
    outstanding: int
    expected: int
    rate: float
    lost: int = 0
    resubmitted: int = 0


class RedisClient:
    """Submit tasks to a shared :class:`RedisQueue`; get results in order, once each.

    ``name`` identifies the producer: its result stream and cursor are kept under it, so a
    producer started again under the same name resumes (:meth:`resume`); without one a random
    name is used. One process per name at a time. ``max_outstanding`` items (and
    ``max_outstanding_bytes`` of their data) may wait for results at once; ``submit()`` and
    ``map()`` block beyond that, and while the queue's stream is longer than its
    ``max_length``.

    An entry Redis lost (restarted without persistence, stream deleted) is noticed within
    about a second and submitted again (``on_lost="resubmit"``) or failed with
    :class:`~pytaskqml.errors.EntryLostError` (``on_lost="fail"``); while Redis does not answer for
    longer than ``lost_timeout`` seconds (``None``: no limit) the outstanding items fail with
    :class:`~pytaskqml.errors.EntryLostError`. See the module's docstring.

    ``commit_interval``: seconds between two writes of the producer's cursor to Redis (the
    results taken in that time are handed over again after a crash). Defaults:
    ``max_outstanding`` 65,536 items, ``max_outstanding_bytes`` 64 MiB, ``commit_interval``
    0.1 s, ``on_lost="resubmit"``, ``lost_timeout`` 60 s. ``ValueError`` for a bad
    ``on_lost``, ``lost_timeout`` or name.
    """

    def __init__(
        self,
        queue: QueueSettings,
        name: str | None = None,
        *,
        max_outstanding: int = 65_536,
        max_outstanding_bytes: int = 64 * 1024 * 1024,
        commit_interval: float = 0.1,
        on_lost: Literal["resubmit", "fail"] = "resubmit",
        lost_timeout: float | None = 60.0,
    ) -> None:
        if on_lost not in ("resubmit", "fail"):
            raise ValueError("on_lost must be 'resubmit' or 'fail'")
        if lost_timeout is not None and not lost_timeout > 0:
            raise ValueError(
                f"lost_timeout must be a positive number or None, got {lost_timeout!r}"
            )
        self.on_lost = on_lost
        self.lost_timeout = lost_timeout
        self.queue = queue
        self.name = check_name(name) if name is not None else f"p-{uuid.uuid4().hex[:16]}"
        self.max_outstanding = max_outstanding
        self.max_outstanding_bytes = max_outstanding_bytes
        self.commit_interval = commit_interval
        self._redis = require_redis()
        self._results_key = queue.results_key(self.name)
        self._cursor_key = queue.producer_key(self.name)
        self._r = queue.connect()
        self._submitting = threading.Lock()
        self._cv = threading.Condition(threading.Lock())
        queue.ensure_group(self._r)
        cursor = self._r.hgetall(self._cursor_key)
        self._next = int(cursor.get(b"next", 0))
        try:
            runs = json.loads(cursor.get(b"taken", b"[]"))
        except ValueError:
            runs = []
        self._taken = SeqSet(runs if isinstance(runs, list) else [])
        expected = SeqSet([[0, self._next]] if self._next else [])
        for s, e in self._taken.runs():
            expected.remove(s, e)
        self._resume = ResumeBuffer(expected)
        self._maps: weakref.WeakSet[MapSink] = weakref.WeakSet()  # live map()s
        # first number -> (sink, count, bytes, offset: the map position minus the number)
        self._sinks: dict[int, tuple[Any, int, int, int]] = {}
        self._delivered: dict[int, tuple[int, bytes]] = {}  # first number -> (count, result id)
        # first number -> (task entry id, its fields): what is looked for, and sent again,
        # should Redis lose it. Kept until the result comes (bounded by max_outstanding_bytes).
        self._sent: dict[int, tuple[bytes, Fields]] = {}
        self._last = b"0-0"  # the result stream read up to here
        self._deletable: list[bytes] = []  # result entries to delete (duplicates)
        self._dirty = False
        self._outstanding = self._outstanding_bytes = 0
        self._stream_length = 0
        self.submitted = self.taken_count = self.duplicates = 0
        self._answered = 0
        self._rate = 0.0
        self.lost = self.resubmitted = 0
        self._closed = False
        self._stop = threading.Event()
        self._runner = CallbackRunner(f"redis-{self.name}")
        self._reader = threading.Thread(
            target=self._read_loop, name=f"pytaskqml-redis-results-{self.name}", daemon=True
        )
        self._reader.start()

    def __enter__(self) -> RedisClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisClient {self.name!r} on {self.queue!r}>"

    # ------------------------------------------------------------------ submitting

    def submit(self, payload: Any, *, timeout: float | None = None) -> Future[Any]:
        """Queue one task; returns a :class:`concurrent.futures.Future`. ``timeout`` counts
        from now (by the wall clock, as the coordinator that runs it sees it): past it the
        future fails with ``TimeoutError``. ``TypeError`` here for a payload that cannot
        travel."""
        fut = TaskFuture()
        fut._runner = self._runner
        deadline = None if timeout is None else time.time() + timeout
        self._send([encode_body(1, payload, deadline=deadline)], fut, 0)
        return fut

    def map(
        self,
        iterable: Iterable[Any],
        *,
        buffersize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        on_error: Literal["raise", "return"] = "raise",
        chunksize: int | None = None,
    ) -> Iterator[Any]:
        """Yield results for *iterable* in submission order (``ordered=True``, the default)
        or as they complete, as ``Coordinator.map()`` does: lazily, at most ``buffersize``
        items outstanding, ``timeout`` seconds bounding each item's run (default ``None``: no
        limit), errors raised at their position (``on_error="raise"``, the default) or
        yielded in their place (``"return"``). Tiny items travel ``chunksize`` to an entry
        (``None``: about 5 ms of the measured throughput, at most 1 MiB of data; items with a
        ``timeout`` go alone). ``ValueError`` for a bad ``on_error``; :class:`ClosedError`
        once the client is closed."""
        if on_error not in ("raise", "return"):
            raise ValueError("on_error must be 'raise' or 'return'")
        self._check_open()
        return self._map(iter(iterable), buffersize, ordered, timeout, on_error, chunksize)

    def _map(
        self,
        it: Iterator[Any],
        fixed_buffer: int | None,
        ordered: bool,
        timeout: float | None,
        on_error: str,
        fixed_chunk: int | None,
    ) -> Iterator[Any]:
        sink = MapSink(ordered)
        self._maps.add(sink)
        raise_errors = on_error == "raise"
        pos = outstanding = 0
        exhausted = False
        cap, chunk_cap = 256, 1

        def top_up() -> None:
            nonlocal pos, outstanding, exhausted, cap, chunk_cap
            want = fixed_buffer or min(cap, max(256, int(self._rate * BUFFER_TIME)), MAX_BUFFER)
            room = want - outstanding
            if exhausted or room < max(1, want // 4):
                return
            cap = min(8 * cap, MAX_BUFFER)
            items = list(itertools.islice(it, room))
            exhausted = len(items) < room
            if not items:
                return
            chunk = fixed_chunk or 1
            if fixed_chunk is None and timeout is None:
                chunk = min(max(1, int(self._rate * ENTRY_TIME)), chunk_cap, MAX_CHUNK)
                chunk_cap = min(8 * chunk_cap, MAX_CHUNK)
                if chunk > 1:
                    text, bufs = _codec.encode(items[0])
                    size = len(text) + sum(b.nbytes for b in bufs) + 16
                    chunk = max(1, min(chunk, CHUNK_BYTES // size))
            bodies = []
            for i in range(0, len(items), chunk):
                part = items[i : i + chunk]
                payload = part if len(part) > 1 else part[0]
                bodies.append(encode_body(len(part), payload, run_timeout=timeout))
            self._send(bodies, sink, pos)
            pos += len(items)
            outstanding += len(items)

        try:
            while True:
                top_up()
                if outstanding == 0:
                    return
                for i, kind, value in sink.get_batch():
                    what = classify(kind, value, raise_errors)
                    seq = sink.origin.pop(i)
                    if what == EACH:
                        outstanding -= len(value)
                        for k, v in enumerate(value, 1):
                            sink.partial = (seq, k)  # handed out, should the caller stop here
                            yield v
                    else:
                        outstanding -= 1
                        if what == RAISE:
                            self._took(seq, 1)
                            raise as_error(kind, value)
                        if what == YIELD:
                            sink.partial = (seq, 1)
                            yield value
                    sink.partial = None
                    self._took(seq, len(value) if what == EACH else 1)
                    top_up()
        finally:
            if sink.partial is not None:
                self._took(*sink.partial)
                sink.partial = None
            sink.abandoned = True  # what still comes for it is taken by the reader

    def _send(self, bodies: list[Body], sink: Any, pos: int) -> None:
        """Number the entries (*pos*: the map position of the first item), register *sink*
        for them and append them in one transaction, so the cursor's next number and the
        entries are stored together or not at all."""
        self._check_open()
        total = sum(b.count for b in bodies)
        nbytes = sum(b.nbytes for b in bodies)
        with self._submitting:
            self._wait_for_room(total, nbytes)
            base = self._next
            fields = []
            with self._cv:
                seq = base
                for b in bodies:
                    fields.append(task_fields(self.name, seq, b))
                    self._sinks[seq] = (sink, b.count, b.nbytes, pos - base)
                    seq += b.count
                self._outstanding += total
                self._outstanding_bytes += nbytes
                self._next = base + total
            seqs = list(itertools.accumulate([b.count for b in bodies], initial=base))[:-1]
            q = self.queue
            pipe = self._r.pipeline(transaction=True)
            for f in fields:
                pipe.xadd(q.stream, f)
            pipe.hset(self._cursor_key, "next", self._next)
            pipe.expire(self._cursor_key, int(q.result_ttl))
            pipe.xlen(q.stream)
            try:
                replies = pipe.execute()
                self._stream_length = replies[-1]
            except BaseException:
                # Not stored (or not known to be): these numbers are never expected again.
                with self._cv:
                    for seq in seqs:
                        self._forget(seq)
                    self._taken.add(base, base + total)
                    self._dirty = True
                raise
            with self._cv:
                for seq, eid, f in zip(seqs, replies, fields, strict=False):
                    if seq in self._sinks:  # (its result may have come already)
                        self._sent[seq] = (eid, f)
            self.submitted += total

    def _wait_for_room(self, total: int, nbytes: int) -> None:
        with self._cv:
            self._cv.wait_for(
                lambda: (
                    self._closed
                    or self._outstanding == 0
                    or (
                        self._outstanding + total <= self.max_outstanding
                        and self._outstanding_bytes + nbytes <= self.max_outstanding_bytes
                    )
                )
            )
        self._check_open()
        backoff = Backoff(first=0.01, cap=0.25)
        while self._stream_length > self.queue.max_length and not self._closed:
            time.sleep(backoff.next())  # the stream is full: wait for coordinators to catch up
            self._stream_length = self._r.xlen(self.queue.stream)

    def _forget(self, seq: int) -> None:
        """Lock held: the entry at *seq* has its result (or never will)."""
        entry = self._sinks.pop(seq, None)
        self._sent.pop(seq, None)
        if entry is not None:
            self._outstanding -= entry[1]
            self._outstanding_bytes -= entry[2]
            self._cv.notify_all()

    # ------------------------------------------------------------------ resuming

    def resume(
        self, *, timeout: float | None = None, on_error: Literal["raise", "return"] = "return"
    ) -> Iterator[Any]:
        """Yield, in order, the results of the items an earlier run under this name submitted
        and did not take (see the module's docstring). ``timeout`` bounds the wait for each
        (``TimeoutError``)."""
        self._check_open()
        for _, value in self._resume.iterate(self._took, timeout, on_error == "raise"):
            yield value

    @property
    def expected(self) -> int:
        """How many items :meth:`resume` has still to yield."""
        return len(self._resume)

    def _took(self, seq: int, count: int) -> None:
        with self._cv:
            self._taken.add(seq, seq + count)
            self.taken_count += count
            self._dirty = True

    # ------------------------------------------------------------------ results

    def _read_loop(self) -> None:
        backoff = Backoff(first=0.05, cap=2.0)
        r: Any = None
        # From the start (self._last): what is there was either taken (dropped) or is wanted.
        next_commit = time.monotonic() + self.commit_interval
        next_check = time.monotonic() + LOST_CHECK_EVERY
        rate_at, rate_count = time.monotonic(), 0
        outage_since: float | None = None  # Redis has not answered since then
        while not self._stop.is_set():
            try:
                if r is None:
                    r = self.queue.connect()
                self._read_results(r, 100)
                now = time.monotonic()
                if now >= next_check:
                    self._check_lost(r)
                    next_check = time.monotonic() + LOST_CHECK_EVERY
                if now - rate_at >= 0.1:
                    answered = self._answered
                    fresh = (answered - rate_count) / (now - rate_at)
                    self._rate = fresh if self._rate == 0 else 0.5 * self._rate + 0.5 * fresh
                    rate_at, rate_count = now, answered
                if now >= next_commit:
                    self._commit(r)
                    next_commit = now + self.commit_interval
                backoff.reset()
                outage_since = None
            except self._redis.RedisError as exc:
                log.warning("Redis error reading results of %s, retrying: %s", self.name, exc)
                now = time.monotonic()
                if outage_since is None:
                    outage_since = now
                elif self.lost_timeout is not None and now - outage_since > self.lost_timeout:
                    self._fail_outstanding(
                        f"Redis did not answer for {now - outage_since:.0f} s (lost_timeout="
                        f"{self.lost_timeout:g}): {exc}"
                    )
                self._stop.wait(backoff.next())
            except Exception:
                log.exception("the result reader of %s failed; retrying", self.name)
                self._stop.wait(backoff.next())
        if r is not None:
            r.close()

    def _read_results(self, r: Any, block: int | None) -> None:
        """Read the result stream on from where it was read (waiting *block* ms for the first
        entries; ``None``: not at all, and read on to its end)."""
        while True:
            reply = r.xread({self._results_key: self._last}, count=1000, block=block)
            entries = stream_entries(reply)
            for eid, fields in entries:
                self._last = eid
                self._on_result(eid, fields)
            if block is not None or len(entries) < 1000:
                return

    def _on_result(self, eid: bytes, fields: Any) -> None:
        try:
            seq, count, kind, value = parse_result(fields)
        except BadEntry as exc:
            log.warning("dropping malformed result entry %r of %s: %s", eid, self.name, exc)
            with self._cv:
                self._deletable.append(eid)
            return
        self._hand_over(eid, seq, count, outcomes(seq, count, kind, value))

    def _hand_over(
        self, eid: bytes | None, seq: int, count: int, outs: list[tuple[int, int, Any]]
    ) -> None:
        """Give the outcomes of the entry at *seq* to whoever waits for them (*eid*: the
        result entry they came in, ``None`` for a failure made here)."""
        with self._cv:
            entry = self._sinks.get(seq)
            offset = 0
            if entry is not None and entry[1] == count:
                self._forget(seq)
                sink, offset = entry[0], entry[3]
            elif eid is not None and self._resume.take_over(outs):
                sink = self._resume  # (lock order: ours, then the resume buffer's)
            else:
                if eid is not None:
                    self.duplicates += 1
                    self._deletable.append(eid)
                return
            if eid is not None:
                self._delivered[seq] = (count, eid)
            self._answered += count
        if sink is self._resume:
            pass
        elif isinstance(sink, TaskFuture):
            kind0, value0 = outs[0][1], outs[0][2]
            if kind0 == TIMEOUT:
                value0 = TimeoutError(f"task {seq} missed its deadline")
            deliver(Task(seq, None, 0, sink, seq, 0.0), OK if kind0 == OK else ERROR, value0)
            self._took(seq, 1)
        elif sink.abandoned:
            self._took(seq, count)  # nobody waits for it any more: it counts as taken
        else:
            sink.deliver_at(offset, outs)

    # ------------------------------------------------------------------ lost entries

    def _check_lost(self, r: Any) -> None:
        """Find the entries Redis lost and submit them again, or fail them (see the module's
        docstring). Runs on the reader thread, so results read meanwhile are handed over
        before an entry is judged."""
        with self._cv:
            if not self._sent:
                return
            sent = dict(self._sent)
        seqs = sorted(sent)
        probe = sorted({seqs[0], seqs[-1]})
        q = self.queue
        pipe = r.pipeline(transaction=False)
        pipe.exists(self._cursor_key)
        for seq in probe:
            pipe.xrange(q.stream, sent[seq][0], sent[seq][0])
        replies = pipe.execute()
        if replies[0] and all(replies[1:]):
            return  # the cursor and both ends are there: nothing to look into
        if not replies[0]:
            with self._cv:
                self._dirty = True  # the cursor is gone: the next commit writes all of it
            r.hset(self._cursor_key, "next", self._next)
            r.expire(self._cursor_key, int(q.result_ttl))
        # A coordinator deletes an entry only after writing its result: what was missing
        # and has no result once the result stream is read to its end was lost. (Usually a
        # missing end just finished: its result is read here, and nothing more is looked at.)
        missing = [seq for seq, found in zip(probe, replies[1:], strict=True) if not found]
        self._read_results(r, None)
        with self._cv:
            lost = [seq for seq in missing if self._sent.get(seq) is sent[seq]]
            rest = [seq for seq in seqs if seq not in probe and self._sent.get(seq) is sent[seq]]
        if not lost and replies[0]:
            return
        if rest:  # one end (or the cursor) was lost: so may be anything between
            missing = self._missing(r, rest, sent)
            self._read_results(r, None)
            with self._cv:
                lost += [seq for seq in missing if self._sent.get(seq) is sent[seq]]
        if not lost:
            return
        lost.sort()
        with self._cv:
            self.lost += len(lost)
        if self.on_lost == "fail":
            log.warning(
                "%d task entries of %s were lost by Redis (restarted without persistence, or "
                "the stream deleted): their items fail (on_lost='fail')",
                len(lost),
                self.name,
            )
            for seq in lost:
                self._fail_entry(seq, "Redis lost the task entry before it ran")
            return
        log.warning(
            "%d task entries of %s were lost by Redis (restarted without persistence, or the "
            "stream deleted): submitting them again",
            len(lost),
            self.name,
        )
        q.ensure_group(r)  # a restarted Redis has neither stream nor group
        for i in range(0, len(lost), CHECK_BATCH):
            part = [(seq, sent[seq][1]) for seq in lost[i : i + CHECK_BATCH]]
            pipe = r.pipeline(transaction=True)
            for _, f in part:
                pipe.xadd(q.stream, f)
            pipe.hset(self._cursor_key, "next", self._next)
            pipe.expire(self._cursor_key, int(q.result_ttl))
            ids = pipe.execute()
            with self._cv:
                for (seq, f), eid in zip(part, ids, strict=False):
                    if seq in self._sent:
                        self._sent[seq] = (eid, f)
                self.resubmitted += len(part)

    def _missing(self, r: Any, seqs: list[int], sent: dict[int, tuple[bytes, Fields]]) -> list[int]:
        """Which of the entries at *seqs* are no longer in the task stream."""
        out: list[int] = []
        for i in range(0, len(seqs), CHECK_BATCH):
            part = seqs[i : i + CHECK_BATCH]
            pipe = r.pipeline(transaction=False)
            for seq in part:
                pipe.xrange(self.queue.stream, sent[seq][0], sent[seq][0])
            out.extend(seq for seq, found in zip(part, pipe.execute(), strict=True) if not found)
        return out

    def _fail_entry(self, seq: int, why: str) -> None:
        with self._cv:
            entry = self._sinks.get(seq)
        if entry is None:
            return
        count = entry[1]
        err = EntryLostError(f"{why} (producer {self.name}, items {seq}..{seq + count - 1})")
        self._hand_over(None, seq, count, [(seq + i, ERROR, err) for i in range(count)])

    def _fail_outstanding(self, why: str) -> None:
        """Redis has not answered for longer than lost_timeout: fail every item waiting."""
        with self._cv:
            seqs = sorted(self._sinks)
        if seqs:
            log.warning("failing %d outstanding entries of %s: %s", len(seqs), self.name, why)
        for seq in seqs:
            self._fail_entry(seq, why)

    def _commit(self, r: Any) -> None:
        """Store the taken numbers and, in the same transaction, delete their result entries."""
        with self._cv:
            if not self._dirty and not self._deletable:
                return
            taken = self._taken
            done = [s for s, (n, _) in self._delivered.items() if taken.covers(s, s + n)]
            ids = [self._delivered.pop(s)[1] for s in done] + self._deletable
            self._deletable = []
            stored = SeqSet(taken.runs())
            for sink in list(self._maps):
                partial = sink.partial  # items of an entry handed out so far
                if partial is not None:
                    stored.add(partial[0], partial[0] + partial[1])
            runs = json.dumps(stored.runs())
            self._dirty = bool(self._maps)
        pipe = r.pipeline(transaction=True)
        pipe.hset(self._cursor_key, "taken", runs)
        pipe.expire(self._cursor_key, int(self.queue.result_ttl))
        if ids:
            pipe.xdel(self._results_key, *ids)
        try:
            pipe.execute()
        except BaseException:
            with self._cv:
                self._deletable.extend(ids)
                self._dirty = True
            raise

    # ------------------------------------------------------------------ the rest

    def statistics(self) -> ProducerStats:
        """A snapshot of this producer's counters (see :class:`ProducerStats`)."""
        with self._cv:
            return ProducerStats(
                self.name,
                self.submitted,
                self.taken_count,
                self.duplicates,
                self._outstanding,
                len(self._resume.expected),
                self._rate,
                self.lost,
                self.resubmitted,
            )

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the producer is closed")

    def close(self) -> None:
        """Store the cursor and stop. Items without a result stay queued and are computed;
        a producer started again under the same name gets them from :meth:`resume`."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._stop.set()
        self._reader.join(10.0)
        try:
            self._commit(self._r)
        except self._redis.RedisError as exc:
            log.warning("could not store the cursor of %s at close: %s", self.name, exc)
        self._resume.close()
        with self._cv:
            pending = [entry[0] for entry in self._sinks.values()]
        for sink in pending:
            if isinstance(sink, TaskFuture) and not sink.done():
                sink.set_exception(ClosedError("the producer was closed before the result came"))
        self._r.close()
        self._runner.close()
