"""Functions and a model the scheduling tests run in worker processes (importable by name).

They synchronise through files, the one thing every process here shares: a call *arrives*
in a directory and waits until enough distinct processes have (so two calls that must run at
the same time on different workers prove it by returning at all), or waits for a *gate* file
the test creates."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pytaskqml import Model

WAIT = 30.0  # what a call waits at most for the others, before it fails the test


def arrive(directory: str, parties: int = 2) -> int:
    """Mark this process as arrived in *directory*; wait until *parties* distinct processes
    have. Returns the pid; TimeoutError if they never come (the calls did not run at the
    same time on different workers)."""
    d = Path(directory)
    (d / str(os.getpid())).touch()
    deadline = time.monotonic() + WAIT
    while len(list(d.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(d.iterdir()))} of {parties} processes arrived")
        time.sleep(0.005)
    return os.getpid()


def arrive_or_quick(payload: Any) -> int:
    """One argument (for ``spawn(fn)``): ``[directory, parties]`` arrives; anything else
    returns at once."""
    if isinstance(payload, list):
        return arrive(payload[0], payload[1])
    return os.getpid()


def gate(path: str) -> str:
    """Wait until the file *path* exists."""
    deadline = time.monotonic() + WAIT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)
    return path


def ran(directory: str, name: str, gate_path: str | None = None) -> str:
    """Record that the call *name* ran (a file in *directory*), then wait for the gate, if
    any."""
    (Path(directory) / name).touch()
    if gate_path is not None:
        gate(gate_path)
    return name


def quick(x: Any) -> Any:
    return x


class GateModel(Model):
    """Each item: record that it started (a file ``started`` in the config's directory),
    wait for the config's gate file, return the item."""

    def load(self, config: dict[str, Any]) -> None:
        self.directory = config["directory"]
        self.gate = config["gate"]

    def predict(self, item: Any) -> Any:
        (Path(self.directory) / "started").touch()
        gate(self.gate)
        return item


def logged(payload: list[Any]) -> str:
    """``[log file, name, gate path or None]``: wait for the gate, if any, then append *name*
    to the log (one short write: appends of different processes do not interleave)."""
    log_path, name, gate_path = payload
    if gate_path is not None:
        gate(gate_path)
    with open(log_path, "a") as f:
        f.write(name + "\n")
    return str(name)
