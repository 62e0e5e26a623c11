"""The sans-IO framing and the payload codec, byte by byte, with no sockets."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytaskqml.errors import ProtocolError
from pytaskqml.wire import codec as _codec
from pytaskqml.wire import protocol as _protocol
from pytaskqml.wire.protocol import FrameDecoder, Message

try:
    import numpy as np
except ImportError:  # only the array cases need it
    np = None

needs_numpy = pytest.mark.skipif(np is None, reason="NumPy is not installed")


def frame(header: dict, buffers: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    text, bufs = _codec.encode(header)
    return b"".join(
        bytes(c) for c in _protocol.encode_frame(text, [*bufs, *map(memoryview, buffers)])
    )


def raw_frame(head: bytes, buffers: list[bytes] = (), declared: list[int] | None = None) -> bytes:  # type: ignore[assignment]
    """A frame built by hand, so tests can make it lie: *declared* overrides the length table."""
    lengths = declared if declared is not None else [len(b) for b in buffers]
    prefix = struct.pack(
        "!2sBBIII",
        b"PQ",
        _protocol.PROTOCOL_VERSION,
        0,
        len(head),
        len(lengths),
        sum(len(b) for b in buffers),
    )
    return prefix + struct.pack(f"!{len(lengths)}I", *lengths) + head + b"".join(buffers)


def decode_all(data: bytes, **kw: int) -> list[Message]:
    return FrameDecoder(**kw).feed(data)


# --------------------------------------------------------------------------- framing


def test_round_trip_one_frame() -> None:
    msgs = decode_all(frame({"op": "run", "t": [[1, "apple"]]}))
    assert [m.header for m in msgs] == [{"op": "run", "t": [[1, "apple"]]}]
    assert msgs[0].op == "run"


def test_byte_by_byte_and_many_frames_at_once_agree() -> None:
    stream = b"".join(frame({"op": "x", "i": i, "s": "é" * i}) for i in range(20))
    whole = [m.header for m in decode_all(stream)]
    dec = FrameDecoder()
    one_by_one = [m.header for b in stream for m in dec.feed(bytes([b]))]
    assert whole == one_by_one == [{"op": "x", "i": i, "s": "é" * i} for i in range(20)]
    assert dec.buffered == 0


def test_prefix_layout_is_as_documented() -> None:
    data = frame({"op": "a"})
    magic, version, flags, hlen, nbuf, body = struct.unpack_from("!2sBBIII", data)
    assert (magic, version, flags, nbuf, body) == (b"PQ", _protocol.PROTOCOL_VERSION, 0, 0, 0)
    assert json.loads(data[16 : 16 + hlen]) == {"op": "a"}


def test_garbage_is_refused_on_its_first_bytes() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="magic"):
        dec.feed(b"GET / HTTP/1.1\r\n")
    # The decoder stays failed: the stream cannot be resynchronised.
    with pytest.raises(ProtocolError):
        dec.feed(frame({"op": "a"}))


def test_wrong_version_is_refused() -> None:
    data = bytearray(frame({"op": "a"}))
    data[2] = 99
    with pytest.raises(ProtocolError, match="version 99"):
        decode_all(bytes(data[:3]))


def test_unknown_flags_are_refused() -> None:
    data = bytearray(frame({"op": "a"}))
    data[3] = 1
    with pytest.raises(ProtocolError, match="flags"):
        decode_all(bytes(data))


def test_oversize_frame_is_refused_before_it_is_buffered() -> None:
    prefix = struct.pack("!2sBBIII", b"PQ", _protocol.PROTOCOL_VERSION, 0, 10, 0, 10**8)
    dec = FrameDecoder(max_frame_size=1 << 20)
    with pytest.raises(ProtocolError, match="exceeds max_frame_size"):
        dec.feed(prefix)  # nothing but the 16-byte prefix was needed to say no


def test_too_many_buffers_is_refused() -> None:
    prefix = struct.pack("!2sBBIII", b"PQ", _protocol.PROTOCOL_VERSION, 0, 2, 10_000, 0)
    with pytest.raises(ProtocolError, match="buffers"):
        decode_all(prefix, max_buffers=16)


def test_lying_buffer_table_is_refused() -> None:
    data = raw_frame(b'{"op":"a"}', [b"abcd"], declared=[3])
    with pytest.raises(ProtocolError, match="add up"):
        decode_all(data)


@pytest.mark.parametrize(
    "head",
    [b"not json", b"[1, 2]", b'{"no_op": 1}', b'{"op": 5}', b"\xff\xfe{}", b'{"op":"a"'],
)
def test_bad_headers_are_protocol_errors(head: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_all(raw_frame(head))


def test_deep_nesting_is_refused_with_an_explicit_limit() -> None:
    deep = {"op": "a", "x": json.loads("[" * 100 + "]" * 100)}
    with pytest.raises(ProtocolError, match="nests deeper"):
        decode_all(frame(deep), max_depth=64)
    shallow = {"op": "a", "x": json.loads("[" * 60 + "]" * 60), "s": "[[[[[[" * 50}
    assert decode_all(frame(shallow), max_depth=64)[0].header == shallow


def test_nesting_past_the_recursion_limit_is_a_protocol_error_without_a_limit() -> None:
    head = b'{"op":"a","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(ProtocolError):
        decode_all(raw_frame(head))


def test_depth_check_counts_real_nesting_only() -> None:
    assert not _protocol.json_depth_exceeds('["[[[[[[[[[[[[[[[[[[[[["]', 4)
    assert _protocol.json_depth_exceeds("[[[[[[]]]]]]", 4)
    assert not _protocol.json_depth_exceeds("[[[[]]]]", 4)
    assert not _protocol.json_depth_exceeds("[[],[],[],[],[],[],[]]", 4)


# --------------------------------------------------------------------------- buffers


@needs_numpy
def test_bytes_and_arrays_travel_raw_after_the_header() -> None:
    img = np.arange(480 * 640 * 3, dtype=np.uint8).reshape(480, 640, 3)
    payload = {"op": "run", "frame": img, "raw": b"\x00\x01\x02", "mv": memoryview(b"xyz"), "n": 7}
    data = frame(payload)
    # The pixels are not in the JSON header: it stays tiny.
    hlen = struct.unpack_from("!I", data, 4)[0]
    assert hlen < 200
    (msg,) = decode_all(data)
    out = msg.header
    assert out["raw"] == b"\x00\x01\x02" and out["mv"] == b"xyz" and out["n"] == 7
    assert out["frame"].dtype == np.uint8 and out["frame"].shape == (480, 640, 3)
    assert np.array_equal(out["frame"], img)
    out["frame"][0, 0, 0] = 255  # arrives writable, so a model can draw on it in place


@needs_numpy
@pytest.mark.parametrize("dtype", ["<f4", ">i8", "<u2", "bool", "<c16"])
def test_array_dtype_and_shape_survive(dtype: str) -> None:
    arr = (np.arange(24) % 3).astype(dtype).reshape(2, 3, 4)
    (msg,) = decode_all(frame({"op": "a", "a": [arr, arr[:, ::2]]}))
    for got, want in zip(msg.header["a"], [arr, arr[:, ::2]], strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want)


@needs_numpy
def test_object_arrays_are_refused_at_encode() -> None:
    with pytest.raises(TypeError):
        _codec.encode(np.array([object()], dtype=object))


@needs_numpy
def test_numpy_scalars_become_json_numbers() -> None:
    text, bufs = _codec.encode({"f": np.float32(1.5), "i": np.int64(3)})
    assert json.loads(text) == {"f": 1.5, "i": 3} and bufs == []


def test_reserved_marker_key_in_user_data_is_refused() -> None:
    with pytest.raises(ValueError, match="reserved"):
        _codec.encode({_codec.MARKER_KEY: 3})


def test_unencodable_payload_is_type_error() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        _codec.encode({"a": {1, 2}})


def test_marker_lengths_must_match_the_buffers() -> None:
    data = raw_frame(json.dumps({"op": "a", "b": {_codec.MARKER_KEY: 5}}).encode(), [b"abc"])
    with pytest.raises(ProtocolError, match="declared 5 bytes"):
        decode_all(data)


def test_every_buffer_must_be_claimed() -> None:
    data = raw_frame(b'{"op":"a"}', [b"abc"])
    with pytest.raises(ProtocolError, match="referenced"):
        decode_all(data)


def test_marker_without_buffer_is_refused() -> None:
    data = raw_frame(json.dumps({"op": "a", "b": {_codec.MARKER_KEY: 1}}).encode())
    with pytest.raises(ProtocolError):
        decode_all(data)


@needs_numpy
def test_array_marker_with_wrong_size_is_refused() -> None:
    data = raw_frame(
        json.dumps({"op": "a", "b": {_codec.MARKER_KEY: ["<u1", [10, 10]]}}).encode(), [b"abc"]
    )
    with pytest.raises(ProtocolError, match="needs 100"):
        decode_all(data)


def test_encode_frame_checks_the_size_limit() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        _protocol.encode_frame('{"op":"a"}', [memoryview(b"x" * 100)], max_frame_size=64)


# --------------------------------------------------------------------------- properties

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.binary(max_size=64)
    | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=5).filter(lambda k: k != _codec.MARKER_KEY), inner, max_size=4
        )
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_values, min_size=1, max_size=5), st.data())
def test_any_split_of_a_valid_stream_decodes_the_same(values: list, data: st.DataObject) -> None:  # type: ignore[type-arg]
    stream = b"".join(frame({"op": "v", "v": v}) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    dec = FrameDecoder()
    got = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got.extend(m.header["v"] for m in dec.feed(stream[prev:cut]))
        prev = cut
    assert got == values
    assert dec.buffered == 0


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_give_messages_or_protocol_error(blob: bytes) -> None:
    dec = FrameDecoder(max_frame_size=1 << 16)
    try:
        for m in dec.feed(blob):
            assert isinstance(m.header, dict) and isinstance(m.op, str)
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 200), st.data())
def test_mutated_frames_give_messages_or_protocol_error(
    noise: bytes, pos: int, data: st.DataObject
) -> None:
    good = bytearray(frame({"op": "run", "t": [[1, "a"], [2, b"xy"]]}))
    pos = min(pos, len(good))
    mode = data.draw(st.sampled_from(["overwrite", "insert", "truncate"]))
    if mode == "overwrite":
        good[pos : pos + len(noise)] = noise
    elif mode == "insert":
        good[pos:pos] = noise
    else:
        del good[pos:]
    with contextlib.suppress(ProtocolError):
        FrameDecoder(max_frame_size=1 << 16).feed(bytes(good))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 200_000), min_size=1, max_size=6), st.data())
def test_receiving_in_place_decodes_the_same(sizes: list[int], data: st.DataObject) -> None:
    """The socket path (recv_target + commit, large frames filled in place) with any chunking."""
    payloads = [{"op": "v", "i": i, "b": bytes([i % 256]) * n} for i, n in enumerate(sizes)]
    stream = b"".join(frame(p) for p in payloads)
    dec = FrameDecoder()
    got: list[dict] = []  # type: ignore[type-arg]
    pos = 0
    while pos < len(stream):
        target = dec.recv_target()
        n = min(len(target), len(stream) - pos, data.draw(st.integers(64, 300_000)))
        target[:n] = stream[pos : pos + n]
        pos += n
        got.extend(m.header for m in dec.commit(n))
    assert got == payloads
    assert dec.buffered == 0


def received_whole(data: bytes, **kw: int) -> tuple[FrameDecoder, list[Message]]:
    """*data* arriving in one recv() on the socket path (recv_target + commit)."""
    dec = FrameDecoder(**kw)
    target = dec.recv_target()
    target[: len(data)] = data
    return dec, dec.commit(len(data))


@pytest.mark.parametrize(
    "data",
    [
        frame({"op": "done", "r": [[7, 0, "h\u00e9llo"]], "bt": 1e-05}),
        frame({"op": "run", "t": [[1, "a"]]}) + frame({"op": "ping"}),  # two frames at once
        frame({"op": "run", "t": [[1, b"raw"]]}),  # a frame with buffers
    ],
)
def test_a_whole_frame_in_one_receive_decodes_as_fed(data: bytes) -> None:
    _, msgs = received_whole(data)
    assert [m.header for m in msgs] == [m.header for m in decode_all(data)]


@pytest.mark.parametrize(
    "data",
    [
        raw_frame(b"not json"),
        raw_frame(b'{"op": 5}'),
        raw_frame(b"\xff\xfe{}"),
        raw_frame(b"[1, 2]"),
        raw_frame(json.dumps({"op": "a", "x": {_codec.MARKER_KEY: 0}}).encode()),  # no buffer
        b"PQ\x01\x01" + frame({"op": "a"})[4:],  # flags set
        b"PQ\x09\x00" + frame({"op": "a"})[4:],  # another version
    ],
)
def test_a_bad_whole_frame_in_one_receive_fails_as_fed(data: bytes) -> None:
    """The socket path's shortcut for one whole small frame refuses what feed() refuses, with
    the same reason, and leaves the decoder failed."""
    with pytest.raises(ProtocolError) as fed:
        decode_all(data)
    dec = FrameDecoder()
    target = dec.recv_target()
    target[: len(data)] = data
    with pytest.raises(ProtocolError) as received:
        dec.commit(len(data))
    assert str(received.value) == str(fed.value)
    with pytest.raises(ProtocolError):
        dec.commit(0)


def test_a_whole_frame_over_the_limit_is_refused_on_the_socket_path() -> None:
    data = frame({"op": "a", "x": "y" * 100})
    with pytest.raises(ProtocolError, match="exceeds max_frame_size"):
        received_whole(data, max_frame_size=64)


@needs_numpy
def test_large_frame_is_received_into_its_own_buffer() -> None:
    img = np.zeros((480, 640, 3), dtype=np.uint8)
    data = frame({"op": "run", "f": img})
    dec = FrameDecoder()
    first = dec.recv_target()
    first[:1000] = data[:1000]
    assert dec.commit(1000) == []
    rest = dec.recv_target()
    assert len(rest) == len(data) - 1000  # exactly the rest of this frame, in place
    rest[:] = data[1000:]
    (msg,) = dec.commit(len(rest))
    assert msg.header["f"].shape == (480, 640, 3)


_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
# (A payload dict may not use the codec's reserved key: encode() refuses it, tested apart.)
_keys = (
    st.text(max_size=4).filter(lambda k: k != _codec.MARKER_KEY)
    | st.integers()
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=False)
)


@given(
    st.recursive(
        _leaves,
        lambda kids: (
            st.lists(kids, max_size=4)
            | st.tuples(kids, kids)
            | st.dictionaries(_keys, kids, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_as_sent_is_what_the_other_side_decodes(value: Any) -> None:
    """Thread workers get as_sent(payload); processes get decode(encode(payload)): the same."""
    text, bufs = _codec.encode(value)
    assert _codec.as_sent(value) == _codec.decode(text, bufs)


@needs_numpy
def test_as_sent_copies_arrays_with_their_shape() -> None:
    for arr in (np.array(5), np.arange(12).reshape(3, 4)[:, ::2], np.zeros((2, 0))):
        got = _codec.as_sent({"a": [arr]})["a"][0]
        assert got.shape == arr.shape and got.dtype == arr.dtype and np.array_equal(got, arr)
        assert got.flags.writeable and not np.shares_memory(got, arr)
    with pytest.raises(TypeError):
        _codec.as_sent(np.array([object()], dtype=object))
    with pytest.raises(TypeError):
        _codec.as_sent({"s": {1, 2}})


def test_result_flags_are_the_cores_outcome_kinds() -> None:
    # the core defines its outcome kinds without importing the wire; a result row's flag is
    # its kind, so the two must agree
    from pytaskqml.core import tasks

    assert (tasks.OK, tasks.ERROR, tasks.CHUNK, tasks.RUN) == (
        _protocol.RESULT_OK,
        _protocol.RESULT_ERROR,
        _protocol.RESULT_CHUNK,
        _protocol.RESULT_RUN,
    )


@pytest.mark.parametrize(
    "text",
    ['{"a":[1,2.5,"x",null,true]}', ' {"a":1}', '{"a":1}\n', "[NaN,Infinity]", '"\\u00e9"', "1"],
)
def test_decode_takes_what_json_takes(text: str) -> None:
    # Plain headers go straight to the C scanner; what it does not take whole (whitespace
    # around the value) goes the general way: the same values either way.
    decoded = _codec.decode(text)
    expected = json.loads(text)
    assert json.dumps(decoded) == json.dumps(expected)


@pytest.mark.parametrize(
    "text", ['{"a":1', '{"a":1}x', "\ufeff{}", '{"a":"\x01"}', "", "[" * 100_000 + "]" * 100_000]
)
def test_decode_refuses_what_json_refuses(text: str) -> None:
    with pytest.raises(ProtocolError):
        _codec.decode(text)


def test_encode_each_is_encode_per_value() -> None:
    values: list[Any] = [{"a": [1, b"xy"]}, 2.5, "s", [b"z", {"b": bytearray(b"w")}], None]
    texts, bufs = _codec.encode_each(values)
    for value, text, mine in zip(values, texts, bufs, strict=True):
        one_text, one_bufs = _codec.encode(value)
        assert text == one_text
        assert [bytes(b) for b in mine] == [bytes(b) for b in one_bufs]
    with pytest.raises(TypeError):
        _codec.encode_each([1, {2}])
    with pytest.raises(ValueError, match="reserved key"):
        _codec.encode_each([1, {_codec.MARKER_KEY: 1}])


@needs_numpy
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.lists(st.integers(0, 40), max_size=4), st.integers(0, 48), st.data())
def test_a_kept_encoding_places_as_encode_does(
    value: object, arrays: list[int], min_shared: int, data: st.DataObject
) -> None:
    """A payload encoded at admission and framed later (encode_kept, then placed) gives the
    text and buffers that encoding it when framed would give, whichever buffers the placer
    takes (some fit, some do not) and whichever arrays the pool lends."""
    payload = [value, *(np.arange(n, dtype=np.int16) for n in arrays)]
    takes = data.draw(st.lists(st.booleans(), min_size=16, max_size=16))
    lends = data.draw(st.lists(st.booleans(), min_size=16, max_size=16))

    def placer() -> Callable[[memoryview], int | None]:
        calls = iter(range(100))

        def place(mv: memoryview) -> int | None:
            i = next(calls)
            return 1000 * i + mv.nbytes if takes[i % 16] else None

        return place

    def lender() -> Callable[[Any], int | None]:
        calls = iter(range(100))

        def lend(arr: Any) -> int | None:
            i = next(calls)
            return 7 + i if lends[i % 16] else None

        return lend

    texts, _, kept = _codec.encode_kept([payload])
    assert kept[0] is not None
    want = _codec.encode(payload, place=placer(), min_shared=min_shared, lend=lender())
    got = _codec.placed(texts[0], kept[0], place=placer(), min_shared=min_shared, lend=lender())
    assert got[0] == want[0]
    assert [bytes(b) for b in got[1]] == [bytes(b) for b in want[1]]
    # Without a placer or a lender the text is used as it is.
    plain = _codec.placed(texts[0], kept[0])
    assert plain[0] == texts[0] == _codec.encode(payload)[0]
