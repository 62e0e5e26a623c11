"""Each payload is encoded once on its way to a worker process, whichever call admitted it,
and whether it holds raw buffers or not, whichever way they travel (in the frame, placed in a
spawned worker's shared memory, or lent from the buffer pool).

The payloads are dicts tagged with a unique number; the coordinator's JSON encoder is wrapped
so that every text it produces is searched for the tags. A path that checks a payload at
admission and encodes it again when framing it counts the tag twice.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from sample_workers import Echo

from pytaskqml import Coordinator
from pytaskqml.wire import codec as _codec

T = 30.0
_TAG = re.compile(r'"tag":(\d+)')


class _Counting:
    """The codec's encoder, counting the tagged payloads in what it writes."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.seen: collections.Counter[int] = collections.Counter()

    def __call__(self, obj: Any) -> str:
        text: str = self.real(obj)
        self.seen.update(int(n) for n in _TAG.findall(text))
        return text


@pytest.fixture(scope="module")
def coord() -> Iterator[Coordinator]:
    with Coordinator() as c:
        c.spawn(Echo, processes=2, timeout=T)
        yield c


@pytest.fixture(scope="module")
def socket_coord() -> Iterator[Coordinator]:
    """Spawned workers without shared memory: every buffer travels in the frame."""
    with Coordinator(shared_memory=False) as c:
        c.spawn(Echo, processes=2, timeout=T)
        yield c


@pytest.fixture
def encoder() -> Iterator[_Counting]:
    counting = _Counting(_codec._encode_json)
    with mock.patch.object(_codec, "_encode_json", counting):
        yield counting


def _tagged(start: int, n: int) -> list[dict[str, Any]]:
    return [{"tag": i, "x": [i, "y"]} for i in range(start, start + n)]


def _once(encoder: _Counting, payloads: list[Any]) -> None:
    tags = [p["tag"] for p in payloads if isinstance(p, dict)]
    counts = {t: encoder.seen[t] for t in tags}
    assert counts == dict.fromkeys(tags, 1)


def test_submit(coord: Coordinator, encoder: _Counting) -> None:
    payloads = _tagged(0, 50)
    futures = [coord.submit(p) for p in payloads]
    assert [f.result(T) for f in futures] == payloads
    _once(encoder, payloads)


@pytest.mark.parametrize("chunksize", [1, 4, None])
def test_map(coord: Coordinator, encoder: _Counting, chunksize: int | None) -> None:
    payloads = _tagged(1000, 300)
    assert list(coord.map(payloads, chunksize=chunksize, timeout=T)) == payloads
    _once(encoder, payloads)


def test_map_with_floats_among_them(coord: Coordinator, encoder: _Counting) -> None:
    # Floats are encoded when framed, so frames mix rows encoded at admission with others.
    payloads: list[Any] = [p if i % 3 else i + 0.5 for i, p in enumerate(_tagged(2000, 300))]
    assert list(coord.map(payloads, chunksize=1, timeout=T)) == payloads
    _once(encoder, payloads)


def test_map_with_bytes_among_them(coord: Coordinator, encoder: _Counting) -> None:
    # Bytes travel as buffers: frames mix rows with buffers and rows encoded at admission.
    payloads: list[Any] = [p if i % 3 else b"b%d" % i for i, p in enumerate(_tagged(3000, 300))]
    assert list(coord.map(payloads, chunksize=1, timeout=T)) == payloads
    _once(encoder, payloads)


def test_stream(coord: Coordinator, encoder: _Counting) -> None:
    payloads = _tagged(4000, 100)
    s = coord.stream(buffersize=len(payloads))
    for p in payloads:
        s.put(p, timeout=T)
    s.close()
    assert list(s) == payloads
    _once(encoder, payloads)


def test_broadcast_encodes_once_for_every_worker(coord: Coordinator, encoder: _Counting) -> None:
    payload = _tagged(5000, 1)[0]
    out = coord.broadcast(payload, timeout=T)
    assert len(out.results) == 2 and all(v == payload for v in out.results.values())
    _once(encoder, [payload])


def _same(got: list[Any], want: list[Any]) -> None:
    np = pytest.importorskip("numpy")
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and g["tag"] == w["tag"]
        for k in w:
            if isinstance(w[k], np.ndarray):
                assert np.array_equal(g[k], w[k]) and g[k].dtype == w[k].dtype
            else:
                assert g[k] == w[k]


def _with_buffers(start: int, n: int, big: int) -> list[dict[str, Any]]:
    """Tagged payloads holding a small bytes value (always in the frame) and an array of *big*
    bytes (through shared memory with a spawned worker from 64 KiB on)."""
    np = pytest.importorskip("numpy")
    return [
        {"tag": i, "b": b"b%d" % i, "a": np.full(big // 2, i % 251, dtype=np.uint16)}
        for i in range(start, start + n)
    ]


@pytest.mark.parametrize("big", [64, 1 << 17], ids=["small", "shared"])
@pytest.mark.parametrize("which", ["coord", "socket_coord"])
def test_payloads_holding_buffers(
    request: pytest.FixtureRequest, encoder: _Counting, which: str, big: int
) -> None:
    c: Coordinator = request.getfixturevalue(which)
    payloads = _with_buffers(6000 + big, 40, big)
    futures = [c.submit(p) for p in payloads[:20]]
    got = [f.result(T) for f in futures]
    got += list(c.map(payloads[20:], chunksize=1, timeout=T))
    _same(got, payloads)
    _once(encoder, payloads)


def test_pool_buffers(coord: Coordinator, encoder: _Counting) -> None:
    """Arrays made with coord.buffer() are lent to the worker from the pool (only their place
    is written into the frame) and their payloads are encoded once too."""
    np = pytest.importorskip("numpy")
    before = coord.statistics().buffers
    payloads = []
    for i in range(20):
        buf = coord.buffer((256, 256))
        buf[...] = i
        payloads.append({"tag": 7000 + i, "a": buf})
    want = [{"tag": p["tag"], "a": np.array(p["a"])} for p in payloads]
    got = list(coord.map(payloads, chunksize=1, timeout=T))
    _same(got, want)
    _once(encoder, payloads)
    after = coord.statistics().buffers
    assert after is not None and before is not None
    assert after.lent - before.lent >= 20  # they went through the pool, not the frame


def test_a_non_contiguous_array_still_travels(coord: Coordinator) -> None:
    # Copied to be sent, so not kept from admission (encoded again when framed): still right.
    np = pytest.importorskip("numpy")
    base = np.arange(300 * 300, dtype=np.int32).reshape(300, 300)
    payloads = [{"tag": i, "a": base[:, i::7]} for i in range(7)]
    got = [coord.submit(p).result(T) for p in payloads]
    _same(got, [{"tag": p["tag"], "a": np.ascontiguousarray(p["a"])} for p in payloads])
