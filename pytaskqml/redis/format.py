"""What a Redis-backed queue stores: task entries, result entries, and the producer's cursor.

Everything in Redis is JSON text and raw bytes (never pickle), built with :mod:`._codec`: a
payload's JSON goes in one field and each of its raw buffers (bytes, NumPy arrays) in a field of
its own, so a frame is stored as its bytes, not as base64 or text.

A task entry (``XADD`` to the queue's stream)::

    h   {"v": 1, "p": producer, "s": seq, "n": count, "b": buffers[, "rt": seconds][, "dl": epoch]}
    d   the payload's JSON (with count > 1: a JSON list of the count items of a chunk)
    0.. the raw buffers the JSON's markers refer to, in order

``seq .. seq + count - 1`` are the items' numbers in their producer's submission order; ``rt``
bounds how long each item may run, ``dl`` is a deadline counted from submission (wall clock).

A result entry (``XADD`` to the producer's result stream) has the same shape; its header says
which items it answers and how ``d`` reads::

    h   {"v": 1, "s": seq, "n": count, "k": kind, "b": buffers}
        kind "ok":      d is the result (count 1)
             "run":     d is the list of the count results
             "chunk":   d is a list of count [flag, value]: flag 0 a result, 1 an error
                        [type, message, traceback], 3 a timeout (its seconds)
             "error":   d is [type, message, traceback], for every item
             "timeout": d is the timeout in seconds, for every item

Any entry that does not parse is :class:`BadEntry` with the reason; nothing here raises
anything else for bad input.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ProtocolError
from ..wire import codec as _codec

FORMAT_VERSION = 1
MAX_COUNT = 65_536  # items in one entry
MAX_HEADER = 4096  # bytes of a header
MAX_BUFFERS = 4096
# A producer's name becomes part of key names: a small alphabet, so an entry cannot aim its
# results at a key outside its queue's prefix.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

FLAG_OK, FLAG_ERROR, FLAG_TIMEOUT = 0, 1, 3
RESULT_KINDS = ("ok", "run", "chunk", "error", "timeout")

Fields = dict[bytes, Any]


class BadEntry(ValueError):
    """An entry that cannot be read; the message says why (it goes with the dead letter)."""


def check_name(name: str, what: str = "producer name") -> str:
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(f"{what} must be 1-128 characters of A-Z a-z 0-9 _ . : -, got {name!r}")
    return name


def _fields(header: dict[str, Any], text: str, bufs: list[memoryview]) -> Fields:
    header["b"] = len(bufs)
    out: Fields = {b"h": json.dumps(header, separators=(",", ":")), b"d": text.encode()}
    for i, b in enumerate(bufs):
        out[str(i).encode()] = b
    return out


@dataclass
class Body:
    """A task's payload encoded for an entry, before it is numbered."""

    count: int
    text: str
    bufs: list[memoryview]
    run_timeout: float | None = None
    deadline: float | None = None

    @property
    def nbytes(self) -> int:
        return len(self.text) + sum(b.nbytes for b in self.bufs) + 64


def encode_body(
    count: int, payload: Any, *, run_timeout: float | None = None, deadline: float | None = None
) -> Body:
    """Encode a payload (the list of items when *count* > 1); ``TypeError``/``ValueError``
    for one that cannot travel."""
    text, bufs = _codec.encode(payload)
    return Body(count, text, bufs, run_timeout, deadline)


def task_fields(producer: str, seq: int, body: Body) -> Fields:
    """The fields of a task entry."""
    header: dict[str, Any] = {"v": FORMAT_VERSION, "p": producer, "s": seq, "n": body.count}
    if body.run_timeout is not None:
        header["rt"] = body.run_timeout
    if body.deadline is not None:
        header["dl"] = body.deadline
    return _fields(header, body.text, body.bufs)


def stream_entries(reply: Any) -> list[tuple[bytes, Any]]:
    """The entries of an XREAD/XREADGROUP reply (RESP2 list or RESP3 dict), all streams."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: [entries]}
        lists = [entries for value in reply.values() for entries in value]
    else:  # RESP2: [[stream, entries]]
        lists = [item[1] for item in reply]
    return [(eid, fields) for entries in lists for eid, fields in entries]


def entry_size(fields: Fields) -> int:
    return sum(len(k) + len(v) for k, v in fields.items())


@dataclass
class TaskEntry:
    producer: str
    seq: int
    count: int
    payload: Any  # the item, or the list of a chunk's items
    run_timeout: float | None
    deadline: float | None
    nbytes: int  # the entry's size in Redis


def _header(fields: Any) -> dict[str, Any]:
    if not isinstance(fields, dict):
        raise BadEntry("the entry has no fields")
    raw = fields.get(b"h")
    if not isinstance(raw, bytes):
        raise BadEntry("no header field 'h'")
    if len(raw) > MAX_HEADER:
        raise BadEntry(f"header of {len(raw)} bytes (at most {MAX_HEADER})")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadEntry(f"header is not JSON: {exc}") from None
    if type(header) is not dict:
        raise BadEntry("header is not a JSON object")
    if header.get("v") != FORMAT_VERSION:
        raise BadEntry(f"unknown format version {header.get('v')!r}")
    return header


def _int(header: dict[str, Any], key: str, low: int, high: int) -> int:
    value = header.get(key)
    if type(value) is not int or not low <= value <= high:
        raise BadEntry(f"header field {key!r} must be an integer in {low}..{high}, got {value!r}")
    return value


def _seconds(header: dict[str, Any], key: str) -> float | None:
    value = header.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not value > 0 or value != value or value > 1e12:
        raise BadEntry(f"header field {key!r} must be a positive number, got {value!r}")
    return float(value)


def _body(fields: Fields, header: dict[str, Any]) -> Any:
    nbuf = _int(header, "b", 0, MAX_BUFFERS)
    text = fields.get(b"d")
    if not isinstance(text, bytes):
        raise BadEntry("no data field 'd'")
    bufs = []
    for i in range(nbuf):
        b = fields.get(str(i).encode())
        if not isinstance(b, bytes):
            raise BadEntry(f"buffer field {i} is missing")
        bufs.append(memoryview(b))
    try:
        return _codec.decode(text, bufs)
    except ProtocolError as exc:
        raise BadEntry(f"data does not decode: {exc}") from None
    except UnicodeDecodeError:
        raise BadEntry("data is not UTF-8") from None


def _task_header(fields: Any) -> tuple[dict[str, Any], str, int, int]:
    header = _header(fields)
    producer = header.get("p")
    if not isinstance(producer, str) or NAME_PATTERN.fullmatch(producer) is None:
        raise BadEntry(f"bad producer name {producer!r}")
    return header, producer, _int(header, "s", 0, 2**62), _int(header, "n", 1, MAX_COUNT)


def parse_task_header(fields: Any) -> tuple[str, int, int]:
    """``(producer, seq, count)`` of a task entry, or :class:`BadEntry`."""
    return _task_header(fields)[1:]


def parse_task(fields: Any) -> TaskEntry:
    """Read a task entry; :class:`BadEntry` with the reason if it cannot be run."""
    header, producer, seq, count = _task_header(fields)
    payload = _body(fields, header)
    if count > 1 and (type(payload) is not list or len(payload) != count):
        raise BadEntry(f"a chunk of {count} items whose data is not a list of {count}")
    return TaskEntry(
        producer,
        seq,
        count,
        payload,
        _seconds(header, "rt"),
        _seconds(header, "dl"),
        entry_size(fields),
    )


def result_fields(seq: int, count: int, kind: str, value: Any) -> Fields:
    text, bufs = _codec.encode(value)
    return _fields({"v": FORMAT_VERSION, "s": seq, "n": count, "k": kind}, text, bufs)


def error_value(exc: BaseException) -> list[str]:
    """``[type, message, traceback]`` of an error, as a result entry carries it."""
    remote_type = getattr(exc, "remote_type", None)
    if isinstance(remote_type, str):
        return [remote_type, str(getattr(exc, "message", exc)), str(exc.remote_traceback)]  # type: ignore[attr-defined]
    return [type(exc).__name__, str(exc), ""]


def parse_result(fields: Any) -> tuple[int, int, str, Any]:
    """``(seq, count, kind, value)`` of a result entry, or :class:`BadEntry`."""
    header = _header(fields)
    seq, count = _int(header, "s", 0, 2**62), _int(header, "n", 1, MAX_COUNT)
    kind = header.get("k")
    if kind not in RESULT_KINDS:
        raise BadEntry(f"unknown result kind {kind!r}")
    value = _body(fields, header)
    if kind in ("run", "chunk") and (type(value) is not list or len(value) != count):
        raise BadEntry(f"a {kind} result for {count} items that is not a list of {count}")
    if kind == "chunk":
        for item in value:
            if type(item) is not list or len(item) != 2 or item[0] not in (0, 1, 3):
                raise BadEntry("malformed item of a chunk result")
            if item[0] == FLAG_ERROR:
                _error_info(item[1])
    if kind == "error":
        _error_info(value)
    if kind == "ok" and count != 1:
        raise BadEntry("an 'ok' result for more than one item")
    return seq, count, kind, value


def _error_info(info: Any) -> None:
    if not (type(info) is list and len(info) == 3 and all(type(x) is str for x in info)):
        raise BadEntry("malformed error in a result")


class SeqSet:
    """A set of non-negative integers kept as sorted, disjoint, non-touching runs
    ``[start, end)``: a producer's taken (or still expected) sequence numbers, which come in
    long runs, so the set stays a handful of pairs however many items passed."""

    def __init__(self, runs: Any = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for run in runs:
            ok = type(run) is list and len(run) == 2 and all(type(x) is int for x in run)
            if ok and 0 <= run[0] < run[1]:
                self.add(run[0], run[1])

    def runs(self) -> list[list[int]]:
        return [[s, e] for s, e in zip(self._starts, self._ends, strict=True)]

    def __len__(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def first(self) -> int | None:
        return self._starts[0] if self._starts else None

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self._ends, start + 1)
        return i < len(self._starts) and self._starts[i] < end

    def add(self, start: int, end: int) -> None:
        starts, ends = self._starts, self._ends
        if starts and start >= ends[-1]:  # the common case: appending
            if start == ends[-1]:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
            return
        i = bisect.bisect_left(ends, start)  # first run that ends at or after start
        j = bisect.bisect_right(starts, end)  # runs before j start at or before end
        if i < j:
            start, end = min(start, starts[i]), max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(ends, start)
        j = bisect.bisect_left(starts, end)
        if i >= j:
            return
        keep_s: list[int] = []
        keep_e: list[int] = []
        if starts[i] < start:
            keep_s.append(starts[i])
            keep_e.append(start)
        if ends[j - 1] > end:
            keep_s.append(end)
            keep_e.append(ends[j - 1])
        starts[i:j] = keep_s
        ends[i:j] = keep_e
