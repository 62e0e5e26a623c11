"""Payload encoding: JSON text plus out-of-band binary buffers.

``bytes``, ``bytearray``, ``memoryview`` and (when numpy is importable) ``numpy.ndarray``
anywhere inside a payload are not put in the JSON. Each is replaced by a small *marker* object
and its memory travels raw after the JSON header, so a video frame is never base64'd, copied
into a string, or pickled.

The marker carries no index. Markers are leaves (they contain no other object), the encoder
visits values in document order, and the decoder completes leaf objects in document order, so
the n-th marker written is the n-th marker read: payloads encoded separately can be
concatenated into one frame and their buffer lists concatenated likewise. The decoder checks
that every buffer is claimed exactly once and that each marker's declared size matches.

Marker forms (``K`` is :data:`MARKER_KEY`)::

    {K: n}                          bytes of length n        -> bytes
    {K: [dtype_str, [d0, d1, ...]]} C-contiguous ndarray     -> writable ndarray (zero-copy view)

and, between a coordinator and a worker it spawned (see :mod:`._shm`), the same two with the
memory in a shared segment at ``offset`` instead of in the frame (they claim no frame buffer)::

    {K: [offset, n]}                bytes
    {K: [dtype_str, [d0, ...], offset]}  ndarray, a view of the shared memory

and an ndarray in the coordinator's *buffer pool* (:mod:`._bufpool`), the one segment every
worker it spawned maps, named by a fourth element, the segment number (:data:`POOL_SEGMENT`;
0 would be the worker's own segment, which the three-element form already names)::

    {K: [dtype_str, [d0, ...], offset, 1]}  ndarray, a view of the pool at offset

A user dict whose only key is ``K`` would be ambiguous; the encoder detects it and raises
``ValueError`` instead of letting it be misread.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, Protocol

from ..errors import ProtocolError

# numpy is optional: used when importable, never required, and never imported by
# `import pytaskqml`. An object can only be an array once numpy is loaded, so encoding looks
# for it in sys.modules (loaded_numpy); decoding an array imports it (import_numpy).
_np: Any = None
_np_tried = False


def loaded_numpy() -> Any:
    """numpy if something has imported it already, else None."""
    global _np
    if _np is None:
        _np = sys.modules.get("numpy")
    return _np


def import_numpy() -> Any:
    """numpy, imported now if it is importable (to build arrays from buffers), else None."""
    global _np, _np_tried
    if _np is None and not _np_tried:
        _np_tried = True
        try:
            import numpy
        except ImportError:  # pragma: no cover - exercised on machines without numpy
            return None
        _np = numpy
    return _np


MARKER_KEY = "\x00pq"
# How the key looks inside encoded JSON text (json escapes the NUL byte).
_MARKER_TEXT = json.dumps(MARKER_KEY)
# json.loads's own parser (the C one, where there is one), called directly by decode().
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]

Buffer = memoryview

# Places a buffer in shared memory and returns its offset, or None to send it inline.
Placer = Callable[[memoryview], "int | None"]
# Says where a (C-contiguous) array already lies in the buffer pool: its offset there, or None
# when it is not a pool buffer (then it is placed or sent inline as any other).
Lender = Callable[[Any], "int | None"]
# The segment number of the coordinator's buffer pool in a marker.
POOL_SEGMENT = 1


class SharedMemory(Protocol):
    """What the decoder needs of shared memory (see :class:`._shm.SharedView`): *segment* is
    0 for the worker's own segment, :data:`POOL_SEGMENT` for the buffer pool."""

    def view(self, offset: Any, nbytes: int, segment: int = 0) -> memoryview: ...

    def hold(self, offset: int, owner: Any, segment: int = 0) -> None: ...


class _EncodeState:
    __slots__ = ("bufs", "copied", "kept", "lend", "min_shared", "place", "shared")

    def __init__(self, place: Placer | None, min_shared: int, lend: Lender | None) -> None:
        self.bufs: list[memoryview] = []
        self.place = place
        self.lend = lend
        self.min_shared = min_shared
        self.shared = 0  # markers that point into shared memory
        # With `kept` a list: each buffer's source (see encode_kept), in document order, and
        # whether one of them had to be copied to be sent (then it is not worth keeping).
        self.kept: list[Any] | None = None
        self.copied = False


_tls = threading.local()


def _default(obj: Any) -> Any:
    """``json`` calls this for every value it cannot encode: buffers become markers."""
    state: _EncodeState = _tls.state
    if isinstance(obj, bytes | bytearray | memoryview):
        mv = memoryview(obj)
        if not mv.c_contiguous:
            mv = memoryview(mv.tobytes())
            state.copied = True
        mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        if state.kept is not None:
            state.kept.append(mv)
        return _bytes_marker(state, mv)
    np = _np if _np is not None else loaded_numpy()
    if np is not None:
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject or obj.dtype.fields is not None:
                raise TypeError(f"numpy arrays of dtype {obj.dtype} cannot be sent (object/struct)")
            # (ascontiguousarray would make a 0-d array 1-d: only copy what is not contiguous)
            if obj.flags.c_contiguous:
                arr = obj
            else:
                arr = np.ascontiguousarray(obj)
                state.copied = True
            if state.kept is not None:
                state.kept.append(arr)
            return _array_marker(state, arr, np)
        if isinstance(obj, np.generic):
            return obj.item()
    raise TypeError(
        f"Object of type {type(obj).__name__} is not JSON serializable "
        "(payloads must be JSON types, bytes/bytearray/memoryview or numpy arrays)"
    )


def _bytes_marker(state: _EncodeState, mv: memoryview) -> dict[str, Any]:
    """The marker of a 1-d byte buffer: placed in shared memory if *state* can, else sent in
    the frame (appended to ``state.bufs``)."""
    if state.place is not None and mv.nbytes >= state.min_shared:
        offset = state.place(mv)
        if offset is not None:
            state.shared += 1
            return {MARKER_KEY: [offset, mv.nbytes]}
    state.bufs.append(mv)
    return {MARKER_KEY: mv.nbytes}


def _array_marker(state: _EncodeState, arr: Any, np: Any) -> dict[str, Any]:
    """The marker of a C-contiguous array: its place in the buffer pool if it lies there, else
    placed in shared memory if *state* can, else sent in the frame."""
    flat = memoryview(arr.reshape(-1).view(np.uint8))
    if state.lend is not None and flat.nbytes >= state.min_shared:
        offset = state.lend(arr)
        if offset is not None:  # already in the pool: only its place travels
            state.shared += 1
            return {MARKER_KEY: [arr.dtype.str, list(arr.shape), offset, POOL_SEGMENT]}
    if state.place is not None and flat.nbytes >= state.min_shared:
        offset = state.place(flat)
        if offset is not None:
            state.shared += 1
            return {MARKER_KEY: [arr.dtype.str, list(arr.shape), offset]}
    state.bufs.append(flat)
    return {MARKER_KEY: [arr.dtype.str, list(arr.shape)]}


# check_circular=False: the C encoder's own recursion guard turns a circular payload into a
# RecursionError (made a ValueError below), and skipping the per-container bookkeeping makes
# encoding a list of small dicts about a quarter cheaper.
_ENCODER = json.JSONEncoder(
    separators=(",", ":"), default=_default, allow_nan=True, check_circular=False
)

# The C encoder that _ENCODER.encode() builds anew on every call (JSONEncoder.iterencode makes
# one per call), made once: a third of the cost of encoding a small value. Same arguments as
# _ENCODER's: no circular check, default=_default, ASCII, compact, NaN allowed. (None on an
# interpreter without the C accelerator, PyPy: _ENCODER then.)
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_c_encode: Any = (
    _c_make_encoder(None, _default, _quote, None, ":", ",", False, False, True)
    if _c_make_encoder is not None
    else None
)


def _encode_json(obj: Any) -> str:
    """``_ENCODER.encode(obj)``: the one place JSON text is made of a value."""
    if _c_encode is None:  # pragma: no cover - PyPy
        return _ENCODER.encode(obj)
    return "".join(_c_encode(obj, 0))


def encode(
    obj: Any, *, place: Placer | None = None, min_shared: int = 0, lend: Lender | None = None
) -> tuple[str, list[memoryview]]:
    """Encode *obj* to JSON text and the list of raw buffers it refers to.

    With *place*, each buffer of at least *min_shared* bytes is offered to it first; a buffer
    it places (it returns an offset) is referred to by that offset instead of travelling in
    the frame. With *lend*, each array of that size is first asked whether it already lies in
    the buffer pool; one that does is referred to by its offset there, and nothing is copied.

    Raises ``TypeError`` for a value that is neither JSON nor a supported buffer, and
    ``ValueError`` for circular references or a dict that looks like a buffer marker.
    """
    outer = getattr(_tls, "state", None)
    state = _EncodeState(place, min_shared, lend)
    _tls.state = state
    try:
        text = _encode_json(obj)
    except RecursionError:
        raise ValueError("payload is circular or nested too deeply") from None
    finally:
        _tls.state = outer
    bufs = state.bufs
    if _MARKER_TEXT in text and text.count(_MARKER_TEXT) != len(bufs) + state.shared:
        raise ValueError(f"a payload dict may not use the reserved key {MARKER_KEY!r}")
    return text, bufs


def encode_each(
    objs: Sequence[Any],
    *,
    place: Placer | None = None,
    min_shared: int = 0,
    lend: Lender | None = None,
) -> tuple[list[str], list[list[memoryview]]]:
    """:func:`encode` each of *objs* on its own, for the price of little more than one call:
    the texts, and for each the buffers it refers to.

    For the many small values of one batch (the items of a ``map()``, the rows of a frame),
    each of which must keep a JSON text of its own. Raises as :func:`encode` does for the
    first value that cannot travel (what the others made is lost: the caller looks at the
    values one by one then)."""
    return _encode_each(objs, _EncodeState(place, min_shared, lend), None)


def encode_kept(
    objs: Sequence[Any],
) -> tuple[list[str], list[list[memoryview]], list[list[Any] | None]]:
    """:func:`encode_each`, also keeping for each value the sources of its buffers (the
    C-contiguous arrays and 1-d byte views its markers stand for, in document order), so that
    its text can be framed later without encoding it again, :func:`placed` rewriting the
    markers of the buffers that go through shared memory. A value with a buffer that had to
    be copied to be sent (not contiguous) keeps ``None``: holding its copy until it is framed
    would cost more memory than encoding it again then."""
    kept: list[list[Any] | None] = []
    texts, bufs = _encode_each(objs, _EncodeState(None, 0, None), kept)
    return texts, bufs, kept


def _encode_each(
    objs: Sequence[Any], state: _EncodeState, kept: list[list[Any] | None] | None
) -> tuple[list[str], list[list[memoryview]]]:
    outer = getattr(_tls, "state", None)
    _tls.state = state
    enc = _encode_json
    texts: list[str] = []
    bufs: list[list[memoryview]] = []
    try:
        for obj in objs:
            mine: list[memoryview] = []
            state.bufs = mine
            state.shared = 0
            if kept is not None:
                state.kept = []
                state.copied = False
            text = enc(obj)
            if _MARKER_TEXT in text and text.count(_MARKER_TEXT) != len(mine) + state.shared:
                raise ValueError(f"a payload dict may not use the reserved key {MARKER_KEY!r}")
            texts.append(text)
            bufs.append(mine)
            if kept is not None:
                kept.append(None if state.copied else state.kept)
    except RecursionError:
        raise ValueError("payload is circular or nested too deeply") from None
    finally:
        _tls.state = outer
    return texts, bufs


# How a marker begins in encoded text (the encoder writes dicts compactly).
_MARKER_OPEN = "{" + _MARKER_TEXT + ":"


def placed(
    text: str,
    kept: Sequence[Any],
    *,
    place: Placer | None = None,
    min_shared: int = 0,
    lend: Lender | None = None,
) -> tuple[str, list[memoryview]]:
    """The text and buffers of a value kept by :func:`encode_kept` (*text*, and *kept*: the
    sources of its buffers), as :func:`encode` with these *place*, *min_shared* and *lend*
    would make them: only the markers of the buffers that go through shared memory are
    rewritten; the rest of the text is used as it is.

    Markers are found by their key: :func:`encode` refused any value where the key appears
    other than in a marker, and a marker holds no ``}`` (its items are numbers, a dtype's
    string and a shape)."""
    state = _EncodeState(place, min_shared, lend)
    np = None
    if (place is None and lend is None) or all(_size(k) < min_shared for k in kept):
        for k in kept:
            if k.__class__ is memoryview:
                state.bufs.append(k)
            else:
                np = np or loaded_numpy()
                state.bufs.append(memoryview(k.reshape(-1).view(np.uint8)))
        return text, state.bufs
    parts: list[str] = []
    pos = 0
    for k in kept:
        start = text.index(_MARKER_OPEN, pos)
        parts.append(text[pos:start])
        if k.__class__ is memoryview:
            marker = _bytes_marker(state, k)
        else:
            np = np or loaded_numpy()
            marker = _array_marker(state, k, np)
        parts.append(_encode_json(marker))
        pos = text.index("}", start) + 1
    parts.append(text[pos:])
    return "".join(parts), state.bufs


def _size(kept: Any) -> int:
    return kept.nbytes  # type: ignore[no-any-return]


_IMMUTABLE = frozenset({str, int, float, bool, type(None), bytes})


def as_sent(obj: Any) -> Any:
    """What the other side of a connection would decode from *obj*: the one contract for what
    a payload or a result becomes, whichever kind of worker it goes to or comes from.

    Containers become JSON's (tuples lists, dict keys strings), NumPy scalars Python numbers,
    ``bytearray``/``memoryview`` ``bytes``; arrays keep dtype and shape and are copies of their
    own, writable. Nothing mutable is shared with *obj*. ``TypeError``/``ValueError`` as
    :func:`encode` for what cannot travel.

    The common shapes (lists, tuples and str-keyed dicts of numbers, strings, bytes and
    arrays) are copied directly; anything else takes the way a frame does (encode, decode),
    which is the definition.
    """
    try:
        return _copy(obj)
    except RecursionError:
        raise ValueError("payload is circular or nested too deeply") from None


def _copy(obj: Any) -> Any:
    cls = type(obj)
    if cls in _IMMUTABLE:
        return obj
    if cls is list or cls is tuple:
        return [x if type(x) in _IMMUTABLE else _copy(x) for x in obj]
    if cls is dict:
        out = {}
        for k, v in obj.items():
            if type(k) is not str:
                return _through_json(obj)  # key conversions: as JSON does them
            out[k] = v if type(v) in _IMMUTABLE else _copy(v)
        if MARKER_KEY in out and len(out) == 1:
            raise ValueError(f"a payload dict may not use the reserved key {MARKER_KEY!r}")
        return out
    np = _np if _np is not None else loaded_numpy()
    if np is not None and cls is np.ndarray:
        if obj.dtype.hasobject or obj.dtype.fields is not None:
            raise TypeError(f"numpy arrays of dtype {obj.dtype} cannot be sent (object/struct)")
        return obj.copy(order="C")
    if cls is bytearray or cls is memoryview:
        return bytes(obj)
    return _through_json(obj)


def _through_json(obj: Any) -> Any:
    text, bufs = encode(obj)
    if not bufs:
        return json.loads(text) if _MARKER_TEXT not in text else decode(text)
    return decode(text, [memoryview(bytearray(b)) for b in bufs])


def scalar_json(obj: Any) -> str | None:
    """The JSON :func:`encode` would make of an int, a short str, a bool or None, made without
    the encoder (the text of a round trip's typical payload or result); ``None`` for any other
    value, which takes the encoder. Floats take it too: NaN and the infinities have spellings
    of their own, and it holds the one place that decides them."""
    kind = obj.__class__
    if kind is int:
        return int.__repr__(obj) if -(1 << 62) < obj < 1 << 62 else None
    if kind is str:
        return _quote(obj) if len(obj) < 4096 else None
    if obj is None:
        return "null"
    if kind is bool:
        return "true" if obj else "false"
    return None


def encode_str(obj: Any) -> str:
    """Encode a value that must not contain buffers (control messages)."""
    text, bufs = encode(obj)
    if bufs:
        raise TypeError("buffers are not allowed here")
    return text


def _prod(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _is_count(n: Any) -> bool:
    return type(n) is int and n >= 0


def make_object_hook(
    buffers: Sequence[memoryview], shared: SharedMemory | None = None
) -> tuple[Callable[[dict[str, Any]], Any], Any]:
    """An ``object_hook`` that swaps markers for buffers (or views of shared memory, through
    *shared*), and a function reporting how many frame buffers were claimed (the caller checks
    all were)."""
    state = [0]

    def next_buffer() -> memoryview:
        i = state[0]
        if i >= len(buffers):
            raise ProtocolError("more buffer markers than buffers in the frame")
        state[0] = i + 1
        return buffers[i]

    def shared_view(offset: Any, nbytes: int, segment: int = 0) -> memoryview:
        if shared is None:
            raise ProtocolError("a shared-memory marker, but no shared memory on this connection")
        return shared.view(offset, nbytes, segment)

    def hook(d: dict[str, Any]) -> Any:
        if MARKER_KEY not in d:
            return d
        if len(d) != 1:
            raise ProtocolError("malformed buffer marker")
        spec = d[MARKER_KEY]
        if isinstance(spec, int) and not isinstance(spec, bool):
            mv = next_buffer()
            if spec != mv.nbytes:
                raise ProtocolError(
                    f"buffer {state[0] - 1} declared {spec} bytes but {mv.nbytes} arrived"
                )
            return mv.tobytes()
        if type(spec) is list and len(spec) == 2 and _is_count(spec[0]) and _is_count(spec[1]):
            return shared_view(spec[0], spec[1]).tobytes()
        if (
            isinstance(spec, list)
            and 2 <= len(spec) <= 4
            and isinstance(spec[0], str)
            and isinstance(spec[1], list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in spec[1])
        ):
            try:
                np = import_numpy()
                dtype = np.dtype(spec[0]) if np is not None else None
            except TypeError as exc:
                raise ProtocolError(f"bad array dtype {spec[0]!r}") from exc
            segment = 0
            if len(spec) == 4:
                if type(spec[3]) is not int or spec[3] != POOL_SEGMENT:
                    raise ProtocolError("malformed buffer marker")
                segment = POOL_SEGMENT
            if len(spec) >= 3:
                if dtype is None:
                    raise ProtocolError("a shared-memory array needs numpy on this side")
                if len(spec[1]) > 64:
                    raise ProtocolError("array has too many dimensions")
                mv = shared_view(spec[2], _prod(spec[1]) * dtype.itemsize, segment)
            else:
                mv = next_buffer()
            if dtype is None:
                # Without numpy the caller still gets the data, with its layout.
                return {"dtype": spec[0], "shape": spec[1], "data": mv.tobytes()}
            if dtype.hasobject or dtype.fields is not None:
                raise ProtocolError(f"array dtype {spec[0]!r} is not allowed")
            if _prod(spec[1]) * dtype.itemsize != mv.nbytes:
                raise ProtocolError(
                    f"buffer holds {mv.nbytes} bytes, array {spec[0]}{spec[1]} needs "
                    f"{_prod(spec[1]) * dtype.itemsize}"
                )
            base = np.frombuffer(mv, dtype=dtype)
            if len(spec) >= 3:
                assert shared is not None
                # every view made from here on keeps `base` alive
                shared.hold(spec[2], base, segment)
            return base.reshape(spec[1])
        raise ProtocolError("malformed buffer marker")

    return hook, lambda: state[0]


def decode(
    text: str | bytes | bytearray | memoryview,
    buffers: Sequence[memoryview] = (),
    shared: SharedMemory | None = None,
) -> Any:
    """Decode JSON text that may hold buffer markers; the inverse of :func:`encode`.
    *shared* resolves markers that point into shared memory (without it they are an error).

    Any malformed input raises :class:`ProtocolError`, never another exception.
    """
    if not buffers and text.__class__ is str and _MARKER_TEXT not in text:
        # The usual frame header: plain JSON, parsed by the C scanner itself (json.loads
        # costs three Python calls and two regex matches more: half of it for a small
        # frame). Anything it does not take whole - whitespace around it, an error - goes the
        # general way below, which accepts or refuses it precisely.
        try:
            value, end = _scan(text, 0)
            if end == len(text):
                return value
        except (StopIteration, ValueError, RecursionError):
            pass
    if isinstance(text, memoryview | bytearray):
        text = bytes(text)
    try:
        if not buffers:
            if isinstance(text, bytes):
                marker_present = _MARKER_TEXT.encode() in text
            else:
                marker_present = _MARKER_TEXT in text
            if not marker_present:
                return json.loads(text)
            # Markers with no frame buffers behind them: in shared memory, or an error the hook
            # reports precisely.
        hook, claimed = make_object_hook(buffers, shared)
        value = json.loads(text, object_hook=hook)
    except ProtocolError:
        raise
    except (ValueError, RecursionError, TypeError) as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    if claimed() != len(buffers):
        raise ProtocolError(f"{len(buffers)} buffers arrived but {claimed()} were referenced")
    return value
