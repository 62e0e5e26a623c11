"""The bounded task queue with its overflow policies, and the reorder buffer.

Neither class starts a thread or reads a clock: the scheduler drives the queue under the
coordinator's lock, and results reach the reorder buffer from whichever thread delivers them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import Any, Generic, Literal, TypeVar

from ._tasks import RUN

T = TypeVar("T")

OverflowPolicy = Literal["block", "drop_oldest", "reject"]
OVERFLOW_POLICIES: tuple[str, ...] = ("block", "drop_oldest", "reject")


class TaskQueue(Generic[T]):
    """A FIFO with a soft bound.

    ``push`` admits new work subject to ``maxsize`` (the caller applies the overflow policy
    when it reports full); ``push_front`` returns work that was already admitted - tasks
    re-queued after a worker died - and is never refused, so a retry cannot be lost to a full
    queue.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize <= 0:
            raise ValueError("max_queue must be positive")
        self.maxsize = maxsize
        self.items: deque[T] = deque()

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.maxsize

    def push(self, item: T) -> None:
        self.items.append(item)

    def extend(self, items: Iterable[T]) -> None:
        self.items.extend(items)

    def push_front(self, items: Iterable[T]) -> None:
        """Put *items* at the head, keeping their relative order."""
        self.items.extendleft(reversed(list(items)))

    def pop_oldest(self) -> T:
        return self.items.popleft()

    def remove(self, item: T) -> bool:
        try:
            self.items.remove(item)
        except ValueError:
            return False
        return True

    def clear(self) -> list[T]:
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
        self._cv = threading.Condition(threading.Lock())
        self._slots: dict[int, tuple[int, Any]] = {}
        self._arrived: deque[tuple[int, int, Any]] = deque()
        self._next = 0

    def deliver(self, seq: int, kind: int, value: Any) -> None:
        with self._cv:
            if self.ordered:
                if seq < self._next or seq in self._slots:
                    return
                self._slots[seq] = (kind, value)
                if seq == self._next:
                    self._cv.notify()
            else:
                self._arrived.append((seq, kind, value))
                self._cv.notify()

    def deliver_many(self, outcomes: list[tuple[int, int, Any]]) -> None:
        with self._cv:
            if self.ordered:
                slots, head = self._slots, self._next
                wake = False
                for seq, kind, value in outcomes:
                    if seq >= head and seq not in slots:
                        slots[seq] = (kind, value)
                        wake = wake or seq == head
                if wake:
                    self._cv.notify()
            else:
                self._arrived.extend(outcomes)
                self._cv.notify()

    def get_next(self, timeout: float | None = None) -> tuple[int, int, Any]:
        """``(seq, kind, value)`` of the next outcome; ``TimeoutError`` if none in time."""
        with self._cv:
            if self.ordered:
                seq = self._next
                if seq not in self._slots and not self._cv.wait_for(
                    lambda: seq in self._slots, timeout
                ):
                    raise TimeoutError("no result within the timeout")
                kind, value = self._slots.pop(seq)
                self._next = seq + (len(value) if kind == RUN else 1)
                return seq, kind, value
            if not self._arrived and not self._cv.wait_for(lambda: bool(self._arrived), timeout):
                raise TimeoutError("no result within the timeout")
            return self._arrived.popleft()

    def get_batch(self, timeout: float | None = None) -> list[tuple[int, int, Any]]:
        """The next outcome plus any that are ready right behind it, in one lock hold."""
        out = [self.get_next(timeout)]
        with self._cv:
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
