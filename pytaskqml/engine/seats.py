"""A place in a spawned pool (:class:`Seat`), the device each seat is given
(:func:`assign_devices`), and what the supervisor needs of the coordinator
(:class:`SupervisorHost`)."""

from __future__ import annotations

import subprocess
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Protocol

from ..buffers import shm as _shm
from ..wire.connection import Connection
from .handles import WorkerHandle

FIRST_BACKOFF = 0.05
# What a seat's device is written to in its process's environment before anything of the
# user's runs (CUDA libraries read it once, when they initialise): the device as the process
# sees it, and the same value under our own name for frameworks that read something else.
DEVICE_ENV = ("CUDA_VISIBLE_DEVICES", "PYTASKQML_DEVICE")


def check_devices(devices: object) -> list[str] | None:
    """``spawn(devices=...)`` as strings: None, or a non-empty sequence of device ids (an int
    from 0, or a string such as ``"1"``, ``"0,1"`` or ``"GPU-5f3c..."``)."""
    if devices is None:
        return None
    if isinstance(devices, str | bytes) or not isinstance(devices, Sequence):
        raise TypeError(f"devices must be a list such as [0, 1], not {devices!r}")
    out: list[str] = []
    for d in devices:
        if isinstance(d, int) and not isinstance(d, bool) and d >= 0:
            out.append(str(d))
        elif isinstance(d, str) and "\0" not in d:
            out.append(d)
        else:
            raise ValueError(f"a device is an int from 0 or a string, not {d!r}")
    if not out:
        raise ValueError("devices must name at least one device (or be None)")
    return out


def assign_devices(devices: Sequence[str], in_use: Sequence[str], count: int) -> list[str]:
    """Devices for *count* new seats: each goes to the device fewest seats of the pool hold
    (*in_use*: the devices of its live seats), the first listed on a tie. For a new pool that
    is round-robin in the order given; a pool growing back after shrinking fills the gaps."""
    load = Counter({d: 0 for d in devices})
    load.update(d for d in in_use if d in load)
    picked = []
    for _ in range(count):
        device = min(devices, key=lambda d: load[d])  # min() keeps the first of equals
        load[device] += 1
        picked.append(device)
    return picked


class Seat:
    """One supervised place in a spawned pool (see the module's docstring)."""

    def __init__(
        self,
        spawn_id: int,
        target: str,
        main_path: str | None,
        kwargs: dict[str, Any],
        window: int | None,
        device: str | None = None,
    ) -> None:
        self.spawn_id = spawn_id
        self.target = target
        self.main_path = main_path
        self.kwargs = kwargs
        self.window = window
        self.device = device  # every process of this seat sees only this device
        self.proc: subprocess.Popen[bytes] | None = None
        self.handle: WorkerHandle | None = None
        self.arena: _shm.Arena | None = None  # shared memory with the current process
        self.error: str | None = None  # why its last start failed
        self.error_traceback = ""
        self.start_failures = 0  # failed starts in a row
        self.restarts = 0
        self.backoff = FIRST_BACKOFF
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.retired = False
        self.ready_once = False
        # Restart after a failed first start? Not for spawn(wait=True), which reports it.
        self.retry_first_start = True
        self.restart_times: deque[float] = deque()

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        on = f" device={self.device}" if self.device is not None else ""
        return f"<Seat {self.spawn_id} {self.target} pid={pid}{on}>"

    def environ(self) -> dict[str, str]:
        """What this seat's processes get in their environment on top of ours."""
        return {} if self.device is None else dict.fromkeys(DEVICE_ENV, self.device)


class SupervisorHost(Protocol):
    """What the supervisor needs of the worker pool that holds it."""

    def attach_spawned(
        self, seat: Seat, conn: Connection, hello: dict[str, Any]
    ) -> WorkerHandle | None:
        """Register a ready process's connection; None if it is not wanted (shutting down)."""

    def seat_retired(self, seat: Seat) -> None:
        """The seat will not be restarted (work nothing else can run must fail now)."""

    def changed(self) -> None:
        """Something statistics() shows changed (a restart, a failed start)."""
