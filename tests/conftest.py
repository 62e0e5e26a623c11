"""Shared fixtures: real worker processes started through the CLI, always cleaned up."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PYTASKQML_AUTHKEY", None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll a condition that lives in another process (no event to wait on across processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except OSError:
        return True


class Procs:
    """Starts processes and guarantees they are gone after the test."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def _start(self, argv: list[str], env: dict[str, str] | None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            env=env or child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(HERE),
        )
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return self._start(["-m", "pytaskqml", *args], env)

    def python(self, code: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return self._start(["-c", code], env)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()


def read_line_with(proc: subprocess.Popen[str], needle: str, timeout: float = 20.0) -> str:
    """Read the child's stderr until a line containing *needle* (or fail with what it said)."""
    assert proc.stderr is not None
    lines: queue.Queue[str | None] = getattr(proc, "_lines", None) or queue.Queue()
    if not hasattr(proc, "_lines"):
        proc._lines = lines  # type: ignore[attr-defined]
        stream = proc.stderr

        def pump() -> None:
            for line in stream:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r}; the process said: {seen}")


def join_threads(
    *prefixes: str, timeout: float = 15.0, besides: set[threading.Thread] | None = None
) -> None:
    """Wait for this process's threads whose names start with one of *prefixes* to end (e.g.
    the reader and writer of a worker that left: until they have, they refer to its handle),
    except those in *besides* (threads that were there before, of other coordinators)."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if besides is not None and t in besides:
            continue
        if t.name.startswith(prefixes) and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
            assert not t.is_alive(), f"thread {t.name} still running"
