"""The Redis queue's entry format and number sets, without a Redis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytaskqml.redis.format import (
    BadEntry,
    SeqSet,
    encode_body,
    parse_result,
    parse_task,
    result_fields,
    task_fields,
)


def _as_stored(fields: dict[bytes, object]) -> dict[bytes, bytes]:
    """What Redis gives back: every field as bytes."""
    out = {}
    for k, v in fields.items():
        out[k] = v.encode() if isinstance(v, str) else bytes(v)  # type: ignore[arg-type]
    return out


def test_a_task_entry_round_trips_with_raw_buffers() -> None:
    np = pytest.importorskip("numpy")
    frame = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    fields = task_fields("cam-1", 7, encode_body(1, {"f": frame, "b": b"\x00\x01"}, run_timeout=2))
    assert fields[b"0"] is not None and len(bytes(fields[b"0"])) == frame.nbytes  # raw, not text
    t = parse_task(_as_stored(fields))
    assert (t.producer, t.seq, t.count, t.run_timeout) == ("cam-1", 7, 1, 2.0)
    assert (t.payload["f"] == frame).all() and t.payload["b"] == b"\x00\x01"
    chunk = parse_task(_as_stored(task_fields("p", 0, encode_body(3, ["a", "b", "c"]))))
    assert chunk.count == 3 and chunk.payload == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({}, "no header"),
        ({b"h": b"[1]", b"d": b"1"}, "not a JSON object"),
        ({b"h": b'{"v":1,"p":"a b","s":0,"n":1,"b":0}', b"d": b"1"}, "producer"),
        ({b"h": b'{"v":1,"p":"p","s":-1,"n":1,"b":0}', b"d": b"1"}, "'s'"),
        ({b"h": b'{"v":1,"p":"p","s":0,"n":0,"b":0}', b"d": b"1"}, "'n'"),
        ({b"h": b'{"v":1,"p":"p","s":0,"n":1,"b":1}', b"d": b"1"}, "buffer field 0"),
        ({b"h": b'{"v":1,"p":"p","s":0,"n":1,"b":0,"rt":-1}', b"d": b"1"}, "'rt'"),
        ({b"h": b'{"v":1,"p":"p","s":0,"n":1,"b":0}', b"d": b"[1,"}, "does not decode"),
        ({b"h": b"x" * 5000, b"d": b"1"}, "header of 5000"),
    ],
)
def test_bad_task_entries_say_why(fields: dict[bytes, bytes], why: str) -> None:
    with pytest.raises(BadEntry, match=why):
        parse_task(fields)


def test_result_entries_round_trip_and_bad_ones_are_refused() -> None:
    assert parse_result(_as_stored(result_fields(4, 1, "ok", {"x": 1}))) == (4, 1, "ok", {"x": 1})
    assert parse_result(_as_stored(result_fields(0, 2, "run", [1, 2])))[3] == [1, 2]
    err = ["ValueError", "no", "tb"]
    assert parse_result(_as_stored(result_fields(0, 2, "chunk", [[0, 1], [1, err]])))[2] == "chunk"
    for kind, value, count in (("run", [1], 2), ("chunk", [[5, 1]], 1), ("error", ["x"], 1)):
        with pytest.raises(BadEntry):
            parse_result(_as_stored(result_fields(0, count, kind, value)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(1, 12)), max_size=40))
def test_a_seqset_is_the_set_of_its_numbers(ops: list[tuple[bool, int, int]]) -> None:
    s, model = SeqSet(), set()
    for add, start, length in ops:
        if add:
            s.add(start, start + length)
            model |= set(range(start, start + length))
        else:
            s.remove(start, start + length)
            model -= set(range(start, start + length))
        runs = s.runs()
        assert {i for a, b in runs for i in range(a, b)} == model and len(s) == len(model)
        assert all(b < c for (_, b), (c, _) in itertools.pairwise(runs))  # disjoint
        for a in range(0, 75, 7):
            assert s.covers(a, a + 2) == ({a, a + 1} <= model)
            assert s.overlaps(a, a + 2) == bool({a, a + 1} & model)
    assert SeqSet(s.runs()).runs() == s.runs()  # survives its JSON form
