"""Worker classes the pipeline tests run in threads and spawned processes (importable by a
child process)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from pytaskqml import Worker


class Tag(Worker):
    """Appends its tag to the item's list: an item shows every stage it went through."""

    def __init__(self, tag: str = "t") -> None:
        self.tag = tag

    def process(self, payload: Any) -> Any:
        if not isinstance(payload, list):
            payload = [payload]
        return [*payload, self.tag]


class Pause(Worker):
    """Returns its item after *delay* seconds (a slow branch)."""

    def __init__(self, delay: float = 0.001) -> None:
        self.delay = delay

    def process(self, payload: Any) -> Any:
        time.sleep(self.delay)
        return payload


class FailOdd(Worker):
    def process(self, payload: int) -> int:
        if payload % 2:
            raise ValueError(f"odd item {payload}")
        return payload * 10


class Gate(Worker):
    """Holds every item until its event is set (a stalled last stage)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def process(self, payload: Any) -> Any:
        if not self.release.wait(60):
            raise TimeoutError("the gate was never opened")
        return payload


class Marker(Worker):
    """Leaves a file when constructed: proof that something built it."""

    def __init__(self, marker: str = "") -> None:
        if marker:
            with open(marker, "a") as f:
                f.write(f"{os.getpid()}\n")

    def process(self, payload: Any) -> Any:
        return payload
