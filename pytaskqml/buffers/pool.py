"""``coord.buffer()``: arrays a producer fills in place, in memory every spawned worker maps.

Without it the coordinator copies each large array once into the shared segment of the worker
that runs its task (:mod:`._shm`), because it cannot know in advance which worker that will be.
A *pool* buffer avoids that copy: it lies in one segment - the pool - that every worker process
of the coordinator maps, from birth (replacements too), so whichever worker runs the task, and
whichever one runs it again after a ``kill -9``, finds the frame where the producer wrote it.
The frame on the socket only names the place (a pool marker, see :mod:`._codec`).

Recognising one. At encode time an array of 64 KiB or more is looked up by its data pointer
(``__array_interface__``) against the pool's mapping; a C-contiguous array inside a live slot
is sent as a marker - the buffer itself, a reshape, a contiguous slice, a value in a dict.
Anything else (a strided view, a copy) travels as any array does.

Life of a slot. A slot is in use while either holds:

* the array is alive *in this process*: a weak reference to its base array (every view keeps
  the base alive) says when it is gone. The task holds its payload until its outcome is
  delivered (through every retry), so this covers "the task is not finished", and it also
  covers the producer's own reference - an array the producer keeps, to draw on once the
  result is back, is never handed out again under it;
* a worker holds a view: each marker sent to a worker counts one hold, which the worker
  returns when nothing there refers to the array any more (the ``"fp"`` list of a result or
  ``free`` message), and all of a worker's holds go when it is lost (its process is gone or
  going; its connection is).

A never-submitted buffer comes back when it is garbage-collected. On CPython that is when the
last reference goes; an array in a reference cycle (or on an interpreter without reference
counting) waits for the cycle collector, which :meth:`BufferPool.take` runs once when it has
waited :data:`GC_AFTER` seconds for a slot.

A full pool. ``buffer()`` then hands out a plain array (after waiting up to ``wait`` seconds
for a pool buffer, if asked to): never an error, never a stall. Blocking by default could wait
on itself - a producer holding every buffer it took - while the plain array costs only the copy
the pool saves elsewhere. ``map()`` keeps its read-ahead to half of what the pool holds of its
items (see :func:`._iterate.map_results`), so a generator filling fresh ``coord.buffer()``
arrays is not what fills it. ``statistics().buffers.plain`` counts plain arrays, and the first
one is logged.

Written after submitting. The worker reads the producer's pages, so a buffer written again
before its task ran would change the task's input: :meth:`._intake.Intake.freeze` makes a
submitted pool array read-only until its task is over.

Weak-reference callbacks run wherever the last reference is dropped - inside any code, even
code holding other locks. So the callback only appends to a list and *tries* the pool's lock;
whoever holds the lock drains the list before releasing it (see :meth:`BufferPool._unlock`).

Workers map the pool copy-on-write (:mod:`._poolview`): what a worker writes into its array
changes neither the producer's array nor what a retry on another worker reads.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import mmap
import operator
import os
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from ..core.stats import BufferStats
from ..wire import codec as _codec
from . import shm as _shm

log = logging.getLogger(__name__)

# The pool's size unless the coordinator says otherwise: address space, not memory - pages
# are used only once written, and free slots are reused most recently freed first.
DEFAULT_POOL_BYTES = 1024 * 1024 * 1024
# A buffer() that has waited this long for a slot runs the cycle collector once.
GC_AFTER = 0.2


def check_pool_bytes(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_buffer_bytes must be a whole number >= 0, got {value!r}")


def pool_supported() -> bool:
    """Copy-on-write views that can be reset (``MADV_DONTNEED``) and NumPy: Linux only."""
    return (
        sys.platform.startswith("linux")
        and hasattr(mmap, "MADV_DONTNEED")
        and (_codec.import_numpy() is not None)
    )


class BufferPool:
    """The coordinator's side of the pool, handed out as NumPy arrays.

    Slots. The pool is cut into *granules* (:data:`._shm.SLOT_GRANULE`) and a slot is a run of
    whole granules, as many as its array needs, so frames of different sizes share one pool (a
    1080p frame after 640x480 ones gets a larger slot; it does not fall back to a copy). A freed
    slot goes on the free list of its length and is handed out again, most recently freed
    first, to the next array of that length: the steady case of a stream of equal frames costs
    a list pop. Granules never handed out yet are taken in order; only when both are exhausted
    are the free slots merged where they touch and a long enough run split (first fit).
    Workers track their claims per granule (:mod:`._poolview`), so slots of any length are the
    same to them.
    """

    def __init__(self, fd: int, m: mmap.mmap, *, changed: Callable[[], None]) -> None:
        import ctypes  # the mapping's address, to recognise arrays that lie in it

        self.fd = fd
        self.token = secrets.token_hex(8)  # a worker that mapped the pool says it in its hello
        self._map: mmap.mmap | None = m
        self._size = len(m)
        self._addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        self._changed = changed
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self.granules = self._size // _shm.SLOT_GRANULE
        self.slot_size = 0  # bytes of the last slot handed out (for statistics)
        self._fresh = 0  # granules from here on were never handed out
        self._free: dict[int, list[int]] = {}  # slot length -> first granules, most recent last
        self._length: dict[int, int] = {}  # first granule -> slot length, for slots handed out
        self._first = [0] * self.granules  # granule -> first granule of the slot it was in
        self._alive: dict[int, weakref.ref[Any]] = {}  # slot -> its array, here
        self._holds: dict[int, dict[object, int]] = {}  # slot -> {worker: views sent}
        self._dropped: list[tuple[int, weakref.ref[Any]]] = []  # from weakref callbacks
        self._closed = False
        self.handed = 0
        self.lent = 0
        self.full_logged = False

    @classmethod
    def create(cls, nbytes: int, changed: Callable[[], None]) -> BufferPool | None:
        """A new pool of about *nbytes*, or ``None`` where there can be none."""
        if not pool_supported():
            return None
        segment = _shm.create_segment("pytaskqml-buffers")
        if segment is None:
            return None
        fd, reserve = segment
        size = nbytes // _shm.SLOT_GRANULE * _shm.SLOT_GRANULE
        if reserve:  # a file in /dev/shm: allocated up front (see _shm.create_segment)
            size = min(size, _shm.RESERVED_ARENA_BYTES)
        try:
            if size < 2 * _shm.SLOT_GRANULE:
                raise ValueError(f"{nbytes} bytes is too small for a buffer pool")
            if reserve:
                os.posix_fallocate(fd, 0, size)
            else:
                os.ftruncate(fd, size)
            m = mmap.mmap(fd, size)
        except (OSError, ValueError) as exc:
            log.warning("no buffer pool (coord.buffer() returns plain arrays): %s", exc)
            os.close(fd)
            return None
        return cls(fd, m, changed=changed)

    # ------------------------------------------------------------------ the lock

    def _lock_and_drain(self) -> None:
        self._lock.acquire()
        self._drain()

    def _unlock(self) -> None:
        """Release the lock, then drain what weakref callbacks left meanwhile: a callback that
        could not take the lock relies on whoever held it to look once more."""
        while True:
            self._lock.release()
            if not self._dropped or not self._lock.acquire(blocking=False):
                return
            self._drain()

    def _drain(self) -> None:
        freed = False
        while self._dropped:
            slot, ref = self._dropped.pop()
            if self._alive.get(slot) is ref:
                del self._alive[slot]
                freed |= self._maybe_free(slot)
        if freed:
            self._cv.notify_all()

    def _maybe_free(self, slot: int) -> bool:
        if slot in self._alive or slot in self._holds or self._closed:
            return False
        length = self._length.pop(slot)
        self._free.setdefault(length, []).append(slot)
        return True

    def _on_drop(self, slot: int, ref: weakref.ref[Any]) -> None:
        # Runs wherever the array's last reference went: never wait for a lock here.
        self._dropped.append((slot, ref))
        if self._lock.acquire(blocking=False):
            self._drain()
            self._unlock()

    # ------------------------------------------------------------------ slots

    def _allocate(self, length: int) -> int | None:
        """Lock held. The first granule of a free run of *length* granules, now handed out."""
        stack = self._free.get(length)
        if stack:
            slot = stack.pop()
        elif self._fresh + length <= self.granules:
            slot = self._fresh
            self._fresh += length
        else:
            found = self._coalesce(length)
            if found is None:
                return None
            slot = found
        self._length[slot] = length
        first = self._first
        for g in range(slot, slot + length):
            first[g] = slot
        return slot

    def _coalesce(self, length: int) -> int | None:
        """Lock held. Merge free slots that touch (and the never-used tail) into runs; take
        the first run of at least *length* granules, leaving the rest of the runs free."""
        runs: list[list[int]] = []  # [first granule, length]
        for size, starts in self._free.items():
            runs.extend([s, size] for s in starts)
        runs.sort()
        merged: list[list[int]] = []
        for run in runs:
            if merged and merged[-1][0] + merged[-1][1] == run[0]:
                merged[-1][1] += run[1]
            else:
                merged.append(run)
        if merged and merged[-1][0] + merged[-1][1] == self._fresh:
            self._fresh = merged.pop()[0]  # the tail is untouched ground again
        found = None
        self._free = {}
        for first, size in merged:
            if found is None and size >= length:
                found = first
                first, size = first + length, size - length
                if not size:
                    continue
            self._free.setdefault(size, []).append(first)
        if found is None and self._fresh + length <= self.granules:
            found = self._fresh
            self._fresh += length
        return found

    def capacity_for(self, nbytes: int) -> int:
        """How many buffers of *nbytes* the whole pool holds."""
        return self.granules // max(1, -(-nbytes // _shm.SLOT_GRANULE))

    def holds(self, arr: Any) -> bool:
        """Whether *arr*'s memory lies in this pool."""
        offset: int = arr.__array_interface__["data"][0] - self._addr
        return 0 <= offset < self._size

    # ------------------------------------------------------------------ producer side

    def take(self, shape: tuple[int, ...], dtype: Any, wait: float) -> Any:
        """A pool array of *shape* and *dtype*, waiting up to *wait* seconds for a free slot;
        ``None`` when it cannot come from the pool (full, closed, larger than the pool)."""
        np = _codec.import_numpy()
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        length = max(1, -(-nbytes // _shm.SLOT_GRANULE))
        started = time.monotonic()
        deadline = started + wait
        collected = False
        self._lock_and_drain()
        try:
            if self._closed or length > self.granules // 2:
                return None
            while (slot := self._allocate(length)) is None:
                now = time.monotonic()
                if now >= deadline:
                    if not self.full_logged:
                        self.full_logged = True
                        log.warning(
                            "coord.buffer(): the pool has no room for another %d-byte buffer "
                            "(%d buffers in use: arrays still referred to, unfinished tasks, "
                            "workers); handing out plain arrays, which are copied when sent. "
                            "Drop references to submitted buffers, or give the pool more "
                            "room (max_buffer_bytes)",
                            nbytes,
                            len(self._length),
                        )
                    return None
                if not collected and now - started >= GC_AFTER:
                    collected = True
                    self._lock.release()
                    try:
                        gc.collect()  # buffers in reference cycles come back
                    finally:
                        self._lock_and_drain()
                    continue
                left = deadline - now
                self._cv.wait(left if collected else min(left, started + GC_AFTER - now))
                self._drain()
                if self._closed:
                    return None
            assert self._map is not None  # (None only once closed)
            base = np.frombuffer(
                self._map,
                dtype=dtype,
                count=nbytes // dtype.itemsize,
                offset=slot * _shm.SLOT_GRANULE,
            )
            self._alive[slot] = weakref.ref(base, functools.partial(self._on_drop, slot))
            self.slot_size = length * _shm.SLOT_GRANULE
            self.handed += 1
        finally:
            self._unlock()
        return base.reshape(shape)

    # ------------------------------------------------------------------ worker side

    def _slot_of(self, offset: int, nbytes: int) -> int | None:
        """Lock held. The live slot holding ``[offset, offset + nbytes)``, if one does."""
        g = offset // _shm.SLOT_GRANULE
        if not 0 <= g < self.granules:
            return None
        slot = self._first[g]
        length = self._length.get(slot)
        if length is None or slot not in self._alive:
            return None
        end = (slot + length) * _shm.SLOT_GRANULE
        return slot if g < slot + length and offset + nbytes <= end else None

    def lend(self, arr: Any, holder: object) -> int | None:
        """The offset of *arr* (C-contiguous) in the pool, now held by *holder* as well, or
        ``None`` when it is not a pool buffer."""
        if not self._alive:
            return None  # (a pool buffer alive here is in _alive)
        offset: int = arr.__array_interface__["data"][0] - self._addr
        if offset < 0 or offset >= self._size:
            return None
        self._lock_and_drain()
        try:
            slot = None if self._closed else self._slot_of(offset, arr.nbytes)
            if slot is None:
                return None
            holds = self._holds.get(slot)
            if holds is None:
                holds = self._holds[slot] = {}
            holds[holder] = holds.get(holder, 0) + 1
            self.lent += 1
        finally:
            self._unlock()
        return offset

    def returned(self, holder: object, offsets: Sequence[int]) -> None:
        """*holder* is done with the views at *offsets* (offsets it does not hold are
        ignored)."""
        freed = False
        self._lock_and_drain()
        try:
            for offset in offsets:
                g = offset // _shm.SLOT_GRANULE
                if not 0 <= g < self.granules:
                    continue
                slot = self._first[g]
                holds = self._holds.get(slot)
                n = holds.get(holder, 0) if holds is not None else 0
                if not n:
                    continue
                assert holds is not None
                if n > 1:
                    holds[holder] = n - 1
                    continue
                freed |= self._let_go(slot, holds, holder)
            if freed:
                self._cv.notify_all()
        finally:
            self._unlock()
        if freed:
            self._changed()

    def _let_go(self, slot: int, holds: dict[object, int], holder: object) -> bool:
        """Lock held. *holder* holds none of *slot*'s views any more; True if that freed it."""
        del holds[holder]
        if holds:
            return False
        del self._holds[slot]
        return self._maybe_free(slot)

    def forget(self, holder: object) -> None:
        """*holder* (a worker that is gone) holds nothing any more."""
        freed = False
        self._lock_and_drain()
        try:
            for slot in [s for s, h in self._holds.items() if holder in h]:
                freed |= self._let_go(slot, self._holds[slot], holder)
            if freed:
                self._cv.notify_all()
        finally:
            self._unlock()
        if freed:
            self._changed()

    # ------------------------------------------------------------------ state

    @property
    def capacity(self) -> int:
        """How many buffers of the last size handed out the pool holds (0 before the first)."""
        return self.granules // (self.slot_size // _shm.SLOT_GRANULE) if self.slot_size else 0

    @property
    def in_use(self) -> int:
        self._lock_and_drain()
        try:
            return len(self._alive.keys() | self._holds.keys())
        finally:
            self._unlock()

    def close(self) -> None:
        """No more buffers or loans; arrays still alive keep their memory (the mapping)."""
        self._lock_and_drain()
        try:
            if self._closed:
                return
            self._closed = True
            self._free = {}
            self._cv.notify_all()
        finally:
            self._unlock()
        m, self._map = self._map, None
        assert m is not None
        with contextlib.suppress(BufferError):  # arrays on it still alive: it goes with them
            m.close()
        os.close(self.fd)


class Buffers:
    """A coordinator's pool (created on first use: the first spawn or ``buffer()`` call, when
    shared memory is on) and the plain arrays handed out instead."""

    def __init__(self, *, enabled: bool, max_bytes: int, changed: Callable[[], None]) -> None:
        check_pool_bytes(max_bytes)
        self._enabled = enabled
        self._max_bytes = max_bytes
        self._changed = changed
        self._lock = threading.Lock()
        self._pool: BufferPool | None = None
        self._made = False
        self._closed = False
        self.plain = 0

    @property
    def pool(self) -> BufferPool | None:
        if not self._made:
            with self._lock:
                if not self._made and not self._closed:
                    if self._enabled and self._max_bytes > 0:
                        self._pool = BufferPool.create(self._max_bytes, self._changed)
                    self._made = True
        return self._pool

    @property
    def existing(self) -> BufferPool | None:
        """The pool if it was made (never makes it)."""
        return self._pool

    def for_child(self) -> tuple[int, str] | None:
        """What a worker process about to start gets: the pool's descriptor and token."""
        pool = self.pool
        return None if pool is None or pool._closed else (pool.fd, pool.token)

    def buffer(self, shape: int | Sequence[int], dtype: Any, wait: float) -> Any:
        np = _codec.import_numpy()
        if np is None:
            raise RuntimeError("coord.buffer() needs NumPy (pip install numpy)")
        dt = np.dtype(dtype)
        if dt.hasobject or dt.fields is not None:
            raise TypeError(f"buffers of dtype {dt} cannot be sent (object/struct)")
        dims = (
            (operator.index(shape),)
            if not isinstance(shape, Sequence)
            else tuple(operator.index(d) for d in shape)
        )
        if any(d < 0 for d in dims):
            raise ValueError(f"negative dimension in shape {dims}")
        if wait < 0:
            raise ValueError("wait must not be negative")
        pool = self.pool
        if pool is not None and int(np.prod(dims, dtype=np.int64)) * dt.itemsize >= (
            _shm.MIN_BYTES
        ):
            arr = pool.take(dims, dt, wait)
            if arr is not None:
                return arr
        with self._lock:
            self.plain += 1
        return np.empty(dims, dt)

    def statistics(self) -> BufferStats:
        pool = self._pool
        if pool is None:
            return BufferStats(plain=self.plain)
        return BufferStats(
            capacity=pool.capacity,
            in_use=pool.in_use,
            pooled=pool.handed,
            plain=self.plain,
            lent=pool.lent,
            slot_bytes=pool.slot_size,
        )

    def close(self) -> None:
        with self._lock:
            self._closed = self._made = True
            pool = self._pool
        if pool is not None:
            pool.close()
