"""Security proofs: hostile peers against LIVE ports.

Every attack runs against a real ``pytaskqml worker ... --listen`` process started with a key
file, and against a real :meth:`Coordinator.listen` port, and shows four things: the peer gets
a clear rejection (a ``denied`` frame and/or the connection closed, well before the handshake
deadline), the process stays up, the other workers keep working, and no task ever runs for, or
is sent to, an unauthenticated peer (the worker's ``/health`` ``tasks_done`` does not move; the
attacker never receives anything but ``challenge``/``denied``). Rejections are counted
(``statistics().rejected_peers``) and logged once each.

The tests at the end are regressions for weaknesses this file found and that were fixed:
the handshake and control-request deadlines, concurrent handshakes in a listening worker,
empty buffers, and keys kept out of spawned children's environment.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import hmac
import http.client
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import HERE, child_env, join_threads, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from sample_workers import Echo

from pytaskqml import Coordinator
from pytaskqml.errors import AuthenticationError, ConnectionLost, ProtocolError
from pytaskqml.wire import auth as _auth
from pytaskqml.wire import codec as _codec
from pytaskqml.wire import connection as _connection
from pytaskqml.wire import get_health, request_shutdown
from pytaskqml.wire import protocol as _protocol
from pytaskqml.worker.serve import WorkerServer

T = 20.0
KEY = b"security-test-key-7c1f0e9a5b3d2468"
HOST = "127.0.0.1"
PREFIX = struct.Struct("!2sBBIII")
#: An attack must be refused this fast: an active refusal, not the 5 s handshake deadline.
REFUSED_WITHIN = 4.0
REJECTED = "rejected connection"


# =========================================================================== frame builders


def raw_frame(
    header: bytes,
    buffers: tuple[bytes, ...] = (),
    *,
    version: int = _protocol.PROTOCOL_VERSION,
    flags: int = 0,
    lengths: tuple[int, ...] | None = None,
    body: int | None = None,
    magic: bytes = b"PQ",
) -> bytes:
    """A frame built by hand, so every field can lie."""
    lens = tuple(len(b) for b in buffers) if lengths is None else lengths
    total = sum(len(b) for b in buffers) if body is None else body
    prefix = PREFIX.pack(magic, version, flags, len(header), len(lens), total)
    return prefix + struct.pack(f"!{len(lens)}I", *lens) + header + b"".join(buffers)


def msg(op: str, **fields: Any) -> bytes:
    return _protocol.encode_message(op, fields)


def proof(key: bytes, nonce: bytes, role: str = "client") -> str:
    return _protocol.auth_digest(key, nonce, role).hex()


def auth(proof_hex: str | None, nonce_hex: str | None = None) -> bytes:
    fields: dict[str, Any] = {"nonce": nonce_hex or os.urandom(32).hex()}
    if proof_hex is not None:
        fields["proof"] = proof_hex
    return msg("auth", **fields)


#: What an attacker pipelines after its handshake attempt: a worker greeting and a task.
#: Neither may ever be acted on.
TAIL = msg("hello", name="intruder", pid=1) + msg("run", t=[[1, "intruder task"]])


# =========================================================================== attacker client


@dataclass
class Outcome:
    ops: list[str] = field(default_factory=list)
    closed: bool = False
    elapsed: float = 0.0


def _recv_until_closed(
    sock: socket.socket, dec: _protocol.FrameDecoder, out: Outcome, end: float
) -> None:
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return
        except OSError:  # reset: the peer hung up on unread data
            out.closed = True
            return
        if not chunk:
            out.closed = True
            return
        try:
            out.ops.extend(m.op for m in dec.feed(chunk))
        except ProtocolError:
            out.ops.append("<not a frame>")


def read_message(sock: socket.socket, timeout: float = T) -> _protocol.Message:
    dec = _protocol.FrameDecoder()
    sock.settimeout(timeout)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionLost("closed before a whole frame arrived")
        got = dec.feed(chunk)
        if got:
            return got[0]


def read_frame_bytes(sock: socket.socket, timeout: float = T) -> bytes:
    """Exactly one frame's bytes, read off *sock*."""
    sock.settimeout(timeout)

    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionLost("closed mid-frame")
            buf += chunk
        return buf

    prefix = exactly(PREFIX.size)
    _, _, _, hlen, nbuf, body = PREFIX.unpack(prefix)
    return prefix + exactly(4 * nbuf + hlen + body)


@dataclass(frozen=True)
class Attack:
    name: str
    payload: Callable[[bytes], bytes]  # the server's challenge nonce -> bytes to send
    read_challenge: bool = True
    half_close: bool = False
    denied: bool = False  # the server must answer with a "denied" frame

    def run(self, port: int) -> Outcome:
        out = Outcome()
        with socket.create_connection((HOST, port), timeout=T) as sock:
            dec = _protocol.FrameDecoder()
            nonce = b""
            if self.read_challenge:
                first = read_message(sock)
                out.ops.append(first.op)
                nonce = bytes.fromhex(first.header["nonce"])
            start = time.monotonic()
            with contextlib.suppress(OSError):  # the server may hang up before we finish
                sock.sendall(self.payload(nonce))
                if self.half_close:
                    sock.shutdown(socket.SHUT_WR)
            _recv_until_closed(sock, dec, out, start + REFUSED_WITHIN + 1.0)
            out.elapsed = time.monotonic() - start
        return out


def _deep(depth: int) -> bytes:
    return b'{"op":"auth","x":' + b"[" * depth + b"]" * depth + b"}"


ATTACKS = [
    Attack("wrong-key", lambda n: auth(proof(b"not the key", n)) + TAIL, denied=True),
    Attack("empty-key", lambda n: auth(proof(b"", n)) + TAIL, denied=True),
    Attack("missing-proof", lambda n: auth(None) + TAIL, denied=True),
    Attack("non-hex-proof", lambda n: auth("zz" * 32) + TAIL, denied=True),
    Attack("server-role-proof", lambda n: auth(proof(b"guess", n, "server")) + TAIL, denied=True),
    Attack("task-instead-of-auth", lambda n: TAIL),
    Attack("truncated-auth", lambda n: auth(proof(b"x", n))[:21], half_close=True),
    Attack("truncated-prefix", lambda n: b"PQ\x01\x00\x00", half_close=True),
    Attack(
        "garbage-before-handshake",
        lambda n: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + TAIL,
        read_challenge=False,
    ),
    Attack("wrong-magic", lambda n: raw_frame(b'{"op":"auth"}', magic=b"QP") + TAIL),
    Attack("wrong-version", lambda n: raw_frame(b'{"op":"auth"}', version=9) + TAIL),
    Attack("unknown-flags", lambda n: raw_frame(b'{"op":"auth"}', flags=1) + TAIL),
    # Only the 16-byte prefix is sent: refusing it at once proves nothing was buffered for it.
    Attack("oversize-2GiB-declared", lambda n: PREFIX.pack(b"PQ", 1, 0, 0x7FFFFFFF, 0, 0)),
    Attack("oversize-4GiB-body", lambda n: PREFIX.pack(b"PQ", 1, 0, 13, 0, 0xFFFFFFFF)),
    Attack("just-over-handshake-limit", lambda n: PREFIX.pack(b"PQ", 1, 0, 4081, 0, 0)),
    Attack("too-many-buffers", lambda n: PREFIX.pack(b"PQ", 1, 0, 13, 100_000, 0)),
    Attack("bad-json", lambda n: raw_frame(b'{"op": "auth", "proof": ') + TAIL),
    Attack("json-not-an-object", lambda n: raw_frame(b"[1, 2, 3]") + TAIL),
    Attack("header-not-utf8", lambda n: raw_frame(b'{"op":"\xff\xfe"}') + TAIL),
    Attack("header-too-short", lambda n: raw_frame(b"{") + TAIL),
    Attack(
        "lying-buffer-lengths",
        lambda n: raw_frame(b'{"op":"auth"}', (b"x" * 100,), lengths=(5, 5), body=100) + TAIL,
    ),
    Attack(
        "unclaimed-buffer",
        lambda n: raw_frame(b'{"op":"auth","proof":"00"}', (b"abc",)) + TAIL,
    ),
    Attack(
        "object-array-marker",
        lambda n: raw_frame(b'{"op":"auth","x":{"\\u0000pq":["O",[1]]}}', (b"12345678",)) + TAIL,
    ),
    Attack("deep-nesting", lambda n: raw_frame(_deep(1000)) + TAIL),
]


# =========================================================================== live processes


class LiveWorker:
    """A ``pytaskqml worker`` process whose stderr is collected line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytaskqml", "worker", *args],
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(HERE),
        )
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        self.port = 0
        self.ctl = 0
        try:
            banner = self.wait_line("pytaskqml worker ")
        except BaseException:
            self.close()
            raise
        if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", banner):
            self.port = int(m.group(1))
        if m := re.search(r"control at http://127\.0\.0\.1:(\d+)", banner):
            self.ctl = int(m.group(1))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, needle: str, timeout: float = T) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.lines):
                if needle in line:
                    return line
            if not self._pump.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no line with {needle!r}; the worker said: {self.lines}")

    def count(self, needle: str) -> int:
        return sum(needle in line for line in list(self.lines))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def tasks_done(self) -> int:
        status, body = get_health((HOST, self.ctl), timeout=T)
        assert status == 200, body
        return int(body["tasks_done"])

    def close(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(T)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(T)
        self._pump.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "authkey"
    path.write_bytes(KEY + b"\n")  # the CLI strips the newline
    path.chmod(0o600)
    return path


def start_listening_worker(key_file: Path) -> LiveWorker:
    return LiveWorker(
        "sample_workers:Echo",
        "--listen",
        f"{HOST}:0",
        "--control",
        f"{HOST}:0",
        "--authkey-file",
        str(key_file),
    )


@pytest.fixture(scope="module")
def keyed_worker(key_file: Path) -> Iterator[LiveWorker]:
    w = start_listening_worker(key_file)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def fresh_worker(key_file: Path) -> Iterator[LiveWorker]:
    w = start_listening_worker(key_file)
    try:
        yield w
    finally:
        w.close()


def run_real_tasks(port: int, n: int = 10, *, timeout: float = T) -> None:
    """A real coordinator with the key connects to the worker and gets correct results."""
    with Coordinator(authkey=KEY) as coord:
        coord.connect((HOST, port), timeout=timeout)
        futs = [coord.submit(["real", i]) for i in range(n)]
        assert [f.result(T) for f in futs] == [["real", i] for i in range(n)]


@dataclass
class CoordEnv:
    coord: Coordinator
    port: int
    ctl: int
    real: LiveWorker


@pytest.fixture(scope="module")
def keyed_coordinator(key_file: Path) -> Iterator[CoordEnv]:
    """A coordinator listening with the key, with one real dial-in worker attached."""
    coord = Coordinator(authkey=KEY)
    real = None
    try:
        _, port = coord.listen((HOST, 0))
        _, ctl = coord.serve_control((HOST, 0))
        real = LiveWorker(
            "sample_workers:Echo",
            "--connect",
            f"{HOST}:{port}",
            "--authkey-file",
            str(key_file),
            "--no-control",
            "--name",
            "real-worker",
        )
        assert coord.wait_workers(1, T)
        yield CoordEnv(coord, port, ctl, real)
    finally:
        coord.shutdown(cancel_futures=True)
        if real is not None:
            real.close()


def rejections_logged(caplog: pytest.LogCaptureFixture) -> int:
    return sum(REJECTED in r.getMessage() for r in caplog.records)


def names(coord: Coordinator) -> list[str]:
    return sorted(w.name for w in coord.workers)


def wait_closed(sock: socket.socket, end: float) -> bool:
    """True once the peer has closed *sock* (EOF or reset), False if *end* passes first."""
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


# =========================================================================== the worker port


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_listening_worker_refuses(attack: Attack, keyed_worker: LiveWorker) -> None:
    w = keyed_worker
    assert w.alive
    done_before = w.tasks_done()
    logged_before = w.count(REJECTED)

    out = attack.run(w.port)

    assert out.closed, f"the worker kept the connection open: {out}"
    assert out.elapsed < REFUSED_WITHIN, out
    assert set(out.ops) <= {"challenge", "denied"}, out  # never "hello", never a result
    if attack.denied:
        assert "denied" in out.ops, out
    wait_for(lambda: w.count(REJECTED) == logged_before + 1, T, "the rejection to be logged")
    assert w.alive
    assert w.tasks_done() == done_before  # the pipelined task never ran
    run_real_tasks(w.port)  # the worker still serves a real coordinator
    assert w.tasks_done() == done_before + 10
    assert w.count(REJECTED) == logged_before + 1  # logged exactly once


def record_good_auth_frame(port: int) -> bytes:
    """Run the library's own client handshake through a recording relay; return the bytes of
    the ``auth`` frame it sent. The recorded session is then closed."""
    with socket.create_server((HOST, 0)) as relay:
        relay.settimeout(T)
        errors: list[BaseException] = []

        def client() -> None:
            conn = _connection.Connection(_connection.dial(relay.getsockname()[:2], timeout=T))
            try:
                _auth.client_handshake(conn, KEY, timeout=T)
            except BaseException as exc:
                errors.append(exc)
            finally:
                conn.abort()

        th = threading.Thread(target=client, daemon=True)
        th.start()
        down, _ = relay.accept()
        try:
            with down, socket.create_connection((HOST, port), timeout=T) as up:
                down.sendall(read_frame_bytes(up))  # challenge
                recorded = read_frame_bytes(down)  # hi (the client speaks first), then auth
                if _protocol.FrameDecoder().feed(recorded)[0].op == "hi":
                    up.sendall(recorded)
                    recorded = read_frame_bytes(down)
                up.sendall(recorded)
                down.sendall(read_frame_bytes(up))  # welcome
        finally:
            th.join(T)
    assert not errors, errors
    assert _protocol.FrameDecoder().feed(recorded)[0].op == "auth"
    return recorded


def test_listening_worker_refuses_a_replayed_handshake(keyed_worker: LiveWorker) -> None:
    w = keyed_worker
    recorded = record_good_auth_frame(w.port)
    done_before = w.tasks_done()
    logged_before = w.count(REJECTED)
    out = Attack("replay", lambda n: recorded + TAIL, denied=True).run(w.port)
    assert out.closed and out.elapsed < REFUSED_WITHIN and "denied" in out.ops, out
    assert set(out.ops) <= {"challenge", "denied"}, out
    wait_for(lambda: w.count(REJECTED) == logged_before + 1, T, "the rejection to be logged")
    assert w.tasks_done() == done_before
    run_real_tasks(w.port)


@pytest.mark.slow
def test_listening_worker_survives_a_connection_flood(fresh_worker: LiveWorker) -> None:
    """200 connections at once that never speak: the worker stays up, /health answers, and a
    real coordinator connects and runs tasks once they are gone."""
    w = fresh_worker
    flood: list[socket.socket] = []
    try:
        for _ in range(200):
            s = socket.socket()
            flood.append(s)
            s.setblocking(False)
            s.connect_ex((HOST, w.port))
        time.sleep(1.0)
        assert w.alive
        assert get_health((HOST, w.ctl), timeout=T)[0] == 200
    finally:
        for s in flood:
            s.close()
    # The flood's handshakes end as their sockets close; until they have, a coordinator may be
    # told the worker is busy (and try again). Wait until no rejection has come for a second.
    seen, quiet_since = w.count(REJECTED), time.monotonic()
    while time.monotonic() - quiet_since < 1.0:
        time.sleep(0.05)
        if (now := w.count(REJECTED)) != seen:
            seen, quiet_since = now, time.monotonic()
    assert 1 <= seen <= 200  # at most one line per flood connection
    run_real_tasks(w.port, timeout=T)
    assert w.alive and w.tasks_done() == 10
    assert w.count(REJECTED) == seen  # the coordinator with the key was not refused


def test_listening_worker_is_not_locked_out_by_two_idle_connections(
    fresh_worker: LiveWorker,
) -> None:
    w = fresh_worker
    idle = [socket.create_connection((HOST, w.port), timeout=T) for _ in range(2)]
    try:
        with Coordinator(authkey=KEY) as coord:
            try:
                coord.connect((HOST, w.port), timeout=3.0)
                connected = True
            except ConnectionLost:
                connected = False
            assert connected, "a real coordinator could not connect while 2 peers sat idle"
    finally:
        for s in idle:
            s.close()


def _trickle(port: int, every: float, until: float) -> float | None:
    """Read the challenge, then send a valid-looking frame one byte every *every* seconds.
    Returns when the server hung up (seconds after the first byte), or None if it never did."""
    data = auth("00" * 32)
    with socket.create_connection((HOST, port), timeout=T) as sock:
        read_message(sock)
        start = time.monotonic()
        for b in data:
            try:
                sock.sendall(bytes([b]))
            except OSError:
                return time.monotonic() - start
            if wait_closed(sock, time.monotonic() + every):
                return time.monotonic() - start
            if time.monotonic() - start > until:
                return None
    return None


def test_worker_handshake_deadline_holds_against_a_trickle() -> None:
    server = WorkerServer(Echo(), authkey=KEY, handshake_timeout=0.5)
    listener = _connection.Listener((HOST, 0))
    th = threading.Thread(target=server.run_listen, args=(listener,), daemon=True)
    th.start()
    port = listener.address[1]
    try:
        # Silence is cut at the deadline...
        with socket.create_connection((HOST, port), timeout=T) as sock:
            read_message(sock)
            start = time.monotonic()
            assert wait_closed(sock, start + 3.0)
            assert time.monotonic() - start < 1.0
        # ...and so must a byte every 0.2 s be.
        hung_up = _trickle(port, every=0.2, until=1.5)
        assert hung_up is not None and hung_up < 1.0, f"trickling peer still connected: {hung_up}"
    finally:
        server.request_stop()
        # request_stop() does not wake a thread blocked in accept() (see the idle-shutdown
        # test): one more connection does.
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=T):
            pass
        th.join(T)
        listener.close()


# =========================================================================== the coordinator port


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_coordinator_listener_refuses(
    attack: Attack, keyed_coordinator: CoordEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pytaskqml")
    env = keyed_coordinator
    coord = env.coord
    before = coord.statistics()
    futs = [coord.submit(["during", i]) for i in range(20)]  # real work while under attack

    out = attack.run(env.port)

    assert out.closed, f"the coordinator kept the connection open: {out}"
    assert out.elapsed < REFUSED_WITHIN, out
    assert set(out.ops) <= {"challenge", "denied"}, out  # no task is ever sent to it
    if attack.denied:
        assert "denied" in out.ops, out
    wait_for(
        lambda: coord.statistics().rejected_peers == before.rejected_peers + 1,
        T,
        "the rejection to be counted",
    )
    assert [f.result(T) for f in futs] == [["during", i] for i in range(20)]
    after = coord.statistics()
    assert names(coord) == ["real-worker"]  # the intruder never became a worker
    assert after.workers_lost == before.workers_lost
    assert after.rejected_peers == before.rejected_peers + 1
    # The count moves just before the log line is written: wait for the line too.
    wait_for(lambda: rejections_logged(caplog) >= 1, T, "the log line")
    assert rejections_logged(caplog) == 1  # logged once per peer


def test_coordinator_listener_refuses_a_replayed_handshake(
    keyed_coordinator: CoordEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pytaskqml")
    env = keyed_coordinator
    before = env.coord.statistics().rejected_peers
    recorded = record_good_auth_frame(env.port)
    # The recorded session authenticated, then closed without a hello: that is one rejection.
    assert env.coord.wait_until(lambda s: s.rejected_peers == before + 1, T), "first count"
    out = Attack("replay", lambda n: recorded + TAIL, denied=True).run(env.port)
    assert out.closed and out.elapsed < REFUSED_WITHIN and "denied" in out.ops, out
    assert set(out.ops) <= {"challenge", "denied"}, out
    assert env.coord.wait_until(lambda s: s.rejected_peers == before + 2, T), "replay count"
    assert names(env.coord) == ["real-worker"]
    assert env.coord.submit("still works").result(T) == "still works"
    # The count moves just before the log line is written: wait for the line too.
    wait_for(lambda: rejections_logged(caplog) >= 2, T, "the log line")
    assert rejections_logged(caplog) == 2  # logged once per peer


@pytest.mark.slow
def test_slow_loris_is_dropped_at_the_deadline(
    fresh_worker: LiveWorker, keyed_coordinator: CoordEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """One byte of a frame, then nothing, to the worker and to the coordinator at once: both
    drop the peer at the 5 s handshake deadline. Meanwhile the coordinator keeps working and
    admits another peer; the worker serves a real coordinator afterwards."""
    caplog.set_level(logging.WARNING, logger="pytaskqml")
    w, env = fresh_worker, keyed_coordinator
    before = env.coord.statistics().rejected_peers
    with (
        socket.create_connection((HOST, w.port), timeout=T) as at_worker,
        socket.create_connection((HOST, env.port), timeout=T) as at_coord,
    ):
        assert read_message(at_worker).op == "challenge"
        assert read_message(at_coord).op == "challenge"
        start = time.monotonic()
        at_worker.sendall(b"P")
        at_coord.sendall(b"P")
        # Meanwhile the coordinator's attached worker keeps working...
        assert list(env.coord.map(range(100))) == list(range(100))
        # ...and another peer completes its handshake: the slow one holds up nobody.
        t0 = time.monotonic()
        good = _connection.Connection(_connection.dial((HOST, env.port), timeout=T))
        try:
            _auth.client_handshake(good, KEY, timeout=T)
        finally:
            good.abort()  # closed before its hello: counted as one rejection
        assert time.monotonic() - t0 < 4.0  # well within the slow peer's 5 s deadline
        assert wait_closed(at_coord, start + 7.0), "the coordinator never dropped the peer"
        coord_elapsed = time.monotonic() - start
        assert wait_closed(at_worker, start + 7.0), "the worker never dropped the peer"
        worker_elapsed = time.monotonic() - start
    assert 4.0 <= coord_elapsed <= 7.0, coord_elapsed
    assert 4.0 <= worker_elapsed <= 7.0, worker_elapsed
    assert env.coord.wait_until(lambda s: s.rejected_peers == before + 2, T), "the count"
    assert names(env.coord) == ["real-worker"]
    # The count moves just before the log line is written: wait for the line too.
    wait_for(lambda: rejections_logged(caplog) >= 2, T, "the log line")
    assert rejections_logged(caplog) == 2  # logged once per peer
    w.wait_line(REJECTED)
    assert w.alive and w.tasks_done() == 0
    run_real_tasks(w.port)


@pytest.mark.slow
def test_coordinator_survives_a_connection_flood(
    keyed_coordinator: CoordEnv,
    key_file: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200 silent connections at once: 64 wait in handshake threads, the rest are refused at
    once; all are dropped by the deadline and each is counted and logged once. The attached
    worker keeps working throughout and a new worker joins afterwards. (The deadline is cut to
    2 s here to keep the test short; the slow-loris test above shows the real 5 s.)"""
    monkeypatch.setattr(_connection, "DEFAULT_HANDSHAKE_TIMEOUT", 2.0)
    caplog.set_level(logging.WARNING, logger="pytaskqml")
    env = keyed_coordinator
    coord = env.coord
    before = coord.statistics().rejected_peers
    flood: list[socket.socket] = []
    try:
        start = time.monotonic()
        for _ in range(200):
            flood.append(socket.create_connection((HOST, env.port), timeout=T))
        assert coord.wait_until(lambda s: s.rejected_peers >= before + 200 - 64, T), "refusals"
        assert list(coord.map(range(200))) == list(range(200))
        assert get_health((HOST, env.ctl), timeout=T)[0] == 200
        for s in flood:
            assert wait_closed(s, start + 6.0), "a flood connection was never dropped"
    finally:
        for s in flood:
            s.close()
    assert coord.wait_until(lambda s: s.rejected_peers == before + 200, T), "all 200 counted"
    # The count moves just before the log line is written: wait for the line too.
    wait_for(lambda: rejections_logged(caplog) >= 200, T, "the log line")
    assert rejections_logged(caplog) == 200  # logged once per peer
    assert names(coord) == ["real-worker"]
    second = LiveWorker(
        "sample_workers:Echo",
        "--connect",
        f"{HOST}:{env.port}",
        "--authkey-file",
        str(key_file),
        "--no-control",
        "--name",
        "second-worker",
    )
    try:
        assert coord.wait_until(lambda s: "second-worker" in names(coord), T), (
            "a new worker to join"
        )
        assert list(coord.map(range(50))) == list(range(50))
    finally:
        assert second.close(signal.SIGTERM) == 0
    assert coord.wait_until(lambda s: names(coord) == ["real-worker"], T), (
        "the second worker to leave"
    )
    assert coord.statistics().rejected_peers == before + 200


def authenticated(port: int) -> socket.socket:
    """A raw socket that has passed the handshake with the right key (bytes sent by hand,
    so the test never goes through the library's send path)."""
    sock = socket.create_connection((HOST, port), timeout=T)
    try:
        nonce = bytes.fromhex(read_message(sock).header["nonce"])
        mine = _protocol.new_nonce()
        sock.sendall(auth(proof(KEY, nonce), mine.hex()))
        welcome = read_message(sock)
        assert welcome.op == "welcome", welcome
        assert _protocol.auth_verify(KEY, mine, "server", welcome.header["proof"])
    except BaseException:
        sock.close()
        raise
    return sock


def test_an_empty_bytes_result_does_not_hang_the_worker(fresh_worker: LiveWorker) -> None:
    w = fresh_worker
    text, _ = _codec.encode({"op": "run", "t": [[1, b""]]})
    with authenticated(w.port) as sock:
        dec = _protocol.FrameDecoder()
        done: list[Any] = []

        def wait_done(n: int, timeout: float) -> None:
            end = time.monotonic() + timeout
            while len(done) < n and (left := end - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    return
                if not chunk:
                    return
                done.extend(m.header["r"] for m in dec.feed(chunk) if m.op == "done")

        sock.sendall(raw_frame(text.encode(), (b"",)))
        wait_done(1, T)  # the result goes out whole; the worker spins right after sending it
        assert len(done) == 1, done
        sock.sendall(msg("run", t=[[2, "next task"]]))
        wait_done(2, 3.0)
    assert len(done) == 2, "the worker never answered the task after an empty bytes result"


def test_coordinator_releases_workers_that_left() -> None:
    """Authenticated workers that come and go (one vanishing mid-frame each time) leave
    nothing behind: no handle, no connection, no partial frame buffer."""
    from pytaskqml.engine.remote import RemoteHandle

    earlier = set(threading.enumerate())

    def live_handles() -> int:
        join_threads("pytaskqml-reader-", "pytaskqml-writer-", besides=earlier)
        gc.collect()
        return sum(isinstance(o, RemoteHandle) for o in gc.get_objects())

    with Coordinator(authkey=KEY) as coord:
        _, port = coord.listen((HOST, 0))
        before = live_handles()
        for i in range(10):
            with authenticated(port) as sock:
                sock.sendall(msg("hello", name=f"transient-{i}", pid=1))
                assert coord.wait_until(lambda s: len(s.workers) == 1, T), "the worker to attach"
                # Vanish in the middle of a 1 MiB frame.
                sock.sendall(PREFIX.pack(b"PQ", 1, 0, 13, 0, 1 << 20) + b'{"op":"ping"}')
                sock.sendall(b"x" * ((1 << 20) - 1))
            assert coord.wait_until(lambda s: not s.workers, T), "the worker to be dropped"
        leaked = live_handles() - before
    assert leaked == 0, f"{leaked} handles of departed workers are still referenced"


def test_coordinator_logs_the_address_of_a_peer_refused_for_capacity(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pytaskqml")
    idle: list[socket.socket] = []
    with Coordinator(authkey=KEY) as coord:
        _, port = coord.listen((HOST, 0))
        try:
            for _ in range(70):
                idle.append(socket.create_connection((HOST, port), timeout=T))
            assert coord.wait_until(lambda s: s.rejected_peers >= 6, T), "capacity refusals"
        finally:
            for s in idle:
                s.close()
        assert coord.wait_until(lambda s: s.rejected_peers == 70, T), "all counted"
    capacity = [r.getMessage() for r in caplog.records if "too many connections" in r.getMessage()]
    assert capacity
    assert all("127.0.0.1" in m for m in capacity), capacity[:2]


def test_coordinator_handshake_deadline_holds_against_a_trickle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_connection, "DEFAULT_HANDSHAKE_TIMEOUT", 0.5)
    with Coordinator(authkey=KEY) as coord:
        _, port = coord.listen((HOST, 0))
        hung_up = _trickle(port, every=0.2, until=1.5)
    assert hung_up is not None and hung_up < 1.0, f"trickling peer still connected: {hung_up}"


# =========================================================================== control endpoints


def http_status(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=T)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body or None)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


TOKEN = _protocol.control_token(KEY)
CONTROL_REFUSALS = [
    ("POST", "/shutdown", {"Content-Length": "0"}, b"", 401),
    ("POST", "/shutdown", {"Content-Length": "0", "Authorization": "Bearer " + "0" * 64}, b"", 401),
    (
        "POST",
        "/shutdown",
        {"Content-Length": "0", "Authorization": "Bearer " + _protocol.control_token(b"x")},
        b"",
        401,
    ),
    ("POST", "/shutdown", {"Content-Length": "0", "Authorization": TOKEN}, b"", 401),
    ("POST", "/shutdown", {"Content-Length": "0", "Authorization": f"Basic {TOKEN}"}, b"", 401),
    ("POST", "/shutdown", {"Content-Length": "5000"}, b"", 413),
    ("POST", "/shutdown", {"Content-Length": "99999999999999"}, b"", 413),
    ("POST", "/shutdown", {"Content-Length": "-1"}, b"", 413),
    ("POST", "/shutdown", {"Content-Length": "5000", "Authorization": f"Bearer {TOKEN}"}, b"", 413),
    ("POST", "/shutdown", {"Content-Length": "lots"}, b"", 400),
    ("POST", "/shutdown", {"Content-Length": "4097"}, b"x" * 4097, 413),
    ("GET", "/shutdown", {}, b"", 405),
    ("PUT", "/shutdown", {"Authorization": f"Bearer {TOKEN}"}, b"", 405),
    ("POST", "/admin", {"Content-Length": "0", "Authorization": f"Bearer {TOKEN}"}, b"", 404),
    ("GET", "/../../etc/passwd", {}, b"", 404),
]


def check_control_refusals(port: int, alive: Callable[[], bool]) -> None:
    for method, path, headers, body, code in CONTROL_REFUSALS:
        assert http_status(port, method, path, headers, body) == code, (method, path, headers)
        assert alive()
    status, health = get_health((HOST, port), timeout=T)  # open, no token needed
    assert status == 200 and health["status"] == "ok"


@pytest.mark.slow
def test_worker_control_endpoint_with_a_key(fresh_worker: LiveWorker, key_file: Path) -> None:
    w = fresh_worker
    check_control_refusals(w.ctl, lambda: w.alive)
    w.wait_line("control endpoint refused")
    wait_for(lambda: w.count("control endpoint refused") == len(CONTROL_REFUSALS), T, "logs")
    assert w.alive and w.tasks_done() == 0
    run_real_tasks(w.port)  # unaffected
    cmdline = Path(f"/proc/{w.proc.pid}/cmdline").read_bytes()
    assert KEY not in cmdline and str(key_file).encode() in cmdline

    def shutdown(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytaskqml", "shutdown", f"{HOST}:{w.ctl}", *extra],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=T,
            cwd=str(HERE),
        )

    refused = shutdown()  # no key
    assert refused.returncode == 1 and "401" in refused.stderr, refused
    assert len(refused.stderr.strip().splitlines()) == 1
    assert w.alive
    with Coordinator(authkey=KEY) as coord:
        coord.connect((HOST, w.port), timeout=T)
        assert coord.submit("busy").result(T) == "busy"
        ok = shutdown("--authkey-file", str(key_file))
        assert ok.returncode == 0, ok
        assert w.proc.wait(T) == 0


def test_idle_listening_worker_exits_on_an_authorized_shutdown(
    fresh_worker: LiveWorker, key_file: Path
) -> None:
    w = fresh_worker
    assert request_shutdown((HOST, w.ctl), authkey=KEY, timeout=T)[0] == 202
    try:
        code: int | None = w.proc.wait(3.0)
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, "the worker accepted the shutdown but is still running"


def test_coordinator_control_endpoint_with_a_key() -> None:
    coord = Coordinator(authkey=KEY)
    try:
        coord.add_local(Echo())
        _, port = coord.serve_control((HOST, 0))
        check_control_refusals(port, lambda: not coord.wait_closed(0))
        assert coord.submit("alive").result(T) == "alive"
        assert request_shutdown((HOST, port), authkey=b"wrong")[0] == 401
        assert request_shutdown((HOST, port), authkey=KEY)[0] == 202
        assert coord.wait_closed(T), "the coordinator to stop"
    finally:
        coord.shutdown()


@pytest.mark.slow
def test_control_endpoint_cuts_off_a_trickling_client() -> None:
    with Coordinator(authkey=KEY) as coord:
        _, port = coord.serve_control((HOST, 0))
        request = b"POST /shutdown HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200
        with socket.create_connection((HOST, port), timeout=T) as sock:
            start = time.monotonic()
            cut = None
            for b in request:
                try:
                    sock.sendall(bytes([b]))
                except OSError:
                    cut = time.monotonic() - start
                    break
                if wait_closed(sock, time.monotonic() + 0.5):
                    cut = time.monotonic() - start
                    break
                if time.monotonic() - start > 5.8:
                    break
        assert cut is not None and cut < 5.8, f"trickling client still connected: {cut}"


# =========================================================================== keys and processes


def test_spawned_children_never_see_a_key_on_the_command_line_or_in_the_environment() -> None:
    user_key = b"user-key-d41d8cd98f00b204e980"
    with Coordinator(authkey=user_key) as coord:
        pids = coord.spawn(Echo, processes=1)
        spawn_key = (
            coord._pool.supervisor.spawn_key
        )  # the per-coordinator key the children get on stdin
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            for secret in (user_key, spawn_key, spawn_key.hex().encode()):
                assert secret not in cmdline and secret not in environ
        assert coord.submit("x").result(T) == "x"


def test_spawned_children_do_not_inherit_pytaskqml_authkey(monkeypatch: pytest.MonkeyPatch) -> None:
    env_key = "env-key-6f8db599de986fab7a21"
    monkeypatch.setenv("PYTASKQML_AUTHKEY", env_key)
    with Coordinator() as coord:
        assert coord.authkey == env_key.encode()
        pids = coord.spawn(Echo, processes=1)
        environ = Path(f"/proc/{pids[0]}/environ").read_bytes()
    assert env_key.encode() not in environ


@pytest.mark.parametrize(
    ("args", "needle", "code"),
    [
        (["--listen", "0.0.0.0:0", "--no-control"], "refusing to listen on non-loopback", 2),
        (["--listen", f"{HOST}:0", "--control", "0.0.0.0:0"], "without a key", 1),
    ],
)
def test_cli_refuses_non_loopback_without_a_key(args: list[str], needle: str, code: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytaskqml", "worker", "sample_workers:Echo", *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=T,
        cwd=str(HERE),
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and needle in lines[0], lines


# =========================================================================== handshake properties

_KEYS = st.text(alphabet="abcxyz_", max_size=6)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=8,
)
_OPS = st.sampled_from(["auth", "challenge", "welcome", "denied", "run", "hello", "stop"])


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["raw", "frame", "mutated", "deep"]))
    if kind == "raw":
        return draw(st.binary(max_size=5000))
    if kind == "deep":
        return raw_frame(_deep(draw(st.integers(60, 1500))))
    header: dict[str, Any] = {"op": draw(_OPS | st.text(max_size=6))}
    header.update(draw(st.dictionaries(_KEYS, _JSON, max_size=4)))
    for name in ("proof", "nonce"):
        if draw(st.booleans()):
            header[name] = draw(st.sampled_from([os.urandom(32).hex(), "zz" * 32, 7, None]))
    if draw(st.booleans()):
        header["v"] = draw(st.sampled_from([1, 2, "1"]))
    bufs = tuple(draw(st.lists(st.binary(max_size=16), max_size=3)))
    data = bytearray(raw_frame(json.dumps(header).encode(), bufs))
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 4))):
            how = draw(st.sampled_from(["flip", "truncate", "insert", "inflate"]))
            pos = draw(st.integers(0, max(0, len(data) - 1)))
            if how == "flip" and data:
                data[pos] ^= draw(st.integers(1, 255))
            elif how == "truncate":
                del data[pos:]
            elif how == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
            elif len(data) >= PREFIX.size:
                field_at = draw(st.sampled_from([4, 8, 12]))
                data[field_at : field_at + 4] = struct.pack("!I", draw(st.integers(0, 2**32 - 1)))
    tail = draw(st.sampled_from([b"", TAIL, b"\x00" * 8]))
    return bytes(data) + tail


def _handshake_on_pair(side: str, data: bytes) -> BaseException | None:
    """Feed *data* (then EOF) to one side of a handshake over a socketpair."""
    ours, theirs = socket.socketpair()
    conn = _connection.Connection(ours)
    try:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        run = _auth.server_handshake if side == "server" else _auth.client_handshake
        try:
            run(conn, KEY, timeout=1.0)
        except BaseException as exc:
            return exc
        return None
    finally:
        conn.abort()
        theirs.close()


@settings(max_examples=80, deadline=None)
@given(hostile_bytes())
def test_server_handshake_on_arbitrary_bytes_fails_cleanly(data: bytes) -> None:
    exc = _handshake_on_pair("server", data)
    assert isinstance(exc, AuthenticationError | ConnectionLost), repr(exc)
    # The peer's EOF ends it: the timeout is never what stops it.
    assert "in time" not in str(exc)


@settings(max_examples=60, deadline=None)
@given(hostile_bytes())
def test_client_handshake_on_arbitrary_bytes_fails_cleanly(data: bytes) -> None:
    exc = _handshake_on_pair("client", data)
    assert isinstance(exc, AuthenticationError | ConnectionLost), repr(exc)
    assert "in time" not in str(exc)


@settings(max_examples=60, deadline=None)
@given(
    proof_kind=st.sampled_from(["right", "wrong-key", "empty-key", "server-role", "stale", "junk"]),
    nonce_kind=st.sampled_from(["valid", "short", "non-hex", "number", "missing"]),
    extra=st.dictionaries(_KEYS.filter(lambda k: k not in ("op", "proof", "nonce")), _JSON),
    trailing=st.sampled_from([b"", b"\x00", b"PQ", TAIL]) | st.binary(max_size=32),
)
def test_server_handshake_succeeds_only_with_the_right_proof(
    proof_kind: str, nonce_kind: str, extra: dict[str, Any], trailing: bytes
) -> None:
    ours, theirs = socket.socketpair()
    conn = _connection.Connection(ours)
    result: list[BaseException | None] = []

    def serve() -> None:
        try:
            _auth.server_handshake(conn, KEY, timeout=2.0)
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        nonce = bytes.fromhex(read_message(theirs, timeout=5.0).header["nonce"])
        mine = _protocol.new_nonce()
        proofs = {
            "right": proof(KEY, nonce),
            "wrong-key": proof(b"other", nonce),
            "empty-key": proof(b"", nonce),
            "server-role": proof(KEY, nonce, "server"),
            "stale": proof(KEY, _protocol.new_nonce()),
            "junk": "zz" * 32,
        }
        nonces: dict[str, Any] = {
            "valid": mine.hex(),
            "short": mine.hex()[:10],
            "non-hex": "g" * 64,
            "number": 12345,
        }
        fields = {**extra, "proof": proofs[proof_kind]}
        if nonce_kind != "missing":
            fields["nonce"] = nonces[nonce_kind]
        theirs.sendall(_protocol.encode_message("auth", fields) + trailing)
        theirs.shutdown(socket.SHUT_WR)
        th.join(5.0)
        assert not th.is_alive(), "the server handshake hung"
        outcome = result[0]
        should_pass = proof_kind == "right" and nonce_kind == "valid"
        if outcome is None:
            assert should_pass, "authenticated without the right proof"
            welcome = read_message(theirs, timeout=5.0)
            assert welcome.op == "welcome"
            assert _protocol.auth_verify(KEY, mine, "server", welcome.header["proof"])
        else:
            assert isinstance(outcome, AuthenticationError | ConnectionLost), repr(outcome)
            assert not (should_pass and not trailing), f"refused the right proof: {outcome!r}"
    finally:
        conn.abort()
        th.join(5.0)
        theirs.close()


def test_auth_digest_is_plain_hmac_sha256() -> None:
    """The proof is HMAC-SHA256 over a domain-separated, role-bound nonce: nothing custom."""
    nonce = bytes(range(32))
    expected = hmac.new(KEY, b"pytaskqml-auth-v1|client|" + nonce, hashlib.sha256).hexdigest()
    assert proof(KEY, nonce) == expected
    assert proof(KEY, nonce, "server") != expected
