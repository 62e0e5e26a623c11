"""``pytaskqml serve``: a pipeline as a service, its ingress ports and its drain."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs, child_env, read_line_with, wait_for

from pytaskqml import Client, ClosedError
from pytaskqml.service.service import Service
from pytaskqml.wire import connection as _connection
from pytaskqml.wire import control as _control
from pytaskqml.wire import protocol as _protocol

T = 30.0


def _config(tmp_path: Path, delay: float, service: dict[str, Any]) -> Path:
    doc = {
        "pipeline": {"name": "svc", "steps": ["pause", "tag"]},
        "stages": {
            "pause": {"worker": "pipeline_workers:Pause", "kwargs": {"delay": delay}},
            "tag": {"worker": "pipeline_workers:Tag", "threads": 1, "kwargs": {"tag": "t"}},
        },
        "service": service,
    }
    path = tmp_path / "svc.json"
    path.write_text(json.dumps(doc))
    return path


def _first_stdout_line(proc: Any, timeout: float = 60.0) -> str:
    out: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: out.put(proc.stdout.readline()), daemon=True).start()
    try:
        return out.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError("pytaskqml serve printed no addresses") from None


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


def _post(url: str, body: Any) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as reply:
        return json.loads(reply.read())


def test_service_in_process_drains_what_it_accepted(tmp_path: Path) -> None:
    doc = json.loads(_config(tmp_path, 0.001, {"ingress": "127.0.0.1:0"}).read_text())
    doc["stages"]["pause"]["threads"] = 2
    service = Service(doc, authkey=None).start()
    try:
        with Client(service.addresses["ingress"], window=8) as client:
            assert list(client.map(range(50))) == [[i, "t"] for i in range(50)]
            futures = [client.submit(i) for i in range(8)]
            gate = service.gate
            assert gate is not None
            wait_for(
                lambda: gate.outstanding() + sum(f.done() for f in futures) >= 8,
                what="the service to accept 8 items",
            )
            service.drain("service is draining")
            late = client.submit(99)
            assert service.wait_drained(30)
            assert [f.result(timeout=30) for f in futures] == [[i, "t"] for i in range(8)]
            with pytest.raises(ClosedError, match="draining"):
                late.result(timeout=30)
    finally:
        service.stop()


def test_service_needs_something_to_serve(tmp_path: Path) -> None:
    doc = json.loads(_config(tmp_path, 0.001, {}).read_text())
    with pytest.raises(ValueError, match="nothing to serve"):
        Service(doc, authkey=None)


@pytest.mark.slow
def test_sigterm_mid_stream_answers_every_accepted_task(tmp_path: Path, procs: Procs) -> None:
    """Spawned workers take 100 ms per item; SIGTERM arrives with a window of items accepted.
    Every accepted item is answered with its result, what comes after is refused with a
    clear error, and the service exits 0."""
    config = _config(tmp_path, 0.1, {"ingress": "127.0.0.1:0", "http": "127.0.0.1:0"})
    doc = json.loads(config.read_text())
    doc["stages"]["pause"]["processes"] = 2
    config.write_text(json.dumps(doc))
    proc = procs.cli("serve", str(config), "--keyless-actions")
    addresses = json.loads(_first_stdout_line(proc))
    assert set(addresses) == {"ingress", "http"}
    assert _post(f"http://{addresses['http']}/map", [1, 2]) == [[1, "t"], [2, "t"]]
    with Client(addresses["ingress"], window=16) as client:
        first = client.submit(0)
        assert first.result(timeout=30) == [0, "t"]
        accepted = [client.submit(i) for i in range(1, 17)]  # the window: all on the server

        def all_accepted() -> bool:  # outstanding + answered <= accepted, so this proves it
            health = _get(f"http://{addresses['http']}/health")
            return int(health["outstanding"]) + sum(f.done() for f in accepted) >= 16

        wait_for(all_accepted, timeout=30, what="the service to accept 16 items")
        proc.send_signal(signal.SIGTERM)
        read_line_with(proc, "draining")
        refused = client.submit(100)
        with pytest.raises(ClosedError, match="draining"):
            refused.result(timeout=30)
        done, _ = wait(accepted, timeout=60)
        assert [f.result() for f in accepted] == [[i, "t"] for i in range(1, 17)]
        assert len(done) == 16
    assert proc.wait(timeout=60) == 0


def test_serve_bad_config_exits_2(tmp_path: Path, procs: Procs) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"pipeline": {"steps": ["nope"]}, "service": {"ingress": "x"}}))
    proc = procs.cli("serve", str(path))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "nope" in err and "bad address" in err


SERVE_KEY = "serve-test-key-0123456789"


def _half_open(address: str, n: int) -> list[socket.socket]:
    """*n* connections that never say a word (no handshake, no request)."""
    host, _, port = address.rpartition(":")
    return [socket.create_connection((host, int(port)), timeout=T) for _ in range(n)]


def test_a_service_with_a_key_serves_keyed_clients_beside_idle_and_vanishing_ones(
    tmp_path: Path, procs: Procs
) -> None:
    """A real ``pytaskqml serve`` with a key, its ingress, HTTP and control ports each held by
    20 connections that never authenticate: a producer with the key, and GET /health with its
    token, are answered well inside the handshake timeout (a lockout would take it, 5 s).
    Clients that send POST /map and hang up before the reply leave no traceback in the log
    and nothing running for them,
    and the control port answers GET /status (the stages as rows), GET / and
    ``pytaskqml status``."""
    config = _config(
        tmp_path,
        0.001,
        {"ingress": "127.0.0.1:0", "http": "127.0.0.1:0", "control": "localhost:0"},
    )
    env = child_env(PYTASKQML_AUTHKEY=SERVE_KEY)
    proc = procs.cli("serve", str(config), env=env)
    addresses = json.loads(_first_stdout_line(proc))
    assert addresses["http"] != addresses["control"]
    key = SERVE_KEY.encode()
    idle = [s for port in ("ingress", "http", "control") for s in _half_open(addresses[port], 20)]
    try:
        started = time.monotonic()
        with Client(addresses["ingress"], authkey=SERVE_KEY) as client:
            assert client.submit(1).result(timeout=T) == [1, "t"]
        for port in ("http", "control"):
            status, body = _control.request(
                _connection.parse_address(addresses[port]), "GET", "/health", authkey=key
            )
            assert (status, body["role"]) == (200, "service")
        assert time.monotonic() - started < 3.0
    finally:
        for s in idle:
            s.close()

    token = _protocol.control_token(key, "act").encode()
    body = json.dumps(list(range(2000))).encode()
    for _ in range(5):  # each hangs up before its reply is written
        host, _, port = addresses["http"].rpartition(":")
        with socket.create_connection((host, int(port)), timeout=T) as s:
            s.sendall(
                b"POST /map HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + token
                + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                + body
            )
    where = _connection.parse_address(addresses["control"])

    def the_hung_up_maps_were_cancelled() -> bool:
        # Each client is gone long before its 2,000 items (2 s of work each) could run: what
        # had not started is cancelled, and the pipeline goes idle.
        status, doc = _control.request(where, "GET", "/status?history=0", authkey=key)
        assert status == 200
        return bool(doc["counts"]["cancelled"] >= 5 and doc["queued"] == doc["in_flight"] == 0)

    wait_for(the_hung_up_maps_were_cancelled, timeout=60, what="the hung-up maps to stop")
    status, doc = _control.request(where, "GET", "/status", authkey=key)
    assert (status, doc["role"], doc["name"]) == (200, "pipeline", "svc")
    assert [s["name"] for s in doc["stages"]] == ["pause", "tag"]
    assert doc["stages"][1]["host"] == "1 thread"
    assert 1 < doc["counts"]["submitted"] < 1 + 5 * 2000
    assert "throughput" in doc["history"]
    latency = doc["latency"]  # items timed end to end (estimates from a histogram)
    assert 0 < latency["p50"] <= latency["p99"] and latency["max"] > 0
    status, page = _control.request(where, "GET", "/")
    assert status == 200 and "<title>pytaskqml status</title>" in page
    shown = subprocess.run(
        [sys.executable, "-m", "pytaskqml", "status", addresses["control"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("pipeline svc (pid ")
    assert [line.split()[0] for line in lines[lines.index("") + 2 :]] == ["pause", "tag"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
