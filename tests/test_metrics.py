"""``GET /metrics`` read by Prometheus' own text parser, against ``statistics()`` after a known
workload; the histograms' buckets on a fake clock; the auth rules of the read-only routes; a
``pytaskqml worker``'s own metrics."""

from __future__ import annotations

import http.client
import json
from typing import Any

import numpy as np
import pytest
from conftest import Procs, free_port, read_line_with
from prometheus_client.parser import text_string_to_metric_families
from sample_workers import Echo, Faulty

from pytaskqml import Coordinator, TaskFailed
from pytaskqml.core.histogram import DURATION_BOUNDS, Histogram
from pytaskqml.core.scheduler import Scheduler
from pytaskqml.core.tasks import OK, Task
from pytaskqml.observe.metrics import Exposition
from pytaskqml.wire.control import request
from pytaskqml.wire.protocol import control_token

T = 30.0


def get(address: tuple[str, int], path: str, token: str | None = None) -> tuple[int, str, Any]:
    conn = http.client.HTTPConnection(address[0], address[1], timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def families(text: str) -> dict[str, Any]:
    """Parsed with prometheus_client: {family name: family}."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    found = [
        s.value
        for s in fams[family].samples
        if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (family, sample, labels, fams[family].samples)
    return float(found[0])


def counter(fams: dict[str, Any], family: str, **labels: str) -> float:
    """A counter's value (its sample is named ``<family>_total``)."""
    return value(fams, family, f"{family}_total", **labels)


class Sink:
    abandoned = False


def test_queue_wait_and_latency_land_in_their_buckets_on_a_fake_clock() -> None:
    core = Scheduler(max_queue=100, overflow="block", max_retries=2)
    ws, _ = core.add_worker("w", window=10, now=0.0)
    # Plain tasks measured quick, the worker kept busy: it may hold both tasks at once.
    core.kind_time[None], ws.ahead = 1e-6, 10
    single = Task(core.new_ids(1)[0], "x", 0, Sink(), 0, 1.0)
    chunk = Task(core.new_ids(1)[0], [1, 2, 3], 0, Sink(), 1, 1.0, 3)
    core.admit([single, chunk], 0, timed=False)
    assert core.queue_wait.counts == [0] * (len(DURATION_BOUNDS) + 1)  # admitted, not sent
    core.dispatch(1.003)  # waited 3 ms: the (2.5 ms, 5 ms] bucket, 4 items
    i = DURATION_BOUNDS.index(0.005)
    assert core.queue_wait.counts[i] == 4 and sum(core.queue_wait.counts) == 4
    assert core.queue_wait.sum == pytest.approx(4 * 0.003)
    core.results(ws, [[single.id, OK, "x"], [chunk.id, 6, [1, 2, 3]]], None, 1.02)  # 20 ms
    j = DURATION_BOUNDS.index(0.025)
    assert core.latency.counts[j] == 4 and sum(core.latency.counts) == 4
    assert core.latency.sum == pytest.approx(4 * 0.02)


def test_a_bound_itself_belongs_to_its_bucket_and_quantiles_interpolate() -> None:
    h = Histogram()
    h.observe(0.001)  # le="0.001" includes 0.001
    h.observe(20.0)  # above every bound
    snap = h.snapshot()
    assert snap.counts[DURATION_BOUNDS.index(0.001)] == 1 and snap.counts[-1] == 1
    assert snap.cumulative()[-1] == snap.count == 2
    h2 = Histogram()
    for _ in range(100):
        h2.observe(0.003)
    q = h2.snapshot().quantile(0.5)
    assert q is not None and 0.0025 < q <= 0.005
    assert Histogram().snapshot().quantile(0.5) is None
    later = h2.snapshot()
    h2.observe(0.2, 10)
    recent = h2.snapshot().minus(later)
    assert recent.count == 10 and recent.quantile(0.99) == pytest.approx(0.25, abs=0.05)


def test_label_values_are_escaped_so_the_official_parser_reads_them_back() -> None:
    out = Exposition()
    out.family("pytaskqml_x_total", "counter", 'help with \\ and\nnewline and "quotes"')
    name = 'we"ird\\na\nme'
    out.sample("pytaskqml_x_total", 3, [("worker", name)])
    (fam,) = text_string_to_metric_families(out.text())
    assert fam.samples[0].labels == {"worker": name} and fam.samples[0].value == 3


def test_metrics_match_statistics_after_a_known_workload() -> None:
    """2 spawned workers and 1 thread worker; 300 map() items of which 30 fail, 20 submit()s,
    8 arrays of 256 KiB through shared memory. /metrics, parsed by prometheus_client, says
    exactly what statistics() says."""
    with Coordinator() as coord:
        coord.spawn(Faulty, processes=2)
        coord.add_local(Echo(), threads=1)
        assert coord.wait_workers(3, timeout=T)
        address = coord.serve_control()
        items = ["boom" if i % 10 == 0 else f"w{i}" for i in range(300)]
        out = list(coord.map(items, on_error="return", chunksize=1))
        assert sum(isinstance(r, TaskFailed) for r in out) <= 30  # Echo does not fail them
        assert [coord.submit(i).result(T) for i in range(20)] == list(range(20))
        arrays = [{"frame": np.full((256, 1024), i, dtype=np.uint8)} for i in range(8)]
        assert [int(a["frame"][0, 0]) for a in coord.map(arrays)] == list(range(8))
        assert coord.wait_idle(T)
        status, ctype, text = get(address, "/metrics")
        stats = coord.statistics()
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    fams = families(text)
    assert stats.submitted == 328 and stats.completed + stats.failed == 328
    assert stats.failed == sum(isinstance(r, TaskFailed) for r in out) > 0
    for family, field in [
        ("pytaskqml_tasks_submitted", "submitted"),
        ("pytaskqml_tasks_completed", "completed"),
        ("pytaskqml_tasks_failed", "failed"),
        ("pytaskqml_tasks_retried", "retried"),
        ("pytaskqml_tasks_timed_out", "timed_out"),
        ("pytaskqml_tasks_dropped", "dropped"),
        ("pytaskqml_workers_lost", "workers_lost"),
        ("pytaskqml_worker_restarts", "restarts"),
    ]:
        assert fams[family].type == "counter"
        assert value(fams, family, family + "_total") == getattr(stats, field), family
    assert value(fams, "pytaskqml_queue_depth") == stats.queued == 0
    assert value(fams, "pytaskqml_tasks_in_flight") == stats.in_flight == 0
    assert value(fams, "pytaskqml_workers", kind="spawned") == 2
    assert value(fams, "pytaskqml_workers", kind="local") == 1
    for w in stats.workers:
        labels = {"worker": w.name, "kind": w.kind}
        assert (
            value(
                fams,
                "pytaskqml_worker_tasks_completed",
                "pytaskqml_worker_tasks_completed_total",
                **labels,
            )
            == w.completed
        )
        assert (
            value(
                fams,
                "pytaskqml_worker_tasks_failed",
                "pytaskqml_worker_tasks_failed_total",
                **labels,
            )
            == w.failed
        )
    # Every item was dispatched once and answered once: each histogram counted all of them.
    for family, snap in [
        ("pytaskqml_task_queue_wait_seconds", stats.queue_wait),
        ("pytaskqml_task_latency_seconds", stats.latency),
    ]:
        assert snap is not None and fams[family].type == "histogram"
        buckets = [s for s in fams[family].samples if s.name == family + "_bucket"]
        assert [float(s.labels["le"]) for s in buckets] == [*DURATION_BOUNDS, float("inf")]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and counts == snap.cumulative()
        assert value(fams, family, family + "_count") == snap.count == 328
        assert value(fams, family, family + "_sum") == pytest.approx(snap.sum)
    # The frames went through each spawned worker's shared memory, the rest through its socket.
    spawned = [w for w in stats.workers if w.kind == "spawned"]
    shm = sum(
        value(
            fams,
            "pytaskqml_worker_sent_bytes",
            "pytaskqml_worker_sent_bytes_total",
            worker=w.name,
            kind="spawned",
            transport="shared_memory",
        )
        for w in spawned
    )
    assert shm == sum(w.shared_bytes or 0 for w in spawned) > 0
    assert shm % (256 * 1024) == 0 and shm // (256 * 1024) <= 8
    for w in spawned:
        socket_bytes = value(
            fams,
            "pytaskqml_worker_sent_bytes",
            "pytaskqml_worker_sent_bytes_total",
            worker=w.name,
            kind="spawned",
            transport="socket",
        )
        assert socket_bytes == w.bytes_sent and socket_bytes > 0


def test_status_and_metrics_need_the_token_when_a_key_is_set_and_the_page_does_not() -> None:
    key = b"k" * 32
    token = control_token(key)
    with Coordinator(authkey=key) as coord:
        coord.add_local(Echo())
        address = coord.serve_control()
        for path in ("/metrics", "/status"):
            assert get(address, path)[0] == 401
            assert get(address, path, "wrong")[0] == 401
            assert get(address, path, token)[0] == 200
        status, ctype, page = get(address, "/")
        assert status == 200 and ctype.startswith("text/html") and "<script>" in page
        assert "local-Echo" not in page  # the page carries no data itself (its worker's name)
        assert get(address, "/health")[0] == 200
    with Coordinator(authkey=key) as coord:
        coord.add_local(Echo())
        address = coord.serve_control(open_metrics=True)
        assert get(address, "/metrics")[0] == 200
        assert get(address, "/status")[0] == 200
        assert request(address, "POST", "/shutdown")[0] == 401  # still needs the token


def test_the_page_forbids_everything_but_its_own_script() -> None:
    with Coordinator() as coord:
        address = coord.serve_control()
        conn = http.client.HTTPConnection(*address, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        policy = resp.getheader("Content-Security-Policy") or ""
        resp.read()
        conn.close()
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "connect-src 'self'" in policy and "unsafe-eval" not in policy


@pytest.mark.slow
def test_a_cli_worker_serves_its_own_metrics(procs: Procs) -> None:
    port, ctl = free_port(), free_port()
    worker = procs.cli(
        "worker",
        "sample_workers:Faulty",
        "--listen",
        f"127.0.0.1:{port}",
        "--control",
        f"127.0.0.1:{ctl}",
        "--name",
        "metered",
    )
    read_line_with(worker, "listening on")
    with Coordinator() as coord:
        coord.connect(("127.0.0.1", port), timeout=T)
        items = ["boom" if i % 4 == 0 else i for i in range(40)]
        out = list(coord.map(items, on_error="return", chunksize=1))
        assert sum(isinstance(r, TaskFailed) for r in out) == 10
        status, _, text = get(("127.0.0.1", ctl), "/metrics")
        assert status == 200
        fams = families(text)
        assert value(fams, "pytaskqml_serve_tasks", "pytaskqml_serve_tasks_total") == 40
        assert value(fams, "pytaskqml_serve_task_errors", "pytaskqml_serve_task_errors_total") == 10
        assert value(fams, "pytaskqml_serve_connected") == 1
        assert value(fams, "pytaskqml_serve_info", worker="metered") == 1
        received = value(
            fams, "pytaskqml_serve_received_bytes", "pytaskqml_serve_received_bytes_total"
        )
        (w,) = coord.statistics().workers
        # What the coordinator sent is what the worker received (heartbeats included).
        assert 0 < received <= (w.bytes_sent or 0)
        code, body = request(("127.0.0.1", ctl), "GET", "/status")
        assert code == 200 and body["role"] == "worker" and body["tasks_done"] == 40
        assert json.loads(json.dumps(body))["errors"] == 10
        # The endpoint's own families: this /metrics request was served, none refused.
        assert counter(fams, "pytaskqml_control_requests_served") == 1
        assert counter(fams, "pytaskqml_control_requests_refused") == 0
        assert value(fams, "pytaskqml_control_connections_open") >= 1  # (an earlier one may linger)


@pytest.mark.slow
def test_a_cli_worker_with_a_key_opens_metrics_only_when_told(procs: Procs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key_file = tmp_path / "key"
    key_file.write_bytes(b"w" * 32)
    ports = {}
    for flag in ("", "--open-metrics"):
        ctl = free_port()
        args = ["worker", "sample_workers:Echo", "--listen", f"127.0.0.1:{free_port()}"]
        args += ["--control", f"127.0.0.1:{ctl}", "--authkey-file", str(key_file)]
        read_line_with(procs.cli(*args, *([flag] if flag else [])), "listening on")
        ports[flag] = ("127.0.0.1", ctl)
    token = control_token(b"w" * 32)
    closed, opened = ports[""], ports["--open-metrics"]
    assert get(closed, "/metrics")[0] == 401 and get(closed, "/status")[0] == 401
    assert get(closed, "/metrics", token)[0] == 200
    assert get(opened, "/metrics")[0] == 200 and get(opened, "/status")[0] == 200
    assert request(opened, "POST", "/shutdown")[0] == 401  # still needs the token


def test_metrics_show_models_pools_and_ingress_producers() -> None:
    from model_workers import Broken, Scale

    from pytaskqml import Client
    from pytaskqml.errors import ModelLoadError

    with Coordinator() as coord:
        coord.spawn(Echo, processes=(1, 2))
        coord.add_local(Echo(), threads=(1, 3))
        assert coord.wait_workers(2, timeout=T)
        coord.models.load("scale", Scale, config={"factor": 2}, version="a")
        assert [coord.submit(i, model="scale").result(T)[0] for i in range(5)] == [
            0, 2, 4, 6, 8,
        ]  # fmt: skip
        coord.models.update("scale", Scale, config={"factor": 3}, version="b")
        assert [coord.submit(i, model="scale").result(T)[0] for i in range(3)] == [0, 3, 6]
        with pytest.raises(ModelLoadError):
            coord.models.update("scale", Broken, version="c")
        ingress = coord.serve_ingress()
        with Client(ingress) as client:
            assert list(client.map(range(7))) == list(range(7))
        address = coord.serve_control()
        stats = coord.statistics()
        status, _, text = get(address, "/metrics")
    assert status == 200
    fams = families(text)
    # Models: results and latency per version; loads and failures per model.
    scale = {m.name: m for m in stats.models}["scale"]
    assert dict(scale.results) == {"a": 5, "b": 3}
    for version, n in (("a", 5), ("b", 3)):
        labels = {"model": "scale", "version": version}
        assert counter(fams, "pytaskqml_model_results", **labels) == n
        family = "pytaskqml_model_latency_seconds"
        assert value(fams, family, f"{family}_count", **labels) == n
        latency = value(fams, family, f"{family}_sum", **labels)
        assert 0 < latency < n * T
    assert counter(fams, "pytaskqml_model_loads", model="scale") == scale.loads >= 3
    assert counter(fams, "pytaskqml_model_load_failures", model="scale") == scale.load_failures >= 1
    assert value(fams, "pytaskqml_model_workers", model="scale", state="ready") == len(scale.ready)
    # Pools: one of processes, one of threads, with their bounds and sizes.
    pools = {p.kind: p for p in stats.pools}
    assert set(pools) == {"processes", "threads"}
    for kind, (lo, hi) in (("processes", (1, 2)), ("threads", (1, 3))):
        p = pools[kind]
        labels = {"pool": p.name, "kind": kind}
        assert value(fams, "pytaskqml_pool_min_workers", **labels) == lo
        assert value(fams, "pytaskqml_pool_max_workers", **labels) == hi
        assert value(fams, "pytaskqml_pool_workers", **labels) == p.workers >= 1
        assert counter(fams, "pytaskqml_pool_scale_ups", **labels) == p.scale_ups
        assert counter(fams, "pytaskqml_pool_scale_downs", **labels) == p.scale_downs
    assert counter(fams, "pytaskqml_scale_ups") == stats.scale_ups
    # Ingress: the producer that came and went, its items.
    where = f"{ingress[0]}:{ingress[1]}"
    assert counter(fams, "pytaskqml_ingress_producers_accepted", address=where) == 1
    assert counter(fams, "pytaskqml_ingress_items_received", address=where) == 7
    assert counter(fams, "pytaskqml_ingress_results_returned", address=where) == 7


def test_a_served_pipeline_shows_its_stages_in_metrics() -> None:
    from pytaskqml import Client
    from pytaskqml.service.service import Service

    doc = {
        "pipeline": {"steps": ["square", "tag"]},
        "stages": {
            "square": {"worker": "sample_workers:Square", "threads": 2},
            "tag": {"worker": "pipeline_workers:Tag", "processes": 1, "kwargs": {"tag": "t"}},
        },
        "service": {"ingress": "127.0.0.1:0", "control": "127.0.0.1:0"},
    }
    service = Service(doc, authkey=None).start()
    try:
        with Client(service.addresses["ingress"]) as client:
            assert list(client.map(range(20))) == [[i * i, "t"] for i in range(20)]
        host, port = service.addresses["control"].rsplit(":", 1)
        status, kind, text = get((host, int(port)), "/metrics")
    finally:
        service.stop()
    assert status == 200 and kind.startswith("text/plain")
    fams = families(text)
    assert counter(fams, "pytaskqml_pipeline_items_in") == 20
    family = "pytaskqml_pipeline_latency_seconds"
    assert value(fams, family, f"{family}_count") == 20  # each item timed end to end
    assert value(fams, family, f"{family}_bucket", le="+Inf") == 20
    stage_sums = sum(
        value(fams, "pytaskqml_stage_latency_seconds", "pytaskqml_stage_latency_seconds_sum",
              stage=stage)
        for stage in ("square", "tag")
    )  # fmt: skip
    # End to end covers both stages and the hand-offs between them.
    assert value(fams, family, f"{family}_sum") >= stage_sums
    for stage in ("square", "tag"):
        assert counter(fams, "pytaskqml_stage_tasks_completed", stage=stage) == 20
        assert counter(fams, "pytaskqml_stage_tasks_failed", stage=stage) == 0
        family = "pytaskqml_stage_latency_seconds"
        assert value(fams, family, f"{family}_count", stage=stage) == 20
    assert value(fams, "pytaskqml_stage_workers", stage="square") >= 1
    assert value(fams, "pytaskqml_stage_workers", stage="tag") == 1
    received = counter(
        fams, "pytaskqml_ingress_items_received", address=service.addresses["ingress"]
    )
    assert received == 20
    assert counter(fams, "pytaskqml_control_requests_served") >= 1


def test_metrics_show_the_http_endpoint_itself() -> None:
    """Two /health requests, one for a route that does not exist, then /metrics: its
    pytaskqml_control_* families, parsed by prometheus_client, count them."""
    with Coordinator() as coord:
        address = coord.serve_control()
        assert get(address, "/health")[0] == 200
        assert get(address, "/health")[0] == 200
        assert get(address, "/no-such-route")[0] == 404
        status, _, text = get(address, "/metrics")
        stats = coord.control_statistics()
    assert status == 200 and stats is not None
    fams = families(text)
    assert counter(fams, "pytaskqml_control_requests_served") == 3  # /metrics counts itself
    assert counter(fams, "pytaskqml_control_requests_refused") == 1
    assert value(fams, "pytaskqml_control_connections_open") >= 1  # (an earlier one may linger)
    for family in ("busy", "evicted"):
        assert counter(fams, f"pytaskqml_control_connections_{family}") == 0
    assert counter(fams, "pytaskqml_control_requests_timed_out") == 0
    assert counter(fams, "pytaskqml_control_broken_pipes") == 0
    assert stats.served >= 3 and stats.refused == 1


def test_per_source_metrics_match_statistics_sources() -> None:
    """Two named streams and some submit()s: each source has its series, parsed by
    prometheus_client, equal to statistics().sources."""
    with Coordinator() as coord:
        coord.add_local(Echo(), threads=2)
        address = coord.serve_control()
        a, b = coord.stream(name="cam a"), coord.stream(name='cam "b"', weight=2)
        for i in range(5):
            a.put(i)
        for i in range(3):
            b.put(i)
        a.close()
        b.close()
        assert list(a) == list(range(5)) and list(b) == list(range(3))
        assert [coord.submit(i).result(T) for i in range(4)] == list(range(4))
        _, _, text = get(address, "/metrics")
        sources = {s.name: s for s in coord.statistics().sources}
    fams = families(text)
    assert set(sources) == {"cam a", 'cam "b"', "submit"}
    for name, s in sources.items():
        assert counter(fams, "pytaskqml_source_items", source=name) == s.items_in
        assert counter(fams, "pytaskqml_source_processed", source=name) == s.processed
        assert counter(fams, "pytaskqml_source_dropped", source=name) == 0
        assert value(fams, "pytaskqml_source_waiting", source=name) == 0
        assert s.lag_p50 is not None
        lag = value(fams, "pytaskqml_source_lag_seconds", source=name, quantile="0.5")
        assert lag == pytest.approx(s.lag_p50)
    assert (sources["cam a"].processed, sources['cam "b"'].processed) == (5, 3)
    assert sources['cam "b"'].weight == 2 and sources["submit"].items_in == 4
