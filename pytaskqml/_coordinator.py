"""The :class:`Coordinator`: submit/map/stream, credit dispatch, retries, deadlines, shutdown.

Data flow::

    caller ── submit()/map()/stream.put() ──▶ encode payload (TypeError raised right here)
                                               │
                                               ▼
                          TaskQueue (bounded; block | drop_oldest | reject)
                                               │  _pump(): least-loaded worker with credit
                     ┌─────────────────────────┼──────────────────────────┐
                     ▼                         ▼                          ▼
             RemoteHandle.writer       RemoteHandle.writer          LocalHandle threads
           (frames over TCP, one      (spawned process or           (Worker.process in
            frame carries many tasks)   standalone host)              this process)
                     │                         │                          │
             RemoteHandle.reader ◀── results ──┘                          │
                     └────────────────────────┬───────────────────────────┘
                                              ▼
                      _on_results(): pop from in-flight (unknown/duplicate ids ignored),
                      free credit, _pump() again, deliver outside the lock
                                              ▼
                 Future (submit)  /  ReorderBuffer (map, stream: submission order)

    housekeeping thread: deadlines (timeout marker in order; the late result goes to the late
    channel), heartbeats, hung-worker detection, restarting spawned processes with backoff.

Credit accounting: a worker's credit is ``window - len(inflight)``. A task enters ``inflight``
when assigned (under the lock) and leaves it exactly once: when its result arrives, when the
writer skips it because it already finished (timed out, cancelled), or when the worker is lost
and the task is re-queued. So a dead worker can never hold credit, and ``_pump`` can never hand
a worker more than its window.

Retry accounting: a worker runs tasks one after another in dispatch order, so when it dies the
task (or batch) at the head of its ``inflight`` was the one running; only that one is charged an
attempt. The others are re-queued at the front free of charge. A task charged more than
``max_retries`` attempts is poison and fails with :class:`WorkerLostError`. Every task has a
``finished`` flag set exactly once, when its outcome is delivered; any later result for it (from
a duplicate execution, or after its deadline) is dropped or sent to the late channel, never
delivered twice.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import os
import queue
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Literal

from . import _codec, _connection, _protocol, _shm
from ._control import ControlServer
from ._errors import (
    AuthenticationError,
    ClosedError,
    ConnectionLost,
    ProtocolError,
    TaskFailed,
    WorkerLostError,
    WorkerStartError,
)
from ._handles import LocalHandle, RemoteHandle, Task, WorkerHandle
from ._ordered import (
    CANCELLED,
    CHUNK,
    DROPPED,
    ERROR,
    OK,
    OVERFLOW_POLICIES,
    RUN,
    TIMEOUT,
    OverflowPolicy,
    ReorderBuffer,
    TaskQueue,
    span,
)
from ._worker import Worker, call_setup, call_teardown, class_target

log = logging.getLogger(__name__)

_END = 99  # reorder-buffer kind marking the end of a stream
_SCALARS = frozenset({str, int, float, bool, type(None)})
# map()'s automatic buffer holds about this much work per worker, and at most MAX_MAP_BUFFER
# items.
MAP_BUFFER_TIME = 0.05
MAX_MAP_BUFFER = 65_536
# map() chunks aim at this much worker time per chunk, and hold at most MAX_CHUNK items.
CHUNK_BUDGET = 0.002
# More than max_restarts restarts of one slot within this many seconds retire it.
RESTART_WINDOW = 60.0
# An adaptive window starts here and follows the measured task time (see WorkerHandle.observe).
INITIAL_WINDOW = 8
MAX_CHUNK = 4096


@dataclass(frozen=True)
class TaskTimeout:
    """Yielded by ``map()``/``stream`` in place of a result that missed its deadline."""

    index: int
    timeout: float

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class LateResult:
    """A result that arrived after its task's deadline had already been reported."""

    task_id: int
    index: int
    ok: bool
    value: Any


@dataclass(frozen=True)
class WorkerStats:
    name: str
    kind: str  # "local", "spawned", "remote" (we dialled it) or "dial-in" (it dialled us)
    pid: int | None
    address: str | None
    window: int
    in_flight: int
    completed: int
    failed: int
    # Spawned workers share memory with the coordinator where the platform allows: buffers of
    # 64 KiB or more sent through it, those sent over the socket because no slot was free, and
    # slots in use now (None: this worker has no shared memory).
    shared_buffers: int | None = None
    shared_fallbacks: int | None = None
    shared_in_use: int | None = None


@dataclass(frozen=True)
class Statistics:
    """A snapshot of the coordinator's counters. Latencies are seconds, submit to result."""

    submitted: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    late: int
    dropped: int
    rejected: int
    retried: int
    poisoned: int
    workers_lost: int
    restarts: int
    rejected_peers: int
    queued: int
    in_flight: int
    workers: tuple[WorkerStats, ...]
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None
    latency_max: float | None
    uptime: float


class _Slot:
    """One supervised child process slot: restarted with backoff when its process dies."""

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
        self.handle: RemoteHandle | None = None
        self.arena: _shm.Arena | None = None  # shared memory with the current process
        self.error: str | None = None
        self.restarts = 0
        self.backoff = 0.05
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.retired = False
        self.connected_once = False
        self.restart_times: deque[float] = deque()


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def _check_positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise ValueError(f"{name} is required")
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _resolve_key(authkey: bytes | str | None) -> bytes | None:
    if authkey is None:
        env = os.environ.get("PYTASKQML_AUTHKEY")
        return env.encode() if env else None
    return authkey.encode() if isinstance(authkey, str) else bytes(authkey)


class Coordinator:
    """Owns the task queue and the workers; returns results in submission order.

    Options (keyword-only): ``max_queue`` bounds tasks waiting for a worker; ``overflow``
    says what a full queue does to new work (``"block"``, ``"drop_oldest"``, ``"reject"``);
    ``window`` caps the tasks in flight per worker - below it each worker's window adapts to
    about 10 ms of its work, unless a window is given for that worker; ``max_retries`` how
    many worker deaths a task may cause before it is failed as poison; ``timeout`` a default
    per-task deadline;
    ``hang_timeout`` how long a worker with work in hand may go without returning any result
    before it is declared lost; ``heartbeat_interval``/``heartbeat_timeout`` liveness of idle
    connections; ``authkey`` the shared key for worker connections (default: the
    ``PYTASKQML_AUTHKEY`` environment variable); ``on_late`` receives results that arrive after
    their deadline (otherwise they can be read with :meth:`late_results`); ``shared_memory``
    lets buffers of 64 KiB or more reach spawned workers through shared memory instead of the
    socket where the platform allows it (see :mod:`pytaskqml._shm`).
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
            ("max_frame_size", max_frame_size),
        ):
            _check_positive(label, value, allow_none=False)
        _check_positive("timeout", timeout)
        _check_positive("hang_timeout", hang_timeout)
        if (
            isinstance(window, float)
            or isinstance(max_retries, float)
            or isinstance(max_queue, float)
        ):
            raise ValueError("window, max_retries and max_queue must be integers")
        self.name = name
        self.overflow: OverflowPolicy = overflow
        self.window = window
        self.max_retries = max_retries
        self.timeout = timeout
        self.hang_timeout = hang_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_restarts = max_restarts
        self.max_frame_size = max_frame_size
        self.shared_memory = bool(shared_memory)
        self.authkey = _resolve_key(authkey)
        self._on_late = on_late
        self._late: deque[LateResult] = deque(maxlen=10_000)

        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._changed = threading.Condition(self._lock)  # workers attached/lost, tasks done
        self._hk_cv = threading.Condition(self._lock)
        self._queue: TaskQueue[Task] = TaskQueue(max_queue)
        self._handles: list[WorkerHandle] = []
        self._locals: list[LocalHandle] = []  # torn down at shutdown
        self._live = 0  # tasks admitted and not yet finished
        self._ids = itertools.count(1)
        # (deadline, task id, weak reference): a finished task must not be kept alive by its
        # entry, which stays until the deadline passes or the heap is compacted.
        self._deadlines: list[tuple[float, int, weakref.ref[Task]]] = []
        self._blocked_putters = 0
        self._closed = False
        self._stranded = False  # every worker gone for good (see _fail_if_stranded)
        self._stopping = False
        self._stopped = threading.Event()
        self._started = time.monotonic()

        self._submitted = self._completed = self._failed = self._cancelled = 0
        self._timed_out = self._late_count = self._dropped = self._rejected = 0
        self._retried = self._poisoned = self._workers_lost = self._restarts = 0
        self._rejected_peers = 0
        self._latencies: deque[float] = deque(maxlen=8192)
        self._item_time: float | None = None  # EWMA of worker seconds per item, for chunking

        self._slots: list[_Slot] = []
        self._spawn_ids = itertools.count(1)
        # A spawned child gets one end of a socketpair at spawn time (POSIX): a channel no other
        # process can reach - nothing listens - and cheaper than TCP loopback (about half the
        # CPU per message here). Elsewhere children dial back to a loopback listener and
        # authenticate with a per-coordinator key they get on stdin.
        self._spawn_socketpair = os.name == "posix"
        self._spawn_listener: _Acceptor | None = None
        self._spawn_key = secrets.token_bytes(32)
        self._acceptors: list[_Acceptor] = []
        self._dialers: list[_Dialer] = []
        self._control: ControlServer | None = None
        self._threads: list[threading.Thread] = []
        self._hk = threading.Thread(
            target=self._housekeeping, name=f"pytaskqml-housekeeping-{name}", daemon=True
        )
        self._hk.start()

    # ================================================================ context

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def __repr__(self) -> str:
        return f"<Coordinator {self.name!r} workers={len(self._handles)} live={self._live}>"

    # ================================================================ workers

    def add_local(
        self, worker: Worker, threads: int = 1, *, window: int | None = None
    ) -> LocalHandle:
        """Run *worker* in ``threads`` threads of this process (``setup()`` is called here)."""
        if not isinstance(worker, Worker):
            raise TypeError("add_local() takes a Worker instance")
        _check_positive("threads", threads, allow_none=False)
        _check_positive("window", window)
        self._check_open()
        call_setup(worker)
        handle = LocalHandle(self, worker, threads=threads, window=window or 2 * threads)
        self._attach(handle)
        handle.start()
        return handle

    def spawn(
        self,
        worker_cls: type[Worker],
        processes: int = 1,
        *,
        kwargs: dict[str, Any] | None = None,
        window: int | None = None,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> list[int]:
        """Start ``processes`` child processes running *worker_cls*; supervise and restart them.

        The class must be importable by the child (module level). ``kwargs`` (JSON) are passed
        to its constructor. With ``wait`` (default) this returns once every child has run
        ``setup()`` and connected, and raises :class:`WorkerStartError` if one fails.
        Returns the children's process ids.
        """
        if not (isinstance(worker_cls, type) and issubclass(worker_cls, Worker)):
            raise TypeError("spawn() takes a Worker subclass")
        _check_positive("processes", processes, allow_none=False)
        _check_positive("window", window)
        target, main_path = class_target(worker_cls)
        kw = dict(kwargs or {})
        _codec.encode_str(kw)  # the constructor arguments travel as JSON
        self._check_open()
        with self._lock:
            if self._spawn_listener is None and not self._spawn_socketpair:
                self._spawn_listener = _Acceptor(
                    self, ("127.0.0.1", 0), self._spawn_key, kind="spawned", window=None
                )
                self._spawn_listener.start()
            new = [
                _Slot(next(self._spawn_ids), target, main_path, kw, window)
                for _ in range(processes)
            ]
            self._slots.extend(new)
        for slot in new:
            self._start_process(slot)
        if not wait:
            return [s.proc.pid for s in new if s.proc]
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for s in new:
                    if s.handle is None and not s.error and s.proc is not None:
                        code = s.proc.poll()
                        if code is not None:
                            s.error = (
                                f"the worker process exited with code {code} before connecting"
                            )
                failed = [s for s in new if s.error]
                if failed or all(s.handle is not None for s in new):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._changed.wait(min(remaining, 0.25))
        if failed or not all(s.handle is not None for s in new):
            for s in new:
                self._retire(s)
            why = failed[0].error if failed else f"workers not ready within {timeout}s"
            raise WorkerStartError(f"could not start {target}: {why}")
        return [s.proc.pid for s in new if s.proc]

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
        :class:`ConnectionLost` (and stop trying) after ``timeout``.
        """
        addr = _connection.parse_address(address) if isinstance(address, str) else address
        _check_positive("window", window)
        self._check_open()
        dialer = _Dialer(self, addr, window, ssl_context)
        with self._lock:
            self._dialers.append(dialer)
        dialer.start()
        if wait and not dialer.connected.wait(timeout):
            dialer.stop()
            raise ConnectionLost(
                f"no worker reachable at {_connection.format_address(addr)} within {timeout}s"
                + (f" ({dialer.last_error})" if dialer.last_error else "")
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
        With *ssl_context* (see :func:`tls_server_context`) every connection is TLS first."""
        addr = _connection.parse_address(address) if isinstance(address, str) else address
        _check_positive("window", window)
        self._check_open()
        if not _connection.is_loopback(addr[0]) and not self.authkey:
            if not insecure:
                raise ValueError(
                    f"refusing to listen on non-loopback {addr[0]} without an authkey "
                    "(set authkey= or PYTASKQML_AUTHKEY, or pass insecure=True)"
                )
            log.warning(
                "listening on %s without an authkey: anyone who can reach it may connect", addr[0]
            )
        acceptor = _Acceptor(
            self, addr, self.authkey or b"", kind="dial-in", window=window, ssl_context=ssl_context
        )
        with self._lock:
            self._acceptors.append(acceptor)
        acceptor.start()
        return acceptor.address

    def wait_workers(self, n: int, timeout: float | None = None) -> bool:
        """Block until at least *n* workers are attached; False on timeout."""
        with self._lock:
            return (
                self._changed.wait_for(lambda: len(self._handles) >= n or self._closed, timeout)
                and len(self._handles) >= n
            )

    @property
    def workers(self) -> tuple[WorkerStats, ...]:
        with self._lock:
            return tuple(self._worker_stats(h) for h in self._handles)

    # ================================================================ submitting

    def submit(self, payload: Any, *, timeout: float | None = None) -> Future[Any]:
        """Queue one task; returns a :class:`concurrent.futures.Future`.

        A payload that is not JSON (plus bytes/arrays) raises ``TypeError`` here. With the
        ``reject`` policy a full queue raises :class:`queue.Full`; with ``drop_oldest`` the
        oldest waiting task is cancelled to make room.
        """
        fut: Future[Any] = Future()
        self._admit_one(payload, fut, 0, timeout if timeout is not None else self.timeout)
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
    ) -> Iterator[Any]:
        """Yield results for *iterable* in submission order (or as completed with
        ``ordered=False``), keeping at most ``buffersize`` items outstanding.

        ``buffersize=None`` (the default) sizes the buffer from the measured time per item:
        about 50 ms of work per worker, between 64 (and 16 per worker) and 65,536 items (4,096
        when items go one per task) - a few frames of video in flight, tens of thousands of
        tiny items.

        The input is read lazily. A failed item raises its :class:`TaskFailed` at its
        position (or is yielded as the exception object with ``on_error="return"``). An item
        past ``timeout`` yields a :class:`TaskTimeout` marker in its place; its late result goes
        to the late channel. Items dropped by the ``drop_oldest`` policy are skipped.

        ``chunksize`` items travel and run as one task (``None``: chosen from the measured
        time per item, so that tiny tasks share a task's overhead and slow ones go alone).
        Items of a chunk that killed a worker are retried one by one, so a poison item fails
        alone.
        """
        _check_positive("buffersize", buffersize)
        _check_positive("timeout", timeout)
        _check_positive("chunksize", chunksize)
        if on_error not in ("raise", "return"):
            raise ValueError("on_error must be 'raise' or 'return'")
        self._check_open()
        return self._map(
            iter(iterable),
            buffersize,
            ordered,
            timeout if timeout is not None else self.timeout,
            on_error,
            chunksize,
        )

    def _auto_buffersize(self, chunked: bool) -> int:
        """map()'s default buffer: about MAP_BUFFER_TIME of work per worker. Items that travel
        one per task (a deadline, chunksize=1) cost a task object each, so fewer of them."""
        workers = max(1, len(self._handles))
        floor = max(64, 16 * workers)
        per = self._item_time
        if per is None:
            return max(256, floor)
        want = int(workers * MAP_BUFFER_TIME / max(per, 1e-7))
        return max(floor, min(MAX_MAP_BUFFER if chunked else MAX_MAP_BUFFER // 16, want))

    def _auto_chunksize(self, buffersize: int) -> int:
        """Items per chunk: about CHUNK_BUDGET seconds of work, leaving every worker a share of
        the buffer. 1 until a result has shown how long an item takes."""
        per = self._item_time
        if per is None or per >= CHUNK_BUDGET:
            return 1
        share = buffersize // (4 * max(1, len(self._handles)))
        return max(1, min(int(CHUNK_BUDGET / max(per, 1e-7)), MAX_CHUNK, share))

    def _map(
        self,
        it: Iterator[Any],
        fixed_buffersize: int | None,
        ordered: bool,
        timeout: float | None,
        on_error: str,
        chunksize: int | None,
    ) -> Iterator[Any]:
        collector = _Collector(ordered)
        seq = 0
        outstanding = 0
        exhausted = False
        chunked = chunksize != 1 and timeout is None
        # The automatic buffer starts at 256 and grows at most 8-fold per refill: the time per
        # item measured so far may be another workload's (tiny words before video frames), and
        # by the time the buffer is large, this map's own results have corrected it.
        cap = 256

        def top_up() -> None:
            # Refill once a quarter of the buffer is free: called after every result handed
            # out, so the workers keep busy while the caller works through a batch of them.
            nonlocal seq, outstanding, exhausted, cap
            buffersize = fixed_buffersize or min(cap, self._auto_buffersize(chunked))
            room = buffersize - outstanding
            if exhausted or room < max(1, buffersize // 4):
                return
            cap = min(8 * cap, MAX_MAP_BUFFER)
            items = list(itertools.islice(it, room))
            if len(items) < room:
                exhausted = True
            if items:
                # Items with a deadline go alone: a chunk would make neighbours of a slow item
                # miss theirs.
                chunk = chunksize or (1 if not chunked else self._auto_chunksize(buffersize))
                self._admit_many(items, collector, seq, timeout, chunk)
                seq += len(items)
                outstanding += len(items)

        try:
            while True:
                top_up()
                if outstanding == 0:
                    return
                for _, kind, value in collector.get_batch():
                    if kind == RUN:  # a chunk's results, all good
                        outstanding -= len(value)
                        yield from value
                        top_up()
                        continue
                    outstanding -= 1
                    if kind == OK:
                        yield value
                    elif kind == DROPPED:
                        pass
                    elif kind == ERROR and on_error == "raise":
                        raise value
                    elif kind == CANCELLED and on_error == "raise":
                        raise value if value is not None else CancelledError()
                    else:
                        yield value
                    top_up()
        finally:
            collector.abandoned = True
            if outstanding:
                self._cancel_abandoned()

    def stream(
        self,
        *,
        buffersize: int = 64,
        ordered: bool = True,
        timeout: float | None = None,
        on_error: Literal["raise", "return"] = "return",
    ) -> Stream:
        """A :class:`Stream` for a live source: a producer thread ``put()``s items and
        ``close()``s, a consumer thread iterates results (in order by default)."""
        _check_positive("buffersize", buffersize, allow_none=False)
        _check_positive("timeout", timeout)
        self._check_open()
        return Stream(
            self, buffersize, ordered, timeout if timeout is not None else self.timeout, on_error
        )

    def late_results(self) -> list[LateResult]:
        """Drain and return results that arrived after their deadline (when no ``on_late``)."""
        with self._lock:
            out = list(self._late)
            self._late.clear()
        return out

    # ---------------------------------------------------------------- admission

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the coordinator is shut down")

    def _check_payload(self, payload: Any) -> int:
        """Raise TypeError/ValueError here, in the caller, for a payload that cannot travel;
        return the bytes of raw buffers it holds."""
        if type(payload) in _SCALARS and (type(payload) is not str or len(payload) < 4096):
            return 0  # always encodable, never holds a buffer
        text, bufs = _codec.encode(payload)
        nbytes = sum(b.nbytes for b in bufs) if bufs else 0
        if nbytes + len(text) + 64 > self.max_frame_size:
            raise ValueError(f"payload is larger than max_frame_size={self.max_frame_size}")
        return nbytes

    def _admit_one(
        self,
        payload: Any,
        sink: Any,
        seq: int,
        timeout: float | None,
        *,
        put_timeout: float | None = None,
    ) -> Task:
        _check_positive("timeout", timeout)
        task = Task(
            next(self._ids), payload, self._check_payload(payload), sink, seq, time.perf_counter()
        )
        self._admit([task], timeout, put_timeout)
        return task

    def _admit_many(
        self, items: list[Any], sink: Any, seq: int, timeout: float | None, chunk: int = 1
    ) -> None:
        ids, now = self._ids, time.perf_counter()
        if chunk > 1:
            # Each chunk is encoded once, here: that checks it can travel, and the text is what
            # the frame will carry. A chunk holding raw buffers, or one that fails, is looked at
            # item by item.
            tasks = []
            for i in range(0, len(items), chunk):
                part = items[i : i + chunk]
                text = self._plain_json(part) if len(part) > 1 else None
                if text is not None:
                    tasks.append(Task(next(ids), part, 0, sink, seq + i, now, len(part), text))
                    continue
                tasks.extend(
                    Task(next(ids), p, self._check_payload(p), sink, seq + i + j, now)
                    for j, p in enumerate(part)
                )
            self._admit(tasks, timeout, None)
            return
        # Checking all items in one encoder call is several times cheaper than one call per
        # item; only a batch that fails, or carries raw buffers, is looked at item by item.
        if self._plain_json(items) is not None:
            tasks = [Task(next(ids), p, 0, sink, seq + i, now) for i, p in enumerate(items)]
        else:
            tasks = [
                Task(next(ids), p, self._check_payload(p), sink, seq + i, now)
                for i, p in enumerate(items)
            ]
        self._admit(tasks, timeout, None)

    def _plain_json(self, items: list[Any]) -> str | None:
        """The JSON of *items* if it can travel, holds no raw buffers and fits in a frame."""
        try:
            text, bufs = _codec.encode(items)
        except (TypeError, ValueError):
            return None
        return text if not bufs and len(text) + 64 <= self.max_frame_size else None

    def _admit(self, tasks: list[Task], timeout: float | None, put_timeout: float | None) -> None:
        dropped: list[Task] = []
        with self._lock:
            if self._closed:
                raise ClosedError("the coordinator is shut down")
            q = self._queue
            if timeout is None and len(tasks) + len(q.items) <= q.maxsize:
                q.items.extend(tasks)  # the common case: room for all, no deadlines
                self._live += len(tasks)
                self._submitted += (
                    tasks[0].count if len(tasks) == 1 else sum(t.count for t in tasks)
                )
            else:
                for task in tasks:
                    self._admit_slow(task, timeout, put_timeout, dropped)
                    self._live += 1
                    self._submitted += task.count
            assigned = self._pump(inline=True)
            if self._stranded:
                self._fail_if_stranded()
        for handle in assigned:
            handle.flush_inline()
        for old in dropped:
            _deliver(old, DROPPED, None)

    def _admit_slow(
        self, task: Task, timeout: float | None, put_timeout: float | None, dropped: list[Task]
    ) -> None:
        """Admit one task when the queue may be full or it has a deadline. Lock held."""
        q = self._queue
        if q.full:
            if self.overflow == "reject":
                self._rejected += 1
                raise queue.Full("the coordinator's queue is full")
            if self.overflow == "drop_oldest":
                old = q.pop_oldest()
                old.finished = True
                self._live -= 1
                self._dropped += old.count
                dropped.append(old)
            else:
                self._pump()  # what this call admitted so far must be able to leave the queue
                self._blocked_putters += 1
                try:
                    ok = self._not_full.wait_for(lambda: not q.full or self._closed, put_timeout)
                finally:
                    self._blocked_putters -= 1
                if self._closed:
                    raise ClosedError("the coordinator is shut down")
                if not ok:
                    raise queue.Full("the coordinator's queue stayed full")
        if timeout is not None:
            task.deadline = task.t_submit + timeout
            if not self._deadlines or task.deadline < self._deadlines[0][0]:
                self._hk_cv.notify()
            heapq.heappush(self._deadlines, (task.deadline, task.id, weakref.ref(task)))
        q.push(task)

    # ================================================================ dispatch

    def _pump(self, *, inline: bool = False) -> list[WorkerHandle]:
        """Hand queued tasks to workers with free credit, most free credit first. Lock held.

        With *inline* the caller promises to call ``flush_inline()`` on the returned handles
        once it has released the lock, so idle writer threads are not woken for them.
        """
        items = self._queue.items
        assigned: list[WorkerHandle] = []
        if not items:
            return assigned
        handles = self._handles
        popped = False
        pop = items.popleft
        while items:
            best: WorkerHandle | None = None
            best_free = 0
            second = 0
            for h in handles:
                f = h.window - len(h.inflight) if h.accepting else 0
                if f > best_free:
                    second = best_free
                    best_free = f
                    best = h
                elif f > second:
                    second = f
            if best is None:
                break
            # Handing the leader (best - second + 1) tasks at once is the same as handing them
            # one by one to whoever has the most credit, without rescanning per task. With
            # many free slots each (tiny tasks) hand out chunks of an eighth of the credit, so a
            # frame carries many tasks; with a small window it is strict alternation.
            n = min(max(best_free - second + 1, best_free >> 3), best_free, len(items))
            tasks = []
            popped = True
            for _ in range(n):
                t = pop()
                if t.finished:
                    continue
                if not t.started:
                    t.started = True
                    s = t.sink
                    if s.__class__ is Future:
                        if not s.set_running_or_notify_cancel():
                            self._finish_cancelled_locked(t)
                            continue
                    elif s.abandoned:
                        self._finish_cancelled_locked(t)
                        continue
                tasks.append(t)
            if tasks:
                best.assign(tasks, wake=not inline)
                if inline and best not in assigned:
                    assigned.append(best)
        if popped and self._blocked_putters:
            self._not_full.notify_all()
        return assigned

    def _finish_cancelled_locked(self, t: Task) -> None:
        t.finished = True
        self._live -= 1
        self._cancelled += 1
        if not self._live:
            self._changed.notify_all()

    def _cancel_abandoned(self) -> None:
        """A map() was closed early: drop its queued tasks now rather than at dispatch."""
        with self._lock:
            keep = []
            for t in self._queue.clear():
                if t.sink.__class__ is not Future and t.sink.abandoned and not t.finished:
                    self._finish_cancelled_locked(t)
                else:
                    keep.append(t)
            self._queue.push_front(keep)
            if self._blocked_putters:
                self._not_full.notify_all()

    # ================================================================ handle callbacks

    def _on_results(
        self, handle: WorkerHandle, entries: list[Any], busy: float | None = None
    ) -> None:
        """Results from a worker: ``[task id, OK | ERROR | CHUNK, value]`` rows, validated;
        *busy* is the worker's own compute time for them, when it reports one."""
        futures: list[tuple[Task, int, Any]] = []
        groups: list[tuple[Any, list[tuple[int, int, Any]]]] = []
        late: list[LateResult] = []
        group: list[tuple[int, int, Any]] = []
        group_sink: Any = None
        now = time.perf_counter()
        with self._lock:
            pop = handle.inflight.pop
            record = self._latencies.append
            ok = failed = items = 0
            for tid, kind, value in entries:
                t = pop(tid, None)
                if t is None:
                    log.warning(
                        "worker %s returned a result for task %r it does not hold; ignored",
                        handle.name,
                        tid,
                    )
                    continue
                items += t.count
                if kind in (CHUNK, RUN) and (type(value) is not list or len(value) != t.count):
                    kind, value = (
                        ERROR,
                        TaskFailed(
                            "ProtocolError",
                            f"worker {handle.name} answered a chunk of {t.count} "
                            f"with {len(value)} results",
                        ),
                    )
                if t.finished:
                    late.extend(_late(t, kind, value))
                    continue
                t.finished = True
                self._live -= 1
                latency = now - t.t_submit
                sink = t.sink
                if kind == RUN:
                    ok += t.count
                    record(latency)  # one sample per task: a chunk counts once
                    if sink.__class__ is Future:  # only a misbehaving worker sends a run here
                        futures.append((t, OK, value[0]))
                        continue
                    outcome = [(t.seq, RUN, value)]
                elif t.count == 1 and kind != CHUNK:
                    if kind == OK:
                        ok += 1
                        record(latency)
                    else:
                        failed += 1
                    if sink.__class__ is Future:
                        futures.append((t, kind, value))
                        continue
                    outcome = [(t.seq, kind, value)]
                else:
                    outcome = _outcomes(t, kind, value)
                    for _, k, _v in outcome:
                        if k == OK:
                            ok += 1
                            record(latency)
                        else:
                            failed += 1
                    if sink.__class__ is Future:  # only a misbehaving worker sends a chunk here
                        futures.append((t, *outcome[0][1:]))
                        continue
                if sink is group_sink:
                    group.extend(outcome)
                else:
                    group_sink, group = sink, outcome
                    groups.append((sink, group))
            handle.completed += ok
            handle.failed += failed
            self._completed += ok
            self._failed += failed
            self._late_count += len(late)
            if busy is not None and entries:
                handle.observe(busy, len(entries))
                per_item = busy / max(1, items)
                self._item_time = (
                    per_item if self._item_time is None else 0.7 * self._item_time + 0.3 * per_item
                )
            handle.last_progress = time.monotonic()
            self._pump()
            if not self._live:
                self._changed.notify_all()
        for sink, outcomes in groups:
            sink.deliver_many(outcomes)
        for t, kind, value in futures:
            _deliver(t, kind, value)
        for item in late:
            self._emit_late(item)

    def _on_skipped(self, handle: WorkerHandle, tasks: list[Task]) -> None:
        with self._lock:
            for t in tasks:
                handle.inflight.pop(t.id, None)
            self._pump()

    def _on_worker_lost(
        self, handle: WorkerHandle, error: BaseException | None, graceful: bool
    ) -> None:
        failures: list[Task] = []
        with self._lock:
            if handle not in self._handles:
                return
            self._handles.remove(handle)
            handle.accepting = False
            tasks = list(handle.inflight.values())
            handle.inflight.clear()
            requeue: list[Task] = []
            for i, t in enumerate(tasks):
                if t.finished:
                    continue
                if not graceful and i < handle.batch:
                    t.attempts += 1
                    if t.count > 1:
                        # Run its items one by one from now on, so a poison item fails alone.
                        requeue.extend(self._split_locked(t))
                        continue
                if t.attempts > self.max_retries:
                    t.finished = True
                    self._live -= 1
                    self._failed += t.count
                    self._poisoned += t.count
                    failures.append(t)
                else:
                    requeue.append(t)
            self._queue.push_front(requeue)
            self._retried += len(requeue)
            if not graceful:
                self._workers_lost += 1
            slot = handle.slot
            if slot is not None and slot.handle is handle:
                slot.handle = None
                if not self._stopping and not slot.retired:
                    self._schedule_restart(slot, did_work=handle.completed > 0)
            elif not self._stopping:
                self._fail_if_stranded()
            self._pump()
            self._changed.notify_all()
            self._hk_cv.notify()
        handle.close()
        if isinstance(handle, RemoteHandle) and handle.arena is not None:
            handle.arena.close()  # its process is gone or going; a new one gets a new segment
        if handle.loss_reason:
            error = ConnectionLost(handle.loss_reason)
        if graceful:
            log.info("worker %s left (%d tasks re-queued)", handle.name, len(requeue))
        elif not self._stopping:
            log.warning(
                "lost worker %s (%s); %d tasks re-queued, %d failed as poison",
                handle.name,
                str(error),
                len(requeue),
                len(failures),
            )
        why = f"worker {handle.name} died while running this task ({error})"
        for t in failures:
            _deliver(t, ERROR, WorkerLostError(f"{why}; it had killed {t.attempts} workers"))

    def _split_locked(self, chunk: Task) -> list[Task]:
        """Replace a chunk by one task per item, keeping its place, attempts and deadline."""
        chunk.finished = True
        singles = []
        for i, item in enumerate(chunk.payload):
            t = Task(next(self._ids), item, 0, chunk.sink, chunk.seq + i, chunk.t_submit)
            t.attempts = chunk.attempts
            t.started = True
            if chunk.deadline is not None:
                t.deadline = chunk.deadline
                heapq.heappush(self._deadlines, (t.deadline, t.id, weakref.ref(t)))
            singles.append(t)
        self._live += len(singles) - 1
        return singles

    def _peer_rejected(self, peer: str, why: object) -> None:
        with self._lock:
            self._rejected_peers += 1
        log.warning("rejected connection from %s: %s", peer, why)

    def _emit_late(self, item: LateResult) -> None:
        if self._on_late is None:
            with self._lock:
                self._late.append(item)
            return
        try:
            self._on_late(item)
        except Exception:
            log.exception("on_late callback raised")

    # ================================================================ attaching

    def _attach(self, handle: WorkerHandle) -> None:
        with self._lock:
            if self._closed and not isinstance(handle, RemoteHandle):
                raise ClosedError("the coordinator is shut down")
            self._handles.append(handle)
            if isinstance(handle, LocalHandle):
                self._locals.append(handle)
            self._pump()
            self._changed.notify_all()

    def _attach_remote(
        self, conn: _connection.Connection, hello: dict[str, Any], *, kind: str, window: int | None
    ) -> RemoteHandle | None:
        """Called from an acceptor/dialer thread after the handshake and hello."""
        spawn_id = hello.get("spawn_id") if kind == "spawned" else None
        slot = None
        if kind == "spawned":
            slot = next((s for s in self._slots if s.spawn_id == spawn_id), None)
            if slot is None or slot.retired:
                conn.abort()
                return None
            if hello.get("op") == "failed":
                with self._lock:
                    slot.error = str(hello.get("error") or "the worker failed to start")
                    self._changed.notify_all()
                conn.abort()
                return None
            window = slot.window
        handle = RemoteHandle(
            self,
            conn,
            hello,
            window=window or self.window,
            kind=kind,
            arena=slot.arena if slot is not None else None,
        )
        if window is None:
            # No window was asked for: size it from how long this worker's tasks take.
            handle.adaptive = True
            handle.window = min(handle.max_window, INITIAL_WINDOW)
        with self._lock:
            if self._stopping:
                conn.abort()
                return None
            if slot is not None:
                handle.slot = slot
                slot.handle = handle
                slot.error = None
                slot.connected_once = True
            self._handles.append(handle)
            handle.start()
            self._pump()
            self._changed.notify_all()
        log.info(
            "worker %s attached (%s, pid %s, window %d)",
            handle.name,
            kind,
            handle.pid,
            handle.window,
        )
        return handle

    # ================================================================ processes

    def _start_process(self, slot: _Slot) -> None:
        config: dict[str, Any] = {
            "target": slot.target,
            "main_path": slot.main_path,
            "kwargs": slot.kwargs,
            "spawn_id": slot.spawn_id,
            "sys_path": [p for p in sys.path if isinstance(p, str)],
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_timeout": self.heartbeat_timeout,
            "max_frame_size": self.max_frame_size,
            "log_level": logging.getLogger("pytaskqml").getEffectiveLevel(),
        }
        env = dict(os.environ)
        env.pop("PYTASKQML_AUTHKEY", None)  # the child gets its key on stdin, nothing else
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
        if slot.arena is not None:
            slot.arena.close()  # the previous process's segment
            slot.arena = None
        pair = socket.socketpair() if self._spawn_socketpair else None
        if pair is not None:
            config["sock"] = pair[1].fileno()
        else:
            assert self._spawn_listener is not None
            config["address"] = list(self._spawn_listener.address)
            config["authkey"] = self._spawn_key.hex()
        segment = _shm.create_segment(f"pytaskqml-{slot.spawn_id}") if self.shared_memory else None
        fd, reserve = segment if segment is not None else (None, False)
        token = secrets.token_hex(8)
        if fd is not None:
            config["shm"] = [fd, token]
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytaskqml._child"],
                stdin=subprocess.PIPE,
                env=env,
                close_fds=True,
                pass_fds=tuple(
                    f for f in (fd, pair[1].fileno() if pair else None) if f is not None
                ),
            )
        except BaseException:
            if fd is not None:
                os.close(fd)
            if pair is not None:
                pair[0].close()
            raise
        finally:
            if pair is not None:
                pair[1].close()  # the child's end: ours is pair[0]
        if fd is not None:
            slot.arena = _shm.Arena(fd, token=token, reserve=reserve)
        if pair is not None:
            threading.Thread(
                target=self._admit_spawned,
                args=(pair[0], proc.pid),
                name=f"pytaskqml-spawn-{proc.pid}",
                daemon=True,
            ).start()
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(config).encode() + b"\n")
            proc.stdin.close()
        except OSError:
            pass  # the child died at once; supervision notices
        slot.proc = proc
        slot.started_at = time.monotonic()
        slot.restart_at = None

    def _admit_spawned(self, sock: socket.socket, pid: int) -> None:
        """Wait for a child's hello on its socketpair and attach it (a thread per child).

        No handshake: only this process and that child hold the pair. No deadline either: the
        child says hello after its setup(), however long that takes, and if it dies first its
        end closes and the wait ends (spawn()'s own timeout kills a child that never does).
        """
        conn = _connection.Connection(sock, name=self.name, max_frame_size=self.max_frame_size)
        conn.peer = f"pid {pid}"
        try:
            hello = _read_hello(conn, None)
            conn.set_authenticated()  # lift the small frame limit of the greeting
            self._attach_remote(conn, hello, kind="spawned", window=None)
        except (ConnectionLost, ProtocolError, OSError) as exc:
            conn.abort()
            log.info("spawned worker %s ended before it was ready: %s", pid, exc)
        except BaseException:
            conn.abort()
            log.exception("attaching spawned worker %s crashed", pid)

    def _schedule_restart(self, slot: _Slot, *, did_work: bool = False) -> None:
        """Lock held. Restart the slot's process after its backoff.

        The backoff grows while the process dies without getting anything done and starts
        over once it has completed work; more than ``max_restarts`` restarts within
        ``RESTART_WINDOW`` seconds retire the slot (a crash loop, not bad luck).
        """
        now = time.monotonic()
        recent = slot.restart_times
        while recent and now - recent[0] > RESTART_WINDOW:
            recent.popleft()
        if len(recent) >= self.max_restarts:
            log.error(
                "worker %s (slot %d) died %d times within %.0fs; not restarting it again",
                slot.target,
                slot.spawn_id,
                len(recent),
                RESTART_WINDOW,
            )
            slot.retired = True
            self._fail_if_stranded()
            return
        if did_work or now - slot.started_at > 10.0:
            slot.backoff = 0.05
        recent.append(now)
        slot.restart_at = now + slot.backoff
        slot.backoff = min(slot.backoff * 2, 5.0)

    def _fail_if_stranded(self) -> None:
        """Lock held. With no worker left and none that can come back (no process slot to
        restart, nothing listening or dialling), queued work would wait forever: fail it."""
        if self._handles or self._acceptors or any(not s.retired for s in self._slots):
            self._stranded = False
            return
        if any(d.active for d in self._dialers):
            self._stranded = False
            return
        self._stranded = True  # from now on new work fails at once, until a worker is added
        stranded = [t for t in self._queue.clear() if not t.finished]
        for t in stranded:
            t.finished = True
            self._live -= 1
            self._failed += t.count
        if stranded:
            log.error(
                "no workers left and none can come back; failing %d queued tasks", len(stranded)
            )
            err = WorkerLostError(
                "no workers left: every worker process died and was not restarted"
            )
            # Delivered from a fresh thread: we hold the lock, and sinks run user callbacks.
            threading.Thread(
                target=_deliver_each,
                args=(stranded, ERROR, err),
                name="pytaskqml-fail-stranded",
                daemon=True,
            ).start()
        self._changed.notify_all()

    def _retire(self, slot: _Slot) -> None:
        with self._lock:
            slot.retired = True
            handle = slot.handle
        if handle is not None:
            handle.conn.abort()
        _kill(slot.proc)
        if slot.arena is not None:
            slot.arena.close()

    def _supervise(self, now: float) -> None:
        """Housekeeping: notice dead children, end wedged ones, restart slots that are due."""
        due: list[_Slot] = []
        doomed: list[subprocess.Popen[bytes]] = []
        with self._lock:
            if self._stopping:
                return
            for slot in self._slots:
                if slot.retired or slot.proc is None:
                    continue
                alive = slot.proc.poll() is None
                if slot.handle is None and slot.restart_at is None and not alive:
                    if not slot.connected_once:
                        continue  # a start-up failure: spawn() reports it, nothing to retry
                    self._schedule_restart(slot)  # died before its connection was noticed
                if slot.restart_at is not None and now >= slot.restart_at and not slot.retired:
                    slot.restart_at = None
                    slot.restarts += 1
                    self._restarts += 1
                    if alive:
                        doomed.append(slot.proc)  # lost its connection yet still running: wedged
                    due.append(slot)
        for proc in doomed:
            _kill(proc)
        for slot in due:
            log.info(
                "restarting worker %s (slot %d, restart %d)",
                slot.target,
                slot.spawn_id,
                slot.restarts,
            )
            try:
                self._start_process(slot)
            except OSError as exc:  # out of processes, descriptors, memory: try again later
                log.error("could not restart worker %s: %s", slot.target, exc)
                with self._lock:
                    if not self._stopping and not slot.retired:
                        self._schedule_restart(slot)

    # ================================================================ housekeeping

    def _housekeeping(self) -> None:
        tick = min(0.25, self.heartbeat_interval / 2)
        try:
            while self._housekeeping_once(tick):
                pass
        except BaseException:
            log.exception("coordinator housekeeping thread crashed; failing outstanding work")
            self._fail_everything(ClosedError("the coordinator's housekeeping thread crashed"))

    def _housekeeping_once(self, tick: float) -> bool:
        # One round per call, so no task stays referenced from this frame while it waits.
        with self._lock:
            if self._stopped.is_set():
                return False
            now = time.monotonic()
            expired = self._expire_locked()
            handles = [h for h in self._handles if isinstance(h, RemoteHandle)]
        for t in expired:
            _deliver(t, TIMEOUT, TaskTimeout(t.seq, (t.deadline or 0) - t.t_submit))
        del expired
        self._check_liveness(handles, now)
        self._supervise(now)
        with self._lock:
            if self._stopped.is_set():
                return False
            wait = tick
            if self._deadlines:
                wait = min(wait, max(0.0, self._deadlines[0][0] - time.perf_counter()))
            if wait > 0:
                self._hk_cv.wait(wait)
        return True

    def _expire_locked(self) -> list[Task]:
        """Finish the tasks whose deadline passed (lock held); the caller delivers markers."""
        expired: list[Task] = []
        dl = self._deadlines
        now = time.perf_counter()  # deadlines are on the submit-time clock
        while dl and dl[0][0] <= now:
            t = heapq.heappop(dl)[2]()
            if t is None or t.finished:
                continue
            t.finished = True
            self._live -= 1
            self._timed_out += t.count
            self._queue.remove(t)  # no-op when it is in flight
            expired.append(t)
        if len(dl) > 2 * self._live + 1024:
            # Mostly entries of tasks that finished early: drop them.
            dl[:] = [e for e in dl if _unfinished(e[2])]
            heapq.heapify(dl)
        if expired:
            self._pump()
            if not self._live:
                self._changed.notify_all()
            if self._blocked_putters:
                self._not_full.notify_all()
        return expired

    def _check_liveness(self, handles: list[RemoteHandle], now: float) -> None:
        for h in handles:
            conn = h.conn
            silent = now - conn.last_recv
            if silent > self.heartbeat_timeout:
                log.warning("worker %s silent for %.1fs; declaring it lost", h.name, silent)
                h.loss_reason = f"silent for {silent:.1f}s"
                self._kill_handle(h)
                continue
            if (
                self.hang_timeout is not None
                and h.inflight
                and now - h.last_progress > self.hang_timeout
            ):
                log.warning(
                    "worker %s returned nothing for %.1fs with %d tasks in hand; declaring it hung",
                    h.name,
                    now - h.last_progress,
                    len(h.inflight),
                )
                h.loss_reason = f"hung: no result for {now - h.last_progress:.1f}s"
                self._kill_handle(h)
                continue
            if now - conn.last_send >= self.heartbeat_interval:
                with contextlib.suppress(ConnectionLost):
                    conn.ping()

    def _kill_handle(self, h: RemoteHandle) -> None:
        h.conn.abort()
        if h.slot is not None:
            _kill(h.slot.proc)

    # ================================================================ stats

    def _worker_stats(self, h: WorkerHandle) -> WorkerStats:
        arena = h.arena if isinstance(h, RemoteHandle) else None
        return WorkerStats(
            h.name,
            h.kind,
            h.pid,
            h.address,
            h.window,
            len(h.inflight),
            h.completed,
            h.failed,
            arena.placed if arena is not None else None,
            arena.fallbacks if arena is not None else None,
            arena.in_use if arena is not None else None,
        )

    def statistics(self) -> Statistics:
        with self._lock:
            lat = sorted(self._latencies)
            in_flight = sum(len(h.inflight) for h in self._handles)
            return Statistics(
                submitted=self._submitted,
                completed=self._completed,
                failed=self._failed,
                cancelled=self._cancelled,
                timed_out=self._timed_out,
                late=self._late_count,
                dropped=self._dropped,
                rejected=self._rejected,
                retried=self._retried,
                poisoned=self._poisoned,
                workers_lost=self._workers_lost,
                restarts=self._restarts,
                rejected_peers=self._rejected_peers,
                queued=len(self._queue),
                in_flight=in_flight,
                workers=tuple(self._worker_stats(h) for h in self._handles),
                latency_p50=_percentile(lat, 0.50),
                latency_p90=_percentile(lat, 0.90),
                latency_p99=_percentile(lat, 0.99),
                latency_max=lat[-1] if lat else None,
                uptime=time.monotonic() - self._started,
            )

    # ================================================================ control endpoint

    def serve_control(
        self, address: tuple[str, int] | str = ("127.0.0.1", 0), *, insecure: bool = False
    ) -> tuple[str, int]:
        """Start the HTTP control endpoint (``GET /health``, ``POST /shutdown``)."""
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
        self._control.start()
        return self._control.address

    # ================================================================ shutdown

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        """Stop accepting work; finish (or with ``cancel_futures`` cancel) what is queued; stop
        and reap every worker process and thread. Every future is resolved when this returns
        (with ``wait``): result, exception or cancelled."""
        with self._lock:
            already = self._closed
            self._closed = True
            self._not_full.notify_all()
        if already:
            if wait:
                self._stopped.wait()
            return
        if cancel_futures:
            self._cancel_queued()
        if not wait:
            threading.Thread(
                target=self._finish_shutdown_logged,
                args=(timeout,),
                name="pytaskqml-shutdown",
                daemon=False,
            ).start()
            return
        self._finish_shutdown(timeout)

    def _cancel_queued(self) -> None:
        with self._lock:
            tasks = [t for t in self._queue.clear() if not t.finished]
            for t in tasks:
                t.finished = True
                self._live -= 1
                self._cancelled += 1
            self._changed.notify_all()
        for t in tasks:
            _deliver(t, CANCELLED, None)

    def _can_progress(self) -> bool:
        return (
            bool(self._handles)
            or any(
                not s.retired
                and (s.restart_at is not None or (s.proc is not None and s.proc.poll() is None))
                for s in self._slots
            )
            or any(d.active for d in self._dialers)
        )

    def _finish_shutdown_logged(self, timeout: float | None) -> None:
        try:
            self._finish_shutdown(timeout)
        except BaseException:
            log.exception("background shutdown crashed")

    def _finish_shutdown(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._live and self._can_progress():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._changed.wait(0.25 if remaining is None else min(remaining, 0.25))
            self._stopping = True
        self._fail_everything(ClosedError("the coordinator shut down before this task ran"))
        # Stop workers: spawned children are asked to leave, then reaped; other connections closed.
        with self._lock:
            handles = list(self._handles)
            slots = list(self._slots)
            for s in slots:
                s.retired = True
        for d in self._dialers:
            d.stop()
        for a in [*self._acceptors, *([self._spawn_listener] if self._spawn_listener else [])]:
            a.stop()
        for h in handles:
            if isinstance(h, RemoteHandle) and h.kind == "spawned":
                with contextlib.suppress(ConnectionLost):
                    h.conn.send("stop")
        end = time.monotonic() + 5.0
        for s in slots:
            if s.proc is not None:
                try:
                    s.proc.wait(max(0.05, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("worker process %d did not exit; killing it", s.proc.pid)
                    _kill(s.proc)
            if s.arena is not None:
                s.arena.close()
        for h in handles:
            h.close()
        for local in self._locals:
            local.close()
            local.join(5.0)
            call_teardown(local.worker)
        for h in handles:
            if isinstance(h, RemoteHandle):
                h.join(2.0)
        if self._control is not None:
            self._control.stop()
        with self._lock:
            self._stopped.set()
            self._hk_cv.notify_all()
            self._changed.notify_all()
        if self._hk is not threading.current_thread():
            self._hk.join(5.0)

    def _fail_everything(self, error: BaseException) -> None:
        with self._lock:
            tasks = [t for t in self._queue.clear() if not t.finished]
            for h in self._handles:
                tasks.extend(t for t in h.inflight.values() if not t.finished)
            for t in tasks:
                t.finished = True
                self._live -= 1
                self._cancelled += 1
            self._changed.notify_all()
        for t in tasks:
            _deliver(t, CANCELLED, error)


def _deliver_each(tasks: list[Task], kind: int, value: Any) -> None:
    try:
        for t in tasks:
            _deliver(t, kind, value)
    except BaseException:
        log.exception("delivering failed tasks crashed")


def _unfinished(ref: weakref.ref[Task]) -> bool:
    t = ref()
    return t is not None and not t.finished


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        proc.wait(5.0)


def _outcomes(t: Task, kind: int, value: Any) -> list[tuple[int, int, Any]]:
    """Per-item ``(seq, kind, value)`` of a task's outcome (a chunk has one per item)."""
    if kind == RUN:
        return [(t.seq + i, OK, v) for i, v in enumerate(value)]
    if kind == CHUNK:
        return [(t.seq + i, k, v) for i, (k, v) in enumerate(value)]
    if kind == TIMEOUT:
        return [(t.seq + i, TIMEOUT, TaskTimeout(t.seq + i, value.timeout)) for i in range(t.count)]
    return [(t.seq + i, kind, value) for i in range(t.count)]


def _late(t: Task, kind: int, value: Any) -> list[LateResult]:
    return [LateResult(t.id, seq, k == OK, v) for seq, k, v in _outcomes(t, kind, value)]


def _deliver(task: Task, kind: int, value: Any) -> None:
    """Hand a finished task's outcome to its owner (outside the coordinator lock)."""
    sink = task.sink
    if sink.__class__ is Future:
        if sink.done():
            return
        try:
            if kind == OK:
                sink.set_result(value)
            elif kind == ERROR:
                sink.set_exception(value)
            elif kind == TIMEOUT:
                sink.set_exception(
                    TimeoutError(f"task {task.id} missed its {value.timeout:.3f}s deadline")
                )
            elif kind == CANCELLED and value is not None and sink.running():
                sink.set_exception(value)
            elif not sink.cancel():
                sink.set_exception(value if value is not None else ClosedError("task cancelled"))
        except InvalidStateError:  # the caller cancelled it meanwhile
            pass
        return
    sink.deliver_many(_outcomes(task, kind, value))


class _Collector(ReorderBuffer):
    """The results side of one map() or stream."""

    def __init__(self, ordered: bool) -> None:
        super().__init__(ordered=ordered)
        self.abandoned = False

    def get_batch(self, timeout: float | None = None) -> list[tuple[int, int, Any]]:
        """The next outcome plus any that are ready right behind it, in one lock hold."""
        out = [self.get_next(timeout)]
        with self._cv:
            if self.ordered:
                slots = self._slots
                while self._next in slots:
                    kind, value = slots.pop(self._next)
                    out.append((self._next, kind, value))
                    self._next += len(value) if kind == RUN else 1
            else:
                while self._arrived:
                    out.append(self._arrived.popleft())
        return out


class Stream:
    """Put items in from a producer thread; iterate results from a consumer thread.

    ``put`` blocks while ``buffersize`` items are outstanding when the coordinator's overflow
    policy is ``block``; under ``drop_oldest`` it never blocks and the oldest waiting item is
    dropped (counted in :attr:`dropped`); under ``reject`` it raises :class:`queue.Full`.
    """

    def __init__(
        self,
        coord: Coordinator,
        buffersize: int,
        ordered: bool,
        timeout: float | None,
        on_error: str,
    ) -> None:
        self._coord = coord
        self._buffersize = buffersize
        self._timeout = timeout
        self._on_error = on_error
        self._collector = _Collector(ordered)
        self._space = threading.Condition(threading.Lock())
        self._count = 0
        self._consumed = 0
        self._closed = False
        self.dropped = 0
        self.timed_out = 0

    def put(self, item: Any, *, timeout: float | None = None) -> None:
        """Submit one item. Raises :class:`ClosedError` after :meth:`close`."""
        with self._space:
            if self._closed:
                raise ClosedError("put() on a closed stream")
            if self._coord.overflow == "block" and not self._space.wait_for(
                lambda: self._count - self._consumed < self._buffersize or self._closed, timeout
            ):
                raise queue.Full("the stream stayed full")
            if self._closed:
                raise ClosedError("put() on a closed stream")
            seq = self._count
            self._count += 1
        try:
            self._coord._admit_one(item, self._collector, seq, self._timeout, put_timeout=timeout)
        except BaseException:
            # Not admitted: fill its place so the consumer does not wait for it.
            self._collector.deliver(seq, DROPPED, None)
            raise

    def put_nowait(self, item: Any) -> None:
        self.put(item, timeout=0)

    def close(self) -> None:
        """No more items; iteration ends after the last outstanding result."""
        with self._space:
            if self._closed:
                return
            self._closed = True
            end = self._count
            self._space.notify_all()
        self._collector.deliver(end, _END, None)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        end_seen = False
        try:
            while True:
                for _, kind, value in self._collector.get_batch():
                    if kind == _END:
                        end_seen = True
                        continue
                    with self._space:
                        self._consumed += span(kind, value)
                        self._space.notify()
                    if kind == RUN:
                        yield from value
                    elif kind == OK:
                        yield value
                    elif kind == DROPPED:
                        self.dropped += 1
                    elif kind == TIMEOUT:
                        self.timed_out += 1
                        yield value
                    elif kind in (ERROR, CANCELLED) and self._on_error == "raise":
                        raise value if value is not None else ClosedError("task cancelled")
                    else:
                        yield value
                if end_seen:
                    with self._space:
                        if self._consumed >= self._count:
                            return
        finally:
            if not end_seen:
                self._collector.abandoned = True


# =================================================================== connection managers

_HELLO_OPS = ("hello", "failed")


def _read_hello(conn: _connection.Connection, timeout: float | None) -> dict[str, Any]:
    conn.sock.settimeout(timeout)
    try:
        with _connection.Deadline(conn.abort, timeout) as deadline:
            msg = conn.recv()
    except (TimeoutError, ConnectionLost) as exc:
        if isinstance(exc, TimeoutError) or deadline.expired:
            raise ConnectionLost(f"{conn.peer} sent no hello in time") from None
        raise
    finally:
        if not conn.closed:
            conn.sock.settimeout(None)
    if msg.op not in _HELLO_OPS:
        raise ProtocolError(f"expected hello, got {msg.op!r}")
    return msg.header


class _Acceptor:
    """Accepts worker connections on one listening socket.

    Each connection is authenticated in its own short-lived thread (so a peer that stalls in
    the handshake holds up nobody), at most ``max_pending`` at a time; more are refused.
    """

    max_pending = 64

    def __init__(
        self,
        coord: Coordinator,
        address: tuple[str, int],
        key: bytes,
        *,
        kind: str,
        window: int | None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.coord = coord
        self.key = key
        self.ssl_context = ssl_context
        self.kind = kind
        self.window = window
        self.sock = _connection.open_listener(address)
        name = self.sock.getsockname()
        self.address: tuple[str, int] = (name[0], name[1])
        self._pending = threading.BoundedSemaphore(self.max_pending)
        self._stopped = False
        self._thread = threading.Thread(
            target=self._loop,
            name=f"pytaskqml-accept-{_connection.format_address(self.address)}",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(2)
        with contextlib.suppress(OSError):
            self.sock.close()
        self._thread.join(2.0)

    def _loop(self) -> None:
        while not self._stopped:
            try:
                sock, peer = self.sock.accept()
            except OSError as exc:
                if self._stopped:
                    return
                log.warning("accept() failed on %s: %s", self.address, exc)
                time.sleep(0.05)  # e.g. out of file descriptors: do not spin
                continue
            except BaseException:
                log.exception("acceptor thread crashed")
                return
            if not self._pending.acquire(blocking=False):
                self.coord._peer_rejected(
                    _connection.format_address(peer[:2]),
                    "too many connections waiting for the handshake",
                )
                with contextlib.suppress(OSError):
                    sock.close()
                continue
            threading.Thread(
                target=self._admit, args=(sock,), name="pytaskqml-handshake", daemon=True
            ).start()

    def _admit(self, sock: Any) -> None:
        conn = None
        timeout = _connection.DEFAULT_HANDSHAKE_TIMEOUT
        try:
            if self.ssl_context is not None:
                sock = _connection.tls_accept(sock, self.ssl_context, timeout=timeout)
            conn = _connection.Connection(sock, max_frame_size=self.coord.max_frame_size)
            _connection.server_handshake(conn, self.key, timeout=timeout)
            hello = _read_hello(conn, timeout)
            self.coord._attach_remote(conn, hello, kind=self.kind, window=self.window)
        except (AuthenticationError, ConnectionLost, ProtocolError, OSError) as exc:
            self.coord._peer_rejected(conn.peer if conn else "?", exc)
            if conn is not None:
                conn.abort()
            else:
                with contextlib.suppress(OSError):
                    sock.close()
        except BaseException:
            log.exception("handshake thread crashed")
            if conn is not None:
                conn.abort()
            else:
                with contextlib.suppress(OSError):
                    sock.close()
        finally:
            self._pending.release()


class _Dialer:
    """Keeps a connection to one listening worker, reconnecting with backoff."""

    def __init__(
        self,
        coord: Coordinator,
        address: tuple[str, int],
        window: int | None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.coord = coord
        self.ssl_context = ssl_context
        self.address = address
        self.window = window
        self.connected = threading.Event()
        self.active = True
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._handle: RemoteHandle | None = None
        self._thread = threading.Thread(
            target=self._loop,
            name=f"pytaskqml-dial-{_connection.format_address(address)}",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        handle = self._handle
        if handle is not None:
            handle.conn.abort()
        self._thread.join(5.0)

    def _loop(self) -> None:
        delay = 0.05
        key = self.coord.authkey or b""
        try:
            while not self._stop.is_set():
                conn = None
                try:
                    sock = _connection.dial(
                        self.address,
                        timeout=_connection.DEFAULT_HANDSHAKE_TIMEOUT,
                        ssl_context=self.ssl_context,
                    )
                    conn = _connection.Connection(sock, max_frame_size=self.coord.max_frame_size)
                    _connection.client_handshake(
                        conn, key, timeout=_connection.DEFAULT_HANDSHAKE_TIMEOUT
                    )
                    hello = _read_hello(conn, _connection.DEFAULT_HANDSHAKE_TIMEOUT)
                except (AuthenticationError, ConnectionLost, ProtocolError, OSError) as exc:
                    if conn is not None:
                        conn.abort()
                    if self.last_error != str(exc):
                        log.info(
                            "worker at %s unavailable: %s",
                            _connection.format_address(self.address),
                            exc,
                        )
                    self.last_error = str(exc)
                    self._stop.wait(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                if self._stop.is_set():
                    conn.abort()
                    return
                handle = self.coord._attach_remote(conn, hello, kind="remote", window=self.window)
                if handle is None:
                    return
                self._handle = handle
                self.connected.set()
                self.last_error = None
                delay = 0.05
                handle.lost.wait()
                self._handle = None
        except BaseException:
            log.exception("dialer thread for %s crashed", self.address)
        finally:
            self.active = False
