"""Module-level functions the executor tests run in worker processes (and in
ProcessPoolExecutor's, to compare)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

_state: dict[str, Any] = {}


class CustomError(Exception):
    """An exception type that is not builtin: raised to the caller as TaskFailed."""


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0, *, scale: int = 1) -> int:
    return (a + b) * scale


def describe(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


def divide(a: float, b: float) -> float:
    return a / b


def lookup(key: Any) -> Any:
    return {"a": 1}[key]


def fail_with(kind: str, message: str) -> None:
    if kind == "custom":
        raise CustomError(message)
    if kind == "file":
        open(os.path.join(message, "missing", "file"))  # noqa: SIM115 - it raises
    cls = {"value": ValueError, "type": TypeError, "runtime": RuntimeError}[kind]
    raise cls(message) if message else cls()


def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def sleep_then(x: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return x


def pid(_: Any = None) -> int:
    return os.getpid()


def initialize(value: Any) -> None:
    _state["init"] = value


def initialized(_: Any = None) -> Any:
    return _state.get("init")


def exit_worker(_: Any = None) -> None:
    os._exit(7)


def die_once(marker: str, value: Any) -> Any:
    """Kills its worker the first time (creating *marker*), returns *value* when run again."""
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def wait_for_file(path: str, timeout: float = 30.0, started: str | None = None) -> str:
    """Blocks until *path* exists (a gate another process opens); first creates *started*,
    if given, to say it is running."""
    if started is not None:
        open(started, "w").close()
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return path


def returns_set(_: Any = None) -> set[int]:
    return {1, 2}


class MyValueError(ValueError):
    """A subclass of a builtin exception: raised to the caller as ValueError, type named."""


def fail_with_subclass(message: str) -> None:
    raise MyValueError(message)


def interrupt(_: Any = None) -> None:
    raise KeyboardInterrupt


def big_bytes(n: int) -> bytes:
    return bytes(n)


def array_of(n: int) -> Any:
    import numpy as np

    return np.full(n, 1, dtype=np.uint8)


class Base:
    @classmethod
    def make(cls, x: Any) -> list[Any]:
        return [cls.__name__, x]


class Sub(Base):
    pass
