"""The :class:`Coordinator`: options, entry points, workers, statistics, shutdown.

Data flow::

    caller ── submit()/map()/stream.put() ──▶ Intake: payload checked (TypeError right here),
                                               tasks built, tiny items chunked
                                               │
                                               ▼
         Engine (one lock) ──▶ Scheduler: bounded queue (block | drop_oldest | reject),
                                          credit dispatch to the least-loaded worker
                                               │  Send actions: each handle's queue
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

The Coordinator is one class that holds its parts, each an object with its own state: the
engine (:mod:`.engine.engine`) and its intake, the :class:`~.engine.pool.WorkerPool` (where
workers come from: threads, spawned processes and their supervisor, dialled and dialling-in
workers, the heartbeat thread), the buffer pool (:class:`~.buffers.pool.Buffers`), the named
models, the broadcasts, the ingress ports (:class:`~.ingress.ports.IngressPorts`), the control
endpoint and a shared queue's feed. Its methods keep the user-facing contract (arguments
checked, defaults, docstrings) and hand the work to the part it belongs to; shutting down stops
the parts in order.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import CancelledError, Future
from typing import Any, Literal, Protocol

from .buffers.pool import DEFAULT_POOL_BYTES, Buffers, check_pool_bytes
from .coordctl import coordinator_control
from .core.ordered import OVERFLOW_POLICIES, OverflowPolicy
from .core.stats import QueueStats, Statistics, WorkerStats
from .core.tasks import LateResult, Route
from .engine.broadcast import Broadcast, Broadcasts
from .engine.delivery import CallbackRunner, TaskFuture
from .engine.engine import Engine
from .engine.handles import WorkerHandle
from .engine.intake import Intake, check_priority, check_weight, item_routes
from .engine.intake import route_for as make_route
from .engine.iterate import Stream, map_results
from .engine.modelreg import Models
from .engine.pool import WorkerPool, check_positive
from .engine.progress import Progress
from .errors import ClosedError
from .ingress.ports import IngressPorts
from .ingress.server import DEFAULT_MAX_OUTSTANDING, IngressStats
from .wire import protocol as _protocol
from .wire.auth import resolve_authkey
from .wire.connection import Address
from .wire.control import ControlServer, ControlStats
from .worker.base import Worker
from .worker.bootstrap import refuse_in_bootstrap
from .worker.models import Model

log = logging.getLogger(__name__)


class QueueFeed(Protocol):
    """A shared queue's feed into one coordinator (``pytaskqml.redis``'s ``QueueFeed``)."""

    def statistics(self) -> QueueStats: ...
    def stop_reading(self) -> None: ...
    def close(self) -> None: ...


class SharedQueue(Protocol):
    """A queue shared by coordinators (a :class:`pytaskqml.redis.RedisQueue`): it feeds a
    coordinator its entries. Described here, not imported: the Redis feature sits above the
    front."""

    def serve(self, coordinator: Coordinator) -> QueueFeed: ...


class Coordinator:
    """Owns the task queue and the workers; returns results in submission order.

    Workers come from :meth:`add_local`, :meth:`spawn`, :meth:`connect` and :meth:`listen`;
    work from :meth:`submit`, :meth:`map` and :meth:`stream`. Leaving a ``with`` block calls
    :meth:`shutdown` (with ``cancel_futures=True`` on an exception, such as Ctrl-C).

    Options (keyword-only; times in seconds):

    - ``max_queue`` (10,000): tasks waiting for a worker, at most.
    - ``overflow`` (``"block"``): a full queue makes new work wait; ``"drop_oldest"``
      cancels the oldest waiting task, ``"reject"`` raises :class:`queue.Full`.
    - ``window`` (64): tasks in flight per worker, at most. Below it the window of each
      process or remote worker adapts to about 10 ms of its work beyond its round trip,
      unless a window is given for that worker; either way a worker holds tasks beyond those
      it runs only while every worker is busy, and a kind of work (a function, a model) never
      measured goes one task per worker.
    - ``max_retries`` (2): worker deaths a task may cause before it fails as poison
      (:class:`WorkerLostError`).
    - ``timeout`` (None): a default deadline for :meth:`submit`, :meth:`map` and streams (see
      each for what it counts from).
    - ``hang_timeout`` (60.0; None: never): how long a worker with work in hand may go
      without returning any result before it is declared lost.
    - ``heartbeat_interval`` (0.5) / ``heartbeat_timeout`` (5.0): a connection silent for
      ``heartbeat_timeout`` is dropped.
    - ``max_restarts`` (50) restarts of one spawned process within 60 s, or
      ``max_start_failures`` (3) failed starts in a row, and its place is given up.
    - ``cancel_grace`` (0.5): how long ``shutdown(cancel_futures=True)`` lets running tasks
      finish before their workers are stopped.
    - ``max_models`` (None: every model on every worker): named models load on demand, at
      most that many per worker; least recently used idle ones make room.
    - ``authkey`` (the ``PYTASKQML_AUTHKEY`` environment variable): the shared key for worker
      and producer connections and the control token.
    - ``max_frame_size`` (64 MiB): the largest frame sent or accepted, in bytes.
    - ``on_late`` (None): called with each :class:`LateResult` that arrives after its
      deadline, on the callback thread; otherwise they wait in :meth:`late_results`.
    - ``shared_memory`` (True): buffers of 64 KiB or more reach spawned workers through
      shared memory where the platform allows it.
    - ``max_buffer_bytes`` (1 GiB): address space of the :meth:`buffer` pool (memory is used
      only by the buffers written; 0: none).
    - ``name`` (``"coordinator"``): shown in logs, thread names and the status page.
    - ``queue`` (None): a :class:`~pytaskqml.redis.RedisQueue` whose entries run on these workers,
      their results going back to their producers.

    Raises ``ValueError`` for an unknown ``overflow``, a count or time that is not positive,
    or a float where a whole number is needed.
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
        max_models: int | None = None,
        authkey: bytes | str | None = None,
        max_frame_size: int = _protocol.DEFAULT_MAX_FRAME_SIZE,
        on_late: Callable[[LateResult], None] | None = None,
        shared_memory: bool = True,
        max_buffer_bytes: int = DEFAULT_POOL_BYTES,
        name: str = "coordinator",
        queue: SharedQueue | None = None,
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
        refuse_in_bootstrap("a Coordinator (or an Executor)")
        check_positive("timeout", timeout)
        check_positive("hang_timeout", hang_timeout)
        check_pool_bytes(max_buffer_bytes)
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
        self.authkey = resolve_authkey(authkey)
        self._started = time.monotonic()
        self._closed = False
        self._stopped = threading.Event()
        self._teardown_lock = threading.Lock()
        self._torn_down = False
        self._runner = CallbackRunner(name)
        self._engine = Engine(
            name=name,
            max_queue=max_queue,
            overflow=overflow,
            max_retries=max_retries,
            max_window=window,
            runner=self._runner,
            on_late=on_late,
            reinforcements=lambda: self._pool.reinforcements(),
            strand_error=lambda: self._pool.strand_error(),
        )
        self._intake = Intake(
            self._engine, max_frame_size=max_frame_size, pool=lambda: self._buffers.existing
        )
        self._engine.max_models = max_models
        #: Named models on this coordinator's workers: load, update, unload, status.
        self.models = Models(self._engine, on_demand=max_models is not None)
        self._broadcasts = Broadcasts(self._intake, self._runner)
        self._buffers = Buffers(
            enabled=self.shared_memory, max_bytes=max_buffer_bytes, changed=self._engine.signal
        )
        self._pool = WorkerPool(
            self._engine,
            name=name,
            authkey=self.authkey,
            max_frame_size=max_frame_size,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            hang_timeout=hang_timeout,
            max_restarts=max_restarts,
            max_start_failures=max_start_failures,
            shared_memory=self.shared_memory,
            buffers=self._buffers,
            models=self.models,
            broadcasts=self._broadcasts,
        )
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()
        self._control: ControlServer | None = None
        self._ingress = IngressPorts(
            self, key=self.authkey, max_frame_size=max_frame_size, name=name
        )
        # Last: the feed starts taking entries as soon as workers are attached.
        self._feed = queue.serve(self) if queue is not None else None

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

    # ================================================================ workers

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
        return self._pool.add_local(
            worker,
            threads,
            window=window,
            scale_up_wait=scale_up_wait,
            scale_down_idle=scale_down_idle,
        )

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
        return self._pool.spawn(
            worker_cls,
            processes,
            kwargs=kwargs,
            window=window,
            wait=wait,
            timeout=timeout,
            scale_up_wait=scale_up_wait,
            scale_down_idle=scale_down_idle,
            devices=devices,
        )

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
        self._pool.connect(
            address, window=window, wait=wait, timeout=timeout, ssl_context=ssl_context
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
        return self._pool.listen(address, window=window, insecure=insecure, ssl_context=ssl_context)

    def wait_workers(self, n: int, timeout: float | None = None) -> bool:
        """Block until at least *n* workers are attached; False on timeout."""
        return self._pool.wait_workers(n, timeout)

    @property
    def workers(self) -> tuple[WorkerStats, ...]:
        """The workers attached now."""
        return self._engine.workers()

    # ================================================================ submitting

    def submit(
        self,
        payload: Any,
        *,
        timeout: float | None = None,
        model: str | None = None,
        key: str | None = None,
        with_meta: bool = False,
        priority: int = 0,
    ) -> Future[Any]:
        """Queue one task; returns a :class:`concurrent.futures.Future`.

        A payload that is not JSON (plus bytes/arrays) raises ``TypeError`` here. With the
        ``reject`` policy a full queue raises :class:`queue.Full`; with ``drop_oldest`` the
        oldest waiting task is cancelled to make room. ``timeout`` counts from now: past it the
        future fails with ``TimeoutError`` (a late result goes to the late channel).

        ``model`` sends it to the named model (see :attr:`models`); with ``with_meta`` the
        result is a :class:`ModelResult` saying which version and worker computed it. Tasks
        with the same ``key`` go to the same worker while it lives (per-key state).
        ``priority``: waiting tasks of a higher priority are dispatched first (see
        docs/scheduling.md; strict, so a steady flow of high-priority work starves lower
        ones). :class:`ClosedError` once shut down; ``ValueError`` for a bad timeout or model.
        """
        check_priority(priority)
        fut = TaskFuture()
        fut._runner = self._runner
        check_positive("timeout", timeout)
        route = self.route_for(model, key, with_meta)
        self._intake.one(
            payload,
            fut,
            0,
            timeout if timeout is not None else self.timeout,
            route=route,
            priority=priority,
        )
        return fut

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the coordinator is shut down")

    def map(
        self,
        iterable: Iterable[Any],
        *,
        buffersize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        on_error: Literal["raise", "return"] = "raise",
        chunksize: int | None = None,
        model: str | Callable[[Any], str] | None = None,
        key: Callable[[Any], str] | None = None,
        with_meta: bool = False,
        total_timeout: float | None = None,
        progress: bool | Progress = False,
        priority: int = 0,
        weight: int = 1,
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

        ``model``, ``with_meta``: as for :meth:`submit` (``model`` may also be a function of
        the item, to mix models in one map); ``key(item)`` gives each item's key.

        ``total_timeout`` counts from this call, as ``concurrent.futures.Executor.map``'s
        timeout does: every result ready by then is yielded, then ``TimeoutError`` is raised
        from the iteration, and the items not started by then are cancelled (they go only to
        a worker that can start them at once, so none waits where it cannot be cancelled).

        ``progress=True`` shows a progress bar on stderr while the results are taken (``tqdm``
        when it is importable, otherwise a line of its own; only on a terminal); a
        :class:`Progress` gives it a label, a total for an input without ``len()``, or shows
        it also off a terminal.

        Each call is a source of its own: waiting tasks of different calls, streams and
        producers take turns (``weight`` tasks per turn), and ``priority`` puts all of its
        tasks ahead of lower-priority work (as for :meth:`submit`).

        Raises ``ValueError`` for a bad size, time, ``on_error`` or model, :class:`ClosedError`
        once shut down; while iterating, ``TypeError`` for a payload that cannot travel.
        """
        check_positive("buffersize", buffersize)
        check_positive("timeout", timeout)
        check_positive("chunksize", chunksize)
        if on_error not in ("raise", "return"):
            raise ValueError("on_error must be 'raise' or 'return'")
        if total_timeout is not None and not total_timeout >= 0:
            raise ValueError(f"total_timeout must be 0 or more, got {total_timeout!r}")
        deadline = None if total_timeout is None else time.monotonic() + total_timeout
        check_priority(priority)
        check_weight(weight)
        if not isinstance(progress, bool | Progress):
            raise TypeError("progress must be True, False or a pytaskqml.engine.Progress")
        self._check_open()
        route, per_item = item_routes(self.route_for, model, key, with_meta)
        if per_item:
            chunksize = 1  # a model, a key or a version per item
        return map_results(
            self._intake,
            iter(iterable),
            buffersize,
            ordered,
            timeout if timeout is not None else self.timeout,
            on_error,
            chunksize,
            route,
            deadline,
            progress,
            len(iterable) if progress and isinstance(iterable, Sized) else None,
            model if isinstance(model, str) else None,
            priority,
            weight,
        )

    def stream(
        self,
        *,
        buffersize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        on_error: Literal["raise", "return"] = "return",
        overflow: OverflowPolicy | None = None,
        model: str | None = None,
        with_meta: bool = False,
        priority: int = 0,
        weight: int = 1,
        name: str | None = None,
    ) -> Stream:
        """A :class:`Stream` for a live source: a producer thread ``put()``s items and
        ``close()``s, a consumer thread iterates results - in submission order
        (``ordered=True``, the default) or as they complete (``ordered=False``). A failed
        item's exception is yielded in its place (``on_error="return"``, the default) or
        raised at its position (``"raise"``).

        ``overflow`` (default: the coordinator's) is what a full stream does to ``put()``:
        ``"block"`` waits while ``buffersize`` items (default 64) are outstanding;
        ``"drop_oldest"`` keeps at most ``buffersize`` items (default: two per worker, at
        least 2) waiting for a worker and drops the oldest of them, so the newest frame wins;
        ``"reject"`` raises :class:`queue.Full`. ``timeout`` counts from ``put()``: a frame
        older than that gets a :class:`TaskTimeout` marker in its place. ``model`` and
        ``with_meta`` as for :meth:`submit`; ``put(item, key=...)`` for per-key affinity.

        Each stream is a source of its own: the waiting frames of different streams are
        dispatched in turns, ``weight`` frames per turn, so a flooding source never delays
        another's next frame by more than a turn, and ``buffersize`` bounds only this
        stream's own frames. ``priority`` (default 0; ``put(item, priority=)`` per item) puts
        its frames ahead of lower-priority work. ``name`` labels it in
        ``statistics().sources`` and ``/metrics`` (default ``stream-N``).
        ``ValueError`` for a bad policy, size, time or model; :class:`ClosedError` once shut down.
        """
        policy = overflow if overflow is not None else self.overflow
        if policy not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}")
        check_positive("buffersize", buffersize)
        check_positive("timeout", timeout)
        check_priority(priority)
        check_weight(weight)
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
            model,
            with_meta and model is not None,
            priority=priority,
            weight=weight,
            name=name,
        )
        if model is not None:
            self.route_for(model, None, False)  # is the model known?
        self._streams.add(stream)
        return stream

    def buffer(self, shape: int | Sequence[int], dtype: Any = "uint8", *, wait: float = 0.0) -> Any:
        """A writable NumPy array to produce a frame into - ``cap.read(image=buf)``,
        ``np.copyto(buf, x)``, ``cv2.cvtColor(src, code, dst=buf)``, a decoder writing in
        place - and then submit (``submit(buf)``, in ``map()``, ``put()``, also as a value in
        a dict payload). Its contents are undefined until written, as with ``numpy.empty``.

        It lies in shared memory that every worker process of this coordinator maps, so it
        reaches the worker without being copied: the frame on the socket only names its place.
        Thread workers get a copy, workers elsewhere the bytes, as for any array.

        Once submitted it belongs to the coordinator until its task is over: the array you
        submitted is read-only until then (writing the next frame into it raises
        ``ValueError: assignment destination is read-only`` instead of changing what the
        worker computes on - take a new buffer for each frame), and writable again once its
        result is in (to draw on it). Only the array object submitted is made read-only: do
        not write through another view of it meanwhile. Its memory is reused only once the
        array is gone from this process (its task finished and nothing here refers to it) and
        every worker that received it has let go, so a kept array is never overwritten, here
        or in a worker; a worker's writes to the array it receives stay its own. A buffer
        never submitted comes back when it is garbage-collected.

        Buffers of any size share the pool (each slot is the size rounded up to whole MiB),
        and ``map()`` reads no further ahead than half the pool holds of its items, so a
        generator producing a fresh buffer per frame is never short of pool buffers because
        of ``map()``. It never fails for lack of room: when the pool has no room left it waits
        up to *wait* seconds (default 0) for a buffer to come back, then returns a plain
        ``numpy.empty`` array, which travels the usual way (one copy). So do a coordinator
        without a pool (``shared_memory=False``, no shared memory on this platform, not Linux)
        and buffers under 64 KiB or larger than half the pool. ``statistics().buffers``
        counts both kinds. (Waiting by default could wait on itself: a producer holding the
        buffers that fill the pool.) *shape* and *dtype* (default ``"uint8"``) as for
        ``numpy.empty``. Needs NumPy (``ImportError`` without it).
        """
        return self._buffers.buffer(shape, dtype, wait)

    def broadcast(
        self,
        payload: Any,
        *,
        mode: Literal["all", "any"] = "all",
        model: str | None = None,
        retain: bool = False,
        timeout: float | None = None,
    ) -> Broadcast:
        """Run *payload* on every worker (``mode="all"``) or on one (``"any"``) and return
        each worker's result by name (an exception in place of a failed one). A *retained*
        broadcast is also run, in order, on every worker that joins or is restarted later,
        before it takes any other task; :meth:`withdraw` its ``id`` to stop that.
        The payload is an ordinary task that each worker runs through ``process()`` (or
        ``model``'s ``predict()``), pinned to it: it fails if that worker dies. Waits up to
        ``timeout`` seconds for each worker (``TimeoutError``); :class:`NoWorkersError` if
        there is none."""
        return self._broadcasts.broadcast(
            payload, mode=mode, model=model, retain=retain, timeout=timeout
        )

    def withdraw(self, broadcast_id: int) -> bool:
        """Stop replaying the retained broadcast whose ``Broadcast.id`` is *broadcast_id*
        to joining workers; False if there was none with that id (or it was withdrawn)."""
        return self._broadcasts.withdraw(broadcast_id)

    def late_results(self) -> list[LateResult]:
        """Drain and return results that arrived after their deadline (when no ``on_late``)."""
        return self._engine.late_results()

    # ================================================================ for features

    # Features that send tasks of their own (pipeline stages, the Redis feed) build on these
    # two, under the coordinator's scheduling, retries and deadlines. They are left out of the
    # API reference (docs/api/coordinator.md): application code uses submit(), map(), stream().

    @property
    def intake(self) -> Intake:
        """Where tasks enter the engine: ``intake.one(payload, sink, seq, timeout, route=)``
        admits a task whose outcome goes to *sink* (a reorder buffer, a collector) instead of
        a future; ``intake.engine.cancel_abandoned()`` drops the queued tasks of sinks marked
        abandoned."""
        return self._intake

    def route_for(
        self, model: str | None, key: Any = None, with_meta: bool = False
    ) -> Route | None:
        """The route of a task for *model* and *key* (None: any worker), as :meth:`submit`
        makes it: ``ValueError`` for a model that cannot run here, ``TypeError`` for a key
        that is not a string, :class:`ClosedError` for a model once shut down."""
        if model is not None:
            self._check_open()  # ClosedError, not "no such model", once shut down
        return make_route(self.models.check, model, key, with_meta)

    # ================================================================ statistics

    def statistics(self) -> Statistics:
        """A snapshot of the coordinator's counters and workers (see :class:`Statistics`)."""
        stats = self._engine.statistics(
            **self._pool.statistics(),
            uptime=time.monotonic() - self._started,
            models=self.models.statistics(
                self._engine.model_counts(), self._engine.model_seconds()
            ),
            buffers=self._buffers.statistics(),
        )
        if self._feed is not None:
            stats = dataclasses.replace(stats, queue=self._feed.statistics())
        return stats

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the coordinator has shut down (for instance through ``POST /shutdown``
        on its control endpoint) and every worker is stopped; False on timeout."""
        return self._stopped.wait(timeout)

    # ================================================================ control endpoint

    def serve_control(
        self,
        address: tuple[str, int] | str = ("127.0.0.1", 0),
        *,
        insecure: bool = False,
        open_metrics: bool = False,
        http_ingress: bool = False,
        keyless_actions: bool = False,
        allow_models: Iterable[type[Model] | str] = (),
    ) -> tuple[str, int]:
        """Start the HTTP control endpoint: ``GET /health``, ``POST /shutdown``, ``GET /``
        (the live status page), ``GET /status`` (JSON), ``GET /metrics`` (Prometheus) and
        the ``/models`` routes; with ``http_ingress`` also ``POST /submit`` and ``POST /map``
        (:mod:`._httpingress`).

        With a key, ``/status``, ``/metrics`` and ``GET /models`` need its read token
        (``pytaskqml token``) unless ``open_metrics`` lets anyone who can reach *address*
        read the first two (see :mod:`pytaskqml.observe.dashboard`); the routes that act need the
        act token (``pytaskqml token --act``). Without a key those are refused unless
        *keyless_actions* opens them to loopback clients (every local user). ``POST
        /models/load`` may name only the model classes of *allow_models* (class objects or
        ``"module:Class"``; see :meth:`Models.allow`).

        *address* defaults to ``127.0.0.1`` and a free port; returns the address bound.
        Raises ``ValueError`` for a non-loopback *address* without a key (unless
        ``insecure=True``, which logs a warning instead) or an *allow_models* entry that cannot
        be imported, ``TypeError``/``PermissionError`` as :meth:`Models.allow` does,
        ``RuntimeError`` if the endpoint is already running, and ``OSError`` if *address*
        cannot be bound."""
        # The status page and the HTTP ingress are imported here, on first use: a coordinator
        # that serves no endpoint never loads them.
        from .ingress.http import install_http_ingress
        from .observe.dashboard import install_coordinator as install_status

        coord = self
        if coord._control is not None:
            raise RuntimeError("the control endpoint is already running")
        coord.models.allow(*allow_models)
        server = coord._control = coordinator_control(
            coord, address, insecure=insecure, keyless_actions=keyless_actions
        )
        install_status(
            server,
            coord.statistics,
            name=coord.name,
            open_metrics=open_metrics,
            ingress=coord.ingress_statistics,
        )
        if http_ingress:
            install_http_ingress(server, coord)
        server.start()
        return server.address

    def control_statistics(self) -> ControlStats | None:
        """The control endpoint's counters (connections open, served, refused, turned away
        with 503, timed out, broken pipes), or None if it is not running."""
        control = self._control
        return None if control is None else control.statistics()

    # ================================================================ ingress

    def serve_ingress(
        self,
        address: Address | str = ("127.0.0.1", 0),
        *,
        tls: ssl.SSLContext | None = None,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        insecure: bool = False,
    ) -> tuple[str, int]:
        """Accept producers (:class:`pytaskqml.Client`) on *address*, authenticated with this
        coordinator's key, TLS first with *tls* (see :func:`tls_server_context`); each gets its
        own ordered stream with at most *max_outstanding* items in flight. Returns the bound
        address. A non-loopback *address* needs an ``authkey`` (or ``insecure=True``)."""
        return self._ingress.start(
            address, tls=tls, max_outstanding=max_outstanding, insecure=insecure
        )

    def ingress_statistics(self) -> list[IngressStats]:
        """The statistics of each ingress port, in the order they were started."""
        return self._ingress.statistics()

    # ================================================================ shutdown

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        """Stop accepting work; finish what is queued and running - or, with
        ``cancel_futures``, cancel what is queued and give what is running ``cancel_grace``
        seconds before stopping its worker - then stop and reap every worker process and
        thread. Every future is resolved when this returns (with ``wait``): result,
        exception or cancelled. ``timeout`` bounds the wait for unfinished work. A
        KeyboardInterrupt (a second Ctrl-C) while it waits stops everything at once."""
        try:
            self._shutdown(wait, cancel_futures, timeout)
        except KeyboardInterrupt:
            self._teardown(cancel=True)  # once only: returns at once if it already ran
            raise

    def _shutdown(self, wait: bool, cancel_futures: bool, timeout: float | None) -> None:
        if self._feed is not None:
            self._feed.stop_reading()  # no new entries; what it holds finishes or is released
        already = self._engine.close()
        self._closed = True
        self._pool.close()
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
        """Drain (or, with *cancel*, give running work its grace), then stop everything. (A
        KeyboardInterrupt while draining goes to the caller, which stops at once.)"""
        engine = self._engine
        if cancel:
            grace = self.cancel_grace if timeout is None else min(timeout, self.cancel_grace)
            engine.drain(grace, self._pool.can_progress)
        else:
            engine.drain(timeout, self._pool.can_progress)
        self._teardown(cancel=cancel)

    def _teardown(self, *, cancel: bool) -> None:
        """Stop every worker, thread and endpoint of the coordinator; resolve what is left. Runs
        once (a later call returns at once); a KeyboardInterrupt while it waits for worker
        processes kills them instead, and is raised again at the end."""
        with self._teardown_lock:
            if self._torn_down:
                return
            self._torn_down = True
        engine = self._engine
        engine.stop()
        busy = engine.abandon_inflight(CancelledError("abandoned at shutdown")) if cancel else []
        engine.fail_all(ClosedError("the coordinator shut down before this task ran"))
        handles = engine.handles()
        interrupted = self._pool.stop(handles, cancel=cancel, busy=busy)
        if self._feed is not None:
            self._feed.close()  # results written, the rest released for other coordinators
        if self._control is not None:
            self._control.stop()
        self._ingress.stop()
        self._buffers.close()
        engine.stop_timer()
        self._runner.close()
        self._stopped.set()
        if interrupted:
            raise KeyboardInterrupt
