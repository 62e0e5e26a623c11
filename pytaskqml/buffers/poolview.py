"""A spawned worker's view of its coordinator's buffer pool (see :mod:`._bufpool`).

Every worker of a coordinator maps the same pool, and a pool buffer is the producer's own
array: what a worker writes into the array it receives must reach neither the producer nor the
next worker a task runs on after this one is killed. So the pool is mapped *private*
(``MAP_PRIVATE``, copy-on-write): the worker reads the coordinator's pages in place, and the
first write to a page gives the worker a copy of that page of its own.

Such a copy would outlive the array, though: the mapping keeps it, and when the coordinator
later puts another frame in that slot this worker would still see its old private page. So
when the last array on a stretch of the pool goes, a stretch that may have been written is
*scrubbed*: ``madvise(MADV_DONTNEED)`` drops the private pages and the next read maps the
pool's again. Scrubbing every time would cost more than the copy it saves (the pages must be
faulted in again: 60-200 us per 640x480 frame on the project's machine), so it is done only
when it can be needed:

* a write to a page not yet copied always faults, and the kernel counts the fault in the
  process's ``ru_minflt``/``ru_majflt``; if no fault at all happened since the stretch was
  first claimed, nothing was written (a worker process with tuned malloc takes no faults per
  frame once warm);
* otherwise ``/proc/self/pagemap`` says which pages are private copies (present, not "file
  page or shared"); only when one is there - or pagemap cannot be read - is it scrubbed.

(A write by the kernel on the process's behalf through ``get_user_pages`` - ``O_DIRECT`` reads
into the received array, say - is not counted as the process's fault; receiving a frame and
then reading a file into it with ``O_DIRECT`` is the one way to defeat the check.)

Claims are tracked per *granule* (:data:`._shm.SLOT_GRANULE`): the pool's slots are whole,
aligned granules, so granules of different slots never overlap, and a granule is only scrubbed
once no claim on it is left.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import weakref
from typing import Any

from ..errors import ProtocolError

log = logging.getLogger(__name__)

try:
    import resource as _resource
except ImportError:  # pragma: no cover - not on Windows, where there is no pool either
    _resource = None  # type: ignore[assignment]

_PAGE = mmap.PAGESIZE
# pagemap entry, top byte: bit 63 "present" (0x80) and bit 61 "file page or shared" (0x20). A
# present page without bit 61 is an anonymous page: this process's private copy.
_PRIVATE_COPY = bytes(1 if (b & 0xA0) == 0x80 else 0 for b in range(256))


def _faults() -> int:
    if _resource is None:
        return -1
    r = _resource.getrusage(_resource.RUSAGE_SELF)
    return int(r.ru_minflt + r.ru_majflt)


# Slots are a whole number of these, so frames of one stream share a layout even when their
# sizes differ a little, and a slot is page-aligned (arrays land on 64-byte boundaries).
SLOT_GRANULE = 1024 * 1024


class PoolView:
    """The pool, mapped copy-on-write into this worker (main thread only)."""

    def __init__(self, fd: int, token: str) -> None:
        self.fd = fd
        self.token: str | None = None  # set once mapped: said in the hello
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._base = 0  # address of the mapping, for pagemap
        # [offset, nbytes, weak reference to the array owning the memory (None until held)]
        self._claims: list[list[Any]] = []
        self._granules: dict[int, int] = {}  # granule -> claims on it
        self._since: dict[int, int] = {}  # granule -> fault count when it was first claimed
        self._pagemap: int | None = None
        self.scrubbed = 0  # granules whose private copies were dropped
        try:
            self._mapped()
        except (OSError, ValueError) as exc:
            log.warning("cannot map the coordinator's buffer pool, copies instead: %s", exc)
            self.close()
            return
        with contextlib.suppress(OSError):
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.token = token

    def _mapped(self) -> None:
        """Map the whole pool (its size is fixed when the coordinator creates it)."""
        size = os.fstat(self.fd).st_size
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_PRIVATE, prot=prot)
        self._view = memoryview(self._map)
        import ctypes  # the mapping's address: where its entries are in pagemap

        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def view(self, offset: Any, nbytes: int) -> memoryview:
        """The pool's bytes ``[offset, offset + nbytes)``, claimed until :meth:`collect` finds
        nothing holding them; a :class:`ProtocolError` for a reference outside the pool."""
        view = self._view
        if view is None:
            raise ProtocolError("a buffer-pool marker, but the pool is not mapped here")
        if type(offset) is not int or offset < 0 or nbytes <= 0 or offset + nbytes > view.nbytes:
            raise ProtocolError(f"buffer-pool reference [{offset}, +{nbytes}) outside the pool")
        faults = -2  # read once, only if a granule is newly claimed
        for g in range(offset // SLOT_GRANULE, (offset + nbytes - 1) // SLOT_GRANULE + 1):
            n = self._granules.get(g, 0)
            if n == 0:
                if faults == -2:
                    faults = _faults()
                self._since[g] = faults
            self._granules[g] = n + 1
        self._claims.append([offset, nbytes, None])
        return view[offset : offset + nbytes]

    def hold(self, offset: int, owner: Any) -> None:
        """*owner* (the array every view of the claim's memory is based on) keeps the claim at
        *offset* for as long as it lives."""
        for claim in reversed(self._claims):
            if claim[0] == offset and claim[2] is None:
                claim[2] = weakref.ref(owner)
                return

    @property
    def held(self) -> int:
        return len(self._claims)

    def collect(self) -> list[int]:
        """Offsets of claims nothing refers to any more (forgotten here, to be reported to the
        coordinator), after scrubbing what they may have left behind."""
        freed: list[int] = []
        kept: list[list[Any]] = []
        emptied: list[int] = []
        for claim in self._claims:
            ref = claim[2]
            if ref is not None and ref() is not None:
                kept.append(claim)
                continue
            offset, nbytes = claim[0], claim[1]
            freed.append(offset)
            for g in range(offset // SLOT_GRANULE, (offset + nbytes - 1) // SLOT_GRANULE + 1):
                n = self._granules[g] - 1
                if n:
                    self._granules[g] = n
                else:
                    del self._granules[g]
                    emptied.append(g)
        self._claims = kept
        if emptied:
            now = _faults()
            for g in emptied:
                since = self._since.pop(g)
                if now < 0 or now != since:
                    self._scrub(g)
        return freed

    def _scrub(self, granule: int) -> None:
        """Drop this process's private copies of the granule's pages, if it has any."""
        m = self._map
        if m is None:
            return
        start = granule * SLOT_GRANULE
        length = min(SLOT_GRANULE, len(m) - start)
        if self._pagemap is not None:
            try:
                pages = length // _PAGE
                first = (self._base + start) // _PAGE
                raw = os.pread(self._pagemap, pages * 8, first * 8)
                if len(raw) == pages * 8 and b"\x01" not in raw[7::8].translate(_PRIVATE_COPY):
                    return  # every present page is still the pool's
            except OSError:
                pass  # cannot tell: scrub
        try:
            m.madvise(mmap.MADV_DONTNEED, start, length)
        except (OSError, ValueError, AttributeError) as exc:
            # A fresh mapping has no private pages at all; arrays still on this one keep it.
            log.warning("cannot drop private pages of the buffer pool (%s); mapping it again", exc)
            try:
                self._mapped()
            except (OSError, ValueError) as again:
                log.error("cannot map the buffer pool again: %s", again)
                raise ProtocolError(f"buffer pool unusable here: {again}") from None
        self.scrubbed += 1

    def close(self) -> None:
        self._claims = []
        self._view = None
        self._map = None  # arrays still on it keep the mapping alive
        self.token = None
        for fd in (self.fd, self._pagemap):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = -1
        self._pagemap = None
