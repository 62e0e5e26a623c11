"""Each payload is encoded once on its way to a worker process, whichever call admitted it.

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
