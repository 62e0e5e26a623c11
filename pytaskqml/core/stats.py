"""The snapshots :meth:`Coordinator.statistics` returns, and a worker process's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .scheduler import Scheduler
    from .workerstate import WorkerState

from .histogram import HistogramSnapshot


@dataclass(frozen=True)
class WorkerStats:
    """One attached worker, as of the snapshot.

    ``name`` identifies it (``pytaskqml worker --name``, else made from its class, such as
    ``Echo-4242`` or ``local-Echo-1``), ``pid`` is its process id and ``address`` where it is
    reached (a peer's ``HOST:PORT``, ``pid N`` for a spawned worker); both are ``None`` for
    thread workers.

    ``kind`` is ``"local"`` (threads in this process), ``"spawned"`` (a child process this
    coordinator started and supervises), ``"remote"`` (a listening worker it connected to) or
    ``"dial-in"`` (a worker that connected to it). ``window`` is how many tasks it may hold at
    once (adaptive unless one was set), ``in_flight`` how many it holds, ``completed`` and
    ``failed`` count items (an item of a chunk counts once).

    Spawned workers share memory with the coordinator where the platform allows:
    ``shared_buffers`` counts buffers of 64 KiB or more sent through it, ``shared_fallbacks``
    those sent over the socket instead because no slot was free, ``shared_in_use`` the slots
    the worker holds now (all three ``None`` for a worker without shared memory).
    ``round_trip`` is the time, in seconds, a task spends on its way to the worker and its
    result on the way back (measured when an idle worker gets work; adaptive windows cover
    it), ``None`` until measured.

    ``state`` is ``"busy"`` (it holds tasks), ``"idle"`` or ``"leaving"`` (it takes no more
    work); ``restarts`` how often its process was started again (spawned workers), ``busy_seconds``
    the time it reported spending on tasks. Over a connection, ``bytes_sent`` and
    ``bytes_received`` count what went through the socket and ``shared_bytes`` what went through
    shared memory instead (``None`` where there is no such path).
    """

    name: str
    kind: str
    pid: int | None
    address: str | None
    window: int
    in_flight: int
    completed: int
    failed: int
    shared_buffers: int | None = None
    shared_fallbacks: int | None = None
    shared_in_use: int | None = None
    round_trip: float | None = None
    state: str = "idle"
    restarts: int = 0
    busy_seconds: float = 0.0
    bytes_sent: int | None = None
    bytes_received: int | None = None
    shared_bytes: int | None = None


@dataclass(frozen=True)
class QueueStats:
    """A coordinator's view of the shared queue it is fed from (``Coordinator(queue=...)``).

    This coordinator's own counts of entries: ``read`` (new ones, from the consumer group),
    ``claimed`` (taken over after they sat idle at another consumer: a dead coordinator's, or
    released ones), ``completed`` (result written, entry acknowledged), ``released`` (given
    back unfinished: shutdown, no worker), ``dead_lettered`` (moved to the dead-letter stream:
    malformed, or delivered too often), ``holding`` (read or claimed, not yet acknowledged),
    ``errors`` (failed calls to the backend, retried). What the backend says, as of ``age``
    seconds ago (``None`` before the first reading): ``pending`` (entries delivered to some
    coordinator and not acknowledged, all consumers), ``lag`` (entries no coordinator has read
    yet), ``length`` (the task stream's length), ``dead_length`` (the dead-letter stream's).
    """

    backend: str
    stream: str
    group: str
    consumer: str
    read: int
    claimed: int
    completed: int
    released: int
    dead_lettered: int
    holding: int
    pending: int | None
    lag: int | None
    length: int | None
    dead_length: int | None
    errors: int
    age: float | None


@dataclass(frozen=True)
class SourceStats:
    """One source of work - a stream, a ``map()`` call, an ingress producer, or ``"submit"``
    (every ``submit()``): its ``name`` and ``weight`` (tasks per turn), items admitted
    (``items_in``), ``processed`` (a result or an error came back), ``dropped`` by an overflow
    policy, ``waiting`` in the queue now, and the latency from submission to result of its
    last 2,048 results (``lag_p50``, ``lag_p99``; ``None`` before the first). A source is
    listed while the object it belongs to is alive."""

    name: str
    weight: int
    items_in: int
    processed: int
    dropped: int
    waiting: int
    lag_p50: float | None
    lag_p99: float | None


@dataclass(frozen=True)
class Statistics:
    """A snapshot of a coordinator's counters since it started.

    Items: ``submitted`` (admitted), ``completed`` (a result delivered), ``failed`` (an error
    delivered: the task raised, was poison, or could not run), ``cancelled``, ``timed_out``
    (a deadline marker delivered), ``late`` (results that came after their deadline),
    ``dropped`` (by the ``drop_oldest`` policy), ``rejected`` (refused by ``reject``).
    ``retried`` counts tasks put back in the queue after their worker was lost, ``poisoned``
    tasks failed for killing more than ``max_retries`` workers. ``workers_lost`` counts workers
    that went away without saying goodbye, ``restarts`` spawned processes started again,
    ``start_failures`` spawned processes that failed before they were ready (``start_error``
    holds the last such error), ``rejected_peers`` connections refused (wrong key, garbage,
    too many at once). ``scale_ups`` and ``scale_downs`` count the workers self-sizing pools
    (``spawn(..., processes=(min, max))``) added and let go; ``pools`` has each such pool
    (:class:`PoolStats`).

    ``queued`` and ``in_flight`` are tasks waiting for a worker and held by workers now (a
    chunk counts once). Latencies (``latency_p50``, ``latency_p90``, ``latency_p99``,
    ``latency_max``) are seconds from submission to result, over the last 8,192 results (a
    chunk counts once); ``None`` before the first result. ``models`` has each named model
    (:class:`ModelStats`). ``uptime`` is seconds
    since the coordinator was created. ``queue`` is the shared queue it is fed from, if any
    (see :class:`QueueStats`); ``buffers`` counts ``coord.buffer()`` arrays
    (:class:`BufferStats`).

    ``queue_wait`` and ``latency`` are histograms (fixed buckets from 100 us to 10 s) of every
    item's wait from submission to its first dispatch and from submission to its result, since
    the coordinator was created (each item counts; the items of a chunk with the chunk's times).

    ``sources`` has each source of work (:class:`SourceStats`): streams, ``map()`` calls and
    ingress producers take turns in the queue.
    """

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
    start_failures: int = 0
    start_error: str | None = None
    models: tuple[ModelStats, ...] = ()
    scale_ups: int = 0
    scale_downs: int = 0
    pools: tuple[PoolStats, ...] = ()
    queue: QueueStats | None = None
    queue_wait: HistogramSnapshot | None = None
    latency: HistogramSnapshot | None = None
    buffers: BufferStats | None = None
    sources: tuple[SourceStats, ...] = ()


@dataclass(frozen=True)
class BufferStats:
    """``coord.buffer()``: ``slot_bytes`` is the slot of the last buffer handed out (its size
    rounded up to whole MiB; 0 before the first one, or without a pool) and ``capacity`` how
    many such buffers the pool holds at once (buffers of other sizes share the pool);
    ``in_use`` slots are taken now (by an array alive in this process, its unfinished task, or
    a worker still holding it); ``pooled`` buffers were handed out from the pool, ``plain`` as
    ordinary arrays instead (no pool, under 64 KiB, no room, larger than half the pool);
    ``lent`` times a pool buffer reached a worker process without a copy."""

    capacity: int = 0
    in_use: int = 0
    pooled: int = 0
    plain: int = 0
    lent: int = 0
    slot_bytes: int = 0


@dataclass(frozen=True)
class ModelStats:
    """One named model: the ``version`` asked for (``None`` for a model only workers brought,
    from their ``--models`` file), the workers holding it now with their version (``ready``),
    those loading it, those whose last load failed with the error, results per version, and
    how many loads and unloads were sent. ``seconds`` is the latency (submission to result)
    summed over the results of each version; ``load_failures`` counts loads a worker reported
    failed."""

    name: str
    version: str | None
    ready: tuple[tuple[str, str], ...]
    loading: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]
    results: tuple[tuple[str, int], ...]
    loads: int
    unloads: int
    seconds: tuple[tuple[str, float], ...] = ()
    load_failures: int = 0


@dataclass(frozen=True)
class PoolStats:
    """A self-sizing pool (``spawn(..., processes=(min, max))``, ``add_local(...,
    threads=(min, max))``): its ``name`` (the worker's ``module:Class``, numbered when
    several pools run the same class), ``kind`` (``"processes"`` or ``"threads"``), the
    ``workers`` attached now and ``starting``, its bounds, and the workers it added
    (``scale_ups``) and let go (``scale_downs``)."""

    name: str
    kind: str
    workers: int
    starting: int
    min: int
    max: int
    scale_ups: int
    scale_downs: int


@dataclass(frozen=True)
class ServeStats:
    """A worker process's counters since it started: ``tasks_done`` (a chunk counts once),
    ``errors`` (items that raised), ``busy_seconds`` (running tasks), ``connections`` (served
    so far), and the bytes through the sockets of all of them."""

    name: str
    tasks_done: int
    errors: int
    busy_seconds: float
    connected: bool
    connections: int
    bytes_sent: int
    bytes_received: int
    stopping: bool


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The *q*-quantile (0..1) of an ascending list, by nearest rank; ``None`` if empty."""
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def worker_stats(ws: WorkerState) -> WorkerStats:
    """One worker's snapshot (scheduler lock held)."""
    h: Any = ws.handle
    placed, fallbacks, in_use = h.shared_memory() or (None, None, None)
    sent, received, through_shm = h.traffic() or (None, None, None)
    return WorkerStats(
        ws.name,
        h.kind,
        h.pid,
        h.address,
        ws.window,
        len(ws.inflight),
        ws.completed,
        ws.failed,
        shared_buffers=placed,
        shared_fallbacks=fallbacks,
        shared_in_use=in_use,
        round_trip=ws.round_trip,
        state="leaving" if not ws.accepting else "busy" if ws.inflight else "idle",
        restarts=h.restarts,
        busy_seconds=ws.busy,
        bytes_sent=sent,
        bytes_received=received,
        shared_bytes=through_shm,
    )


def snapshot(core: Scheduler, **front: Any) -> Statistics:
    """Statistics from the scheduler's counters (its lock held) and what the front counts
    (*front*: restarts, rejected_peers, start_failures, start_error, uptime, models)."""
    return Statistics(
        submitted=core.submitted,
        completed=core.completed,
        failed=core.failed,
        cancelled=core.cancelled,
        timed_out=core.timed_out,
        late=core.late,
        dropped=core.dropped,
        rejected=core.rejected,
        retried=core.retried,
        poisoned=core.poisoned,
        workers_lost=core.workers_lost,
        queued=core.queued,
        in_flight=core.in_flight,
        workers=tuple(worker_stats(ws) for ws in core.workers),
        latency_p50=None,  # filled in by the caller, which sorts without the lock
        latency_p90=None,
        latency_p99=None,
        latency_max=None,
        queue_wait=core.queue_wait.snapshot(),
        latency=core.latency.snapshot(),
        sources=source_stats(core),
        **front,
    )


def source_stats(core: Scheduler) -> tuple[SourceStats, ...]:
    """Every source still alive that has admitted work (scheduler lock held)."""
    waiting = core.queue.items.waiting()
    out = []
    for src in list(core.sources.values()):
        if not src.items_in:
            continue
        lags = sorted(src.lags)
        out.append(
            SourceStats(
                name=src.name,
                weight=src.weight,
                items_in=src.items_in,
                processed=src.processed,
                dropped=src.dropped,
                waiting=waiting.get(None if src is core.default_source else src, 0),
                lag_p50=percentile(lags, 0.50),
                lag_p99=percentile(lags, 0.99),
            )
        )
    return tuple(out)
