"""Worker classes the tests run in threads, spawned processes and CLI workers.

They live in an importable module (not in a test file) so a child process can import them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pytaskqml import Worker, load


class Echo(Worker):
    def process(self, payload: Any) -> Any:
        return payload


class Square(Worker):
    def process(self, x: int) -> int:
        return x * x


class WordCount(Worker):
    def process(self, word: str) -> dict[str, int]:
        return {word: 1}


class Pid(Worker):
    """Returns which process ran the task, and after how long a pause."""

    def process(self, payload: Any) -> list[Any]:
        if isinstance(payload, list) and payload and isinstance(payload[1], int | float):
            time.sleep(payload[1])
            return [payload[0], os.getpid()]
        return [payload, os.getpid()]


class Faulty(Worker):
    def process(self, payload: Any) -> Any:
        if payload == "boom":
            raise ValueError("cannot process boom")
        if payload == "unencodable":
            return object()
        return payload


class Poison(Worker):
    """Kills its own process on the poison item, as a segfaulting model would."""

    def process(self, payload: Any) -> Any:
        if payload == "poison":
            os._exit(13)
        if isinstance(payload, list) and payload and payload[0] == "slow":
            time.sleep(payload[1])
            return payload[2]
        return payload


class Hang(Worker):
    def process(self, payload: Any) -> Any:
        if payload == "hang":
            time.sleep(3600)
        return payload


class Slow(Worker):
    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay

    def process(self, payload: Any) -> Any:
        time.sleep(self.delay)
        return payload


class SetupFails(Worker):
    def setup(self) -> None:
        raise RuntimeError("model file missing")

    def process(self, payload: Any) -> Any:
        return payload


class Batched(Worker):
    max_batch_size = 4

    def process_batch(self, payloads: list[Any]) -> list[Any]:
        out: list[Any] = []
        for p in payloads:
            out.append(ValueError("bad item") if p == "bad" else [p, len(payloads)])
        return out


class Tearable(Worker):
    """Writes a marker file from teardown() so a test can see teardown ran."""

    def __init__(self, marker: str = "") -> None:
        self.marker = marker

    def process(self, payload: Any) -> Any:
        if isinstance(payload, int | float) and payload > 0:
            time.sleep(payload)
        return payload

    def teardown(self) -> None:
        if self.marker:
            with open(self.marker, "w") as f:
                f.write("torn down")


class SpillSummer(Worker):
    """Loads a file handed over with pytaskqml.spill() and sums it."""

    def process(self, task: dict[str, Any]) -> float:
        return float(load(task["ref"], delete=True).sum())


class Counted(Worker):
    """Numbers its calls, so a test can tell that no item ran twice; fails on "boom" and
    returns something JSON cannot carry for "unencodable"."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def process(self, payload: Any) -> Any:
        self.calls += 1
        if payload == "boom":
            raise ValueError("cannot process boom")
        if payload == "unencodable":
            return object()
        return [payload, os.getpid(), self.calls]


class Churn(Worker):
    """Allocates and frees buffers of a few hundred KiB to MiBs per task, as a model over video
    frames does, and reports the page faults that cost this process (from getrusage)."""

    def process(self, rounds: int) -> int:
        import resource

        import numpy as np

        frame = np.full((480, 640, 3), 7, dtype=np.uint8)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            gray = frame.mean(axis=2, dtype=np.float32)
            float((gray[1:-1] + gray[2:] + gray[:-2]).mean())
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


class Sleepy(Worker):
    """Sleeps the given seconds; with a marker directory, first writes a file named after the
    process there, so a test in another process can see that the task started."""

    def __init__(self, marker_dir: str = "") -> None:
        self.marker_dir = marker_dir

    def process(self, seconds: float) -> float:
        if self.marker_dir:
            with open(os.path.join(self.marker_dir, f"started-{os.getpid()}"), "w") as f:
                f.write("1")
        time.sleep(seconds)
        return seconds


class SetupFailsAfterFirst(Worker):
    """setup() succeeds in the first process and fails in every later one (a model file that
    went missing after the first start)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def setup(self) -> None:
        if os.path.exists(self.marker):
            raise RuntimeError("the model file went missing")
        with open(self.marker, "w") as f:
            f.write(str(os.getpid()))

    def process(self, payload: Any) -> Any:
        return payload


def shape_of(value: Any) -> Any:
    """A description of a value's types, all the way down."""
    if isinstance(value, dict):
        return ["dict", {str(k): [type(k).__name__, shape_of(v)] for k, v in value.items()}]
    if isinstance(value, list | tuple):
        return [type(value).__name__, [shape_of(v) for v in value]]
    if type(value).__module__ == "numpy":
        if hasattr(value, "shape") and hasattr(value, "flags"):
            return ["ndarray", value.dtype.str, list(value.shape), bool(value.flags.writeable)]
        return ["numpy-scalar", type(value).__name__]
    return type(value).__name__


class Inspect(Worker):
    """Returns what arrived (its types, all the way down) and the payload itself, after
    writing into the arrays and dicts it was given (they are the worker's own)."""

    def process(self, payload: Any) -> list[Any]:
        seen = shape_of(payload)
        scribble(payload)
        return [seen, payload]


def scribble(value: Any) -> None:
    if isinstance(value, dict):
        value["scribbled"] = True
        for v in list(value.values()):
            scribble(v)
    elif isinstance(value, list):
        for v in value:
            scribble(v)
    elif type(value).__module__ == "numpy" and getattr(value, "ndim", 0) > 0:
        value.flat[0] = 7


class History(Worker):
    """Returns every payload this worker has seen, in the order it saw them."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def process(self, payload: Any) -> list[Any]:
        self.seen.append(payload)
        return list(self.seen)


class Patient(Worker):
    """Opts in to interrupts and checks cancelled(): a payload of *n* seconds runs until
    then or until it is no longer wanted; returns ``[how it ended, pid]``."""

    interrupt_grace = 5.0

    def process(self, payload: Any) -> list[Any]:
        end = time.monotonic() + float(payload)
        while time.monotonic() < end:
            if self.cancelled():
                return ["interrupted", os.getpid()]
            time.sleep(0.005)
        return ["done", os.getpid()]


class Stuck(Worker):
    """Opts in to interrupts but never checks: sleeps *payload* seconds; returns its pid."""

    interrupt_grace = 0.3

    def process(self, payload: Any) -> int:
        time.sleep(float(payload))
        return os.getpid()
