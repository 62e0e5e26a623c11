"""Worker classes for the shared-memory tests (importable by spawned children)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from pytaskqml import Worker


def digest(arr: Any) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast("B")).hexdigest()[:16]


class Describe(Worker):
    """Returns what arrived: a checksum, the shape and dtype, and which process saw it."""

    def process(self, arr: Any) -> list[Any]:
        return [digest(arr), list(arr.shape), arr.dtype.str, os.getpid()]


class Keeper(Worker):
    """Keeps every array it is given and checks on each call that none of them changed: the
    memory behind a kept array must not be handed out again."""

    def __init__(self, keep: int = 40) -> None:
        super().__init__()
        self.keep = keep
        self.kept: list[tuple[Any, str]] = []

    def process(self, arr: Any) -> int:
        self.kept.append((arr[::2], digest(arr[::2])))  # a view is enough to keep it alive
        del self.kept[: -self.keep]
        return sum(digest(a) != d for a, d in self.kept)


class Scribble(Worker):
    """Writes into the array it receives (it is the worker's own) and returns its sum."""

    def process(self, arr: Any) -> int:
        arr[:] = 7
        return int(arr.sum())


class BytesInfo(Worker):
    def process(self, payload: Any) -> list[Any]:
        return [type(payload).__name__, len(payload), hashlib.sha256(payload).hexdigest()[:16]]


class DigestThenScribble(Worker):
    """Returns the checksum of what arrived, then writes over it: a worker's writes must stay
    its own, and must not show in the next frame that lands in the same memory."""

    def process(self, arr: Any) -> str:
        d = digest(arr)
        arr[:] = 7
        return d


class ScribbleAndDie(Worker):
    """The first time any worker of the test sees a frame (no *flag* file yet) it writes over
    the frame and kills its own process; afterwards it describes what it gets."""

    def __init__(self, flag: str) -> None:
        super().__init__()
        self.flag = flag

    def process(self, arr: Any) -> str:
        try:
            fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return digest(arr)
        os.close(fd)
        arr[:] = 0
        os.kill(os.getpid(), 9)
        return "unreachable"


class GatedDescribe(Describe):
    """:class:`Describe`, but a path payload is a FIFO to read first: the task (and every task
    behind it on this worker) waits until the test writes to it."""

    def process(self, arr: Any) -> Any:
        if isinstance(arr, str):
            with open(arr) as gate:
                return gate.read()
        return super().process(arr)
