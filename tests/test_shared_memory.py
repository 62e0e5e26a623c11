"""Shared memory between the coordinator and the workers it spawns: slots, their release, the
markers that name them, and whole runs with real processes (kill -9 included)."""

from __future__ import annotations

import hashlib
import mmap
import os
import signal

import pytest

np = pytest.importorskip("numpy", reason="shared-memory arrays need NumPy")
from conftest import wait_for  # noqa: E402
from sample_workers import Echo  # noqa: E402
from shm_workers import BytesInfo, Describe, Keeper, Scribble, digest  # noqa: E402

from pytaskqml import Coordinator  # noqa: E402
from pytaskqml.buffers import shm as _shm  # noqa: E402
from pytaskqml.errors import ProtocolError  # noqa: E402
from pytaskqml.wire import codec as _codec  # noqa: E402

T = 30.0


def _segment() -> int:
    segment = _shm.create_segment("test")
    assert segment is not None
    return segment[0]


def _probe() -> bool:
    segment = _shm.create_segment("probe")
    if segment is None:
        return False
    os.close(segment[0])
    return True


pytestmark = pytest.mark.skipif(not _probe(), reason="no shared memory on this platform")


def _frames(n: int, shape: tuple[int, ...] = (240, 320, 3), seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _shared_workers(coord: Coordinator) -> list[int]:
    return [w.shared_buffers for w in coord.statistics().workers if w.shared_buffers is not None]


def _open_fds() -> set[int]:
    return (
        {int(fd) for fd in os.listdir("/proc/self/fd")} if os.path.isdir("/proc/self/fd") else set()
    )


# --------------------------------------------------------------------------- the arena alone


def test_arena_places_copies_and_runs_out_of_slots() -> None:
    fd = _segment()
    arena = _shm.Arena(fd, token="t", limit=4 * _shm.SLOT_GRANULE)
    data = bytes(range(256)) * 1024  # 256 KiB
    offsets = [arena.place(memoryview(data)) for _ in range(5)]
    assert offsets[:4] == [0, 1 << 20, 2 << 20, 3 << 20]
    assert offsets[4] is None  # four slots, all taken: the caller sends it inline
    assert (arena.placed, arena.fallbacks, arena.in_use) == (4, 1, 4)
    # What was written is in the segment, where another process would map it.
    with mmap.mmap(fd, 4 << 20) as m:
        assert m[(2 << 20) : (2 << 20) + len(data)] == data
    arena.release([1 << 20, 12345])  # an unknown offset is ignored
    assert arena.in_use == 3
    assert arena.place(memoryview(data)) == 1 << 20
    arena.close()
    arena.close()  # twice is fine
    assert arena.place(memoryview(data)) is None
    with pytest.raises(OSError):
        os.fstat(fd)  # the descriptor is closed


def test_arena_resizes_slots_only_when_none_is_taken() -> None:
    fd = _segment()
    arena = _shm.Arena(fd, token="t", limit=8 * _shm.SLOT_GRANULE)
    small = memoryview(bytes(100_000))
    big = memoryview(bytes(3 * _shm.SLOT_GRANULE))
    first = arena.place(small)
    assert first == 0 and arena.slot_size == _shm.SLOT_GRANULE
    assert arena.place(big) is None  # a slot is taken: no resize now
    arena.release([first])
    assert arena.place(big) == 0
    assert arena.slot_size == 3 * _shm.SLOT_GRANULE
    assert arena.place(memoryview(bytes(9 * _shm.SLOT_GRANULE))) is None  # not 2 slots' room
    arena.close()


def test_shared_view_checks_references_and_frees_slots_when_arrays_die() -> None:
    fd = _segment()
    arena = _shm.Arena(fd, token="t")
    view = _shm.SharedView(os.dup(fd), "t")
    try:
        frames = _frames(3, (64, 64, 4))
        text, bufs = _codec.encode(
            [frames[0], {"b": frames[1].tobytes()}, frames[2][:, :, 1]],
            place=arena.place,
            min_shared=1,
        )
        assert bufs == [] and arena.in_use == 3
        out = _codec.decode(text, (), view)
        assert out[1]["b"] == frames[1].tobytes()
        np.testing.assert_array_equal(out[0], frames[0])
        np.testing.assert_array_equal(out[2], frames[2][:, :, 1])
        assert out[0].flags.writeable
        # The bytes were copied out: that slot is free at once. The arrays hold theirs.
        assert view.collect() == [1 << 20]
        keep = out[2][3:5]  # a view of a view keeps the slot too
        del out
        assert view.collect() == [0]
        assert view.held == 1
        del keep
        assert view.collect() == [2 << 20]
        assert view.collect() == []

        for bad in ([-1, 10], ["0", 10], [0, 1 << 40]):
            with pytest.raises(ProtocolError):
                _codec.decode('{"\\u0000pq":' + str(bad).replace("'", '"') + "}", (), view)
        with pytest.raises(ProtocolError):
            _codec.decode('{"\\u0000pq":["|u1",[1,1],268435456000]}', (), view)
        # Without shared memory a reference to it is refused, not followed.
        with pytest.raises(ProtocolError, match="no shared memory"):
            _codec.decode('{"\\u0000pq":[0,10]}')
        with pytest.raises(ProtocolError, match="no shared memory"):
            _codec.decode('{"\\u0000pq":["|u1",[10],0]}')
    finally:
        view.close()
        arena.close()


def test_small_buffers_stay_inline() -> None:
    fd = _segment()
    arena = _shm.Arena(fd, token="t")
    try:
        small = np.zeros(1000, dtype=np.float32)
        text, bufs = _codec.encode([small], place=arena.place, min_shared=_shm.MIN_BYTES)
        assert len(bufs) == 1 and arena.placed == 0
        np.testing.assert_array_equal(_codec.decode(text, bufs)[0], small)
    finally:
        arena.close()


# --------------------------------------------------------------------------- real processes


def test_spawned_workers_read_frames_from_shared_memory_in_order() -> None:
    frames = _frames(120)
    frames += [f.astype(np.float32) for f in _frames(20, (128, 128), seed=2)]
    frames += [_frames(1, (480, 640, 3), seed=3)[0][::2, ::2]]  # not contiguous
    with Coordinator() as coord:
        pids = coord.spawn(Describe, processes=2)
        out = list(coord.map(frames, buffersize=32))
        assert [o[0] for o in out] == [digest(f) for f in frames]
        assert [o[1] for o in out] == [list(f.shape) for f in frames]
        assert [o[2] for o in out] == [f.dtype.str for f in frames]
        assert {o[3] for o in out} == set(pids)
        placed = _shared_workers(coord)
        assert len(placed) == 2 and sum(placed) >= len(frames) * 3 // 4
        # Every slot comes back once the workers are done with the arrays.
        wait_for(
            lambda: all(w.shared_in_use == 0 for w in coord.statistics().workers),
            what="all shared slots released",
        )


def test_shared_memory_can_be_turned_off() -> None:
    with Coordinator(shared_memory=False) as coord:
        coord.spawn(Describe, processes=1)
        frames = _frames(5)
        assert [o[0] for o in coord.map(frames)] == [digest(f) for f in frames]
        (w,) = coord.statistics().workers
        assert w.shared_buffers is None and w.shared_in_use is None


def test_arrays_a_worker_keeps_are_never_overwritten() -> None:
    frames = _frames(300, (160, 160, 3))  # 75 KiB each: above MIN_BYTES
    with Coordinator() as coord:
        coord.spawn(Keeper, processes=2, kwargs={"keep": 40})
        out = list(coord.map(frames, buffersize=64))
        assert out == [0] * len(frames)  # no kept array ever changed under the worker
        assert sum(_shared_workers(coord)) >= len(frames) // 2
        # The kept arrays hold their slots; the others were released.
        in_use = sum(w.shared_in_use or 0 for w in coord.statistics().workers)
        assert 0 < in_use <= 2 * 40 + 2 * 8


def test_echoed_arrays_and_large_bytes_come_back_whole() -> None:
    frames = _frames(40)
    blobs = [os.urandom(200_000) for _ in range(10)]
    with Coordinator() as coord:
        coord.spawn(BytesInfo, processes=1)
        got = list(coord.map(blobs))
        assert got == [["bytes", len(b), hashlib.sha256(b).hexdigest()[:16]] for b in blobs]
    with Coordinator() as coord:
        coord.spawn(Echo, processes=2)
        back = list(coord.map(frames, buffersize=8))
        for a, b in zip(frames, back, strict=True):
            np.testing.assert_array_equal(a, b)
        wait_for(
            lambda: all(w.shared_in_use == 0 for w in coord.statistics().workers),
            what="echoed slots released",
        )


def test_a_worker_writing_into_its_input_does_not_touch_the_callers_array() -> None:
    frames = _frames(10)
    before = [digest(f) for f in frames]
    with Coordinator() as coord:
        coord.spawn(Scribble, processes=1)
        assert list(coord.map(frames)) == [7 * f.size for f in frames]
    assert [digest(f) for f in frames] == before


def test_killed_worker_releases_its_segment_and_loses_nothing() -> None:
    frames = _frames(400, (160, 200, 3))
    expected = [digest(f) for f in frames]
    fds_before = _open_fds()
    with Coordinator(max_retries=3) as coord:
        pids = coord.spawn(Describe, processes=2)
        out = []
        for i, o in enumerate(coord.map(frames, buffersize=16)):
            out.append(o)
            if i == 100:
                os.kill(pids[0], signal.SIGKILL)
        assert [o[0] for o in out] == expected
        assert coord.wait_until(lambda s: len(s.workers) == 2, 15), "replacement attached"
        # The replacement has a segment of its own, and uses it.
        more = _frames(200, (480, 640, 3), seed=9)
        assert [o[0] for o in coord.map(more, buffersize=64)] == [digest(f) for f in more]
        (new,) = [w for w in coord.statistics().workers if w.pid not in pids]
        assert new.shared_buffers
    assert _open_fds() - fds_before == set()  # the dead worker's segment was closed too


def test_a_size_limited_tmpfs_segment_is_reserved_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without memfd the segment is a file in /dev/shm, whose size limit would turn a write
    past it into SIGBUS: its pages are allocated first, and a full tmpfs means the socket."""
    if not (os.path.isdir("/dev/shm") and hasattr(os, "posix_fallocate")):
        pytest.skip("no /dev/shm here")
    monkeypatch.delattr(os, "memfd_create", raising=False)
    segment = _shm.create_segment("test")
    assert segment is not None and segment[1] is True
    arena = _shm.Arena(segment[0], token="t", reserve=segment[1])
    assert arena.limit == _shm.RESERVED_ARENA_BYTES
    assert arena.place(memoryview(bytes(100_000))) == 0
    assert os.fstat(arena.fd).st_blocks * 512 >= _shm.RESERVED_ARENA_BYTES  # allocated
    arena.close()

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    segment = _shm.create_segment("test")
    assert segment is not None
    arena = _shm.Arena(segment[0], token="t", reserve=segment[1])
    assert arena.place(memoryview(bytes(100_000))) is None  # the caller sends it inline
    assert arena.fallbacks == 1 and arena.place(memoryview(bytes(100_000))) is None
    arena.close()
