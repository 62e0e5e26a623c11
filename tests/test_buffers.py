"""``coord.buffer()``: arrays produced straight into the pool every spawned worker maps - the
pool alone, the markers that name it, the worker's copy-on-write view, and whole runs with real
processes (kill -9 included)."""

from __future__ import annotations

import gc
import itertools
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

np = pytest.importorskip("numpy", reason="coord.buffer() needs NumPy")
from conftest import wait_for  # noqa: E402
from sample_workers import Echo  # noqa: E402
from shm_workers import (  # noqa: E402
    Describe,
    DigestThenScribble,
    GatedDescribe,
    Keeper,
    ScribbleAndDie,
    digest,
)

from pytaskqml import Coordinator  # noqa: E402
from pytaskqml.buffers import pool as _bufpool  # noqa: E402
from pytaskqml.buffers import poolview as _poolview  # noqa: E402
from pytaskqml.buffers import shm as _shm  # noqa: E402
from pytaskqml.core.tasks import Task  # noqa: E402
from pytaskqml.engine.intake import Intake  # noqa: E402
from pytaskqml.errors import ProtocolError  # noqa: E402
from pytaskqml.wire import codec as _codec  # noqa: E402

MIB = 1 << 20
pytestmark = pytest.mark.skipif(
    not _bufpool.pool_supported() or _shm.create_segment("probe") is None,
    reason="no buffer pool on this platform (Linux with shared memory only)",
)


def _pool(nbytes: int = 8 * MIB) -> _bufpool.BufferPool:
    pool = _bufpool.BufferPool.create(nbytes, lambda: None)
    assert pool is not None
    return pool


def _frame(i: int, shape: tuple[int, ...] = (256, 256, 3)) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _in_use(coord: Coordinator) -> int:
    stats = coord.statistics().buffers
    assert stats is not None
    return stats.in_use


# --------------------------------------------------------------------------- the pool alone


def test_buffers_come_from_the_pool_and_return_when_dropped() -> None:
    with Coordinator() as coord:
        buf = coord.buffer((480, 640, 3))
        assert buf.shape == (480, 640, 3) and buf.dtype == np.uint8 and buf.flags.writeable
        floats = coord.buffer(100_000, "float32")
        assert floats.shape == (100_000,) and floats.dtype == np.float32
        small = coord.buffer((10, 10))  # under 64 KiB: travels inline anyway
        s = coord.statistics().buffers
        assert s is not None
        assert (s.pooled, s.plain, s.in_use, s.slot_bytes) == (2, 1, 2, MIB)
        assert s.capacity == _bufpool.DEFAULT_POOL_BYTES // MIB
        view = buf[10:20]  # a view keeps the buffer's memory taken
        del buf, floats, small
        assert _in_use(coord) == 1
        del view
        assert _in_use(coord) == 0  # never submitted, garbage-collected: returned


def test_a_full_pool_hands_out_plain_arrays_or_waits_when_asked() -> None:
    with Coordinator(max_buffer_bytes=2 * MIB) as coord:
        a, b = coord.buffer(MIB), coord.buffer(MIB)
        assert _in_pool(coord, a) and _in_pool(coord, b)
        full = coord.buffer(MIB)  # no room: a plain array at once
        assert not _in_pool(coord, full) and full.shape == (MIB,)
        got: list[np.ndarray] = []

        def waiter() -> None:
            got.append(coord.buffer(MIB, wait=30))

        thread = threading.Thread(target=waiter)
        thread.start()
        del a  # wakes the waiter (or it finds the slot free when it looks)
        thread.join(30)
        assert not thread.is_alive() and got and _in_pool(coord, got[0])
        big = coord.buffer(3 * MIB)  # larger than a slot, and slots are taken: a plain array
        assert not _in_pool(coord, big)
        s = coord.statistics().buffers
        assert s is not None and (s.pooled, s.plain, s.in_use) == (3, 2, 2)
        del b
        got.clear()
        assert _in_use(coord) == 0


def _in_pool(coord: Coordinator, arr: np.ndarray) -> bool:
    pool = coord._buffers.pool
    assert pool is not None
    offset = arr.__array_interface__["data"][0] - pool._addr
    return 0 <= offset < pool._size


def test_a_buffer_in_a_reference_cycle_comes_back_once_the_pool_is_full() -> None:
    gc.disable()
    try:
        with Coordinator(max_buffer_bytes=2 * MIB) as coord:
            for _ in range(2):
                cycle: list[object] = [coord.buffer(MIB)]
                cycle.append(cycle)
            del cycle
            assert _in_use(coord) == 2
            assert _in_pool(coord, coord.buffer(MIB, wait=30))  # the collector ran
    finally:
        gc.enable()


def test_drops_while_the_pool_is_locked_are_picked_up_when_it_is_released() -> None:
    """A weakref callback never waits for the pool's lock: it leaves the slot to whoever holds
    the lock."""
    pool = _pool()
    arr = pool.take((MIB,), np.dtype(np.uint8), 1.0)
    assert pool.in_use == 1
    pool._lock.acquire()
    del arr  # the callback runs here, with the lock taken
    assert pool._dropped
    pool._unlock()
    assert pool.in_use == 0 and not pool._dropped
    pool.close()


def test_pool_buffers_are_recognised_at_encode_time_without_a_copy() -> None:
    pool = _pool()
    try:
        buf = pool.take((512, 512), np.dtype(np.uint8), 1.0)
        buf[:] = 3
        lend = lambda arr: pool.lend(arr, "w")  # noqa: E731
        text, bufs = _codec.encode(
            [buf, {"frame": buf[256:]}, buf[:, ::2], np.ones(100_000, np.uint8)],
            lend=lend,
            min_shared=_shm.MIN_BYTES,
        )
        # The buffer and its contiguous half by reference; the strided view and the plain
        # array travel in the frame.
        assert len(bufs) == 2
        assert text.count('"\\u0000pq":["|u1",') == 4
        assert ",0,1]}" in text and f",{256 * 512},1]" in text
        assert pool.lent == 2 and pool.in_use == 1
        pool.returned("w", [0, 256 * 512, 12345])  # an offset it does not hold is ignored
        del buf
        assert pool.in_use == 0
        # Held by a worker after the producer let go: the slot stays taken until returned.
        buf = pool.take((512, 512), np.dtype(np.uint8), 1.0)
        assert pool.lend(buf, "w") == 0 and pool.lend(buf, "w") == 0
        del buf
        pool.returned("w", [0])
        assert pool.in_use == 1
        pool.forget("w")  # the worker died
        assert pool.in_use == 0
    finally:
        pool.close()


def test_pool_markers_are_checked() -> None:
    pool = _pool()
    view = _shm.SharedView(None, "", pool=_poolview.PoolView(os.dup(pool.fd), pool.token))
    try:
        assert view.pool_token == pool.token and view.token is None
        for bad in (
            '["|u1",[10],0,2]',  # no such segment
            '["|u1",[10],0,"1"]',
            '["|u1",[10],-1,1]',
            f'["|u1",[10],{8 * MIB - 5},1]',  # past the end
        ):
            with pytest.raises(ProtocolError):
                _codec.decode('{"\\u0000pq":' + bad + "}", (), view)
        with pytest.raises(ProtocolError, match="no shared memory"):
            _codec.decode('{"\\u0000pq":["|u1",[10],0,1]}')
        plain = _shm.SharedView(os.dup(pool.fd), "t")  # a segment of its own, no pool
        with pytest.raises(ProtocolError, match="pool is not mapped"):
            _codec.decode('{"\\u0000pq":["|u1",[10],0,1]}', (), plain)
        plain.close()
    finally:
        view.close()
        pool.close()


def test_a_workers_writes_stay_private_and_are_dropped_before_the_slot_is_reused() -> None:
    pool = _pool()
    view = _poolview.PoolView(os.dup(pool.fd), pool.token)
    shared = _shm.SharedView(None, "", pool=view)
    try:
        buf = pool.take((MIB,), np.dtype(np.uint8), 1.0)
        buf[:] = 1
        text, _ = _codec.encode([buf], lend=lambda a: pool.lend(a, "w"), min_shared=1)
        (got,) = _codec.decode(text, (), shared)
        assert got.flags.writeable and (got == 1).all()
        got[:100] = 9  # the worker's own copy of that page
        assert (buf[:100] == 1).all()  # the producer's array is untouched
        assert shared.freed() == {}  # still held
        del got
        assert shared.freed() == {"fp": [0]}
        assert view.scrubbed == 1
        buf[:] = 2  # the slot's next frame, written by the coordinator
        (again,) = _codec.decode(text, (), shared)
        assert (again == 2).all()  # not the worker's stale private page
        del again
        shared.freed()
    finally:
        shared.close()
        pool.close()


def test_bad_arguments_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="max_buffer_bytes"):
        Coordinator(max_buffer_bytes=-1)
    with Coordinator(max_buffer_bytes=0) as coord:  # no pool: plain arrays
        assert coord.buffer(MIB).nbytes == MIB
        with pytest.raises(TypeError):
            coord.buffer((2.5, 3))
        with pytest.raises(TypeError, match="object"):
            coord.buffer(10, object)
        with pytest.raises(ValueError, match="negative"):
            coord.buffer((-1, 3))
        s = coord.statistics().buffers
        assert s is not None and (s.capacity, s.plain) == (0, 1)


def test_without_shared_memory_buffers_are_plain_arrays() -> None:
    with Coordinator(shared_memory=False) as coord:
        coord.spawn(Describe, processes=1)
        frames = [_frame(i) for i in range(5)]
        bufs = []
        for f in frames:
            buf = coord.buffer(f.shape)
            np.copyto(buf, f)
            bufs.append(buf)
        assert [o[0] for o in coord.map(bufs)] == [digest(f) for f in frames]
        s = coord.statistics().buffers
        assert s is not None and (s.capacity, s.pooled, s.plain) == (0, 0, 5)


# --------------------------------------------------------------------------- real processes


def _produce(coord: Coordinator, frames: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for f in frames:
        buf = coord.buffer(f.shape, f.dtype)
        np.copyto(buf, f)
        out.append(buf)
    return out


def test_frames_produced_into_buffers_reach_spawned_workers_intact_and_in_order() -> None:
    frames = [_frame(i) for i in range(16)]
    frames += [_frame(i, (100, 100, 4)).astype(np.float32) for i in range(4)]
    with Coordinator() as coord:
        pids = coord.spawn(Describe, processes=2)

        # One buffer per frame, produced as map() reads them.
        items = (_produce(coord, [frames[i % len(frames)]])[0] for i in range(200))
        out = list(coord.map(items, buffersize=32))
        assert [o[0] for o in out] == [digest(frames[i % len(frames)]) for i in range(200)]
        assert {o[3] for o in out} == set(pids)
        s = coord.statistics().buffers
        assert s is not None and s.pooled == 200 and s.lent >= 200
        # Nothing was copied into the workers' own segments.
        assert sum(w.shared_buffers or 0 for w in coord.statistics().workers) == 0
        wait_for(lambda: _in_use(coord) == 0, what="every pool slot returned")


@pytest.mark.slow
def test_no_slot_leaks_after_many_frames() -> None:
    frame = _frame(0)
    with Coordinator(max_buffer_bytes=16 * MIB) as coord:
        coord.spawn(Describe, processes=2)
        # A producer that waits for the pool: every one of its frames goes without a copy.
        futures = []
        for _ in range(1000):
            buf = coord.buffer(frame.shape, wait=30)
            np.copyto(buf, frame)
            futures.append(coord.submit(buf))
        del buf
        assert all(f.result(30)[0] == digest(frame) for f in futures)
        s = coord.statistics().buffers
        assert s is not None and (s.pooled, s.plain, s.capacity) == (1000, 0, 16)
        wait_for(lambda: _in_use(coord) == 0, what="every pool slot returned")
        # map() reads no further ahead than half the pool holds: every frame from the pool.
        out = coord.map(_produce(coord, [frame])[0] for _ in range(1000))
        assert all(o[0] == digest(frame) for o in out)
        s = coord.statistics().buffers
        assert s is not None and (s.pooled, s.plain) == (2000, 0)
        wait_for(lambda: _in_use(coord) == 0, what="every pool slot returned")


@pytest.mark.slow
def test_a_kept_array_is_never_overwritten_in_the_worker_or_the_producer() -> None:
    with Coordinator(max_buffer_bytes=128 * MIB) as coord:
        coord.spawn(Keeper, processes=2, kwargs={"keep": 20})
        kept = []
        results = []
        for i in range(300):
            (buf,) = _produce(coord, [_frame(i % 50)])
            results.append(coord.submit(buf))
            if i % 10 == 0:
                kept.append((buf, digest(_frame(i % 50))))
            del buf
        assert [f.result(30) for f in results] == [0] * 300  # no kept view changed
        assert all(digest(b) == d for b, d in kept)
        assert 0 < _in_use(coord) <= 2 * 20 + len(kept) + 16


def test_a_worker_writing_into_its_buffer_changes_neither_the_producer_nor_the_next_frame() -> None:
    frames = [_frame(i) for i in range(6)]
    with Coordinator(max_buffer_bytes=4 * MIB) as coord:  # 4 slots: each reused many times
        coord.spawn(DigestThenScribble, processes=2)
        bufs = _produce(coord, frames[:2])
        assert list(coord.map(bufs)) == [digest(f) for f in frames[:2]]
        assert [digest(b) for b in bufs] == [digest(f) for f in frames[:2]]
        del bufs
        more = coord.map(_produce(coord, [frames[i % 6]])[0] for i in range(120))
        assert list(more) == [digest(frames[i % 6]) for i in range(120)]


def test_a_task_rerun_after_kill_9_reads_the_frame_the_producer_wrote(tmp_path: Path) -> None:
    frames = [_frame(i) for i in range(4)]
    with Coordinator(max_retries=2) as coord:
        coord.spawn(ScribbleAndDie, processes=2, kwargs={"flag": str(tmp_path / "died")})
        out = list(coord.map(_produce(coord, frames)))
        assert out == [digest(f) for f in frames]  # the one that died wrote zeros first
        assert (tmp_path / "died").exists() and coord.statistics().workers_lost >= 1
        wait_for(lambda: _in_use(coord) == 0, what="the dead worker's holds dropped")


def test_a_replacement_worker_maps_the_pool_too() -> None:
    with Coordinator() as coord:
        (pid,) = coord.spawn(Describe, processes=1)
        os.kill(pid, signal.SIGKILL)
        assert coord.wait_until(
            lambda s: s.restarts >= 1 and len(s.workers) == 1 and s.workers[0].pid != pid, 30
        )
        before = coord.statistics().buffers
        frames = [_frame(i) for i in range(10)]
        assert [o[0] for o in coord.map(_produce(coord, frames))] == [digest(f) for f in frames]
        after = coord.statistics().buffers
        assert before is not None and after is not None and after.lent - before.lent == 10


def test_thread_workers_get_a_copy_of_a_pool_buffer() -> None:
    with Coordinator() as coord:
        coord.add_local(DigestThenScribble())
        frames = [_frame(i) for i in range(20)]
        bufs = _produce(coord, frames)
        s = coord.statistics().buffers
        assert s is not None and s.pooled == 20  # a pool without a spawned worker too
        assert list(coord.map(bufs)) == [digest(f) for f in frames]
        assert [digest(b) for b in bufs] == [digest(f) for f in frames]  # never written
        del bufs
        wait_for(lambda: _in_use(coord) == 0, what="every pool slot returned")


def test_pool_buffers_inside_dicts_are_sent_by_reference_and_echoed_whole() -> None:
    with Coordinator() as coord:
        coord.spawn(Echo, processes=2)
        frames = [_frame(i, (300, 300)) for i in range(12)]
        payloads = [{"i": i, "frame": b} for i, b in enumerate(_produce(coord, frames))]
        for i, (f, back) in enumerate(zip(frames, coord.map(payloads), strict=True)):
            assert back["i"] == i
            np.testing.assert_array_equal(back["frame"], f)
        s = coord.statistics().buffers
        assert s is not None and s.lent == 12


def test_tmpfs_pool_without_memfd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without memfd the pool is an unlinked file in /dev/shm, reserved up front; without
    either, buffers are plain arrays. Both reach spawned workers intact."""
    if not (os.path.isdir("/dev/shm") and hasattr(os, "posix_fallocate")):
        pytest.skip("no /dev/shm here")
    monkeypatch.delattr(os, "memfd_create", raising=False)
    frames = [_frame(i) for i in range(8)]
    with Coordinator(max_buffer_bytes=1 << 40) as coord:
        coord.spawn(Describe, processes=1)
        assert [o[0] for o in coord.map(_produce(coord, frames))] == [digest(f) for f in frames]
        s = coord.statistics().buffers
        assert s is not None and s.capacity == _shm.RESERVED_ARENA_BYTES // MIB and s.lent == 8
    monkeypatch.setattr(_shm, "create_segment", lambda name: None)
    with Coordinator() as coord:
        coord.spawn(Describe, processes=1)
        assert [o[0] for o in coord.map(_produce(coord, frames))] == [digest(f) for f in frames]
        s = coord.statistics().buffers
        assert s is not None and (s.capacity, s.plain) == (0, 8)


def test_the_pool_fd_and_mapping_go_at_shutdown() -> None:
    def fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    before = fds()
    with Coordinator() as coord:
        coord.spawn(Describe, processes=1)
        kept = _produce(coord, [_frame(1)])[0]
        assert [o[0] for o in coord.map([kept])] == [digest(_frame(1))]
        assert len(fds() - before) >= 2  # the pool and the worker's segment, at least
    np.testing.assert_array_equal(kept, _frame(1))  # it outlives its coordinator, readable
    del kept  # and the mapping (with the descriptor mmap keeps) goes with the last array
    assert fds() - before == set()


# --------------------------------------------------------------------------- slots of any size


def test_slots_of_different_sizes_share_the_pool() -> None:
    """The first buffer does not fix the slot size: a larger one later still comes from the
    pool, and freed slots are merged to make room for larger ones."""
    with Coordinator(max_buffer_bytes=16 * MIB) as coord:
        small = [coord.buffer((480, 640, 3)) for _ in range(4)]  # 1 MiB slots
        big = coord.buffer((1080, 1920, 3))  # 6 MiB: a slot of 6 granules
        assert all(_in_pool(coord, a) for a in [*small, big])
        s = coord.statistics().buffers
        assert s is not None and (s.slot_bytes, s.capacity, s.plain) == (6 * MIB, 2, 0)
        del big
        # 16 granules: 10 left untouched, 6 freed by the big one, 4 taken by the small ones.
        # Two more big ones need the freed slot merged with the untouched tail.
        bigs = [coord.buffer((1080, 1920, 3)) for _ in range(2)]
        assert all(_in_pool(coord, b) for b in bigs)
        del small
        # Four freed 1 MiB slots next to each other make room for one more 4 MiB buffer.
        four = coord.buffer(4 * MIB)
        assert _in_pool(coord, four)
        s = coord.statistics().buffers
        assert s is not None and s.plain == 0 and s.in_use == 3


def test_random_slots_never_overlap() -> None:
    """Any sequence of takes and drops of mixed sizes: live slots never share a byte, and
    what is freed is found again."""
    rng = np.random.default_rng(20261207)
    pool = _pool(32 * MIB)
    live: list[np.ndarray] = []
    for _ in range(2000):
        if live and rng.random() < 0.45:
            live.pop(int(rng.integers(len(live))))
            continue
        arr = pool.take((int(rng.integers(1, 5 * MIB)),), np.dtype(np.uint8), 0.0)
        if arr is not None:
            live.append(arr)
        spans = sorted(
            (a.__array_interface__["data"][0], a.__array_interface__["data"][0] + a.nbytes)
            for a in live
        )
        assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
        assert all(start >= pool._addr and end <= pool._addr + pool._size for start, end in spans)
    live.clear()
    del arr
    assert pool.in_use == 0
    # Everything merges back: a buffer of half the pool fits again.
    assert pool.take((16 * MIB,), np.dtype(np.uint8), 0.0) is not None


# --------------------------------------------------------------------------- after submitting


def test_a_submitted_buffer_is_read_only_until_its_task_is_over(tmp_path: Path) -> None:
    """Writing the next frame into a buffer already submitted would change what its task
    computes on (the worker reads the producer's memory): it raises instead, and the array is
    writable again once its result is in."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    with Coordinator() as coord:
        coord.spawn(GatedDescribe, processes=1)
        frame = _frame(1)
        (buf,) = _produce(coord, [frame])
        held = coord.submit(str(gate))  # the only worker waits on the gate: buf's task cannot end
        future = coord.submit(buf)
        with pytest.raises(ValueError, match="read-only"):
            np.copyto(buf, _frame(2))
        assert not future.done()
        with open(gate, "w") as g:
            g.write("open")
        assert held.result(30) == "open"
        assert future.result(30)[0] == digest(frame)
        del future
        wait_for(lambda: buf.flags.writeable, what="the buffer writable again")
        np.copyto(buf, _frame(2))  # the producer may draw on it now


def test_a_buffer_in_two_tasks_is_writable_again_when_both_are_over() -> None:
    pool = _pool()
    intake = Intake(None, max_frame_size=1 << 30, pool=lambda: pool)  # type: ignore[arg-type]
    buf = pool.take((MIB,), np.dtype(np.uint8), 0.0)
    first = Task(1, {"frame": buf}, MIB, None, 0, 0.0)
    second = Task(2, [buf], MIB, None, 1, 0.0)
    view = buf[:10]
    third = Task(3, view, 10, None, 2, 0.0)  # a view submitted: that view is read-only
    assert intake.freeze(first) == intake.freeze(second) == intake.freeze(third) == 8
    assert not buf.flags.writeable and not view.flags.writeable
    del third
    assert view.flags.writeable
    del first
    assert not buf.flags.writeable
    del second
    assert buf.flags.writeable


def test_map_reads_ahead_no_further_than_the_pool_holds() -> None:
    """A fresh buffer per frame fed to map() with its default read-ahead: every frame comes
    from the pool (none falls back to a copy), even when the pool holds fewer frames than
    map()'s buffer would otherwise be."""
    frame = _frame(3, (480, 640, 3))
    with Coordinator(max_buffer_bytes=64 * MIB) as coord:  # 64 such frames
        coord.spawn(Describe, processes=2)
        out = list(coord.map(_produce(coord, [frame])[0] for _ in range(600)))
        assert len(out) == 600 and all(o[0] == digest(frame) for o in out)
        s = coord.statistics().buffers
        assert s is not None and (s.pooled, s.plain) == (600, 0)


@pytest.mark.xfail(
    strict=True,
    reason="map() reads a batch of items from the iterator before it admits (and so makes "
    "read-only) any of them: a buffer written again within one read-ahead batch is not "
    "detected (engine/iterate.py would have to make each item's pool arrays read-only as it "
    "reads it)",
)
def test_one_buffer_reused_for_every_frame_of_a_map_is_detected_not_a_wrong_result() -> None:
    """The mistake the read-only buffer is there to catch, made through map(): one
    coord.buffer() written again for each frame. Either the write raises (ValueError) or
    every result is that of its own frame - never the next frame's."""
    frames = [_frame(i, (240, 320, 3)) for i in range(40)]
    with Coordinator() as coord:
        coord.spawn(Describe, processes=2)
        buf = coord.buffer((240, 320, 3), np.uint8)

        def reuse() -> Iterator[np.ndarray]:
            for frame in frames:
                np.copyto(buf, frame)
                yield buf

        try:
            out = list(coord.map(reuse()))
        except ValueError as exc:
            assert "read-only" in str(exc)
            return
        wrong = [i for i, o in enumerate(out) if o[0] != digest(frames[i])]
        assert not wrong, f"{len(wrong)} of {len(frames)} results were of another frame"
