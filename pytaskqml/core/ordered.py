"""The bounded task queue with its overflow policies, and the reorder buffer.

Neither class starts a thread or reads a clock: the scheduler drives the queue under the
coordinator's lock, and results reach the reorder buffer from whichever thread delivers them.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from .tasks import RUN, Source, Task

OverflowPolicy = Literal["block", "drop_oldest", "reject"]
OVERFLOW_POLICIES: tuple[str, ...] = ("block", "drop_oldest", "reject")


# Lanes kept (those with nothing waiting too) before the idle ones are forgotten.
MAX_IDLE_LANES = 64


class _Lane:
    """The waiting tasks of one source at one priority, oldest first; ``tag`` is the virtual
    start time of its head task (see :class:`FairQueue`)."""

    __slots__ = ("key", "level", "source", "step", "tag", "tasks")

    def __init__(self, key: tuple[Source | None, int], source: Source) -> None:
        self.key = key
        self.level = key[1]
        self.source = source
        self.step = 1.0 / source.weight  # virtual time one task costs
        self.tag = 0.0
        self.tasks: deque[Task] = deque()


class FairQueue:
    """The waiting tasks: one lane per (source, priority), highest priority first and, within
    a priority, fair between sources.

    Fairness is start-time fair queueing: a virtual clock ``_now`` is the tag of the last task
    served; every lane's head task carries a tag, and the lowest tag goes next (ties: first
    come). A served task moves its lane's tag on by ``1 / weight``. A lane that starts waiting
    gets the tag ``max(virtual now, where its source left off)``: a source that sent little
    lately (a camera at 10 frames/s next to one flooding at 200) goes at the next free slot,
    while a source that keeps a backlog takes turns with the others, ``weight`` tasks per turn.
    Remembering where a source left off (``Source.vfinish``) means a source cannot jump the
    line by emptying its lane after every task. Each lane keeps its own order, so a stream's
    frames leave in the order they came.

    It answers the deque operations the scheduler uses on a FIFO - ``[0]`` (the task
    :meth:`popleft` would return), ``popleft``, ``appendleft`` (put back the task just popped:
    it is next again), ``append``, ``extend``, ``remove``, ``len`` - so the dispatch loop reads
    as before. A lane that empties is forgotten (its source may be long gone).

    Priorities are strict: while a higher level has tasks, a lower one gets nothing (a
    sustained flow of high-priority work starves lower priorities; documented for users).
    """

    __slots__ = ("_count", "_lanes", "_levels", "_n", "_now", "_order", "_undo", "default")

    def __init__(self, default: Source | None = None) -> None:
        self._lanes: dict[tuple[Source | None, int], _Lane] = {}
        # Per priority: a heap of (tag, arrival number, lane) of the lanes with tasks; and the
        # levels present, highest first.
        self._levels: dict[int, list[tuple[float, int, _Lane]]] = {}
        self._order: list[int] = []
        self._n = 0
        self._now = 0.0
        self._count = itertools.count()
        # The source of tasks that name none (submit()'s).
        self.default = default if default is not None else Source("submit")
        # What the last popleft changed, so that appendleft of that task undoes it exactly.
        self._undo: tuple[Task, float, float, float] | None = None

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __iter__(self) -> Iterator[Task]:
        for level in self._order:
            for _, _, lane in sorted(self._levels[level]):
                yield from lane.tasks

    def __getitem__(self, i: int) -> Task:
        if i != 0 or not self._n:
            raise IndexError("only the head of a FairQueue can be read")
        return self._levels[self._order[0]][0][2].tasks[0]

    def _lane(self, t: Task, tag: float | None = None) -> _Lane:
        """*t*'s lane, made waiting (in its level's heap) if it was not."""
        key = (t.source, t.priority)
        lane = self._lanes.get(key)
        if lane is None:
            if len(self._lanes) >= MAX_IDLE_LANES:
                self._forget_idle()
            lane = self._lanes[key] = _Lane(key, t.source or self.default)
        if not lane.tasks:
            level = lane.level
            heap = self._levels.get(level)
            if heap is None:
                heap = self._levels[level] = []
            if not heap:
                self._order.append(level)
                self._order.sort(reverse=True)
            lane.tag = max(self._now, lane.source.vfinish) if tag is None else tag
            heapq.heappush(heap, (lane.tag, next(self._count), lane))
        return lane

    def _retire(self, lane: _Lane) -> None:
        """*lane* has emptied: out of its level's heap (the lane itself is kept for the next
        task of its source, which is usually close behind: see :meth:`_forget_idle`)."""
        heap = self._levels[lane.level]
        if heap[0][2] is lane:
            heapq.heappop(heap)
        else:
            heap[:] = [e for e in heap if e[2] is not lane]
            heapq.heapify(heap)
        if not heap:
            self._order.remove(lane.level)

    def _forget_idle(self) -> None:
        """Forget the lanes with nothing waiting (their sources may be long gone)."""
        self._lanes = {k: ln for k, ln in self._lanes.items() if ln.tasks}
        self._levels = {lv: h for lv, h in self._levels.items() if h}

    def append(self, t: Task) -> None:
        self._lane(t).tasks.append(t)
        self._n += 1

    def extend(self, tasks: Iterable[Task]) -> None:
        lane: _Lane | None = None
        for t in tasks:
            # An admission's tasks nearly always share their lane: look it up once per run.
            if lane is None or lane.key[0] is not t.source or lane.level != t.priority:
                lane = self._lane(t)
            lane.tasks.append(t)
            self._n += 1

    def popleft(self) -> Task:
        if not self._n:
            raise IndexError("pop from an empty FairQueue")
        heap = self._levels[self._order[0]]
        tag, _, lane = heap[0]
        t = lane.tasks.popleft()
        self._n -= 1
        src = lane.source
        self._undo = (t, tag, self._now, src.vfinish)
        self._now = tag
        lane.tag = src.vfinish = tag + lane.step
        if lane.tasks:
            heapq.heapreplace(heap, (lane.tag, next(self._count), lane))
        else:
            self._retire(lane)
        return t

    def appendleft(self, t: Task) -> None:
        """Put *t* at the head of its lane. The task just popped is the next one again."""
        undo = self._undo
        self._undo = None
        if undo is not None and undo[0] is t:
            _, tag, self._now, vfinish = undo
            (t.source or self.default).vfinish = vfinish
            lane = self._lanes.get((t.source, t.priority))
            if lane is not None and lane.tasks:
                # Still waiting with the tag after t's: give it t's tag back.
                heap = self._levels[lane.level]
                heap[:] = [e for e in heap if e[2] is not lane]
                lane.tag = tag
                # (A negative arrival number: before any other lane with the same tag.)
                heap.append((tag, -next(self._count), lane))
                heapq.heapify(heap)
            else:
                lane = self._lane(t, tag)
        else:
            lane = self._lane(t)
        lane.tasks.appendleft(t)
        self._n += 1

    def settle(self) -> None:
        """The task last popped stays out (no more :meth:`appendleft` undo for it; the queue
        keeps no reference to it)."""
        self._undo = None

    def remove(self, t: Task) -> None:
        """Remove *t* (ValueError if it is not waiting)."""
        lane = self._lanes.get((t.source, t.priority))
        if lane is None:
            raise ValueError("task not queued")
        lane.tasks.remove(t)
        self._n -= 1
        if not lane.tasks:
            self._retire(lane)

    def clear(self) -> None:
        self._lanes.clear()
        self._levels.clear()
        self._order.clear()
        self._n = 0

    def pop_from_longest(self, incoming: Task | None = None) -> Task | None:
        """The oldest task of the longest lane at the lowest priority (what an overflow policy
        drops: the source that fills the queue pays for it, not the others). Between lanes as
        long as each other, the lane of *incoming*'s source - the new task that needs the room
        - pays: so live sources that each keep one frame waiting each keep their newest."""
        if not self._n:
            return None
        heap = self._levels[self._order[-1]]
        lane = max((e[2] for e in heap), key=lambda ln: len(ln.tasks))
        if incoming is not None:
            own = self._lanes.get((incoming.source, lane.level))
            if own is not None and len(own.tasks) == len(lane.tasks):
                lane = own
        t = lane.tasks.popleft()
        self._n -= 1
        if not lane.tasks:
            self._retire(lane)
        return t

    def waiting(self) -> dict[Source | None, int]:
        """Tasks waiting per source (None: submit())."""
        out: dict[Source | None, int] = {}
        for (src, _), lane in self._lanes.items():
            out[src] = out.get(src, 0) + len(lane.tasks)
        return out

    def oldest_submit(self) -> float | None:
        """The submission time of the oldest unfinished waiting task (None: none waits)."""
        oldest: float | None = None
        for lane in self._lanes.values():
            for t in lane.tasks:
                if not t.finished:
                    if oldest is None or t.t_submit < oldest:
                        oldest = t.t_submit
                    break
        return oldest


class TaskQueue:
    """The waiting tasks (a :class:`FairQueue`) with a soft bound.

    New work is admitted subject to ``maxsize`` (the caller applies the overflow policy when it
    reports full); ``push_front`` returns work that was already admitted - tasks re-queued
    after a worker died - and is never refused, so a retry cannot be lost to a full queue.
    """

    def __init__(self, maxsize: int, default: Source | None = None) -> None:
        if maxsize <= 0:
            raise ValueError("max_queue must be positive")
        self.maxsize = maxsize
        self.items = FairQueue(default)

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.maxsize

    def push(self, item: Task) -> None:
        self.items.append(item)

    def extend(self, items: Iterable[Task]) -> None:
        self.items.extend(items)

    def push_front(self, items: Iterable[Task]) -> None:
        """Put *items* at the head of their lanes, keeping their relative order."""
        for t in reversed(list(items)):
            self.items.appendleft(t)

    def pop_oldest(self) -> Task:
        return self.items.popleft()

    def remove(self, item: Task) -> bool:
        try:
            self.items.remove(item)
        except ValueError:
            return False
        return True

    def clear(self) -> list[Task]:
        out = list(self.items)
        self.items.clear()
        return out


class ReorderBuffer:
    """Holds outcomes that arrived early until every earlier one has arrived.

    Invariant: ``_next`` is the sequence number the consumer waits for; every stored key is
    ``>= _next``; an outcome stored at ``seq`` covers ``seq .. seq + span - 1`` (a RUN of a
    chunk's results is stored and handed out whole, so a chunk costs one entry, not one per
    item, and no two stored outcomes overlap); an outcome is stored once (a second delivery
    for the same number is ignored, which is how a late duplicate can never reach the caller).
    The producer side calls :meth:`deliver` from any thread; the consumer calls
    :meth:`get_next`, which blocks until the head of the line is present. Only a delivery that
    completes the head wakes the consumer, so out-of-order arrivals cost no wake-ups.

    With ``ordered=False`` the buffer is a plain completion queue: :meth:`get_next` returns
    outcomes as they arrive. (The coordinator delivers each task once; the buffer's own check
    is for the ordered case, where a stale number must never overwrite the head.)
    """

    def __init__(self, *, ordered: bool = True) -> None:
        self.ordered = ordered
        self._lock = threading.Lock()
        # A waiting consumer blocks on a lock of its own, held until a delivery releases it -
        # after releasing _lock, so the consumer wakes once and finds _lock free (with a
        # Condition it would wake holding nothing, then wait again for the deliverer's
        # _lock: two hand-offs of the interpreter per result instead of one).
        self._waiters: list[threading.Lock] = []
        self._slots: dict[int, tuple[int, Any]] = {}
        self._arrived: deque[tuple[int, int, Any]] = deque()
        self._next = 0

    def deliver(self, seq: int, kind: int, value: Any) -> None:
        woken: list[threading.Lock] = []
        with self._lock:
            if self.ordered:
                if seq < self._next or seq in self._slots:
                    return
                self._slots[seq] = (kind, value)
                if seq == self._next and self._waiters:
                    woken, self._waiters = self._waiters, []
            else:
                self._arrived.append((seq, kind, value))
                if self._waiters:
                    woken, self._waiters = self._waiters, []
        for w in woken:
            w.release()

    def deliver_many(self, outcomes: list[tuple[int, int, Any]]) -> None:
        woken: list[threading.Lock] = []
        with self._lock:
            if self.ordered:
                slots, head = self._slots, self._next
                wake = False
                for seq, kind, value in outcomes:
                    if seq >= head and seq not in slots:
                        slots[seq] = (kind, value)
                        wake = wake or seq == head
                if wake and self._waiters:
                    woken, self._waiters = self._waiters, []
            else:
                self._arrived.extend(outcomes)
                if self._waiters:
                    woken, self._waiters = self._waiters, []
        for w in woken:
            w.release()

    def _take(self) -> tuple[int, int, Any] | None:
        """Lock held: the next outcome if it is here."""
        if self.ordered:
            seq = self._next
            got = self._slots.pop(seq, None)
            if got is None:
                return None
            kind, value = got
            self._next = seq + (len(value) if kind == RUN else 1)
            return seq, kind, value
        return self._arrived.popleft() if self._arrived else None

    def get_next(self, timeout: float | None = None) -> tuple[int, int, Any]:
        """``(seq, kind, value)`` of the next outcome; ``TimeoutError`` if none in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                out = self._take()
                if out is not None:
                    return out
                waiter = threading.Lock()
                waiter.acquire()
                self._waiters.append(waiter)
            if deadline is None:
                waiter.acquire()
                continue
            if waiter.acquire(timeout=max(0.0, deadline - time.monotonic())):
                continue
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                out = self._take()
                if out is not None:
                    return out
            raise TimeoutError("no result within the timeout")

    def get_batch(self, timeout: float | None = None) -> list[tuple[int, int, Any]]:
        """The next outcome plus any that are ready right behind it, in one lock hold."""
        out = [self.get_next(timeout)]
        with self._lock:
            if self.ordered:
                slots = self._slots
                while self._next in slots:
                    kind, value = slots.pop(self._next)
                    out.append((self._next, kind, value))
                    self._next += len(value) if kind == RUN else 1
            else:
                while self._arrived:
                    out.append(self._arrived.popleft())
        return out
