"""Where a coordinator's workers come from: threads of this process, processes it spawns,
workers it dials, workers that dial in. A :class:`WorkerPool` attaches them for one
coordinator (which holds it and documents each way in its own methods): every kind ends up as
a handle registered with the engine, and nothing here looks at a handle's kind again. It owns
what brings workers - the supervisor of the spawned processes, the listeners, the dialers, the
autoscalers - and the heartbeat thread of their connections, and stops them all.
"""

from __future__ import annotations

import logging
import ssl
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from ..buffers.pool import Buffers
from ..errors import ClosedError, ConnectionLost, NoWorkersError, RemoteTraceback, WorkerStartError
from ..wire import codec as _codec
from ..wire import connection as _connection
from ..wire.connection import Connection
from ..wire.endpoints import Acceptor, read_hello
from ..worker.base import Worker
from ..worker.bootstrap import call_setup, call_teardown, class_target
from ..worker.functions import FunctionWorker, function_target, is_function
from .autoscale import Autoscaler, bounds, pool_statistics
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
    """The workers of one coordinator's *engine*, and everything that brings them.

    The coordinator's ``add_local()``, ``spawn()``, ``connect()``, ``listen()`` and
    ``wait_workers()`` are these methods (their arguments are documented there). A worker
    attached here gets the retained broadcasts of *broadcasts* first, then the named models of
    *models*. It is also the :class:`~.seats.SupervisorHost` of its supervisor, whose processes
    map *buffers*' pool. After :meth:`close` no worker is added (:class:`ClosedError`);
    :meth:`stop` ends every worker and thread it holds.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        name: str,
        authkey: bytes | None,
        max_frame_size: int,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        hang_timeout: float | None,
        max_restarts: int,
        max_start_failures: int,
        shared_memory: bool,
        buffers: Buffers,
        models: Models,
        broadcasts: Broadcasts,
    ) -> None:
        self._engine = engine
        self.name = name
        self.authkey = authkey
        self.max_frame_size = max_frame_size
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._buffers = buffers
        self._models = models
        self._broadcasts = broadcasts
        self._closed = False
        self._lock = threading.Lock()
        self._rejected_peers = 0
        self._heartbeats = Heartbeats(
            name,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            hang_timeout=hang_timeout,
            clock=engine.clock,
        )
        #: Starts, restarts and reaps the spawned processes.
        self.supervisor = Supervisor(
            self,
            name=name,
            config=self._child_config,
            max_restarts=max_restarts,
            max_start_failures=max_start_failures,
            shared_memory=shared_memory,
            max_frame_size=max_frame_size,
            pool=buffers.for_child,
        )
        self._acceptors: list[Acceptor] = []
        self._dialers: list[Dialer] = []
        self._locals: list[LocalHandle] = []  # torn down at stop()
        self._autoscalers: list[Autoscaler] = []

    def close(self) -> None:
        """No worker is added from now on (the coordinator is shutting down)."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the coordinator is shut down")

    # ---------------------------------------------------------------- adding workers

    def add_local(
        self,
        worker: Worker | Callable[[Any], Any],
        threads: int | tuple[int, int] = 1,
        *,
        window: int | None = None,
        scale_up_wait: float = 0.25,
        scale_down_idle: float = 10.0,
    ) -> WorkerHandle:
        """``Coordinator.add_local()``."""
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
        self._models.worker_attached(handle)
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
        """``Coordinator.spawn()``."""
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
        sup = self.supervisor

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
        """``Coordinator.connect()``."""
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
        """``Coordinator.listen()``."""
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
        with self._lock:
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

    # ---------------------------------------------------------------- the engine's questions

    def reinforcements(self) -> bool:
        """Could a worker still come: a process seat not given up, a listener, a dialer?"""
        return (
            bool(self._acceptors)
            or any(d.active for d in self._dialers)
            or self.supervisor.active()
        )

    def can_progress(self) -> bool:
        """Could queued work still run: a worker attached, or one that may come back?"""
        return (
            self._engine.worker_count() > 0
            or self.supervisor.can_progress()
            or any(d.active for d in self._dialers)
        )

    def strand_error(self) -> BaseException:
        """What work nothing can run fails with."""
        error = self.supervisor.retired_error
        if error is not None:
            err = WorkerStartError(f"no worker can run this task: {error}")
            err.remote_traceback = self.supervisor.retired_traceback
            return err
        return NoWorkersError("no workers left: every worker process died and was not restarted")

    def wait_workers(self, n: int, timeout: float | None = None) -> bool:
        """``Coordinator.wait_workers()``."""
        return self._engine.wait_for(
            lambda core: len(core.workers) >= n or self._closed, timeout
        ) and (len(self._engine.workers()) >= n)

    def statistics(self) -> dict[str, Any]:
        """What :class:`~pytaskqml.core.stats.Statistics` shows of the pool: restarts, failed
        starts and the last start error, peers refused, autoscaling (keyword arguments for
        :meth:`Engine.statistics`)."""
        sup = self.supervisor
        with self._lock:
            rejected = self._rejected_peers
        return {
            "restarts": sup.restarts,
            "rejected_peers": rejected,
            "start_failures": sup.start_failures,
            "start_error": sup.last_error,
            "scale_ups": sum(a.ups for a in self._autoscalers),
            "scale_downs": sum(a.downs for a in self._autoscalers),
            "pools": pool_statistics(self._autoscalers),
        }

    # ---------------------------------------------------------------- stopping

    def stop(
        self,
        handles: Sequence[WorkerHandle],
        *,
        cancel: bool,
        busy: Collection[WorkerHandle] = (),
    ) -> bool:
        """Stop every worker and what brings them, once the engine is stopping (it attaches
        nothing more) and *handles* are the workers it had: spawned processes leave (killed,
        with *cancel*: what they run is no longer wanted) and are reaped, connections close,
        thread workers finish (those in *busy* given half a second) and are torn down, then
        the heartbeat thread stops. A KeyboardInterrupt while the processes are reaped kills
        them instead; returns whether that happened, for the caller to raise it once
        everything else is stopped too."""
        for scaler in self._autoscalers:
            scaler.stop()
        seats = self.supervisor.stop()
        for d in self._dialers:
            d.stop()
        for a in self._acceptors:
            a.stop()
        if cancel:
            for s in seats:
                self.supervisor.kill(s)  # whatever they run is no longer wanted
        else:
            for s in seats:
                if s.handle is not None:
                    s.handle.request_stop()  # spawned workers leave; standalone ones stay up
        interrupted = False
        try:
            self.supervisor.reap(seats, 0.5 if cancel else 5.0)
        except KeyboardInterrupt:
            interrupted = cancel = True
            for s in seats:
                self.supervisor.kill(s)
            self.supervisor.reap(seats, 0.5)
        for h in handles:
            h.close()
        for local in self._locals:
            local.close()
            local.join(0.5 if cancel or local in busy else 5.0)
            call_teardown(local.worker)
        for h in handles:
            h.join(2.0)
        self._heartbeats.stop()
        return interrupted

    # ---------------------------------------------------------------- the supervisor's host

    def attach_spawned(
        self, seat: Seat, conn: Connection, hello: dict[str, Any]
    ) -> WorkerHandle | None:
        """Register a spawned process's connection; None if it is not wanted (closed)."""
        return self._attach_remote(
            conn,
            hello,
            kind="spawned",
            window=seat.window,
            arena=seat.arena,
            owner=self.supervisor,
            restarts=seat.restarts,
            pool=self._buffers.pool,
        )

    def seat_retired(self, seat: Seat) -> None:
        """Work that only the retired seat could run fails now."""
        self._engine.check_stranded()
        self._engine.signal()

    def changed(self) -> None:
        """A restart or a failed start: wake whoever waits on statistics."""
        self._engine.signal()
