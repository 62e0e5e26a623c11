"""Where a coordinator's workers come from: threads of this process, processes it spawns,
workers it dials, workers that dial in. :class:`WorkerPool` is the part of
:class:`~._coordinator.Coordinator` that attaches them; every kind ends up as a handle
registered with the engine, and nothing here looks at a handle's kind again.
"""

from __future__ import annotations

import logging
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..buffers.pool import Buffers
from ..core.stats import WorkerStats
from ..errors import ClosedError, ConnectionLost, NoWorkersError, RemoteTraceback, WorkerStartError
from ..wire import codec as _codec
from ..wire import connection as _connection
from ..wire.connection import Connection
from ..wire.endpoints import Acceptor, read_hello
from ..worker.base import Worker
from ..worker.bootstrap import call_setup, class_target
from ..worker.functions import FunctionWorker, function_target, is_function
from .autoscale import Autoscaler, bounds
from .broadcast import Broadcasts
from .engine import Engine
from .handles import LocalHandle, WorkerHandle, WorkerOwner
from .links import Dialer
from .modelreg import Models
from .remote import Heartbeats, RemoteHandle
from .seats import Seat, assign_devices, check_devices
from .supervisor import Supervisor

log = logging.getLogger("pytaskqml.coordinator")


def check_positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise ValueError(f"{name} is required")
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


class WorkerPool:
    """Adding workers; mixed into :class:`~._coordinator.Coordinator`, which sets these up."""

    name: str
    authkey: bytes | None
    window: int
    heartbeat_interval: float
    heartbeat_timeout: float
    max_frame_size: int
    _closed: bool
    _engine: Engine
    _supervisor: Supervisor
    _heartbeats: Heartbeats
    _acceptors: list[Acceptor]
    _dialers: list[Dialer]
    _locals: list[LocalHandle]
    _rejected_peers: int
    _stats_lock: Any
    _broadcasts: Broadcasts
    _autoscalers: list[Autoscaler]
    _buffers: Buffers
    models: Models

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the coordinator is shut down")

    def add_local(
        self,
        worker: Worker | Callable[[Any], Any],
        threads: int | tuple[int, int] = 1,
        *,
        window: int | None = None,
        scale_up_wait: float = 0.25,
        scale_down_idle: float = 10.0,
    ) -> WorkerHandle:
        """Run *worker* in ``threads`` threads of this process (``setup()`` is called here).
        A plain function is run as ``function(payload)`` for each task.

        ``threads=(min, max)`` sizes the pool by itself (see :mod:`pytaskqml.engine.autoscale`):
        a thread more while work waits longer than ``scale_up_wait`` seconds (default 0.25),
        one less after ``scale_down_idle`` seconds (default 10) with nothing to do.
        ``window`` is how many tasks the pool may hold at once (default: 2 per thread).

        Returns the pool's handle. Raises ``TypeError`` for anything but a Worker instance or a
        function, ``ValueError`` for a count or time that is not positive, whatever ``setup()``
        raises, and :class:`ClosedError` once the coordinator is shut down.
        """
        if not isinstance(worker, Worker):
            if not is_function(worker):
                raise TypeError("add_local() takes a Worker instance or a function")
            worker = FunctionWorker(worker)
        lo, hi = bounds(threads, "threads")
        check_positive("window", window)
        self._check_open()
        call_setup(worker)
        handle = LocalHandle(self._engine, worker, threads=max(1, lo), window=window)
        if not self._attach(handle):
            raise ClosedError("the coordinator is shut down")
        self._locals.append(handle)
        if lo != hi:
            self._autoscale_threads(handle, lo, hi, scale_up_wait, scale_down_idle)
        return handle

    def _autoscale_threads(
        self, handle: LocalHandle, lo: int, hi: int, up: float, idle: float
    ) -> None:
        def resize(by: int) -> None:
            if by > 0:
                handle.add_threads(by)
            else:
                handle.remove_thread()
            window = handle.window if handle.fixed_window and handle.window else 2 * handle.size
            self._engine.resize(handle, handle.size * handle.batch_size, window)

        scaler = Autoscaler(
            self._engine,
            kind="threads",
            name=handle.name,
            lo=max(1, lo),
            hi=hi,
            members=lambda: [handle] * handle.size,
            starting=lambda: 0,
            grow=resize,
            shrink=lambda h: resize(-1),
            scale_up_wait=up,
            scale_down_idle=idle,
        )
        self._autoscalers.append(scaler)
        scaler.start()

    def _attach(self, handle: WorkerHandle) -> bool:
        """Register a worker: retained broadcasts first, then every named model."""
        if not self._engine.attach(handle, self._broadcasts.preload(handle)):
            return False
        self.models.worker_attached(handle)
        return True

    def spawn(
        self,
        worker_cls: type[Worker] | Callable[[Any], Any],
        processes: int | tuple[int, int] = 1,
        *,
        kwargs: dict[str, Any] | None = None,
        window: int | None = None,
        wait: bool = True,
        timeout: float = 60.0,
        scale_up_wait: float = 0.25,
        scale_down_idle: float = 10.0,
        devices: Sequence[int | str] | None = None,
    ) -> list[int]:
        """Start ``processes`` child processes running *worker_cls*; supervise and restart them.

        The class must be importable by the child (module level). ``kwargs`` (JSON) are passed
        to its constructor. With ``wait`` (default) this returns once every child has run
        ``setup()`` and connected, and raises :class:`WorkerStartError` if one fails. Without
        it, a child that fails to start is started again with backoff; after
        ``max_start_failures`` failures in a row its place is given up, and tasks nothing else
        can run fail with that :class:`WorkerStartError`. Returns the children's process ids.

        ``processes=(min, max)`` sizes the pool by itself (see :mod:`pytaskqml.engine.autoscale`):
        it starts with ``min`` and grows while work waits longer than ``scale_up_wait``
        seconds; a worker with nothing to do for ``scale_down_idle`` seconds finishes what it
        holds and leaves, never below ``min``.

        A plain module-level function instead of a class is run as ``function(payload)`` for
        each task (by import path, in a :class:`FunctionWorker`; ``TypeError`` for a lambda,
        a nested function or a bound method).

        ``window`` fixes how many tasks each of these workers may hold (default: adaptive,
        see :class:`Coordinator`); ``timeout`` (seconds, default 60) bounds the wait for the
        children to start; ``scale_up_wait`` (0.25 s) and ``scale_down_idle`` (10 s) as for
        :meth:`add_local`. Raises ``ValueError`` for a count or time that is not positive,
        :class:`WorkerStartError` (with ``wait``) when a child cannot start in time, and
        :class:`ClosedError` once the coordinator is shut down.

        ``devices`` gives each process its own GPU (or group of GPUs): a list of device ids
        such as ``[0, 1]``, ``["0,1", "2,3"]`` or GPU UUIDs (``""``: no GPU). Each process is a
        *seat* with one entry: its environment has ``CUDA_VISIBLE_DEVICES`` (and
        ``PYTASKQML_DEVICE``, for frameworks that read something else) set to it before Python
        starts, so before the class is imported and ``setup()`` runs; inside the process its
        GPUs are numbered from 0 (``cuda:0``). A process that dies is replaced on the same
        device. With fewer devices than processes the seats share them round-robin
        (``processes=4, devices=[0, 1]``: 0, 1, 0, 1); a self-sizing pool places each new
        process on the device the fewest of its processes use. Without ``devices`` the
        children inherit this process's environment, ``CUDA_VISIBLE_DEVICES`` included.
        """
        if is_function(worker_cls):
            if kwargs:
                raise ValueError("kwargs= is for a Worker class; a function gets the payload")
            target, main_path = function_target(worker_cls)
            worker_cls, kwargs = FunctionWorker, {"function": target, "main_path": main_path}
        if not (isinstance(worker_cls, type) and issubclass(worker_cls, Worker)):
            raise TypeError("spawn() takes a Worker subclass or a module-level function")
        lo, hi = bounds(processes, "processes")
        check_positive("window", window)
        device_ids = check_devices(devices)
        target, main_path = class_target(worker_cls)
        kw = dict(kwargs or {})
        _codec.encode_str(kw)  # the constructor arguments travel as JSON
        self._check_open()
        sup = self._supervisor

        def place(n: int, group: list[Seat]) -> list[str] | None:
            if device_ids is None:
                return None
            in_use = [s.device for s in group if not s.retired and s.device is not None]
            return assign_devices(device_ids, in_use, n)

        seats = sup.add(
            target, main_path, kw, window, lo, retry_first_start=not wait, devices=place(lo, [])
        )
        if lo != hi:
            group = list(seats)

            def grow(n: int) -> None:
                group.extend(sup.add(target, main_path, kw, window, n, devices=place(n, group)))

            def shrink(handle: WorkerHandle) -> None:
                seat = next((s for s in group if s.handle is handle), None)
                if seat is not None:
                    self._engine.dismiss(handle)
                    sup.dismiss(seat)

            scaler = Autoscaler(
                self._engine,
                name=target,
                lo=lo,
                hi=hi,
                members=lambda: [s.handle for s in group if s.handle and not s.retired],
                starting=lambda: sum(1 for s in group if s.handle is None and not s.retired),
                grow=grow,
                shrink=shrink,
                scale_up_wait=scale_up_wait,
                scale_down_idle=scale_down_idle,
            )
            self._autoscalers.append(scaler)
            scaler.start()
        if wait:
            ready, why = sup.wait_ready(seats, timeout)
            if not ready:
                for s in seats:
                    sup.retire(s)
                err = WorkerStartError(f"could not start {target}: {why}")
                tb = next((s.error_traceback for s in seats if s.error_traceback), "")
                err.remote_traceback = tb
                if tb:
                    err.__cause__ = RemoteTraceback(tb)
                raise err
        return [s.proc.pid for s in seats if s.proc]

    def connect(
        self,
        address: tuple[str, int] | str,
        *,
        window: int | None = None,
        wait: bool = True,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Connect to a worker listening at *address*; reconnect with backoff whenever it drops.

        With ``wait`` (default) block until the first connection is up, or raise
        :class:`ConnectionLost` (and stop trying) after ``timeout``. A worker that refuses our
        key raises :class:`AuthenticationError` at once, and a TLS certificate that does not
        verify :class:`ConnectionLost` at once: retrying could not help. ``timeout`` is in
        seconds (default 10); ``window`` fixes how many tasks the worker may hold (default:
        adaptive); *ssl_context* (see :func:`tls_client_context`) makes the connection TLS.
        *address* is ``(host, port)`` or ``"host:port"`` (``ValueError`` if malformed).
        """
        addr = _connection.parse_address(address) if isinstance(address, str) else address
        check_positive("window", window)
        self._check_open()
        dialer = Dialer(
            self._attach_dialled,
            addr,
            self.authkey or b"",
            window=window,
            ssl_context=ssl_context,
            max_frame_size=self.max_frame_size,
            on_gave_up=self._engine.check_stranded,
        )
        self._dialers.append(dialer)
        dialer.start()
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while not dialer.connected.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if dialer.fatal_error is not None:
                raise dialer.fatal_error
            if time.monotonic() >= deadline:
                dialer.stop()
                raise ConnectionLost(
                    f"no worker reachable at {_connection.format_address(addr)} within "
                    f"{timeout}s" + (f" ({dialer.last_error})" if dialer.last_error else "")
                )

    def listen(
        self,
        address: tuple[str, int] | str = ("127.0.0.1", 0),
        *,
        window: int | None = None,
        insecure: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> tuple[str, int]:
        """Accept workers that dial in (``pytaskqml worker ... --connect``); returns the bound
        address. Binding a non-loopback address needs an ``authkey`` (or ``insecure=True``).
        With *ssl_context* (see :func:`tls_server_context`) every connection is TLS first.
        ``window`` fixes how many tasks each of these workers may hold (default: adaptive).
        Raises ``ValueError`` for a non-loopback address without a key, ``OSError`` when the
        address cannot be bound, :class:`ClosedError` once the coordinator is shut down."""
        addr = _connection.parse_address(address) if isinstance(address, str) else address
        check_positive("window", window)
        self._check_open()
        _connection.check_bind(
            addr[0],
            self.authkey,
            insecure=insecure,
            what="listen",
            fix="set authkey= or PYTASKQML_AUTHKEY, or pass insecure=True",
            key_name="an authkey",
        )

        def accepted(conn: Connection) -> None:
            hello = read_hello(conn, _connection.DEFAULT_HANDSHAKE_TIMEOUT)
            self._attach_remote(conn, hello, kind="dial-in", window=window)

        acceptor = Acceptor(
            _connection.Listener(addr),
            self.authkey or b"",
            on_connection=accepted,
            on_refused=self._peer_rejected,
            ssl_context=ssl_context,
            max_frame_size=self.max_frame_size,
            name=self.name,
        )
        self._acceptors.append(acceptor)
        acceptor.start()
        return acceptor.address

    # ---------------------------------------------------------------- attaching

    def _attach_remote(
        self,
        conn: Connection,
        hello: dict[str, Any],
        *,
        kind: str,
        window: int | None,
        arena: Any = None,
        owner: WorkerOwner | None = None,
        restarts: int = 0,
        pool: Any = None,
    ) -> RemoteHandle | None:
        handle = RemoteHandle(
            self._engine,
            conn,
            hello,
            kind=kind,
            window=window,
            heartbeats=self._heartbeats,
            arena=arena,
            pool=pool,
        )
        handle.owner = owner
        handle.restarts = restarts
        if not self._attach(handle):
            conn.abort()
            return None
        log.info("worker %s attached (%s, pid %s)", handle.name, kind, handle.pid)
        return handle

    def _attach_dialled(
        self, conn: Connection, hello: dict[str, Any], dialer: Dialer
    ) -> RemoteHandle | None:
        return self._attach_remote(conn, hello, kind="remote", window=dialer.window, owner=dialer)

    def _peer_rejected(self, peer: str, why: object) -> None:
        with self._stats_lock:
            self._rejected_peers += 1
        log.warning("rejected connection from %s: %s", peer, why)
        self._engine.signal()

    def _child_config(self) -> dict[str, Any]:
        return {
            "sys_path": [p for p in sys.path if isinstance(p, str)],
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_timeout": self.heartbeat_timeout,
            "max_frame_size": self.max_frame_size,
            "log_level": logging.getLogger("pytaskqml").getEffectiveLevel(),
        }

    def _reinforcements(self) -> bool:
        """Could a worker still come: a process seat not given up, a listener, a dialer?"""
        return (
            bool(self._acceptors)
            or any(d.active for d in self._dialers)
            or self._supervisor.active()
        )

    def _can_progress(self) -> bool:
        return (
            self._engine.worker_count() > 0
            or self._supervisor.can_progress()
            or any(d.active for d in self._dialers)
        )

    def _strand_error(self) -> BaseException:
        error = self._supervisor.retired_error
        if error is not None:
            err = WorkerStartError(f"no worker can run this task: {error}")
            err.remote_traceback = self._supervisor.retired_traceback
            return err
        return NoWorkersError("no workers left: every worker process died and was not restarted")

    def wait_workers(self, n: int, timeout: float | None = None) -> bool:
        """Block until at least *n* workers are attached; False on timeout."""
        return self._engine.wait_for(
            lambda core: len(core.workers) >= n or self._closed, timeout
        ) and (len(self.workers) >= n)

    @property
    def workers(self) -> tuple[WorkerStats, ...]:
        """The workers attached now."""
        return self._engine.workers()


class SpawnHost:
    """The coordinator as its supervisor sees it."""

    def __init__(self, coord: WorkerPool) -> None:
        self._coord = coord

    def attach_spawned(
        self, seat: Seat, conn: Connection, hello: dict[str, Any]
    ) -> WorkerHandle | None:
        c = self._coord
        return c._attach_remote(
            conn,
            hello,
            kind="spawned",
            window=seat.window,
            arena=seat.arena,
            owner=c._supervisor,
            restarts=seat.restarts,
            pool=c._buffers.pool,
        )

    def seat_retired(self, seat: Seat) -> None:
        self._coord._engine.check_stranded()
        self._coord._engine.signal()

    def changed(self) -> None:
        self._coord._engine.signal()
