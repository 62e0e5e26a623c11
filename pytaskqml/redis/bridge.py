"""The coordinator's side of a :class:`~._redisqueue.RedisQueue`: :class:`QueueFeed`.

It feeds the coordinator's engine from the consumer group, as ``map()`` feeds it from an
iterable, and writes results back::

    reader thread:  XREADGROUP (new entries)  ─┐
                    XAUTOCLAIM (idle entries   ├─▶ tasks admitted to the engine, one sink
                    of dead coordinators)     ─┘         │ outcomes, on whichever thread
                    XCLAIM JUSTID (renew ours)           ▼ delivers them
    writer thread:  XADD result ─▶ producer's result stream; then XACK + XDEL the entry

Why nothing is lost: an entry is acknowledged only in the same pipeline as, and after, the
``XADD`` of its result, so a coordinator that dies at any moment leaves every entry whose
result is not written in the group's pending list, where another coordinator claims it after
``claim_idle``. Work this coordinator cannot finish (shutdown with ``cancel_futures``, no
worker left) is *released*: it stays pending, marked idle, and is claimed at once by whichever
coordinator looks next - this one included, once it has workers again. Why a result reaches
its producer once: a second run writes a second result with the same numbers, and the producer
keeps the first (see :mod:`._redisclient`).

Neither thread ever raises out of its loop: Redis errors are counted, logged once per outage
and retried with backoff; a malformed entry goes to the dead-letter stream with the reason.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ..core.stats import QueueStats
from ..core.tasks import ERROR, OK, RUN, Task
from ..errors import ClosedError
from ..wire.endpoints import Backoff
from .format import (
    BadEntry,
    Fields,
    TaskEntry,
    parse_task,
    parse_task_header,
    result_fields,
    stream_entries,
)
from .settings import QueueSettings, require_redis
from .writer import HeldEntry, Op, ResultWriter, result_of

if TYPE_CHECKING:
    from ..coordinator import Coordinator

log = logging.getLogger(__name__)

READ_BATCH = 64  # entries per XREADGROUP
BLOCK_MS = 250  # how long one XREADGROUP waits for new entries
HOLD_BYTES = 64 * 1024 * 1024  # entries held (read, not acknowledged) at most this big together
HOLD_TIME = 0.1  # ... and at most about this much work for the workers
STATS_EVERY = 1.0
FORGET_AFTER = 10  # a consumer idle this many claim_idle periods with nothing pending is dead

# Removes a consumer from the group only if it has no pending entry, in one step: deleting a
# consumer drops its pending entries, and a live one may read an entry between a look and a
# delete. A live consumer removed while idle comes back with its next XREADGROUP.
FORGET_SCRIPT = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""


class QueueFeed:
    """Feeds one coordinator from a :class:`RedisQueue` (see the module's docstring).

    Deliberately built on the engine's interface (tasks, a sink, ``admit``), the same one
    ``map()`` uses: the coordinator's scheduling, retries and deadlines apply unchanged.
    """

    abandoned = False  # the sink protocol: nobody abandons a queue's entries

    def __init__(self, q: QueueSettings, coord: Coordinator, consumer: str) -> None:
        self.queue = q
        self.consumer = consumer
        self._coord = coord
        self._intake = coord.intake
        self._engine = self._intake.engine
        self._redis = require_redis()
        self._lock = threading.Condition(threading.Lock())
        self._entries: dict[int, HeldEntry] = {}  # by base number
        self._bases: list[int] = []  # ascending; may hold bases of finished entries
        self._next_base = 0
        self._held: dict[bytes, HeldEntry] = {}  # read (or claimed), not yet acknowledged
        self._held_items = 0
        self._held_bytes = 0
        self._stop_reading = threading.Event()
        self.read = self.claimed = self.completed = self.released = 0
        self.dead_lettered = self.errors = 0
        self._remote: dict[str, int | None] = {"pending": None, "lag": None}
        self._remote_at: float | None = None
        self._lengths: tuple[int | None, int | None] = (None, None)
        self._warned_bad = False
        self.forgotten = 0  # dead consumers removed from the group
        self._forget_script: Any = None
        self._reader = threading.Thread(
            target=self._read_loop, name=f"pytaskqml-redis-reader-{q.stream}", daemon=True
        )
        self._writer = ResultWriter(q, consumer, self._forget, self._count_error)

    def start(self) -> None:
        self._reader.start()
        self._writer.start()

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> QueueStats:
        with self._lock:
            age = None if self._remote_at is None else time.monotonic() - self._remote_at
            return QueueStats(
                backend="redis",
                stream=self.queue.stream,
                group=self.queue.group,
                consumer=self.consumer,
                read=self.read,
                claimed=self.claimed,
                completed=self.completed,
                released=self.released,
                dead_lettered=self.dead_lettered,
                holding=len(self._held),
                pending=self._remote["pending"],
                lag=self._remote["lag"],
                length=self._lengths[0],
                dead_length=self._lengths[1],
                errors=self.errors,
                age=age,
            )

    # ------------------------------------------------------------------ stopping

    def stop_reading(self) -> None:
        """Take no more entries (the coordinator is shutting down); what is held finishes."""
        self._stop_reading.set()
        with self._lock:
            self._lock.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """After the coordinator drained: write what is finished, release what is not, stop
        both threads."""
        self.stop_reading()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout)
        with self._lock:
            rest = [e for e in self._held.values() if e.base in self._entries]
            for e in rest:
                self._entries.pop(e.base, None)
        for e in rest:
            self._writer.put(("release", e, None))
        self._writer.close(timeout)

    # ------------------------------------------------------------------ the sink

    def deliver_many(self, outcomes: list[tuple[int, int, Any]]) -> None:
        """Outcomes of our tasks, from whichever thread learnt them (never blocks on Redis)."""
        done: list[tuple[str, HeldEntry, Any]] = []
        with self._lock:
            entries = self._entries
            for seq, kind, value in outcomes:
                e = entries.get(seq)
                if e is None:
                    e = self._find(seq)
                    if e is None:
                        continue  # a duplicate outcome, or an entry already released
                if e.count == 1 or (kind == RUN and seq == e.base and len(value) == e.count):
                    finished = True
                    e.outcomes = [(OK, v) for v in value] if kind == RUN else None
                else:
                    finished = e.add(seq - e.base, kind, value)
                if finished:
                    del entries[e.base]
                    res = result_of(e, kind, value)
                    done.append(("release", e, None) if res is None else ("result", e, res))
        for op in done:
            self._writer.put(op)

    def deliver(self, seq: int, kind: int, value: Any) -> None:
        self.deliver_many([(seq, kind, value)])

    def _find(self, seq: int) -> HeldEntry | None:
        i = bisect.bisect_right(self._bases, seq) - 1
        if i < 0:
            return None
        e = self._entries.get(self._bases[i])
        return e if e is not None and seq < e.base + e.count else None

    # ------------------------------------------------------------------ reading

    def _read_loop(self) -> None:
        backoff = Backoff(first=0.05, cap=2.0)
        r: Any = None
        next_maintenance = 0.0
        outage = False
        while not self._stop_reading.is_set():
            try:
                if r is None:
                    r = self.queue.connect()
                    self.queue.ensure_group(r)
                    self._recover_own(r)
                now = time.monotonic()
                if now >= next_maintenance:
                    self._maintain(r)
                    next_maintenance = now + min(STATS_EVERY, self.queue.claim_idle / 4)
                self._read_once(r, max(0.0, next_maintenance - time.monotonic()))
                if outage:
                    log.warning("Redis answers again (%s)", self.queue)
                    outage = False
                backoff.reset()
            except self._redis.RedisError as exc:
                with self._lock:
                    self.errors += 1
                if not outage:
                    log.warning("Redis error in %s's reader, retrying: %s", self.consumer, exc)
                    outage = True
                # Start over on a new connection: a Redis that restarted without persistence
                # answers NOGROUP until the group is created again (ensure_group, above).
                if r is not None:
                    r.close()
                    r = None
                self._stop_reading.wait(backoff.next())
            except Exception:
                with self._lock:
                    self.errors += 1
                log.exception("the Redis reader of %s failed; retrying", self.consumer)
                self._stop_reading.wait(backoff.next())
        if r is not None:
            r.close()

    def _room(self) -> int:
        """How many more entries to take now (lock held): none without workers; otherwise
        about HOLD_TIME of the workers' work and HOLD_BYTES, at most READ_BATCH at a time."""
        workers = self._engine.worker_count()
        if not workers:
            return 0
        per = self._engine.mean_item_time()
        want_items = 64 * workers if per is None else max(16 * workers, workers * HOLD_TIME / per)
        if self._held_items >= want_items or self._held_bytes >= HOLD_BYTES:
            return 0
        return max(1, min(READ_BATCH, 4 * workers, int(want_items - self._held_items)))

    def _read_once(self, r: Any, wait: float) -> None:
        with self._lock:
            room = self._room()
            if room <= 0:
                self._lock.wait(min(wait, 0.05) if wait > 0 else 0.05)
                return
        q = self.queue
        block = max(1, min(BLOCK_MS, int(wait * 1000)))
        reply = r.xreadgroup(q.group, self.consumer, {q.stream: ">"}, count=room, block=block)
        entries = stream_entries(reply)
        if entries:
            with self._lock:
                self.read += len(entries)
            self._take(r, entries)

    def _recover_own(self, r: Any) -> None:
        """Entries still pending under our own name (a coordinator restarted with the same
        ``consumer``): ours to run again."""
        q = self.queue
        pending = r.xpending_range(q.stream, q.group, "-", "+", 10_000, consumername=self.consumer)
        ids = [p["message_id"] for p in pending]
        for i in range(0, len(ids), 500):
            claimed = r.xclaim(q.stream, q.group, self.consumer, 0, ids[i : i + 500])
            self._take(r, [(eid, f) for eid, f in claimed if f])

    def _take(self, r: Any, entries: list[tuple[bytes, Fields]]) -> None:
        """Turn entries into tasks and admit them; bad ones go to the dead-letter stream."""
        engine, intake = self._engine, self._intake
        taken: list[HeldEntry] = []
        singles: list[Task] = []
        chunks: list[tuple[HeldEntry, TaskEntry]] = []
        timed = False
        now = engine.clock()
        for eid, fields in entries:
            if eid in self._held:
                continue  # already running here (claimed back after a Redis outage)
            try:
                t = parse_task(fields)
                # (Checked by encoding it; the text is what the frame carries.)
                nbytes, text, kept = (
                    intake.payload_text(t.payload) if t.count == 1 else (0, None, None)
                )
            except (BadEntry, TypeError, ValueError) as exc:
                self._dead_letter(r, eid, fields, str(exc))
                continue
            with self._lock:
                e = HeldEntry(eid, t, self._next_base)
                self._next_base += t.count
                self._entries[e.base] = e
                self._bases.append(e.base)
                if len(self._bases) > 2 * len(self._entries) + 64:
                    self._bases = sorted(self._entries)
                self._held[eid] = e
                self._held_items += t.count
                self._held_bytes += t.nbytes
            taken.append(e)
            if t.count > 1:
                chunks.append((e, t))
                continue
            task = Task(engine.new_ids(1)[0], t.payload, nbytes, self, e.base, now, 1, text, kept)
            task.run_timeout = t.run_timeout
            if t.deadline is not None:
                task.deadline = now + max(0.0, t.deadline - time.time())
                timed = True
            singles.append(task)
        try:
            if singles:
                engine.admit(singles, timed=timed)
            for e, t in chunks:
                chunk = min(t.count, max(1, intake.auto_chunksize(4 * self._held_items)))
                intake.many(t.payload, self, e.base, run_timeout=t.run_timeout, chunk=chunk)
        except Exception as exc:  # shut down meanwhile, or the queue refused them
            # Released: those that were admitted after all may run here too (a second run).
            why = ClosedError(f"not admitted: {exc}")
            self.deliver_many([(e.base, ERROR, why) for e in taken])

    def _dead_letter(self, r: Any, eid: bytes, fields: Any, reason: str) -> None:
        """Move an entry nobody can run to the dead-letter stream, with the reason; tell its
        producer, when the entry says who that is, so it does not wait for it forever."""
        q = self.queue
        dead: Fields = dict(fields) if isinstance(fields, dict) else {}
        dead.update({b"reason": reason.encode(), b"id": eid, b"by": self.consumer.encode()})
        pipe = r.pipeline(transaction=False)
        pipe.xadd(q.dead_stream, dead, maxlen=q.max_dead, approximate=True)
        try:
            producer, seq, count = parse_task_header(fields)
        except BadEntry:
            pass
        else:
            info = ["DeadLetter", f"the entry was moved to {q.dead_stream}: {reason}", ""]
            key = q.results_key(producer)
            pipe.xadd(key, result_fields(seq, count, "error", info), maxlen=q.max_results)
            pipe.expire(key, int(q.result_ttl))
        pipe.xack(q.stream, q.group, eid)
        pipe.xdel(q.stream, eid)
        pipe.execute()
        with self._lock:
            self.dead_lettered += 1
        self._engine.signal()  # for wait_until() on statistics()
        if not self._warned_bad:
            self._warned_bad = True
            log.warning(
                "entry %s of %s moved to %s: %s (further ones are only counted, in "
                "statistics().queue.dead_lettered)",
                eid.decode(errors="replace"),
                q.stream,
                q.dead_stream,
                reason,
            )

    # ------------------------------------------------------------------ upkeep

    def _maintain(self, r: Any) -> None:
        q = self.queue
        with self._lock:
            mine = list(self._held)
        # Renew our entries, so nobody claims work that is running here. (Should another
        # coordinator have claimed one while we could not reach Redis, both run it: allowed.)
        for i in range(0, len(mine), 1000):
            r.xclaim(q.stream, q.group, self.consumer, 0, mine[i : i + 1000], justid=True)
        self._claim(r)
        pipe = r.pipeline(transaction=False)
        pipe.xinfo_groups(q.stream)
        pipe.xlen(q.stream)
        pipe.xlen(q.dead_stream)
        pipe.xinfo_consumers(q.stream, q.group)
        groups, length, dead, consumers = pipe.execute()
        self._forget_dead(r, consumers)
        with self._lock:
            for g in groups:
                name = g.get("name")
                if (name.decode() if isinstance(name, bytes) else name) == q.group:
                    self._remote = {"pending": g.get("pending"), "lag": g.get("lag")}
            self._lengths = (length, dead)
            self._remote_at = time.monotonic()
        self._engine.signal()

    def _forget_dead(self, r: Any, consumers: list[dict[str, Any]]) -> None:
        """Remove consumers idle for FORGET_AFTER claim periods that hold nothing: coordinators
        that died (their entries were claimed meanwhile); else the group lists them forever."""
        limit_ms = FORGET_AFTER * self.queue.claim_idle * 1000
        for c in consumers:
            name = c.get("name")
            name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            if name == self.consumer or c.get("pending") or (c.get("idle") or 0) < limit_ms:
                continue
            if self._forget_script is None:
                self._forget_script = r.register_script(FORGET_SCRIPT)
            try:
                removed = self._forget_script(
                    keys=[self.queue.stream], args=[self.queue.group, name], client=r
                )
            except self._redis.ResponseError as exc:  # scripts not allowed here: keep them
                log.debug("cannot remove idle consumer %s: %s", name, exc)
                return
            if removed == -1:  # it took an entry meanwhile
                continue
            with self._lock:
                self.forgotten += 1
            log.info("removed consumer %s of %s: idle and holding nothing", name, self.queue.stream)

    def _claim(self, r: Any) -> None:
        """Take over entries idle past ``claim_idle``: a dead coordinator's, or released ones."""
        q = self.queue
        start = "0-0"
        for _ in range(16):
            with self._lock:
                room = self._room()
            if room <= 0:
                return
            reply = r.xautoclaim(
                q.stream, q.group, self.consumer, int(q.claim_idle * 1000), start, count=room
            )
            start, entries = reply[0], [(eid, f) for eid, f in reply[1] if f]
            if entries:
                entries = self._over_delivered(r, entries)
                with self._lock:
                    self.claimed += len(entries)
                self._engine.signal()
                log.info("%s claimed %d idle entries of %s", self.consumer, len(entries), q.stream)
                self._take(r, entries)
            if start in (b"0-0", "0-0"):
                return

    def _over_delivered(
        self, r: Any, entries: list[tuple[bytes, Fields]]
    ) -> list[tuple[bytes, Fields]]:
        """Dead-letter the claimed entries delivered more than ``max_deliveries`` times."""
        q = self.queue
        ids = [eid for eid, _ in entries]
        info = r.xpending_range(
            q.stream, q.group, min(ids), max(ids), len(ids) + 16, consumername=self.consumer
        )
        times = {p["message_id"]: p["times_delivered"] for p in info}
        keep = []
        for eid, fields in entries:
            n = times.get(eid, 0)
            if n > q.max_deliveries:
                self._dead_letter(r, eid, fields, f"delivered {n} times without being completed")
            else:
                keep.append((eid, fields))
        return keep

    def _count_error(self) -> None:
        with self._lock:
            self.errors += 1

    def _forget(self, batch: list[Op], completed: int, released: int) -> None:
        """These entries are no longer ours: stop renewing them (an entry whose result could
        not be written is claimed by another coordinator once idle)."""
        with self._lock:
            for _, e, _res in batch:
                if self._held.pop(e.id, None) is not None:
                    self._held_items -= e.count
                    self._held_bytes -= e.nbytes
            self.completed += completed
            self.released += released
            self._lock.notify_all()
        self._engine.signal()
