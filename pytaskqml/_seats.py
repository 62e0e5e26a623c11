"""A place in a spawned pool (:class:`Seat`), and what the supervisor needs of the
coordinator (:class:`SupervisorHost`)."""

from __future__ import annotations

import subprocess
from collections import deque
from typing import Any, Protocol

from . import _shm
from ._connection import Connection
from ._handles import WorkerHandle

FIRST_BACKOFF = 0.05


class Seat:
    """One supervised place in a spawned pool (see the module's docstring)."""

    def __init__(
        self,
        spawn_id: int,
        target: str,
        main_path: str | None,
        kwargs: dict[str, Any],
        window: int | None,
    ) -> None:
        self.spawn_id = spawn_id
        self.target = target
        self.main_path = main_path
        self.kwargs = kwargs
        self.window = window
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
        return f"<Seat {self.spawn_id} {self.target} pid={self.proc.pid if self.proc else None}>"


class SupervisorHost(Protocol):
    """What the supervisor needs of the coordinator."""

    def attach_spawned(
        self, seat: Seat, conn: Connection, hello: dict[str, Any]
    ) -> WorkerHandle | None:
        """Register a ready process's connection; None if it is not wanted (shutting down)."""

    def seat_retired(self, seat: Seat) -> None:
        """The seat will not be restarted (work nothing else can run must fail now)."""

    def changed(self) -> None:
        """Something statistics() shows changed (a restart, a failed start)."""
