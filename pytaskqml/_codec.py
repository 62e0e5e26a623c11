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

A user dict whose only key is ``K`` would be ambiguous; the encoder detects it and raises
``ValueError`` instead of letting it be misread.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import ProtocolError

_np: Any
try:  # numpy is optional: used when importable, never required.
    import numpy as _np
except ImportError:  # pragma: no cover - exercised on machines without numpy
    _np = None

MARKER_KEY = "\x00pq"
# How the key looks inside encoded JSON text (json escapes the NUL byte).
_MARKER_TEXT = json.dumps(MARKER_KEY)

Buffer = memoryview

_tls = threading.local()


def _default(obj: Any) -> Any:
    """``json`` calls this for every value it cannot encode: buffers become markers."""
    bufs: list[memoryview] = _tls.bufs
    if isinstance(obj, bytes | bytearray | memoryview):
        mv = memoryview(obj)
        if not mv.c_contiguous:
            mv = memoryview(mv.tobytes())
        mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        bufs.append(mv)
        return {MARKER_KEY: mv.nbytes}
    if _np is not None:
        if isinstance(obj, _np.ndarray):
            if obj.dtype.hasobject or obj.dtype.fields is not None:
                raise TypeError(f"numpy arrays of dtype {obj.dtype} cannot be sent (object/struct)")
            arr = _np.ascontiguousarray(obj)
            flat: Any = arr.reshape(-1).view(_np.uint8)
            bufs.append(memoryview(flat))
            return {MARKER_KEY: [arr.dtype.str, list(arr.shape)]}
        if isinstance(obj, _np.generic):
            return obj.item()
    raise TypeError(
        f"Object of type {type(obj).__name__} is not JSON serializable "
        "(payloads must be JSON types, bytes/bytearray/memoryview or numpy arrays)"
    )


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_default, allow_nan=True)


def encode(obj: Any) -> tuple[str, list[memoryview]]:
    """Encode *obj* to JSON text and the list of raw buffers it refers to.

    Raises ``TypeError`` for a value that is neither JSON nor a supported buffer, and
    ``ValueError`` for circular references or a dict that looks like a buffer marker.
    """
    outer = getattr(_tls, "bufs", None)
    bufs: list[memoryview] = []
    _tls.bufs = bufs
    try:
        text = _ENCODER.encode(obj)
    finally:
        _tls.bufs = outer
    if _MARKER_TEXT in text and text.count(_MARKER_TEXT) != len(bufs):
        raise ValueError(f"a payload dict may not use the reserved key {MARKER_KEY!r}")
    return text, bufs


def encode_str(obj: Any) -> str:
    """Encode a value that must not contain buffers (control messages)."""
    text, bufs = encode(obj)
    if bufs:
        raise TypeError("buffers are not allowed here")
    return text


def _prod(shape: Sequence[int]) -> int:
    return math.prod(shape)


def make_object_hook(buffers: Sequence[memoryview]) -> tuple[Callable[[dict[str, Any]], Any], Any]:
    """An ``object_hook`` that swaps markers for buffers, and a function reporting how many
    buffers were claimed (the caller checks all were)."""
    state = [0]

    def hook(d: dict[str, Any]) -> Any:
        if MARKER_KEY not in d:
            return d
        if len(d) != 1:
            raise ProtocolError("malformed buffer marker")
        i = state[0]
        if i >= len(buffers):
            raise ProtocolError("more buffer markers than buffers in the frame")
        state[0] = i + 1
        mv = buffers[i]
        spec = d[MARKER_KEY]
        if isinstance(spec, int) and not isinstance(spec, bool):
            if spec != mv.nbytes:
                raise ProtocolError(f"buffer {i} declared {spec} bytes but {mv.nbytes} arrived")
            return mv.tobytes()
        if (
            isinstance(spec, list)
            and len(spec) == 2
            and isinstance(spec[0], str)
            and isinstance(spec[1], list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in spec[1])
        ):
            if _np is None:
                # Without numpy the caller still gets the data, with its layout.
                return {"dtype": spec[0], "shape": spec[1], "data": mv.tobytes()}
            try:
                dtype = _np.dtype(spec[0])
            except TypeError as exc:
                raise ProtocolError(f"bad array dtype {spec[0]!r}") from exc
            if dtype.hasobject or dtype.fields is not None:
                raise ProtocolError(f"array dtype {spec[0]!r} is not allowed")
            if _prod(spec[1]) * dtype.itemsize != mv.nbytes:
                raise ProtocolError(
                    f"buffer {i} holds {mv.nbytes} bytes, array {spec[0]}{spec[1]} needs "
                    f"{_prod(spec[1]) * dtype.itemsize}"
                )
            return _np.frombuffer(mv, dtype=dtype).reshape(spec[1])
        raise ProtocolError("malformed buffer marker")

    return hook, lambda: state[0]


def decode(text: str | bytes | bytearray | memoryview, buffers: Sequence[memoryview] = ()) -> Any:
    """Decode JSON text that may hold buffer markers; the inverse of :func:`encode`.

    Any malformed input raises :class:`ProtocolError`, never another exception.
    """
    if isinstance(text, memoryview | bytearray):
        text = bytes(text)
    try:
        if not buffers:
            value = json.loads(text)
            if isinstance(text, bytes):
                marker_present = _MARKER_TEXT.encode() in text
            else:
                marker_present = _MARKER_TEXT in text
            if marker_present:
                # A marker with no buffers behind it: run the hook to report it precisely.
                hook, _ = make_object_hook(())
                value = json.loads(text, object_hook=hook)
            return value
        hook, claimed = make_object_hook(buffers)
        value = json.loads(text, object_hook=hook)
    except ProtocolError:
        raise
    except (ValueError, RecursionError, TypeError) as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    if claimed() != len(buffers):
        raise ProtocolError(f"{len(buffers)} buffers arrived but {claimed()} were referenced")
    return value
