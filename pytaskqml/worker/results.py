"""A worker's result rows: checking the task rows of a ``run`` frame, counting the items
that raised, and encoding result rows ``(task id, flag, value)`` for the wire."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..wire import codec as _codec
from ..wire.protocol import CHUNK_ROW, RESULT_CHUNK, RESULT_ERROR, RESULT_OK, RESULT_RUN
from .base import error_info


def count_errors(rows: Sequence[tuple[int, int, Any]]) -> int:
    """Items that raised among result rows (see :func:`~._worker.run_entries`)."""
    n = 0
    for _, flag, value in rows:
        if flag == RESULT_ERROR:
            n += 1
        elif flag == RESULT_CHUNK:
            n += sum(1 for k, _ in value if k == RESULT_ERROR)
    return n


def valid_row(e: Any) -> bool:
    if type(e) is not list or not e or type(e[0]) is not int:
        return False
    if len(e) == 2:
        return True
    if len(e) != 3:
        return False
    opts = e[2]
    if opts == CHUNK_ROW and opts is not True:
        return type(e[1]) is list
    if type(opts) is not dict:
        return False
    name, key = opts.get("m"), opts.get("k")
    return (
        (name is None or type(name) is str)
        and (key is None or type(key) is str)
        and (not opts.get("c") or type(e[1]) is list)
    )


def _wire_value(flag: int, value: Any) -> Any:
    """Exceptions travel as ``[type, message, traceback]`` text, never as objects."""
    if flag == RESULT_ERROR:
        return error_info(value)
    if flag == RESULT_CHUNK:
        return [[k, error_info(v) if k else v] for k, v in value]
    return value  # a result, or (RESULT_RUN) a list of results


def encode_results(results: Sequence[tuple[int, int, Any]]) -> tuple[str, list[memoryview]]:
    """Encode result rows ``(task id, flag, value)`` (see :func:`~._worker.run_entries`) as one
    JSON array plus buffers.

    One encoder call does the whole list; only if that fails is each row (and each item of a
    chunk) encoded alone, so a result that cannot be encoded fails its own task and no other.
    """
    rows = [[tid, flag, _wire_value(flag, v)] for tid, flag, v in results]
    try:
        return _codec.encode(rows)
    except (TypeError, ValueError):
        pass
    parts: list[str] = []
    buffers: list[memoryview] = []
    for row in rows:
        if row[1] == RESULT_RUN:
            row = [row[0], RESULT_CHUNK, [[RESULT_OK, v] for v in row[2]]]
        if row[1] == RESULT_CHUNK:
            items = []
            for item in row[2]:
                try:
                    _codec.encode(item)
                    items.append(item)
                except (TypeError, ValueError) as exc:
                    items.append([RESULT_ERROR, error_info(exc)])
            row = [row[0], RESULT_CHUNK, items]
        try:
            text, bufs = _codec.encode(row)
        except (TypeError, ValueError) as exc:
            text, bufs = _codec.encode([row[0], RESULT_ERROR, error_info(exc)])
        parts.append(text)
        buffers.extend(bufs)
    return "[" + ",".join(parts) + "]", buffers
