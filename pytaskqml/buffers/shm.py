"""Shared memory between the coordinator and the worker processes it spawns.

A large buffer inside a task (a video frame, say) is copied once, by the coordinator, into a
*slot* of a memory segment the child process also maps; the task's frame on the socket carries
only a marker naming the slot's offset (see :mod:`._codec`), and the worker reads the array in
place. Compared with the socket this saves the kernel's two copies and the TCP segmentation of
every frame in both processes.

The segment is an anonymous ``memfd`` (Linux) handed to the child at spawn time through
``pass_fds``, rather than a named ``multiprocessing.shared_memory`` block:

* nothing to leak - no name lives in ``/dev/shm``, so a coordinator killed with ``kill -9``
  leaves no segment behind; the memory goes when the last process holding it exits;
* nothing to guess - another process of the same user cannot open it by name;
* no resource-tracker process in every worker (on Python < 3.13 attaching to a named segment
  registers it with the tracker, which unlinks it when that worker exits).

Where ``memfd_create`` is missing, an unlinked file in ``/dev/shm`` serves the same purpose;
where neither exists (macOS, Windows) tasks travel over the socket as before.

Slot life cycle. The coordinator's :class:`Arena` hands out fixed-size slots and copies the
buffer in; the slot stays taken until the worker reports it free. The worker
(:class:`SharedView`) reports a slot free only once nothing refers to its memory any more: the
decoder builds each array on one base array and the worker watches that base through a weak
reference (every view, slice or reshape of the array keeps its base alive). So an array that
``process()`` keeps (in ``self``, a cache, a result still being sent) stays valid; its slot
comes back when the array is gone. When the worker dies the whole segment is dropped with it
and the replacement process gets a new one: slots are always released.

Arrays the producer wrote straight into shared memory (``coord.buffer()``) are not copied here
at all: they lie in the coordinator's buffer pool, one more segment every worker maps
(:mod:`._bufpool`, :mod:`._poolview`); :class:`SharedView` resolves markers into either.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import tempfile
import threading
import weakref
from typing import Any

from ..errors import ProtocolError
from .poolview import SLOT_GRANULE as SLOT_GRANULE  # slots are whole granules of the pool
from .poolview import PoolView

log = logging.getLogger(__name__)

# Buffers at least this large go through shared memory; smaller ones travel inline in the frame.
# `python -m benchmark.frames --sizes` on 2 cores, spawned workers on a socketpair: from 64 KiB
# on shared memory took 0.66-0.73x the CPU per task at an equal or higher rate (1.9x at 1 MiB);
# at 16-32 KiB the two were within noise, and a small buffer would take a whole slot (1 MiB).
MIN_BYTES = 64 * 1024
# Address space reserved per worker. Pages are only backed once written, and freed slots are
# reused most-recent-first, so the memory actually used follows the number of frames in flight.
ARENA_BYTES = 256 * 1024 * 1024
# In /dev/shm (no memfd) the whole arena is reserved up front, so it is kept smaller.
RESERVED_ARENA_BYTES = 64 * 1024 * 1024
MAX_SLOTS = 128


def create_segment(name: str) -> tuple[int, bool] | None:
    """A new empty shared segment: ``(file descriptor, reserve)``, or ``None``.

    The descriptor is not inheritable. *reserve* is true for a file in ``/dev/shm``: that
    tmpfs has a size limit (64 MiB in a default Docker container), and a write into a mapping
    past it kills the process with SIGBUS instead of raising, so its pages must be allocated
    before use. A memfd has no such limit of its own.
    """
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        with contextlib.suppress(OSError):
            fd: int = memfd_create(name, getattr(os, "MFD_CLOEXEC", 0))
            return fd, False
    shm_dir = "/dev/shm"  # noqa: S108 - mkstemp: O_EXCL, mode 0600, unlinked at once
    if os.path.isdir(shm_dir) and hasattr(os, "posix_fallocate"):
        try:
            fd, path = tempfile.mkstemp(dir=shm_dir, prefix="pytaskqml-")
        except OSError:
            return None
        with contextlib.suppress(OSError):
            os.unlink(path)
        return fd, True
    return None


class Arena:
    """The coordinator's side of one worker's segment: fixed-size slots, copied into."""

    def __init__(
        self, fd: int, *, token: str, reserve: bool = False, limit: int | None = None
    ) -> None:
        self.fd = fd
        self.token = token  # the process given this segment says it in its hello
        self.reserve = reserve  # allocate the pages up front (see create_segment)
        self.limit = (
            limit if limit is not None else RESERVED_ARENA_BYTES if reserve else ARENA_BYTES
        )
        self._lock = threading.Lock()
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._size = 0  # bytes of the file (only ever grows: a live mapping must stay valid)
        self.slot_size = 0
        self._free: list[int] = []  # offsets, most recently freed last
        self._taken: set[int] = set()
        self._closed = False
        self.placed = 0  # buffers that went through shared memory
        self.fallbacks = 0  # buffers big enough for it that went over the socket instead
        self.placed_bytes = 0

    def place(self, data: memoryview) -> int | None:
        """Copy *data* into a free slot and return its offset; ``None`` when there is no room
        (the caller sends it inline)."""
        n = data.nbytes
        with self._lock:
            if self._closed:
                return None
            if n > self.slot_size and not self._relayout(n):
                self.fallbacks += 1
                return None
            if not self._free:
                self.fallbacks += 1
                return None
            offset = self._free.pop()
            assert self._view is not None
            self._view[offset : offset + n] = data
            self._taken.add(offset)
            self.placed += 1
            self.placed_bytes += n
            return offset

    def _relayout(self, n: int) -> bool:
        # Slots are resized only when none is taken: the worker may still be reading them.
        if self._taken:
            return False
        size = -(-n // SLOT_GRANULE) * SLOT_GRANULE
        count = min(MAX_SLOTS, self.limit // size)
        if count < 2:
            return False
        total = size * count
        try:
            if total > self._size:
                if self.reserve:
                    os.posix_fallocate(self.fd, 0, total)  # ENOSPC here, not SIGBUS later
                else:
                    os.ftruncate(self.fd, total)
                self._size = total
            if self._view is not None:
                self._view.release()
            if self._map is not None:
                self._map.close()
            self._map = mmap.mmap(self.fd, self._size)
        except (OSError, ValueError, BufferError) as exc:
            log.warning("shared memory unavailable, using the socket: %s", exc)
            self._close_locked()
            return False
        self._view = memoryview(self._map)
        self.slot_size = size
        # Reversed so pop() hands out the lowest offsets first: fewer pages touched.
        self._free = [i * size for i in reversed(range(count))]
        return True

    def release(self, offsets: list[int]) -> None:
        """The worker is done with these slots."""
        with self._lock:
            for off in offsets:
                if off in self._taken:
                    self._taken.discard(off)
                    self._free.append(off)

    @property
    def in_use(self) -> int:
        return len(self._taken)

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._free = []
        self._taken.clear()
        if self._view is not None:
            with contextlib.suppress(BufferError):
                self._view.release()
            self._view = None
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        with contextlib.suppress(OSError):
            os.close(self.fd)


class SharedView:
    """The worker's side: resolves markers to views of the segment (and of the coordinator's
    buffer pool, through *pool*, see :mod:`._poolview`), and frees their slots once nothing
    refers to them. Used from the worker's main thread only. *fd* is ``None`` when the worker
    has no segment of its own."""

    def __init__(self, fd: int | None, token: str, pool: PoolView | None = None) -> None:
        self.fd = fd
        self.token = token if fd is not None else None
        self.pool = pool
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        # (offset, weak reference to the array that owns the slot's memory, or None when the
        # data was copied out and nothing can refer to the slot)
        self._claims: list[tuple[int, weakref.ref[Any] | None]] = []

    @property
    def pool_token(self) -> str | None:
        """Said in the hello: the pool is mapped here (None: it is not)."""
        return self.pool.token if self.pool is not None else None

    def view(self, offset: Any, nbytes: int, segment: int = 0) -> memoryview:
        """The segment's bytes ``[offset, offset + nbytes)``; a :class:`ProtocolError` for a
        reference outside it. The slot counts as in use until :meth:`collect` finds nothing
        :meth:`hold`-ing it."""
        if segment:
            if self.pool is None:
                raise ProtocolError("a buffer-pool marker, but the pool is not mapped here")
            return self.pool.view(offset, nbytes)
        if self.fd is None:
            raise ProtocolError("a shared-memory marker, but no segment of our own")
        if type(offset) is not int or offset < 0 or nbytes < 0:
            raise ProtocolError("malformed shared-memory reference")
        end = offset + nbytes
        view = self._view
        if view is None or end > view.nbytes:
            # The coordinator grew the segment: map it again at its current size. The old
            # mapping stays alive as long as arrays on it do.
            try:
                size = os.fstat(self.fd).st_size
            except OSError as exc:
                raise ProtocolError(f"shared memory unavailable: {exc}") from None
            if end > size:
                raise ProtocolError(
                    f"shared-memory reference [{offset}, {end}) beyond the segment ({size} bytes)"
                )
            try:
                self._map = mmap.mmap(self.fd, size)
            except (OSError, ValueError) as exc:
                raise ProtocolError(f"cannot map shared memory: {exc}") from None
            view = self._view = memoryview(self._map)
        self._claims.append((offset, None))
        return view[offset:end]

    def hold(self, offset: int, owner: Any, segment: int = 0) -> None:
        """*owner* (an array every view of the slot's data is based on) now keeps the slot at
        *offset* in use for as long as it lives."""
        if segment:
            assert self.pool is not None
            self.pool.hold(offset, owner)
            return
        for i in range(len(self._claims) - 1, -1, -1):
            if self._claims[i][0] == offset:
                self._claims[i] = (offset, weakref.ref(owner))
                return

    @property
    def held(self) -> int:
        return len(self._claims) + (self.pool.held if self.pool is not None else 0)

    def freed(self) -> dict[str, list[int]]:
        """What to tell the coordinator: ``{"f": own offsets, "fp": pool offsets}`` freed since
        the last call (only the non-empty lists)."""
        out: dict[str, list[int]] = {}
        own = self.collect()
        if own:
            out["f"] = own
        if self.pool is not None and self.pool.held:
            pooled = self.pool.collect()
            if pooled:
                out["fp"] = pooled
        return out

    def collect(self) -> list[int]:
        """Offsets of slots nothing refers to any more; they are forgotten here and must be
        reported to the coordinator."""
        if not self._claims:
            return []
        freed: list[int] = []
        kept: list[tuple[int, weakref.ref[Any] | None]] = []
        for offset, ref in self._claims:
            if ref is not None and ref() is not None:
                kept.append((offset, ref))
            else:
                freed.append(offset)
        self._claims = kept
        return freed

    def close(self) -> None:
        self._claims = []
        self._view = None
        self._map = None
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        if self.pool is not None:
            self.pool.close()
