"""``GET /metrics``: counters and gauges in the Prometheus text exposition format (0.0.4).

Rendered on request from one snapshot (:class:`~._stats.Statistics` for a coordinator,
:class:`~._serve.ServeStats` for a ``pytaskqml worker``), so scraping costs the hot path nothing
but the snapshot's one pass under the engine's lock. Names follow Prometheus' conventions: a
``pytaskqml_`` prefix, base units (seconds, bytes), ``_total`` on counters. Per-worker series
carry ``worker`` (its name) and ``kind`` labels; a worker's series end when it leaves, and a
worker process started again under the same name starts its counters from zero (which
``rate()`` reads as a counter reset). A ``pytaskqml worker``'s own series are named
``pytaskqml_serve_*``, so that they never mix with a coordinator's ``pytaskqml_worker_*``.

Named models (``pytaskqml_model_*``) carry ``model`` and, for results, ``version`` labels;
self-sizing pools (``pytaskqml_pool_*``) a ``pool`` label (the worker's ``module:Class``,
numbered when two pools run the same class); ingress ports (``pytaskqml_ingress_*``) an
``address``; a pipeline's stages (:func:`pipeline_metrics`, ``pytaskqml_stage_*``) a
``stage``. Every endpoint also shows its own HTTP server (``pytaskqml_control_*``,
:func:`control_metrics`): connections open, requests served and refused, connections turned
away at the limit, slow ones evicted or timed out. A family with nothing to show (no model
loaded) is still declared, empty, so a dashboard finds every name from the start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..core.histogram import HistogramSnapshot
from ..core.stats import ModelStats, PoolStats, ServeStats, SourceStats, Statistics, WorkerStats

if TYPE_CHECKING:
    from ..ingress.server import IngressStats
    from ..wire.control import ControlStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Sequence[tuple[str, str]]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    """Builds one exposition: each family's ``# HELP`` and ``# TYPE`` lines, then its
    samples. Families must be added whole, one after another (the format requires it)."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Labels = ()) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            self._lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self._lines.append(f"{name} {_number(value)}")

    def metric(self, name: str, kind: str, help_text: str, value: float) -> None:
        """A family of one unlabelled sample."""
        self.family(name, kind, help_text)
        self.sample(name, value)

    def histogram(self, name: str, help_text: str, h: HistogramSnapshot) -> None:
        self.family(name, "histogram", help_text)
        self.histogram_samples(name, h)

    def histogram_samples(self, name: str, h: HistogramSnapshot, labels: Labels = ()) -> None:
        """One histogram's samples (its family declared already), with *labels* on each."""
        cumulative = h.cumulative()
        for bound, count in zip(h.bounds, cumulative, strict=False):
            self.sample(f"{name}_bucket", count, [*labels, ("le", _number(float(bound)))])
        self.sample(f"{name}_bucket", cumulative[-1], [*labels, ("le", "+Inf")])
        self.sample(f"{name}_sum", h.sum, labels)
        self.sample(f"{name}_count", cumulative[-1], labels)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


# (metric name, Statistics field, help): the coordinator's counters of items.
_TASK_COUNTERS = (
    ("pytaskqml_tasks_submitted_total", "submitted", "Items admitted to the queue."),
    ("pytaskqml_tasks_completed_total", "completed", "Items whose result was delivered."),
    (
        "pytaskqml_tasks_failed_total",
        "failed",
        "Items whose error was delivered (raised, poison, or nothing could run them).",
    ),
    ("pytaskqml_tasks_cancelled_total", "cancelled", "Items cancelled before they ran."),
    (
        "pytaskqml_tasks_retried_total",
        "retried",
        "Tasks put back in the queue after their worker was lost.",
    ),
    ("pytaskqml_tasks_timed_out_total", "timed_out", "Items that missed their deadline."),
    ("pytaskqml_tasks_late_total", "late", "Results that arrived after their deadline."),
    ("pytaskqml_tasks_dropped_total", "dropped", "Items dropped by the drop_oldest policy."),
    ("pytaskqml_tasks_rejected_total", "rejected", "Items refused by the reject policy."),
    (
        "pytaskqml_tasks_poisoned_total",
        "poisoned",
        "Items failed for killing more than max_retries workers.",
    ),
)

_EVENT_COUNTERS = (
    (
        "pytaskqml_worker_restarts_total",
        "restarts",
        "Spawned worker processes started again after they died.",
    ),
    (
        "pytaskqml_workers_lost_total",
        "workers_lost",
        "Workers that went away without saying goodbye (killed, crashed, hung, silent).",
    ),
    (
        "pytaskqml_worker_start_failures_total",
        "start_failures",
        "Spawned worker processes that failed before they were ready.",
    ),
    (
        "pytaskqml_rejected_peers_total",
        "rejected_peers",
        "Connections refused (wrong key, garbage, too many at once).",
    ),
)


def _worker_labels(w: WorkerStats) -> list[tuple[str, str]]:
    return [("worker", w.name), ("kind", w.kind)]


def coordinator_metrics(
    stats: Statistics,
    *,
    start_time: float,
    ingress: Sequence[IngressStats] = (),
) -> str:
    """The coordinator's exposition. *start_time*: when it was created, in Unix seconds;
    *ingress*: its ingress ports' statistics."""
    out = Exposition()
    for name, field, help_text in _TASK_COUNTERS:
        out.metric(name, "counter", help_text, getattr(stats, field))
    out.metric(
        "pytaskqml_queue_depth",
        "gauge",
        "Tasks waiting for a worker (a chunk counts once).",
        stats.queued,
    )
    out.metric(
        "pytaskqml_tasks_in_flight",
        "gauge",
        "Tasks held by workers now (a chunk counts once).",
        stats.in_flight,
    )
    if stats.queue_wait is not None:
        out.histogram(
            "pytaskqml_task_queue_wait_seconds",
            "Time from submission to first dispatch to a worker, per item.",
            stats.queue_wait,
        )
    if stats.latency is not None:
        out.histogram(
            "pytaskqml_task_latency_seconds",
            "Time from submission to the result's arrival, per item.",
            stats.latency,
        )
    for name, field, help_text in _EVENT_COUNTERS:
        out.metric(name, "counter", help_text, getattr(stats, field))
    kinds: dict[str, int] = {}
    for w in stats.workers:
        kinds[w.kind] = kinds.get(w.kind, 0) + 1
    out.family("pytaskqml_workers", "gauge", "Workers attached now, by kind.")
    for kind in ("local", "spawned", "remote", "dial-in"):
        out.sample("pytaskqml_workers", kinds.pop(kind, 0), [("kind", kind)])
    for kind, n in sorted(kinds.items()):
        out.sample("pytaskqml_workers", n, [("kind", kind)])
    _per_worker(out, stats.workers)
    _models(out, stats.models)
    _sources(out, stats.sources)
    _pools(out, stats)
    _ingress(out, ingress)
    out.metric(
        "pytaskqml_start_time_seconds",
        "gauge",
        "When the coordinator was created, in seconds since the Unix epoch.",
        start_time,
    )
    return out.text()


def _models(out: Exposition, models: Sequence[ModelStats]) -> None:
    out.family(
        "pytaskqml_model_results_total",
        "counter",
        "Items a named model answered (a result or an error), by model and version.",
    )
    for m in models:
        for version, n in m.results:
            out.sample(
                "pytaskqml_model_results_total", n, [("model", m.name), ("version", version)]
            )
    # A summary without quantiles: rate(_sum) / rate(_count) is the mean latency.
    out.family(
        "pytaskqml_model_latency_seconds",
        "summary",
        "Time from submission to result of a named model's items, by model and version.",
    )
    for m in models:
        seconds = dict(m.seconds)
        for version, n in m.results:
            labels = [("model", m.name), ("version", version)]
            out.sample("pytaskqml_model_latency_seconds_sum", seconds.get(version, 0.0), labels)
            out.sample("pytaskqml_model_latency_seconds_count", n, labels)
    for name, field, help_text in (
        ("pytaskqml_model_loads_total", "loads", "Loads of a model sent to workers."),
        (
            "pytaskqml_model_load_failures_total",
            "load_failures",
            "Loads a worker reported failed (load() raised, class not allowed).",
        ),
        ("pytaskqml_model_unloads_total", "unloads", "Unloads of a model sent to workers."),
    ):
        out.family(name, "counter", help_text)
        for m in models:
            out.sample(name, getattr(m, field), [("model", m.name)])
    out.family(
        "pytaskqml_model_workers",
        "gauge",
        "Workers by what they report of a model now: ready (serving it), loading, failed "
        "(its last load failed and it serves no version).",
    )
    for m in models:
        for state, n in (("ready", len(m.ready)), ("loading", len(m.loading))):
            out.sample("pytaskqml_model_workers", n, [("model", m.name), ("state", state)])
        ready = {w for w, _ in m.ready}
        failed = sum(1 for w, _ in m.failed if w not in ready)
        out.sample("pytaskqml_model_workers", failed, [("model", m.name), ("state", "failed")])


def _sources(out: Exposition, sources: Sequence[SourceStats]) -> None:
    # Two sources may share a name (a user's choice): their series are summed, one per name.
    by_name: dict[str, list[SourceStats]] = {}
    for s in sources:
        by_name.setdefault(s.name, []).append(s)
    for name, field, kind, help_text in (
        ("pytaskqml_source_items_total", "items_in", "counter", "Items admitted, per source."),
        (
            "pytaskqml_source_processed_total",
            "processed",
            "counter",
            "Items whose result or error came back, per source.",
        ),
        (
            "pytaskqml_source_dropped_total",
            "dropped",
            "counter",
            "Items dropped by an overflow policy, per source.",
        ),
        ("pytaskqml_source_waiting", "waiting", "gauge", "Items waiting for a worker now."),
    ):
        out.family(name, kind, help_text)
        for src, group in by_name.items():
            out.sample(name, sum(getattr(s, field) for s in group), [("source", src)])
    out.family(
        "pytaskqml_source_lag_seconds",
        "gauge",
        "Time from submission to result of a source's recent items, by quantile.",
    )
    for src, group in by_name.items():
        for q, field in (("0.5", "lag_p50"), ("0.99", "lag_p99")):
            values = [v for v in (getattr(s, field) for s in group) if v is not None]
            if values:
                out.sample(
                    "pytaskqml_source_lag_seconds", max(values), [("source", src), ("quantile", q)]
                )


def _pools(out: Exposition, stats: Statistics) -> None:
    pools: Sequence[PoolStats] = stats.pools
    out.metric(
        "pytaskqml_scale_ups_total",
        "counter",
        "Workers self-sizing pools added, all pools.",
        stats.scale_ups,
    )
    out.metric(
        "pytaskqml_scale_downs_total",
        "counter",
        "Workers self-sizing pools let go, all pools.",
        stats.scale_downs,
    )
    for name, kind, field, help_text in (
        ("pytaskqml_pool_scale_ups_total", "counter", "scale_ups", "Workers the pool added."),
        ("pytaskqml_pool_scale_downs_total", "counter", "scale_downs", "Workers it let go."),
        ("pytaskqml_pool_workers", "gauge", "workers", "Its workers attached now."),
        ("pytaskqml_pool_starting_workers", "gauge", "starting", "Its workers starting now."),
        ("pytaskqml_pool_min_workers", "gauge", "min", "The fewest workers it keeps."),
        ("pytaskqml_pool_max_workers", "gauge", "max", "The most workers it may have."),
    ):
        out.family(name, kind, f"A self-sizing pool: {help_text[0].lower()}{help_text[1:]}")
        for p in pools:
            out.sample(name, getattr(p, field), [("pool", p.name), ("kind", p.kind)])


def _ingress(out: Exposition, ports: Sequence[IngressStats]) -> None:
    for name, kind, field, help_text in (
        ("pytaskqml_ingress_producers", "gauge", "producers", "Producers connected now."),
        (
            "pytaskqml_ingress_producers_accepted_total",
            "counter",
            "accepted",
            "Producers accepted.",
        ),
        (
            "pytaskqml_ingress_connections_refused_total",
            "counter",
            "refused",
            "Connections that failed the handshake.",
        ),
        (
            "pytaskqml_ingress_producers_dropped_total",
            "counter",
            "dropped_producers",
            "Producers disconnected for a protocol violation or a bad frame.",
        ),
        ("pytaskqml_ingress_items_received_total", "counter", "received", "Items received."),
        ("pytaskqml_ingress_results_returned_total", "counter", "returned", "Results sent back."),
        (
            "pytaskqml_ingress_items_abandoned_total",
            "counter",
            "abandoned",
            "Items whose producer went away before their result.",
        ),
    ):
        out.family(name, kind, f"An ingress port: {help_text[0].lower()}{help_text[1:]}")
        for i, port in enumerate(ports):
            out.sample(name, getattr(port, field), [("address", port.address or str(i))])


_CONTROL = (
    ("pytaskqml_control_connections_open", "gauge", "open", "Connections open now."),
    (
        "pytaskqml_control_requests_served_total",
        "counter",
        "served",
        "Requests that reached their route.",
    ),
    (
        "pytaskqml_control_requests_refused_total",
        "counter",
        "refused",
        "Requests answered with a 4xx status (bad, unauthorised, unknown route).",
    ),
    (
        "pytaskqml_control_connections_busy_total",
        "counter",
        "busy",
        "Connections answered 503 at the connection limit.",
    ),
    (
        "pytaskqml_control_connections_evicted_total",
        "counter",
        "evicted",
        "Slow requests cut to make room for a new connection.",
    ),
    (
        "pytaskqml_control_requests_timed_out_total",
        "counter",
        "timed_out",
        "Requests that missed their read deadline (answered 408).",
    ),
    (
        "pytaskqml_control_broken_pipes_total",
        "counter",
        "broken_pipes",
        "Replies the client hung up on.",
    ),
)


def control_metrics(stats: ControlStats) -> str:
    """The families of the HTTP endpoint serving ``/metrics`` (appended to another
    exposition)."""
    out = Exposition()
    for name, kind, field, help_text in _CONTROL:
        out.metric(
            name,
            kind,
            f"The HTTP endpoint: {help_text[0].lower()}{help_text[1:]}",
            getattr(stats, field),
        )
    return out.text()


def pipeline_metrics(
    stages: Mapping[str, Statistics],
    *,
    items_in: int,
    items_out: int,
    start_time: float,
    latency: HistogramSnapshot | None = None,
) -> str:
    """A served pipeline's exposition (from :meth:`Pipeline.statistics`): its items in and
    out, their time end to end (*latency*), and per stage the coordinator's main series with
    a ``stage`` label."""
    out = Exposition()
    out.metric(
        "pytaskqml_pipeline_items_in_total", "counter", "Items put into the pipeline.", items_in
    )
    out.metric(
        "pytaskqml_pipeline_items_out_total",
        "counter",
        "Items that came out of the pipeline (a result or an error).",
        items_out,
    )
    out.family(
        "pytaskqml_pipeline_latency_seconds",
        "histogram",
        "Time from put() until the item's result left the last step, per item.",
    )
    if latency is not None:
        out.histogram_samples("pytaskqml_pipeline_latency_seconds", latency)
    per_stage: tuple[tuple[str, str, str, str], ...] = (
        ("pytaskqml_stage_tasks_submitted_total", "counter", "submitted", "Items admitted."),
        ("pytaskqml_stage_tasks_completed_total", "counter", "completed", "Items completed."),
        ("pytaskqml_stage_tasks_failed_total", "counter", "failed", "Items failed."),
        ("pytaskqml_stage_tasks_timed_out_total", "counter", "timed_out", "Items timed out."),
        ("pytaskqml_stage_tasks_retried_total", "counter", "retried", "Tasks retried."),
        ("pytaskqml_stage_queue_depth", "gauge", "queued", "Tasks waiting for a worker."),
        ("pytaskqml_stage_tasks_in_flight", "gauge", "in_flight", "Tasks held by workers."),
        ("pytaskqml_stage_worker_restarts_total", "counter", "restarts", "Workers restarted."),
    )
    for name, kind, field, help_text in per_stage:
        out.family(name, kind, f"A pipeline stage: {help_text[0].lower()}{help_text[1:]}")
        for stage, s in stages.items():
            out.sample(name, getattr(s, field), [("stage", stage)])
    out.family("pytaskqml_stage_workers", "gauge", "A pipeline stage: its workers attached now.")
    for stage, s in stages.items():
        out.sample("pytaskqml_stage_workers", len(s.workers), [("stage", stage)])
    out.family(
        "pytaskqml_stage_latency_seconds",
        "histogram",
        "A pipeline stage: time from submission to result, per item.",
    )
    for stage, s in stages.items():
        if s.latency is not None:
            out.histogram_samples("pytaskqml_stage_latency_seconds", s.latency, [("stage", stage)])
    out.metric(
        "pytaskqml_start_time_seconds",
        "gauge",
        "When the pipeline started, in seconds since the Unix epoch.",
        start_time,
    )
    return out.text()


def _per_worker(out: Exposition, workers: Sequence[WorkerStats]) -> None:
    simple = (
        ("pytaskqml_worker_tasks_completed_total", "counter", "completed", "Items it completed."),
        ("pytaskqml_worker_tasks_failed_total", "counter", "failed", "Items it failed."),
        ("pytaskqml_worker_tasks_in_flight", "gauge", "in_flight", "Tasks it holds now."),
        ("pytaskqml_worker_window", "gauge", "window", "Tasks it may hold at once."),
        (
            "pytaskqml_worker_busy_seconds_total",
            "counter",
            "busy_seconds",
            "Time it reported spending on tasks.",
        ),
    )
    for name, kind, field, help_text in simple:
        out.family(name, kind, help_text)
        for w in workers:
            out.sample(name, getattr(w, field), _worker_labels(w))
    remote = [w for w in workers if w.bytes_sent is not None]
    out.family(
        "pytaskqml_worker_sent_bytes_total",
        "counter",
        "Bytes sent to a worker process, by transport: the socket (frames) or shared memory "
        "(buffers of 64 KiB or more copied into its segment).",
    )
    for w in remote:
        labels = _worker_labels(w)
        out.sample(
            "pytaskqml_worker_sent_bytes_total",
            w.bytes_sent or 0,
            [*labels, ("transport", "socket")],
        )
        if w.shared_bytes is not None:
            out.sample(
                "pytaskqml_worker_sent_bytes_total",
                w.shared_bytes,
                [*labels, ("transport", "shared_memory")],
            )
    out.family(
        "pytaskqml_worker_received_bytes_total",
        "counter",
        "Bytes received from a worker process through the socket.",
    )
    for w in remote:
        out.sample(
            "pytaskqml_worker_received_bytes_total", w.bytes_received or 0, _worker_labels(w)
        )
    shared = [w for w in workers if w.shared_buffers is not None]
    out.family(
        "pytaskqml_worker_shared_fallbacks_total",
        "counter",
        "Buffers big enough for shared memory that went over the socket (no free slot).",
    )
    for w in shared:
        out.sample(
            "pytaskqml_worker_shared_fallbacks_total", w.shared_fallbacks or 0, _worker_labels(w)
        )


def worker_process_metrics(stats: ServeStats, *, target: str, start_time: float) -> str:
    """A ``pytaskqml worker`` process's exposition (*target*: its ``module:Class``)."""
    out = Exposition()
    out.family("pytaskqml_serve_info", "gauge", "The worker class this process serves.")
    out.sample("pytaskqml_serve_info", 1, [("worker", stats.name), ("class", target)])
    out.metric(
        "pytaskqml_serve_tasks_total",
        "counter",
        "Tasks this process ran (a chunk counts once).",
        stats.tasks_done,
    )
    out.metric("pytaskqml_serve_task_errors_total", "counter", "Items that raised.", stats.errors)
    out.metric(
        "pytaskqml_serve_busy_seconds_total",
        "counter",
        "Time spent running tasks.",
        stats.busy_seconds,
    )
    out.metric(
        "pytaskqml_serve_connected",
        "gauge",
        "1 while a coordinator is connected.",
        stats.connected,
    )
    out.metric(
        "pytaskqml_serve_connections_total",
        "counter",
        "Coordinator connections served.",
        stats.connections,
    )
    out.metric(
        "pytaskqml_serve_sent_bytes_total",
        "counter",
        "Bytes sent to coordinators through the socket.",
        stats.bytes_sent,
    )
    out.metric(
        "pytaskqml_serve_received_bytes_total",
        "counter",
        "Bytes received from coordinators through the socket.",
        stats.bytes_received,
    )
    out.metric(
        "pytaskqml_serve_stopping",
        "gauge",
        "1 once a graceful stop was asked for.",
        stats.stopping,
    )
    out.metric(
        "pytaskqml_start_time_seconds",
        "gauge",
        "When the process started serving, in seconds since the Unix epoch.",
        start_time,
    )
    return out.text()


def ingress_metrics(ports: Sequence[IngressStats]) -> str:
    """The ingress ports' families alone (appended to another exposition)."""
    out = Exposition()
    _ingress(out, ports)
    return out.text()
