"""Writing a coordinator's results back to a Redis queue: :class:`ResultWriter`, and what an
entry's outcomes become (:func:`result_of`).

The writer thread takes finished entries in batches and, in one pipeline per batch, ``XADD``s
each result to its producer's result stream and only then ``XACK``s and ``XDEL``s the entries;
released entries get ``XCLAIM ... IDLE``, which makes them claimable at once. A Redis error is
retried with backoff, so a result is never dropped while the coordinator runs; if one cannot
be written by the time the coordinator closes, its entry is given up (it stays pending, and
another coordinator claims and runs it again).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ..core.tasks import CANCELLED, DROPPED, ERROR, OK, RUN, TIMEOUT
from ..errors import ClosedError, NoWorkersError, WorkerStartError
from ..wire.endpoints import Backoff
from .format import FLAG_ERROR, FLAG_OK, FLAG_TIMEOUT, TaskEntry, error_value, result_fields
from .settings import QueueSettings, require_redis

log = logging.getLogger(__name__)

WRITE_BATCH = 512  # entries per pipeline
WRITE_BYTES = 16 * 1024 * 1024  # ... or about this much data
# Errors that mean "not here, not now" rather than "this task fails": the entry is released.
_NOT_HERE = (ClosedError, NoWorkersError, WorkerStartError)

Op = tuple[str, "HeldEntry", Any]  # ("result", entry, (kind, value)) or ("release", entry, None)


class HeldEntry:
    """One stream entry this coordinator holds: where its items' outcomes are gathered."""

    __slots__ = ("base", "count", "got", "id", "nbytes", "outcomes", "producer", "seq")

    def __init__(self, eid: bytes, t: TaskEntry, base: int) -> None:
        self.id = eid
        self.producer = t.producer
        self.seq = t.seq
        self.count = t.count
        self.nbytes = t.nbytes
        self.base = base  # its first item's number in this feed's own numbering
        self.got = 0
        self.outcomes: list[tuple[int, Any] | None] | None = None

    def add(self, offset: int, kind: int, value: Any) -> bool:
        """Record outcome(s) from *offset*; True once every item has one."""
        if self.outcomes is None:
            self.outcomes = [None] * self.count
        slots = self.outcomes
        pairs = [(OK, v) for v in value] if kind == RUN else [(kind, value)]
        for i, pair in enumerate(pairs, offset):
            if 0 <= i < self.count and slots[i] is None:
                slots[i] = pair
                self.got += 1
        return self.got >= self.count


def result_of(e: HeldEntry, kind: int, value: Any) -> tuple[str, Any] | None:
    """The result entry's kind and value for a finished entry, or None: release it."""
    if e.count == 1:
        pairs = [(kind, value)]
    else:
        assert e.outcomes is not None
        pairs = [p for p in e.outcomes if p is not None]
    if any(
        k in (CANCELLED, DROPPED) or (k == ERROR and isinstance(v, _NOT_HERE)) for k, v in pairs
    ):
        return None  # not done here: another coordinator (or this one, later) runs it
    if all(k == OK for k, _ in pairs):
        return ("ok", pairs[0][1]) if e.count == 1 else ("run", [v for _, v in pairs])
    if e.count == 1:
        k, v = pairs[0]
        return ("timeout", v.timeout) if k == TIMEOUT else ("error", error_value(v))
    items: list[list[Any]] = []
    for k, v in pairs:
        if k == OK:
            items.append([FLAG_OK, v])
        elif k == TIMEOUT:
            items.append([FLAG_TIMEOUT, v.timeout])
        else:
            items.append([FLAG_ERROR, error_value(v)])
    return "chunk", items


class ResultWriter:
    """The writer thread of one :class:`~._redisbridge.QueueFeed`. *done(batch, completed,
    released)* is called after each batch was written (or given up); *on_error* at each
    Redis error."""

    def __init__(
        self,
        q: QueueSettings,
        consumer: str,
        done: Callable[[list[Op], int, int], None],
        on_error: Callable[[], None],
    ) -> None:
        self.queue = q
        self.consumer = consumer
        self._done = done
        self._on_error = on_error
        self._redis = require_redis()
        self._ops: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"pytaskqml-redis-writer-{q.stream}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def put(self, op: Op) -> None:
        self._ops.put(op)

    def close(self, timeout: float) -> None:
        """Write what is queued (retrying for a while), then stop."""
        self._closing.set()
        self._ops.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _loop(self) -> None:
        r: Any = None
        backoff = Backoff(first=0.05, cap=2.0)
        batch: list[tuple[str, HeldEntry, Any]] = []
        ended = False
        while not (ended and not batch):
            try:
                if not batch:
                    ended = self._gather(batch)
                    if not batch:
                        continue
                if r is None:
                    r = self.queue.connect()
                self._write(r, batch)
                batch = []
                backoff.reset()
            except self._redis.RedisError as exc:
                self._on_error()
                log.warning("Redis error writing results of %s, retrying: %s", self.consumer, exc)
                if self._closing.is_set() and backoff.delay >= backoff.cap:
                    log.error("giving up on %d results: their entries stay pending", len(batch))
                    self._done(batch, 0, 0)
                    return
                time.sleep(backoff.next())
            except Exception:
                log.exception("Redis writer of %s failed; its entries stay pending", self.consumer)
                self._done(batch, 0, 0)
                batch = []
        if r is not None:
            r.close()

    def _gather(self, batch: list[tuple[str, HeldEntry, Any]]) -> bool:
        """Wait for operations; True once the end marker came."""
        try:
            op = self._ops.get(timeout=0.5)
        except queue.Empty:
            return False
        size = 0
        while True:
            if op is None:
                return True
            batch.append(op)
            size += op[1].nbytes
            if len(batch) >= WRITE_BATCH or size >= WRITE_BYTES:
                return False
            try:
                op = self._ops.get_nowait()
            except queue.Empty:
                return False

    def _write(self, r: Any, batch: list[tuple[str, HeldEntry, Any]]) -> None:
        q = self.queue
        pipe = r.pipeline(transaction=False)
        done: list[bytes] = []
        released: list[bytes] = []
        keys: set[str] = set()
        for op, e, res in batch:
            if op == "release":
                released.append(e.id)
                continue
            kind, value = res
            try:
                fields = result_fields(e.seq, e.count, kind, value)
            except (TypeError, ValueError) as exc:
                info = ["TypeError", f"the result cannot be stored: {exc}", ""]
                fields = result_fields(e.seq, e.count, "error", info)
            key = q.results_key(e.producer)
            pipe.xadd(key, fields, maxlen=q.max_results, approximate=True)
            keys.add(key)
            done.append(e.id)
        for key in keys:
            pipe.expire(key, int(q.result_ttl))
        if done:  # after the results: an entry is acknowledged only once its result is stored
            pipe.xack(q.stream, q.group, *done)
            pipe.xdel(q.stream, *done)
        if released:  # idle at once: the next coordinator that looks claims them
            idle = int(q.claim_idle * 1000) + 1
            pipe.xclaim(q.stream, q.group, self.consumer, 0, released, idle=idle, justid=True)
        pipe.execute()
        self._done(batch, len(done), len(released))
