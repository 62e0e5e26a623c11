"""``pytaskqml status`` and ``pytaskqml token`` as a user runs them, against a live
coordinator's control endpoint."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import HERE, Procs, child_env, free_port, read_line_with
from sample_workers import Echo, Pid

from pytaskqml import Coordinator
from pytaskqml.wire.protocol import control_token

T = 30.0


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytaskqml", *args],
        env=env or child_env(),
        cwd=str(HERE),
        capture_output=True,
        text=True,
        timeout=T,
    )


def test_status_prints_every_worker_of_a_coordinator_with_three() -> None:
    with Coordinator() as coord:
        coord.spawn(Pid, processes=2)
        coord.add_local(Echo(), threads=1)
        assert coord.wait_workers(3, timeout=T)
        host, port = coord.serve_control()
        assert len(list(coord.map(range(100)))) == 100
        names = sorted(w.name for w in coord.statistics().workers)
        done = cli("status", f"{host}:{port}")
        as_json = cli("status", f"{host}:{port}", "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("WORKER"))
    rows = lines[header + 1 :]
    assert sorted(r.split()[0] for r in rows) == names
    assert {r.split()[1] for r in rows} == {"spawned", "local"}
    assert "3 workers" in done.stdout and "completed 100" in done.stdout
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert sorted(w["name"] for w in doc["workers"]) == names
    assert doc["counts"]["completed"] == 100 and "history" not in doc


def test_status_watch_refreshes_until_ctrl_c() -> None:
    with Coordinator() as coord:
        coord.add_local(Echo(), threads=1)
        host, port = coord.serve_control()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytaskqml", "status", f"{host}:{port}", "--watch", "0.1"],
            env=child_env(),
            cwd=str(HERE),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            lines: queue.Queue[str] = queue.Queue()
            stdout = proc.stdout
            assert stdout is not None
            threading.Thread(target=lambda: [lines.put(x) for x in stdout], daemon=True).start()

            def submitted() -> int:
                while True:  # the next refresh's count (a missing one times out the test)
                    line = lines.get(timeout=T)
                    if line.startswith("submitted"):
                        return int(line.split()[1].replace(",", ""))

            first = submitted()
            coord.submit(1).result(T)
            later = [submitted()]
            while later[-1] == first:  # refreshes fetched before the submit may still come
                later.append(submitted())
            proc.send_signal(signal.SIGINT)
            assert proc.wait(T) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=T)
    assert later[-1] == first + 1


@pytest.mark.slow
def test_status_with_a_key_needs_it_and_token_prints_it(tmp_path: Path) -> None:
    key = b"a-key-for-the-status-test-000000"
    key_file = tmp_path / "key"
    key_file.write_bytes(key)
    with Coordinator(authkey=key) as coord:
        coord.add_local(Echo(), threads=1)
        host, port = coord.serve_control()
        refused = cli("status", f"{host}:{port}")
        allowed = cli("status", f"{host}:{port}", "--authkey-file", str(key_file))
        from_env = cli("status", f"{host}:{port}", env=child_env(PYTASKQML_AUTHKEY=key.decode()))
    assert refused.returncode == 1 and "needs the control token" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert allowed.returncode == 0 and "local-Echo" in allowed.stdout
    assert from_env.returncode == 0 and "local-Echo" in from_env.stdout
    token = cli("token", "--authkey-file", str(key_file))
    assert token.returncode == 0 and token.stdout.strip() == control_token(key)
    url = cli("token", "--authkey-file", str(key_file), "--url", "127.0.0.1:7100")
    assert url.stdout.strip() == f"http://127.0.0.1:7100/#token={control_token(key)}"
    none = cli("token")
    assert none.returncode == 2 and "no key" in none.stderr


@pytest.mark.slow
def test_status_of_a_cli_worker_and_of_nothing(procs: Procs) -> None:
    port, ctl = free_port(), free_port()
    worker = procs.cli(
        "worker", "sample_workers:Echo", "--listen", f"127.0.0.1:{port}",
        "--control", f"127.0.0.1:{ctl}", "--name", "lone",
    )  # fmt: skip
    read_line_with(worker, "listening on")
    with Coordinator() as coord:
        coord.connect(("127.0.0.1", port), timeout=T)
        assert list(coord.map(range(10), chunksize=1)) == list(range(10))
        done = cli("status", f"127.0.0.1:{ctl}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("worker lone (sample_workers:Echo")
    assert "tasks 10" in done.stdout
    gone = cli("status", f"127.0.0.1:{free_port()}")
    assert gone.returncode == 1 and gone.stderr.startswith("pytaskqml: error: cannot reach")
