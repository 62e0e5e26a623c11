"""Spawned worker processes: starting them, restarting them with backoff, retiring crash
loops, reaping them. Restarts run on the supervisor's own thread, so a slow ``Popen`` delays
no deadline, heartbeat or result.

A :class:`Seat` is one place in a spawned pool: it holds one process at a time and gets a new
one when that process dies. A process is *ready* once it has run ``setup()`` and said hello; a
start *fails* when it reports that it could not start, or exits before it is ready.

Backoff: a seat waits 50 ms before its first restart, doubling up to 5 s while its processes
die without getting anything done, and starting over once one did work. A seat is retired - no
more restarts - after ``max_start_failures`` failed starts in a row (a replacement whose
``setup()`` keeps failing), or more than ``max_restarts`` restarts within ``RESTART_WINDOW``
seconds (a worker that keeps crashing on its tasks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConnectionLost, ProtocolError
from ..wire import connection as _connection
from ..wire.connection import Connection
from ..wire.endpoints import Acceptor, read_hello
from .handles import WorkerHandle
from .launch import kill_process, launch, reap
from .seats import FIRST_BACKOFF, Seat, SupervisorHost

log = logging.getLogger(__name__)

RESTART_WINDOW = 60.0
MAX_BACKOFF = 5.0
# A seat whose process lived this long before dying starts its backoff over.
HEALTHY_AFTER = 10.0
# How often the supervisor looks at processes nothing else watches (one starting up).
POLL_INTERVAL = 0.25


class Supervisor:
    """Starts, restarts and reaps the processes of every seat of one coordinator."""

    def __init__(
        self,
        host: SupervisorHost,
        *,
        name: str,
        config: Callable[[], dict[str, Any]],
        max_restarts: int,
        max_start_failures: int,
        shared_memory: bool,
        max_frame_size: int,
        pool: Callable[[], tuple[int, str] | None] | None = None,
    ) -> None:
        self.host = host
        self._pool = pool  # the coordinator's buffer pool, for every child (see _bufpool)
        self.name = name
        self.max_restarts = max_restarts
        self.max_start_failures = max_start_failures
        self.shared_memory = shared_memory
        self.max_frame_size = max_frame_size
        self._config = config  # the settings every child gets
        self.seats: list[Seat] = []
        self._next_id = 1
        self.restarts = 0
        self.start_failures = 0
        self.last_error: str | None = None  # of the last failed start, with its traceback
        # Why the last seat given up was given up, when it was for failing to start: what work
        # that nothing else can run fails with (with the traceback, if there was one).
        self.retired_error: str | None = None
        self.retired_traceback = ""
        self._cv = threading.Condition(threading.Lock())
        self._stopping = False
        self._thread: threading.Thread | None = None
        # A spawned child gets one end of a socketpair at spawn time (POSIX): a channel no other
        # process can reach - nothing listens - and cheaper than TCP loopback (about half the
        # CPU per message here). Elsewhere children dial back to a loopback listener and
        # authenticate with a per-coordinator key they get on stdin.
        self.use_socketpair = os.name == "posix"
        self.spawn_key = secrets.token_bytes(32)
        self.listener: Acceptor | None = None

    # ------------------------------------------------------------------ seats

    def add(
        self,
        target: str,
        main_path: str | None,
        kwargs: dict[str, Any],
        window: int | None,
        count: int,
        *,
        retry_first_start: bool = True,
        devices: Sequence[str] | None = None,
    ) -> list[Seat]:
        """New seats, their processes started from the calling thread. Without
        *retry_first_start* a seat whose first process fails to start is not restarted (the
        caller reports the failure). *devices*: one per seat, kept by the seat for good."""
        if devices is not None and len(devices) != count:
            raise ValueError(f"{len(devices)} devices for {count} seats")
        with self._cv:
            if self._stopping:
                return []
            if self.listener is None and not self.use_socketpair:
                self.listener = Acceptor(
                    _connection.Listener(("127.0.0.1", 0)),
                    self.spawn_key,
                    on_connection=self._on_dial_back,
                    on_refused=lambda peer, why: log.warning(
                        "rejected connection from %s: %s", peer, why
                    ),
                    max_frame_size=self.max_frame_size,
                    name=self.name,
                )
                self.listener.start()
            seats = []
            for i in range(count):
                device = devices[i] if devices is not None else None
                seat = Seat(self._next_id, target, main_path, kwargs, window, device)
                seat.retry_first_start = retry_first_start
                seats.append(seat)
                self._next_id += 1
            self.seats.extend(seats)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name=f"pytaskqml-supervisor-{self.name}", daemon=True
                )
                self._thread.start()
        for seat in seats:
            self._start(seat)
        return seats

    def wait_ready(self, seats: list[Seat], timeout: float) -> tuple[bool, str | None]:
        """Block until every seat's first process is ready, or one fails; returns (all ready,
        the first error)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cv:
                failed = [s for s in seats if s.error and not s.ready_once]
                if failed:
                    return False, failed[0].error
                if all(s.ready_once for s in seats):
                    return True, None
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    return False, f"workers not ready within {timeout}s"
                self._cv.wait(min(remaining, POLL_INTERVAL))
            self._poll_starting()

    def retire(self, seat: Seat) -> None:
        """No more restarts for *seat*; its process is killed."""
        with self._cv:
            seat.retired = True
            handle = seat.handle
        if handle is not None:
            handle.abort("retired")
        kill_process(seat.proc)
        if seat.arena is not None:
            seat.arena.close()

    def dismiss(self, seat: Seat) -> None:
        """Let the seat's worker go for good (a pool shrinking): no restart; its process
        finishes what it holds, says goodbye and exits; it is reaped by the thread."""
        with self._cv:
            seat.retired = True
            handle = seat.handle
        if handle is not None:
            handle.request_stop()
        else:
            kill_process(seat.proc)

    def kill(self, seat: Seat) -> None:
        """End the seat's process now (its work is no longer wanted); it is restarted as after
        any other death unless the supervisor is stopping."""
        with self._cv:
            proc = seat.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()

    # ------------------------------------------------------------------ events

    def worker_left(self, handle: WorkerHandle, graceful: bool, did_work: bool) -> None:
        """The seat's worker left (its connection ended): restart its process after the
        backoff. Called by the coordinator once it has re-queued the worker's tasks."""
        with self._cv:
            seat = next((s for s in self.seats if s.handle is handle), None)
            if seat is None:
                return
            seat.handle = None
            if not self._stopping and not seat.retired:
                self._schedule_restart(seat, did_work=did_work)
            self._cv.notify_all()

    def _start_failed(self, seat: Seat, error: str, tb: str = "") -> None:
        retire = False
        with self._cv:
            if seat.retired or self._stopping:
                return
            seat.error = error
            seat.error_traceback = tb
            seat.start_failures += 1
            self.start_failures += 1
            self.last_error = error + (f"\n{tb}" if tb else "")
            log.warning(
                "worker %s (seat %d) failed to start: %s", seat.target, seat.spawn_id, error
            )
            if not seat.ready_once and not seat.retry_first_start:
                self._cv.notify_all()  # spawn(wait=True) reports it and retires the seat
                return
            if seat.start_failures >= self.max_start_failures:
                log.error(
                    "worker %s (seat %d) failed to start %d times in a row; not restarting it",
                    seat.target,
                    seat.spawn_id,
                    seat.start_failures,
                )
                self.retired_error = (
                    f"{seat.target} failed to start {seat.start_failures} times in a row; "
                    f"the last time: {error}"
                )
                self.retired_traceback = tb
                retire = True
            else:
                self._schedule_restart(seat)
            self._cv.notify_all()
        if retire:
            self.retire(seat)
            self.host.seat_retired(seat)
        self.host.changed()

    def _schedule_restart(self, seat: Seat, *, did_work: bool = False) -> None:
        """Lock held. Restart the seat's process after its backoff, or retire a crash loop."""
        now = time.monotonic()
        recent = seat.restart_times
        while recent and now - recent[0] > RESTART_WINDOW:
            recent.popleft()
        if len(recent) >= self.max_restarts:
            log.error(
                "worker %s (seat %d) died %d times within %.0fs; not restarting it again",
                seat.target,
                seat.spawn_id,
                len(recent),
                RESTART_WINDOW,
            )
            seat.retired = True
            self.retired_error = None
            threading.Thread(
                target=self._retired, args=(seat,), name="pytaskqml-retire", daemon=True
            ).start()
            return
        if did_work or now - seat.started_at > HEALTHY_AFTER:
            seat.backoff = FIRST_BACKOFF
        recent.append(now)
        seat.restart_at = now + seat.backoff
        seat.backoff = min(seat.backoff * 2, MAX_BACKOFF)
        self._cv.notify_all()

    def _retired(self, seat: Seat) -> None:
        try:
            self.retire(seat)
            self.host.seat_retired(seat)
        except BaseException:
            log.exception("retiring worker %s crashed", seat.target)

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        try:
            while self._loop_once():
                pass
        except BaseException:
            log.exception("supervisor thread crashed; spawned workers are no longer restarted")

    def _loop_once(self) -> bool:
        with self._cv:
            if self._stopping:
                return False
            now = time.monotonic()
            due = [s for s in self.seats if s.restart_at is not None and now >= s.restart_at]
            for s in due:
                s.restart_at = None
            pending = [s.restart_at for s in self.seats if s.restart_at is not None]
            wait = min([POLL_INTERVAL, *(max(0.0, t - now) for t in pending)])
        for seat in due:
            self._restart(seat)
        self._poll_starting()
        self._reap_dismissed()
        with self._cv:
            if not self._stopping and not due:
                self._cv.wait(wait)
        return True

    def _restart(self, seat: Seat) -> None:
        old = seat.proc
        if old is not None and old.poll() is None:
            kill_process(old)  # lost its connection yet still running: wedged
        with self._cv:
            if self._stopping or seat.retired:
                return
            seat.restarts += 1
            self.restarts += 1
        log.info(
            "restarting worker %s (seat %d, restart %d)", seat.target, seat.spawn_id, seat.restarts
        )
        try:
            self._start(seat)
        except OSError as exc:  # out of processes, descriptors, memory: try again later
            log.error("could not restart worker %s: %s", seat.target, exc)
            with self._cv:
                if not self._stopping and not seat.retired:
                    self._schedule_restart(seat)
        self.host.changed()

    def _reap_dismissed(self) -> None:
        """Collect the exit status of processes let go (so none stays a zombie)."""
        with self._cv:
            gone = [s for s in self.seats if s.retired and s.proc is not None]
        for s in gone:
            assert s.proc is not None
            if s.proc.poll() is not None and s.arena is not None:
                s.arena.close()

    def _poll_starting(self) -> None:
        """A process that exited before it was ready, with nothing else to notice it (the
        dial-back fallback; on a socketpair its hello thread sees the end)."""
        if self.use_socketpair:
            return
        with self._cv:
            starting = [
                s
                for s in self.seats
                if s.handle is None and s.restart_at is None and not s.retired and s.proc
            ]
        for s in starting:
            assert s.proc is not None
            code = s.proc.poll()
            if code is not None and s.error is None:
                self._start_failed(
                    s, f"the worker process exited with code {code} before it was ready"
                )

    # ------------------------------------------------------------------ starting

    def _start(self, seat: Seat) -> None:
        if seat.arena is not None:
            seat.arena.close()  # the previous process's segment
            seat.arena = None
        seat.error = None
        config: dict[str, Any] = {
            **self._config(),
            "target": seat.target,
            "main_path": seat.main_path,
            "kwargs": seat.kwargs,
            "spawn_id": seat.spawn_id,
        }
        if seat.device is not None:
            log.info(
                "starting worker %s (seat %d) on device %s", seat.target, seat.spawn_id, seat.device
            )
        child = launch(
            config,
            environ=seat.environ(),
            socketpair=self.use_socketpair,
            dial_back=(self.listener.address, self.spawn_key) if self.listener else None,
            shared_memory=self.shared_memory,
            segment_name=f"pytaskqml-{seat.spawn_id}",
            pool=self._pool() if self._pool is not None and self.shared_memory else None,
        )
        seat.arena = child.arena
        with self._cv:
            seat.proc = child.proc
            seat.started_at = time.monotonic()
            seat.restart_at = None
        if child.sock is not None:
            conn = Connection(child.sock, name=self.name, max_frame_size=self.max_frame_size)
            threading.Thread(
                target=self._await_hello,
                args=(seat, child.proc, conn),
                name=f"pytaskqml-spawn-{child.proc.pid}",
                daemon=True,
            ).start()
        child.send_config()

    def _await_hello(self, seat: Seat, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        """Wait for a child's hello on its socketpair and attach it (a thread per child).

        No handshake: only this process and that child hold the pair. No deadline either: the
        child says hello after its setup(), however long that takes, and if it dies first its
        end closes and the wait ends (spawn()'s own timeout kills a child that never does).
        """
        conn.peer = f"pid {proc.pid}"
        try:
            hello = read_hello(conn, None)
            conn.set_authenticated()  # lift the small frame limit of the greeting
        except (ConnectionLost, ProtocolError, OSError) as exc:
            conn.abort()
            code = None
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(1.0)
            if seat.proc is proc:
                self._start_failed(
                    seat,
                    f"the worker process exited with code {code} before it was ready"
                    if code is not None
                    else f"the worker process broke its connection before it was ready ({exc})",
                )
            return
        except BaseException:
            conn.abort()
            log.exception("attaching spawned worker %s crashed", proc.pid)
            return
        self._hello(seat, conn, hello)

    def _on_dial_back(self, conn: Connection) -> None:
        hello = read_hello(conn, _connection.DEFAULT_HANDSHAKE_TIMEOUT)
        spawn_id = hello.get("spawn_id")
        seat = next((s for s in self.seats if s.spawn_id == spawn_id), None)
        if seat is None:
            conn.abort()
            return
        self._hello(seat, conn, hello)

    def _hello(self, seat: Seat, conn: Connection, hello: dict[str, Any]) -> None:
        if hello.get("op") == "failed":
            conn.abort()
            tb = hello.get("traceback")
            self._start_failed(
                seat,
                str(hello.get("error") or "the worker failed to start"),
                tb if isinstance(tb, str) else "",
            )
            return
        with self._cv:
            wanted = not seat.retired and not self._stopping
        handle = self.host.attach_spawned(seat, conn, hello) if wanted else None
        if handle is None:
            conn.abort()
            return
        with self._cv:
            seat.handle = handle
            seat.error = None
            seat.start_failures = 0
            seat.ready_once = True
            self._cv.notify_all()

    # ------------------------------------------------------------------ state

    def can_progress(self) -> bool:
        """Could a seat still run work: a process alive, or a restart pending?"""
        with self._cv:
            return any(
                not s.retired
                and (s.restart_at is not None or (s.proc is not None and s.proc.poll() is None))
                for s in self.seats
            )

    def active(self) -> bool:
        """Is any seat not retired (a worker may still come)?"""
        with self._cv:
            return any(not s.retired for s in self.seats)

    def stop(self) -> list[Seat]:
        """No more restarts; stop the thread and the dial-back listener. Returns every seat,
        for :meth:`reap`."""
        with self._cv:
            self._stopping = True
            for s in self.seats:
                s.retired = True
            self._cv.notify_all()
            thread = self._thread
            seats = list(self.seats)
        if self.listener is not None:
            self.listener.stop()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        return seats

    def reap(self, seats: list[Seat], timeout: float) -> None:
        """Wait up to *timeout* for the processes to exit, kill the rest, free their memory."""
        reap([s.proc for s in seats if s.proc is not None], timeout)
        for s in seats:
            if s.arena is not None:
                s.arena.close()
