"""The snapshots :meth:`Coordinator.statistics` returns, and a worker process's own."""

from __future__ import annotations

from dataclasses import dataclass

from ._histogram import HistogramSnapshot


@dataclass(frozen=True)
class WorkerStats:
    """One attached worker, as of the snapshot.

    ``kind`` is ``"local"`` (threads in this process), ``"spawned"`` (a child process this
    coordinator started and supervises), ``"remote"`` (a listening worker it connected to) or
    ``"dial-in"`` (a worker that connected to it). ``window`` is how many tasks it may hold at
    once (adaptive unless one was set), ``in_flight`` how many it holds, ``completed`` and
    ``failed`` count items (an item of a chunk counts once).

    Spawned workers share memory with the coordinator where the platform allows:
    ``shared_buffers`` counts buffers of 64 KiB or more sent through it, ``shared_fallbacks``
    those sent over the socket instead because no slot was free, ``shared_in_use`` the slots
    the worker holds now (all three ``None`` for a worker without shared memory).

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
    state: str = "idle"
    restarts: int = 0
    busy_seconds: float = 0.0
    bytes_sent: int | None = None
    bytes_received: int | None = None
    shared_bytes: int | None = None


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
    too many at once).

    ``queued`` and ``in_flight`` are tasks waiting for a worker and held by workers now (a
    chunk counts once). Latencies are seconds from submission to result, over the last 8,192
    results (a chunk counts once); ``None`` before the first result. ``uptime`` is seconds
    since the coordinator was created.

    ``queue_wait`` and ``latency`` are histograms (fixed buckets from 100 us to 10 s) of every
    item's wait from submission to its first dispatch and from submission to its result, since
    the coordinator was created (each item counts; the items of a chunk with the chunk's times).
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
    queue_wait: HistogramSnapshot | None = None
    latency: HistogramSnapshot | None = None


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
