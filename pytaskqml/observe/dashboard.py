"""What a control endpoint shows a person or a scraper: ``GET /`` (the live status page),
``GET /status`` (the JSON it and ``pytaskqml status`` poll) and ``GET /metrics``.

Nothing here runs on the hot path. The page's charts need the recent past, so a coordinator's
endpoint keeps a :class:`History`: a thread of its own (``pytaskqml-status-<name>``) takes one
:meth:`~pytaskqml.Coordinator.statistics` snapshot a second - one pass under the engine's lock
- into a ring buffer of the last :data:`HISTORY_SECONDS`; throughput and latency per second
are differences between neighbouring snapshots (latency quantiles from the histograms'
differences), and a worker's tasks/s the difference over the last few seconds.

Auth (see :mod:`._control`): ``/`` is a page without data and always open, like ``/health``.
``/status`` and ``/metrics`` need the token when a key is set, unless the endpoint was started
with ``open_metrics`` (then anyone who can reach its address may read them; ``/shutdown``
keeps needing the token). The page reads the token from its URL's fragment
(``http://host:port/#token=...``), which the browser never sends to a server, and sends it
as ``Authorization: Bearer``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import itertools
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..core.histogram import HistogramSnapshot
from ..core.stats import ServeStats, Statistics, WorkerStats
from ..wire.control import ControlServer, Reply, Request
from . import metrics as _metrics

if TYPE_CHECKING:
    from ..ingress.server import IngressStats

log = logging.getLogger(__name__)

HISTORY_SECONDS = 300
SAMPLE_INTERVAL = 1.0
# A worker's tasks/s is its completed items over about this many seconds.
RATE_WINDOW = 5.0


@dataclass(frozen=True)
class _Sample:
    t: float  # time.monotonic()
    completed: int
    failed: int
    queued: int
    in_flight: int
    latency: HistogramSnapshot | None
    workers: dict[str, int] = field(default_factory=dict)  # name -> completed


class _Named(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def completed(self) -> int: ...


class Snapshot(Protocol):
    """What the history keeps of a snapshot: a coordinator's :class:`Statistics`, or a
    pipeline's :class:`PipelineSnapshot` (its stages in place of workers)."""

    @property
    def completed(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def latency(self) -> HistogramSnapshot | None: ...
    @property
    def workers(self) -> Sequence[_Named]: ...


@dataclass(frozen=True)
class StageSnapshot:
    name: str
    completed: int  # items the stage finished (a result or an error)
    stats: Statistics


@dataclass(frozen=True)
class PipelineSnapshot:
    """A served pipeline as its status page sees it: ``completed`` items that came out of it
    (whatever their outcome), ``failed`` items a stage failed, ``queued`` items waiting in
    the stages' queues, ``in_flight`` items inside the pipeline, one row per stage."""

    name: str
    uptime: float
    items_in: int
    completed: int
    failed: int
    queued: int
    in_flight: int
    workers: tuple[StageSnapshot, ...]
    latency: HistogramSnapshot | None = None  # per item, put() to leaving the last step
    latency_max: float | None = None


class PipelineCounts(Protocol):
    """What a served pipeline's statistics give the page (``PipelineStats``)."""

    @property
    def stages(self) -> Mapping[str, Statistics]: ...
    @property
    def items_in(self) -> int: ...
    @property
    def items_out(self) -> int: ...
    @property
    def latency(self) -> HistogramSnapshot | None: ...
    @property
    def latency_max(self) -> float | None: ...
    @property
    def items_abandoned(self) -> int: ...


class ServedPipeline(Protocol):
    """What the page reads of a served pipeline (a :class:`pytaskqml.pipeline.Pipeline`; the
    pipeline layer sits above this one, so its type is described here, not imported)."""

    @property
    def name(self) -> str: ...
    def statistics(self) -> PipelineCounts: ...


def pipeline_snapshot(pipeline: ServedPipeline, uptime: float) -> PipelineSnapshot:
    """One pass over the pipeline's stages (each one :meth:`Coordinator.statistics`)."""
    s = pipeline.statistics()
    rows = tuple(
        StageSnapshot(name, st.completed + st.failed + st.timed_out, st)
        for name, st in s.stages.items()
    )
    return PipelineSnapshot(
        name=pipeline.name,
        uptime=uptime,
        items_in=s.items_in,
        completed=s.items_out,
        failed=sum(r.stats.failed + r.stats.timed_out for r in rows),
        queued=sum(r.stats.queued for r in rows),
        in_flight=max(0, s.items_in - s.items_out - s.items_abandoned),
        workers=rows,
        latency=s.latency,
        latency_max=s.latency_max,
    )


class History:
    """The last *seconds* of snapshots, one per :meth:`add`. Thread-safe."""

    def __init__(self, seconds: float = HISTORY_SECONDS, interval: float = SAMPLE_INTERVAL):
        self.interval = interval
        self._samples: deque[_Sample] = deque(maxlen=max(2, int(seconds / interval) + 1))
        self._lock = threading.Lock()

    def add(self, stats: Snapshot, now: float) -> None:
        sample = _Sample(
            now,
            stats.completed,
            stats.failed,
            stats.queued,
            stats.in_flight,
            stats.latency,
            {w.name: w.completed for w in stats.workers},
        )
        with self._lock:
            self._samples.append(sample)

    def _all(self) -> list[_Sample]:
        with self._lock:
            return list(self._samples)

    def series(self, now: float) -> dict[str, Any]:
        """Per interval between neighbouring samples: items/s, latency p50 and p99 (seconds,
        ``None`` without results), and queue depth and tasks in flight at its end; ``t`` is
        each interval's end in seconds before *now*."""
        samples = self._all()
        out: dict[str, Any] = {
            "interval": self.interval,
            "t": [],
            "throughput": [],
            "latency_p50": [],
            "latency_p99": [],
            "queued": [],
            "in_flight": [],
        }
        for a, b in itertools.pairwise(samples):
            dt = b.t - a.t
            if dt <= 0:
                continue
            out["t"].append(round(b.t - now, 3))
            out["throughput"].append(
                round((b.completed + b.failed - a.completed - a.failed) / dt, 3)
            )
            recent = b.latency.minus(a.latency) if b.latency and a.latency else None
            for q, key in ((0.5, "latency_p50"), (0.99, "latency_p99")):
                value = recent.quantile(q) if recent is not None else None
                out[key].append(None if value is None else round(value, 7))
            out["queued"].append(b.queued)
            out["in_flight"].append(b.in_flight)
        return out

    def rate(self, stats: Snapshot, now: float) -> tuple[float | None, dict[str, float]]:
        """Items/s over about :data:`RATE_WINDOW` up to *stats* (taken at *now*), overall and
        per worker name; ``None`` overall until there is a sample half a second old. A worker
        that came in the window counts from the first sample that shows it."""
        window = [s for s in self._all() if now - s.t <= RATE_WINDOW]
        if not window or now - window[0].t < 0.5:
            return None, {}
        base = window[0]
        total = (stats.completed + stats.failed - base.completed - base.failed) / (now - base.t)
        per: dict[str, float] = {}
        for w in stats.workers:
            seen = next((s for s in window if w.name in s.workers), None)
            span = now - seen.t if seen is not None else 0.0
            per[w.name] = (w.completed - seen.workers[w.name]) / span if seen and span > 0 else 0.0
        return max(0.0, total), per


def _host(w: WorkerStats) -> str:
    if w.kind == "local":
        return "this process"
    if w.kind == "spawned" or not w.address:
        return "localhost"
    return w.address.rsplit(":", 1)[0].strip("[]")


def status_document(
    stats: Statistics, history: History | None, *, name: str, with_history: bool = True
) -> dict[str, Any]:
    """The JSON of a coordinator's ``GET /status``."""
    now = time.monotonic()
    throughput, per_worker = history.rate(stats, now) if history else (None, {})
    doc: dict[str, Any] = {
        "role": "coordinator",
        "name": name,
        "pid": os.getpid(),
        "uptime": round(stats.uptime, 3),
        "queued": stats.queued,
        "in_flight": stats.in_flight,
        "throughput": None if throughput is None else round(throughput, 3),
        "counts": {
            k: getattr(stats, k)
            for k in (
                "submitted",
                "completed",
                "failed",
                "cancelled",
                "retried",
                "timed_out",
                "late",
                "dropped",
                "rejected",
                "poisoned",
                "workers_lost",
                "restarts",
                "start_failures",
                "rejected_peers",
            )
        },
        "latency": {
            "p50": stats.latency_p50,
            "p90": stats.latency_p90,
            "p99": stats.latency_p99,
            "max": stats.latency_max,
        },
        "start_error": stats.start_error,
        "workers": [
            {
                "name": w.name,
                "kind": w.kind,
                "pid": w.pid,
                "host": _host(w),
                "address": w.address or None,
                "state": w.state,
                "window": w.window,
                "in_flight": w.in_flight,
                "completed": w.completed,
                "failed": w.failed,
                "tasks_per_s": round(per_worker.get(w.name, 0.0), 3),
                "restarts": w.restarts,
                "busy_seconds": round(w.busy_seconds, 6),
            }
            for w in stats.workers
        ],
        "sources": [
            {
                "name": s.name,
                "weight": s.weight,
                "items_in": s.items_in,
                "processed": s.processed,
                "dropped": s.dropped,
                "waiting": s.waiting,
                "lag_p50": s.lag_p50,
                "lag_p99": s.lag_p99,
            }
            for s in stats.sources
        ],
    }
    if with_history and history is not None:
        doc["history"] = history.series(now)
    return doc


def _add_page(control: ControlServer) -> None:
    """Serve the status page at ``GET /`` (open: it carries no data, only the page)."""
    page, policy = _page()
    headers = {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
    }
    control.add_route(
        "GET", "/", lambda request: Reply(200, page, "text/html; charset=utf-8", headers)
    )


def _page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy: nothing but its own inline script and style,
    and requests to the endpoint it came from."""
    html = importlib.resources.files(__package__).joinpath("status.html").read_bytes()
    scripts = re.findall(rb"<script>(.*?)</script>", html, re.S)
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s).digest()).decode() + "'" for s in scripts
    )
    policy = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html, policy


class _Sampler:
    """Takes a snapshot into *history* every :data:`SAMPLE_INTERVAL` until *stopped* is set
    (none while *snapshot* returns None)."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot | None],
        history: History,
        stopped: threading.Event,
        name: str,
    ) -> None:
        self._snapshot = snapshot
        self._history = history
        self._stopped = stopped
        self.thread = threading.Thread(
            target=self._loop, name=f"pytaskqml-status-{name}", daemon=True
        )

    def sample(self) -> None:
        snap = self._snapshot()
        if snap is not None:
            self._history.add(snap, time.monotonic())

    def _loop(self) -> None:
        try:
            self.sample()
            while not self._stopped.wait(self._history.interval):
                self.sample()
        except BaseException:
            log.exception("status sampler crashed; the status page's charts stop")


def _wants_history(request: Request) -> bool:
    return request.query.get("history", "1") not in ("0", "false", "no")


def _install(
    control: ControlServer,
    status: Callable[[Request], Reply],
    exposition: Callable[[], str | Reply],
    *,
    open_metrics: bool,
    sampler: _Sampler | None = None,
) -> None:
    """``/status`` and ``/metrics`` (*exposition*, followed by the endpoint's own families) on
    *control*; with a *sampler*, also the page, and the sampler started (it ends with the
    endpoint)."""

    def metrics(request: Request) -> Reply:
        text = exposition()
        if isinstance(text, Reply):
            return text
        text += _metrics.control_metrics(control.statistics())
        return Reply(200, text, _metrics.CONTENT_TYPE)

    if sampler is not None:
        _add_page(control)
    control.add_route("GET", "/status", status, auth=not open_metrics)
    control.add_route("GET", "/metrics", metrics, auth=not open_metrics)
    if sampler is not None:
        control.companions.append(sampler.thread)
        sampler.thread.start()


def install_coordinator(
    control: ControlServer,
    snapshot: Callable[[], Statistics],
    *,
    name: str,
    open_metrics: bool = False,
    ingress: Callable[[], list[IngressStats]] | None = None,
) -> History:
    """Add ``/``, ``/status`` and ``/metrics`` to a coordinator's endpoint and start sampling
    (until the endpoint stops). *ingress*: the statistics of its ingress ports, for
    ``/metrics``."""
    history = History()
    sampler = _Sampler(snapshot, history, control.stopped, name)
    start_time = time.time() - snapshot().uptime

    def status(request: Request) -> Reply:
        doc = status_document(snapshot(), history, name=name, with_history=_wants_history(request))
        return Reply(200, doc, headers={"Cache-Control": "no-store"})

    def exposition() -> str:
        ports = ingress() if ingress is not None else []
        return _metrics.coordinator_metrics(snapshot(), start_time=start_time, ingress=ports)

    _install(control, status, exposition, open_metrics=open_metrics, sampler=sampler)
    return history


def install_worker(
    control: ControlServer,
    snapshot: Callable[[], ServeStats],
    *,
    target: str,
    open_metrics: bool = False,
) -> None:
    """Add ``/status`` and ``/metrics`` to a ``pytaskqml worker``'s endpoint."""
    started = time.time()
    clock = time.monotonic()

    def status(request: Request) -> Reply:
        s = snapshot()
        return Reply(
            200,
            {
                "role": "worker",
                "name": s.name,
                "class": target,
                "pid": os.getpid(),
                "uptime": round(time.monotonic() - clock, 3),
                "tasks_done": s.tasks_done,
                "errors": s.errors,
                "busy_seconds": round(s.busy_seconds, 6),
                "connected": s.connected,
                "connections": s.connections,
                "bytes_sent": s.bytes_sent,
                "bytes_received": s.bytes_received,
                "stopping": s.stopping,
            },
        )

    def exposition() -> str:
        return _metrics.worker_process_metrics(snapshot(), target=target, start_time=started)

    _install(control, status, exposition, open_metrics=open_metrics)


def _kind_count(kind: str, n: int) -> str:
    one, many = {"local": ("thread", "threads"), "spawned": ("process", "processes")}.get(
        kind, (kind, kind)
    )
    return f"{n} {one if n == 1 else many}"


def _stage_row(row: StageSnapshot, per_stage: dict[str, float]) -> dict[str, Any]:
    st = row.stats
    kinds: dict[str, int] = {}
    for w in st.workers:
        kinds[w.kind] = kinds.get(w.kind, 0) + 1
    where = ", ".join(_kind_count(kind, n) for kind, n in kinds.items()) or "no worker"
    return {
        # The fields of a coordinator's worker row, so the page draws stages as it draws
        # workers ...
        "name": row.name,
        "kind": "stage",
        "pid": None,
        "host": where,
        "state": "busy" if st.in_flight or st.queued else "idle",
        "in_flight": st.in_flight,
        "completed": st.completed,
        "failed": st.failed + st.timed_out,
        "tasks_per_s": round(per_stage.get(row.name, 0.0), 3),
        "restarts": st.restarts,
        # ... and what a stage has besides.
        "workers": len(st.workers),
        "queued": st.queued,
        "timed_out": st.timed_out,
        "cancelled": st.cancelled,
        "dropped": st.dropped,
        "rejected": st.rejected,
        "retried": st.retried,
        "latency": {"p50": st.latency_p50, "p99": st.latency_p99},
        "start_error": st.start_error,
    }


def _histogram_quantiles(
    h: HistogramSnapshot | None, longest: float | None
) -> dict[str, float | None]:
    """The latency tiles of a page from a histogram (estimates within a bucket)."""
    return {
        "p50": None if h is None else h.quantile(0.5),
        "p90": None if h is None else h.quantile(0.9),
        "p99": None if h is None else h.quantile(0.99),
        "max": longest,
    }


def pipeline_status_document(
    snap: PipelineSnapshot, history: History | None, *, with_history: bool = True
) -> dict[str, Any]:
    """The JSON of a served pipeline's ``GET /status``: the shape of a coordinator's (so
    the status page and ``pytaskqml status`` read it the same way), ``role`` ``"pipeline"``,
    one row per stage in ``stages`` and, for the page, in ``workers``."""
    now = time.monotonic()
    throughput, per_stage = history.rate(snap, now) if history else (None, {})
    rows = [_stage_row(r, per_stage) for r in snap.workers]
    counts = dict.fromkeys(
        ("cancelled", "retried", "timed_out", "dropped", "rejected", "restarts", "workers_lost"),
        0,
    )
    for r in snap.workers:
        for k in counts:
            counts[k] += getattr(r.stats, k)
    errors = [f"{r['name']}: {r['start_error']}" for r in rows if r["start_error"]]
    doc: dict[str, Any] = {
        "role": "pipeline",
        "name": snap.name,
        "pid": os.getpid(),
        "uptime": round(snap.uptime, 3),
        "queued": snap.queued,
        "in_flight": snap.in_flight,
        "throughput": None if throughput is None else round(throughput, 3),
        "counts": {
            "submitted": snap.items_in,
            "completed": snap.completed,
            "failed": snap.failed,
            **counts,
        },
        "latency": _histogram_quantiles(snap.latency, snap.latency_max),
        "start_error": "; ".join(errors) or None,
        "stages": rows,
        "workers": rows,
    }
    if with_history and history is not None:
        doc["history"] = history.series(now)
    return doc


def install_service(
    control: ControlServer,
    pipeline: Callable[[], ServedPipeline | None],
    ingress: Callable[[], list[IngressStats]],
    *,
    open_metrics: bool = False,
) -> None:
    """Add ``/`` (the status page), ``/status`` and ``/metrics`` to a served pipeline's
    endpoint: its stages and ingress ports (see :func:`~._metrics.pipeline_metrics`), and
    start sampling them once a second (until the endpoint stops)."""
    started = time.time()
    clock = time.monotonic()

    def snapshot() -> PipelineSnapshot | None:
        p = pipeline()
        return None if p is None else pipeline_snapshot(p, time.monotonic() - clock)

    history = History()
    sampler = _Sampler(snapshot, history, control.stopped, "service")

    def status(request: Request) -> Reply:
        snap = snapshot()
        if snap is None:
            return Reply(503, {"error": "the pipeline is not running"})
        doc = pipeline_status_document(snap, history, with_history=_wants_history(request))
        return Reply(200, doc, headers={"Cache-Control": "no-store"})

    def exposition() -> str | Reply:
        p = pipeline()
        if p is None:
            return Reply(503, {"error": "the pipeline is not running"})
        s = p.statistics()
        text = _metrics.pipeline_metrics(
            s.stages,
            items_in=s.items_in,
            items_out=s.items_out,
            start_time=started,
            latency=s.latency,
        )
        return text + _metrics.ingress_metrics(ingress())

    _install(control, status, exposition, open_metrics=open_metrics, sampler=sampler)
