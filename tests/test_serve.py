"""``pytaskqml serve``: a pipeline as a service, its ingress ports and its drain."""

from __future__ import annotations

import json
import queue
import signal
import threading
import urllib.request
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs, read_line_with, wait_for

from pytaskqml import Client, ClosedError
from pytaskqml._service import Service


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
