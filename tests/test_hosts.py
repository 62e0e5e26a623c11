"""Workers on other network hosts (Linux network namespaces, see tests/netns.py), dialling in
over mutual TLS: a host cut off mid-stream and rejoining; a host 50 ms away."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import HERE, child_env, read_line_with
from netns import Host, Hosts, hosts, leftovers, processes, unavailable  # noqa: F401 - fixture
from test_tls import _run

from pytaskqml import Coordinator, Statistics
from pytaskqml.wire import tls_server_context

T = 60.0
KEY = "netns-test-key"

pytestmark = pytest.mark.skipif(
    __import__("shutil").which("openssl") is None, reason="needs the openssl CLI"
)


def _pki(d: Path, server_ips: list[str]) -> Path:
    """A throwaway CA, a server certificate for *server_ips*, a client certificate."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _run("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
         "-days", "2", "-subj", "/CN=pytaskqml hosts test ca")  # fmt: skip
    for name, san in (("server", ",".join(f"IP:{ip}" for ip in server_ips)), ("client", "")):
        ext = d / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
        _run("req", "-new", *ec, "-keyout", str(d / f"{name}.key"), "-out",
             str(d / f"{name}.csr"), "-subj", f"/CN={name}")  # fmt: skip
        _run("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
             "-out", str(d / f"{name}.pem"), "-extfile", str(ext))  # fmt: skip
    (d / "key").write_text(KEY)
    return d


def _worker(
    host: Host, pki: Path, connect: str, name: str, delay: float, log: Path
) -> subprocess.Popen[bytes]:
    argv = host.command(
        sys.executable, "-m", "pytaskqml", "worker", "sample_workers:Slow",
        "--kwargs", json.dumps({"delay": delay}), "--connect", connect, "--name", name,
        "--no-control", "--authkey-file", str(pki / "key"), "--tls-ca", str(pki / "ca.pem"),
        "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key"),
        "--heartbeat-timeout", "1", "-v",
    )  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=child_env(), cwd=str(HERE), stdout=out, stderr=out)


def _coordinator(net: Hosts, pki: Path) -> tuple[Coordinator, int]:
    coord = Coordinator(authkey=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.0)
    server = tls_server_context(
        str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem")
    )  # mutual TLS: a worker without a certificate of our CA never gets in
    _, port = coord.listen((net.address, 0), ssl_context=server)
    return coord, port


def _done(s: Statistics, name: str) -> int:
    return sum(w.completed for w in s.workers if w.name == name)


def _attached(s: Statistics, name: str) -> bool:
    return any(w.name == name for w in s.workers)


def _logs(*paths: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in paths)


@pytest.mark.slow
def test_a_host_cut_off_mid_stream_loses_nothing_and_rejoins(
    hosts: Hosts,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, b = hosts.add(), hosts.add()
    pki = _pki(tmp_path, [hosts.address])
    coord, port = _coordinator(hosts, pki)
    where = f"{hosts.address}:{port}"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    results: list[Any] = []
    put = [0]
    stop = threading.Event()
    with processes() as started, coord:
        started += [
            _worker(a, pki, where, "hostA", 0.002, logs[0]),
            _worker(b, pki, where, "hostB", 0.002, logs[1]),
        ]
        assert coord.wait_workers(2, T), _logs(*logs)
        st = coord.stream(buffersize=64)

        def produce() -> None:
            while not stop.is_set():
                st.put(put[0], timeout=T)
                put[0] += 1
            st.close()

        producer = threading.Thread(target=produce, daemon=True)
        consumer = threading.Thread(target=lambda: results.extend(st), daemon=True)
        producer.start()
        consumer.start()
        try:
            assert coord.wait_until(lambda s: _done(s, "hostB") >= 50, T), _logs(*logs)
            b.cut()  # mid-stream: B holds tasks that never come back over this connection
            assert coord.wait_until(
                lambda s: s.workers_lost >= 1 and not _attached(s, "hostB"), 15
            ), "the cut host was not declared lost"
            before = _done(coord.statistics(), "hostA")
            assert coord.wait_until(lambda s: _done(s, "hostA") >= before + 100, T), (
                "the stream stalled while the host was cut off"
            )
            b.rejoin()
            assert coord.wait_until(
                lambda s: _attached(s, "hostB") and _done(s, "hostB") >= 50, T
            ), "the host did not rejoin and take work again\n" + _logs(*logs)
        finally:
            stop.set()
            producer.join(T)
            consumer.join(T)
        s = coord.statistics()
    assert not consumer.is_alive()
    assert results == list(range(put[0]))  # in order, nothing lost, nothing twice
    assert s.retried >= 1 and s.workers_lost >= 1  # B's tasks re-ran on A


@pytest.mark.slow
def test_a_far_host_gets_a_share_proportional_to_its_speed(
    hosts: Hosts,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Host B is 50 ms away and twice as fast as host A: it should do about 2/3 of the work,
    without the ordered stream waiting on it."""
    near, far = hosts.add(), hosts.add()
    pki = _pki(tmp_path, [hosts.address, "127.0.0.1"])
    coord, port = _coordinator(hosts, pki)
    where = f"{hosts.address}:{port}"
    logs = [tmp_path / "near.log", tmp_path / "far.log", tmp_path / "relay.log"]
    with processes() as started, coord:
        why = far.add_latency(50)
        far_connect = where
        if why is not None:
            # No netem in this kernel: the same delay from a relay on the far host, 25 ms each
            # way, so everything between its worker and us takes 50 ms longer there and back.
            relay = subprocess.Popen(
                far.command(sys.executable, str(HERE / "delayrelay.py"), "127.0.0.1", "7390",
                            hosts.address, str(port), "0.025"),
                env=child_env(), stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            started.append(relay)
            read_line_with(relay, "relaying")  # type: ignore[arg-type]
            far_connect = "127.0.0.1:7390"
        started += [
            _worker(near, pki, where, "near", 0.006, logs[0]),
            _worker(far, pki, far_connect, "far", 0.003, logs[1]),
        ]
        assert coord.wait_workers(2, T), _logs(*logs[:2])
        assert list(coord.map(range(200))) == list(range(200))  # warm up: windows adapt
        before = coord.statistics()
        t0 = time.perf_counter()
        n = 1500
        assert list(coord.map(range(n))) == list(range(n))
        elapsed = time.perf_counter() - t0
        after = coord.statistics()
    far_stats = next(w for w in after.workers if w.name == "far")
    assert far_stats.round_trip is not None and far_stats.round_trip >= 0.04
    share = (_done(after, "far") - _done(before, "far")) / n
    assert 0.55 <= share <= 0.8, f"far host's share {share:.2f}, expected about 0.67"
    print(f"far host's share {share:.2f}, {n / elapsed:.0f} tasks/s")  # the figure, not a test


def test_hosts_are_cleaned_up() -> None:
    why = unavailable()
    if why is not None:
        pytest.skip(f"needs network namespaces: {why}")
    h = Hosts()
    try:
        h.add()
        assert leftovers(h.tag)
    finally:
        h.close()
    assert leftovers(h.tag) == []
