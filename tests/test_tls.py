"""TLS between coordinator and workers, with a throwaway CA made in the test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Procs, free_port, read_line_with
from sample_workers import Square

from pytaskqml import Client, Coordinator
from pytaskqml.errors import ConnectionLost
from pytaskqml.wire import tls_client_context, tls_server_context

T = 20.0

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _run(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _issue(d: Path, ca: str, name: str, cn: str) -> None:
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _run(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(d / f"{name}.key"),
        "-out",
        str(d / f"{name}.csr"),
        "-subj",
        f"/CN={cn}",
    )
    _run(
        "x509",
        "-req",
        "-in",
        str(d / f"{name}.csr"),
        "-CA",
        str(d / f"{ca}.pem"),
        "-CAkey",
        str(d / f"{ca}.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        str(d / f"{name}.pem"),
        "-extfile",
        str(ext),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue"):
        _run(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(d / f"{ca}.key"),
            "-out",
            str(d / f"{ca}.pem"),
            "-days",
            "2",
            "-subj",
            f"/CN=pytaskqml test {ca}",
        )
    _issue(d, "ca", "server", "localhost")
    _issue(d, "ca", "client", "worker")
    _issue(d, "rogue", "intruder", "intruder")
    return d


def test_dial_in_worker_over_mutual_tls(pki: Path, procs: Procs) -> None:
    server = tls_server_context(
        str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem")
    )
    with Coordinator(authkey=b"shared") as coord:
        _, port = coord.listen(("127.0.0.1", 0), ssl_context=server)
        env_key = pki / "key"
        env_key.write_text("shared")
        worker = procs.cli(
            "worker",
            "sample_workers:Square",
            "--connect",
            f"127.0.0.1:{port}",
            "--no-control",
            "--authkey-file",
            str(env_key),
            "--tls-ca",
            str(pki / "ca.pem"),
            "--tls-cert",
            str(pki / "client.pem"),
            "--tls-key",
            str(pki / "client.key"),
            "-v",
        )
        assert coord.wait_workers(1, T)
        assert worker.poll() is None
        assert list(coord.map(range(20))) == [i * i for i in range(20)]
        # A client whose certificate comes from another CA never gets in.
        intruder = procs.cli(
            "worker",
            "sample_workers:Square",
            "--connect",
            f"127.0.0.1:{port}",
            "--no-control",
            "--authkey-file",
            str(env_key),
            "--tls-ca",
            str(pki / "ca.pem"),
            "--tls-cert",
            str(pki / "intruder.pem"),
            "--tls-key",
            str(pki / "intruder.key"),
        )
        assert coord.wait_until(lambda s: s.rejected_peers >= 1, 15), "the intruder's rejection"
        assert len(coord.workers) == 1
        intruder.kill()


def test_coordinator_connects_to_a_tls_listening_worker(pki: Path, procs: Procs) -> None:
    port = free_port()
    worker = procs.cli(
        "worker",
        "sample_workers:Square",
        "--listen",
        f"127.0.0.1:{port}",
        "--no-control",
        "--tls-cert",
        str(pki / "server.pem"),
        "--tls-key",
        str(pki / "server.key"),
    )
    read_line_with(worker, "listening on")
    with Coordinator() as coord:
        coord.connect(
            ("127.0.0.1", port), ssl_context=tls_client_context(str(pki / "ca.pem")), timeout=T
        )
        assert coord.submit(9).result(T) == 81
    # Without trusting the CA the coordinator refuses the worker's certificate.
    with Coordinator() as coord, pytest.raises(ConnectionLost, match="CERTIFICATE_VERIFY_FAILED"):
        coord.connect(
            ("127.0.0.1", port), ssl_context=tls_client_context(str(pki / "rogue.pem")), timeout=3
        )


@pytest.mark.slow
def test_plain_peer_cannot_talk_to_a_tls_listener(pki: Path) -> None:
    server = tls_server_context(str(pki / "server.pem"), str(pki / "server.key"))
    with Coordinator() as coord:
        _, port = coord.listen(("127.0.0.1", 0), ssl_context=server)
        coord.add_local(Square())
        plain = Coordinator()
        try:
            with pytest.raises(ConnectionLost):
                plain.connect(("127.0.0.1", port), timeout=2)
        finally:
            plain.shutdown()
        assert coord.wait_until(lambda s: s.rejected_peers >= 1, 15), "the plain peer's rejection"
        assert coord.submit(3).result(T) == 9


def test_a_producer_over_tls_to_the_ingress_port(pki: Path) -> None:
    server = tls_server_context(str(pki / "server.pem"), str(pki / "server.key"))
    with Coordinator(authkey="tls-ingress") as coord:
        coord.add_local(Square(), 2)
        addr = coord.serve_ingress(tls=server)
        tls = tls_client_context(str(pki / "ca.pem"))
        with Client(addr, authkey="tls-ingress", tls=tls) as client:
            assert list(client.map(range(5))) == [0, 1, 4, 9, 16]
        with pytest.raises(ConnectionLost):  # a producer without TLS gets nowhere
            Client(addr, authkey="tls-ingress", connect_timeout=3)
