"""The :class:`Coordinator`: options, entry points, workers, statistics, shutdown.

Data flow::

    caller ── submit()/map()/stream.put() ──▶ Intake: payload checked (TypeError right here),
                                               tasks built, tiny items chunked
                                               │
                                               ▼
         Engine (one lock) ──▶ Scheduler: bounded queue (block | drop_oldest | reject),
                                          credit dispatch to the least-loaded worker
                                               │  each worker's outbox
                     ┌─────────────────────────┼──────────────────────────┐
                     ▼                         ▼                          ▼
             RemoteHandle writer       RemoteHandle writer          LocalHandle threads
           (frames over a socket,    (spawned process, or a         (Worker.process in
            many tasks per frame)     worker on another host)        this process)
                     │                         │                          │
             RemoteHandle reader ◀── results ──┘                          │
                     └────────────────────────┬───────────────────────────┘
                                              ▼
                  Engine.results(): Scheduler pops them from in-flight (unknown or duplicate
                  ids ignored), frees credit, dispatches; delivered after the lock is released
                                              ▼
             TaskFuture (submit)  /  reorder buffer (map, stream: submission order)

Beside them: the deadline thread (:mod:`._engine`, timeout markers in order), the heartbeat
thread (:mod:`._remote`, silent and hung workers), the supervisor (:mod:`._supervisor`,
restarting spawned processes), and the callback thread (:mod:`._delivery`), the only one that
runs users' done-callbacks and ``on_late``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import CancelledError, Future
from typing import Any, Literal

from . import _connection, _protocol
from ._bootstrap import call_teardown
from ._control import ControlServer
from ._dashboard import install_coordinator as install_status
from ._delivery import CallbackRunner, TaskFuture
from ._endpoints import Acceptor
from ._engine import Engine
from ._errors import ClosedError
from ._handles import LocalHandle
from ._intake import Intake
from ._iterate import Stream, map_results
from ._links import Dialer
from ._ordered import OVERFLOW_POLICIES, OverflowPolicy
from ._pool import SpawnHost, WorkerPool, check_positive
from ._progress import Progress
from ._remote import Heartbeats
from ._stats import Statistics
from ._supervisor import Supervisor
from ._tasks import LateResult

log = logging.getLogger(__name__)


def _resolve_key(authkey: bytes | str | None) -> bytes | None:
    if authkey is None:
        env = os.environ.get("PYTASKQML_AUTHKEY")
        return env.encode() if env else None
    return authkey.encode() if isinstance(authkey, str) else bytes(authkey)


class Coordinator(WorkerPool):
    """Owns the task queue and the workers; returns results in submission order.

    Options (keyword-only): ``max_queue`` bounds tasks waiting for a worker; ``overflow``
    says what a full queue does to new work (``"block"``, ``"drop_oldest"``, ``"reject"``);
    ``window`` caps the tasks in flight per worker - below it each worker's window adapts to
    about 10 ms of its work, unless a window is given for that worker; ``max_retries`` how
    many worker deaths a task may cause before it is failed as poison; ``timeout`` a default
    deadline for ``submit()``, ``map()`` and streams (see each for what it counts from);
    ``hang_timeout`` how long a worker with work in hand may go without returning any result
    before it is declared lost; ``heartbeat_interval``/``heartbeat_timeout`` liveness of idle
    connections; ``max_restarts`` restarts of one spawned process within 60 s, and
    ``max_start_failures`` failed starts in a row, before it is given up; ``cancel_grace``
    how long ``shutdown(cancel_futures=True)`` (and leaving a ``with`` block on an exception,
    such as Ctrl-C) lets tasks already running finish before their workers are stopped;
    ``authkey`` the shared key for worker connections (default: the ``PYTASKQML_AUTHKEY``
    environment variable); ``on_late`` receives results that arrive after their deadline
    (otherwise they can be read with :meth:`late_results`); ``shared_memory`` lets buffers of
    64 KiB or more reach spawned workers through shared memory instead of the socket where the
    platform allows it (see :mod:`pytaskqml._shm`).
    """

    def __init__(
        self,
        *,
        max_queue: int = 10_000,
        overflow: OverflowPolicy = "block",
        window: int = 64,
        max_retries: int = 2,
        timeout: float | None = None,
        hang_timeout: float | None = 60.0,
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 5.0,
        max_restarts: int = 50,
        max_start_failures: int = 3,
        cancel_grace: float = 0.5,
        authkey: bytes | str | None = None,
        max_frame_size: int = _protocol.DEFAULT_MAX_FRAME_SIZE,
        on_late: Callable[[LateResult], None] | None = None,
        shared_memory: bool = True,
        name: str = "coordinator",
    ) -> None:
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(
                f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {overflow!r}"
            )
        for label, value in (
            ("max_queue", max_queue),
            ("window", window),
            ("max_retries", max_retries),
            ("heartbeat_interval", heartbeat_interval),
            ("heartbeat_timeout", heartbeat_timeout),
            ("max_restarts", max_restarts),
            ("max_start_failures", max_start_failures),
            ("cancel_grace", cancel_grace),
            ("max_frame_size", max_frame_size),
        ):
            check_positive(label, value, allow_none=False)
        check_positive("timeout", timeout)
        check_positive("hang_timeout", hang_timeout)
        if any(isinstance(v, float) for v in (window, max_retries, max_queue, max_start_failures)):
            raise ValueError(
                "window, max_retries, max_queue and max_start_failures must be integers"
            )
        self.name = name
        self.overflow: OverflowPolicy = overflow
        self.window = window
        self.max_retries = max_retries
        self.timeout = timeout
        self.hang_timeout = hang_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_restarts = max_restarts
        self.cancel_grace = cancel_grace
        self.max_frame_size = max_frame_size
        self.shared_memory = bool(shared_memory)
        self.authkey = _resolve_key(authkey)
        self._started = time.monotonic()
        self._closed = False
        self._stopped = threading.Event()
        self._rejected_peers = 0
        self._stats_lock = threading.Lock()
        self._runner = CallbackRunner(name)
        self._engine = Engine(
            name=name,
            max_queue=max_queue,
            overflow=overflow,
            max_retries=max_retries,
            max_window=window,
            runner=self._runner,
            on_late=on_late,
            reinforcements=self._reinforcements,
            strand_error=self._strand_error,
        )
        self._intake = Intake(self._engine, max_frame_size=max_frame_size)
        self._heartbeats = Heartbeats(
            name,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            hang_timeout=hang_timeout,
            clock=self._engine.clock,
        )
        self._supervisor = Supervisor(
            SpawnHost(self),
            name=name,
            config=self._child_config,
            max_restarts=max_restarts,
            max_start_failures=max_start_failures,
            shared_memory=self.shared_memory,
            max_frame_size=max_frame_size,
        )
        self._acceptors: list[Acceptor] = []
        self._dialers: list[Dialer] = []
        self._locals: list[LocalHandle] = []  # torn down at shutdown
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()
        self._control: ControlServer | None = None

    # ================================================================ context

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def __repr__(self) -> str:
        return f"<Coordinator {self.name!r} workers={len(self.workers)}>"

    # ================================================================ waiting

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no task is queued or in flight; False on timeout."""
        return self._engine.wait_for(lambda core: not core.live, timeout)

    def wait_until(
        self, predicate: Callable[[Statistics], bool], timeout: float | None = None
    ) -> bool:
        """Block until ``predicate(statistics())`` holds, checked whenever something it could
        depend on changes (a worker comes or goes, a process restarts or fails to start, a
        peer is refused, results arrive); False on timeout."""
        return self._engine.wait_until(lambda: predicate(self.statistics()), timeout)

    # ================================================================ submitting

    def submit(self, payload: Any, *, timeout: float | None = None) -> Future[Any]:
        """Queue one task; returns a :class:`concurrent.futures.Future`.

        A payload that is not JSON (plus bytes/arrays) raises ``TypeError`` here. With the
        ``reject`` policy a full queue raises :class:`queue.Full`; with ``drop_oldest`` the
        oldest waiting task is cancelled to make room. ``timeout`` counts from now: past it the
        future fails with ``TimeoutError`` (a late result goes to the late channel).
        """
        fut = TaskFuture()
        fut._runner = self._runner
        check_positive("timeout", timeout)
        self._intake.one(payload, fut, 0, timeout if timeout is not None else self.timeout)
        return fut

    def map(
        self,
        iterable: Iterable[Any],
        *,
        buffersize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        on_error: Literal["raise", "return"] = "raise",
        chunksize: int | None = None,
        progress: bool | Progress = False,
    ) -> Iterator[Any]:
        """Yield results for *iterable* in submission order (or as completed with
        ``ordered=False``), keeping at most ``buffersize`` items outstanding.

        ``buffersize=None`` (the default) sizes the buffer from the measured time per item:
        about 50 ms of work per worker, between 64 (and 16 per worker) and 65,536 items (4,096
        when items go one per task) - a few frames of video in flight, tens of thousands of
        tiny items.

        The input is read lazily. A failed item raises its :class:`TaskFailed` at its
        position (or is yielded as the exception object with ``on_error="return"``).
        ``timeout`` bounds how long each item may *run*: its clock starts when a worker takes
        it up (such an item goes only to a worker that can start it at once), so an item is
        never timed out for waiting behind others. Past it the item yields a
        :class:`TaskTimeout` marker in its place and its late result goes to the late channel.
        Items dropped by the ``drop_oldest`` policy are skipped.

        ``chunksize`` items travel and run as one task (``None``: chosen from the measured
        time per item, so that tiny tasks share a task's overhead and slow ones go alone;
        items with a timeout always go alone). Items of a chunk that killed a worker are
        retried one by one, so a poison item fails alone.

        ``progress=True`` shows a progress bar on stderr while the results are taken (``tqdm``
        when it is importable, otherwise a line of its own; only on a terminal); a
        :class:`Progress` gives it a label, a total for an input without ``len()``, or shows
        it also off a terminal.
        """
        check_positive("buffersize", buffersize)
        check_positive("timeout", timeout)
        check_positive("chunksize", chunksize)
        if on_error not in ("raise", "return"):
            raise ValueError("on_error must be 'raise' or 'return'")
        if not isinstance(progress, bool | Progress):
            raise TypeError("progress must be True, False or a pytaskqml.Progress")
        self._check_open()
        return map_results(
            self._intake,
            iter(iterable),
            buffersize,
            ordered,
            timeout if timeout is not None else self.timeout,
            on_error,
            chunksize,
            progress,
            len(iterable) if progress and isinstance(iterable, Sized) else None,
        )

    def stream(
        self,
        *,
        buffersize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        on_error: Literal["raise", "return"] = "return",
        overflow: OverflowPolicy | None = None,
    ) -> Stream:
        """A :class:`Stream` for a live source: a producer thread ``put()``s items and
        ``close()``s, a consumer thread iterates results (in order by default).

        ``overflow`` (default: the coordinator's) is what a full stream does to ``put()``:
        ``"block"`` waits while ``buffersize`` items (default 64) are outstanding;
        ``"drop_oldest"`` keeps at most ``buffersize`` items (default: two per worker, at
        least 2) waiting for a worker and drops the oldest of them, so the newest frame wins;
        ``"reject"`` raises :class:`queue.Full`. ``timeout`` counts from ``put()``: a frame
        older than that gets a :class:`TaskTimeout` marker in its place.
        """
        policy = overflow if overflow is not None else self.overflow
        if policy not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}")
        check_positive("buffersize", buffersize)
        check_positive("timeout", timeout)
        self._check_open()
        if buffersize is None:
            buffersize = 2 * max(1, len(self.workers)) if policy == "drop_oldest" else 64
        stream = Stream(
            self._intake,
            buffersize,
            ordered,
            timeout if timeout is not None else self.timeout,
            on_error,
            policy,
        )
        self._streams.add(stream)
        return stream

    def late_results(self) -> list[LateResult]:
        """Drain and return results that arrived after their deadline (when no ``on_late``)."""
        return self._engine.late_results()

    # ================================================================ statistics

    def statistics(self) -> Statistics:
        """A snapshot of the coordinator's counters and workers (see :class:`Statistics`)."""
        sup = self._supervisor
        with self._stats_lock:
            rejected = self._rejected_peers
        return self._engine.statistics(
            restarts=sup.restarts,
            rejected_peers=rejected,
            start_failures=sup.start_failures,
            start_error=sup.last_error,
            uptime=time.monotonic() - self._started,
        )

    # ================================================================ control endpoint

    def serve_control(
        self,
        address: tuple[str, int] | str = ("127.0.0.1", 0),
        *,
        insecure: bool = False,
        open_metrics: bool = False,
    ) -> tuple[str, int]:
        """Start the HTTP control endpoint: ``GET /health``, ``POST /shutdown``, ``GET /``
        (the live status page), ``GET /status`` (JSON) and ``GET /metrics`` (Prometheus).

        With a key, ``/status`` and ``/metrics`` need its token (``pytaskqml token``) unless
        ``open_metrics`` lets anyone who can reach *address* read them (see
        :mod:`pytaskqml._dashboard`)."""
        addr = _connection.parse_address(address) if isinstance(address, str) else address
        if self._control is not None:
            raise RuntimeError("the control endpoint is already running")

        def health() -> dict[str, Any]:
            s = self.statistics()
            return {
                "status": "ok",
                "role": "coordinator",
                "pid": os.getpid(),
                "workers": len(s.workers),
                "submitted": s.submitted,
                "completed": s.completed,
                "queued": s.queued,
                "in_flight": s.in_flight,
            }

        def stop() -> None:
            threading.Thread(
                target=self.shutdown, name="pytaskqml-control-shutdown", daemon=True
            ).start()

        self._control = ControlServer(
            addr, health=health, shutdown=stop, authkey=self.authkey, insecure=insecure
        )
        install_status(self._control, self.statistics, name=self.name, open_metrics=open_metrics)
        self._control.start()
        return self._control.address

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the coordinator has shut down (for instance through ``POST /shutdown``
        on its control endpoint) and every worker is stopped; False on timeout."""
        return self._stopped.wait(timeout)

    # ================================================================ shutdown

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        """Stop accepting work; finish what is queued and running - or, with
        ``cancel_futures``, cancel what is queued and give what is running ``cancel_grace``
        seconds before stopping its worker - then stop and reap every worker process and
        thread. Every future is resolved when this returns (with ``wait``): result,
        exception or cancelled. ``timeout`` bounds the wait for unfinished work."""
        already = self._engine.close()
        self._closed = True
        for stream in list(self._streams):
            stream.end("coordinator shut down")
        if already:
            if wait:
                self._stopped.wait()
            return
        if cancel_futures:
            self._engine.cancel_queued()
        if not wait:
            threading.Thread(
                target=self._finish_shutdown_logged,
                args=(timeout, cancel_futures),
                name="pytaskqml-shutdown",
                daemon=False,
            ).start()
            return
        self._finish_shutdown(timeout, cancel_futures)

    def _finish_shutdown_logged(self, timeout: float | None, cancel: bool) -> None:
        try:
            self._finish_shutdown(timeout, cancel)
        except BaseException:
            log.exception("background shutdown crashed")

    def _finish_shutdown(self, timeout: float | None, cancel: bool) -> None:
        engine = self._engine
        try:
            if cancel:
                grace = self.cancel_grace if timeout is None else min(timeout, self.cancel_grace)
                engine.drain(grace, self._can_progress)
            else:
                engine.drain(timeout, self._can_progress)
        except KeyboardInterrupt:
            cancel = True  # a second Ctrl-C: stop now
            self._teardown(cancel=True)
            raise
        self._teardown(cancel=cancel)

    def _teardown(self, *, cancel: bool) -> None:
        engine = self._engine
        engine.stop()
        busy = engine.abandon_inflight(CancelledError("abandoned at shutdown")) if cancel else []
        engine.fail_all(ClosedError("the coordinator shut down before this task ran"))
        seats = self._supervisor.stop()
        for d in self._dialers:
            d.stop()
        for a in self._acceptors:
            a.stop()
        handles = [ws.handle for ws in list(engine.core.workers)]
        if cancel:
            for s in seats:
                self._supervisor.kill(s)  # whatever they run is no longer wanted
        else:
            for s in seats:
                if s.handle is not None:
                    s.handle.request_stop()  # spawned workers leave; standalone ones stay up
        self._supervisor.reap(seats, 0.5 if cancel else 5.0)
        for h in handles:
            h.close()
        for local in self._locals:
            local.close()
            local.join(0.5 if cancel or local in busy else 5.0)
            call_teardown(local.worker)
        for h in handles:
            h.join(2.0)
        if self._control is not None:
            self._control.stop()
        self._heartbeats.stop()
        engine.stop_timer()
        self._runner.close()
        self._stopped.set()
