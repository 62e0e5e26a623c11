"""The ingress port: producers in other processes submit through pytaskqml.Client, each with
its own ordered results and its own credit; a producer that dies loses only its own work."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import Procs, read_line_with, wait_for
from sample_workers import Echo, Faulty, Pid, Square

from pytaskqml import Client, ClosedError, Coordinator, TaskFailed
from pytaskqml.errors import AuthenticationError, ConnectionLost
from pytaskqml.ingress import server as _ingress
from pytaskqml.wire import protocol as _protocol
from pytaskqml.wire.endpoints import dial_once

T = 20.0
KEY = "ingress-test-key"


class Gate:
    """A task function that blocks on an event and counts what it has received."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.cv = threading.Condition()
        self.received = 0
        self.active = 0
        self.peak = 0

    def __call__(self, x: Any) -> Any:
        with self.cv:
            self.received += 1
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.cv.notify_all()
        assert self.release.wait(T)
        with self.cv:
            self.active -= 1
        return x

    def wait_received(self, n: int) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: self.received >= n, T), self.received


def test_submit_map_and_stream_come_back_in_order() -> None:
    with Coordinator(authkey=KEY) as coord:
        coord.add_local(Square(), 3)
        addr = coord.serve_ingress()
        with Client(addr, authkey=KEY, window=4) as client:
            assert client.submit(7).result(T) == 49
            assert list(client.map(range(50))) == [i * i for i in range(50)]
            assert sorted(client.map(range(20), ordered=False)) == [i * i for i in range(20)]
            stream = client.stream()
            for i in range(10):
                stream.put(i, timeout=T)
            stream.close()
            assert list(stream) == [i * i for i in range(10)]
            stats = client.statistics()
            assert (stats.submitted, stats.completed, stats.outstanding) == (81, 81, 0)
        with pytest.raises(ClosedError):
            client.submit(1)
        wait_for(lambda: coord.ingress_statistics()[0].producers == 0, what="producer gone")
        assert coord.ingress_statistics()[0].returned == 81


def test_arrays_and_bytes_travel_as_raw_buffers_without_a_key_on_loopback() -> None:
    np = pytest.importorskip("numpy")
    with Coordinator() as coord:
        coord.add_local(Echo(), 1)
        with Client(coord.serve_ingress()) as client:
            img = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
            out = client.submit({"img": img, "raw": b"\x00\xff"}).result(T)
    assert np.array_equal(out["img"], img) and out["raw"] == b"\x00\xff"


def test_a_remote_failure_is_that_items_error_in_its_place() -> None:
    with Coordinator(authkey=KEY) as coord:
        coord.add_local(Faulty(), 2)
        addr = coord.serve_ingress()
        with Client(addr, authkey=KEY) as client:
            out = list(client.map([1, "boom", 3], on_error="return"))
            assert out[0] == 1 and out[2] == 3
            assert isinstance(out[1], TaskFailed)
            assert "Traceback" in out[1].remote_traceback
            with pytest.raises(TaskFailed):
                list(client.map([1, "boom"]))
            assert client.submit(5).result(T) == 5  # the connection survives


def test_a_client_sees_connection_lost_when_the_service_goes_away() -> None:
    coord = Coordinator(authkey=KEY)
    coord.add_local(Square(), 1)
    client = Client(coord.serve_ingress(), authkey=KEY)
    try:
        assert client.submit(3).result(T) == 9
        coord.shutdown()
        with pytest.raises(ConnectionLost):
            client.submit(1).result(T)
        with pytest.raises(ConnectionLost):
            client.submit(2)
    finally:
        client.close()
        coord.shutdown()


def test_at_shutdown_accepted_items_are_answered_and_new_ones_refused() -> None:
    gate = Gate()
    coord = Coordinator(authkey=KEY)
    coord.add_local(gate, 1)
    client = Client(coord.serve_ingress(), authkey=KEY, window=8)
    stopper = threading.Thread(target=coord.shutdown)

    def closing() -> bool:
        try:
            coord.stream().close()
        except ClosedError:
            return True
        return False

    try:
        accepted = [client.submit(i) for i in range(3)]
        gate.wait_received(1)  # one runs, two wait in the queue
        wait_for(lambda: coord.statistics().submitted == 3, what="all three accepted")
        stopper.start()
        wait_for(closing, what="the coordinator to begin its shutdown")
        with pytest.raises(ClosedError, match="takes no more work"):
            client.submit(99).result(T)
        gate.release.set()
        assert [f.result(T) for f in accepted] == [0, 1, 2]
        stopper.join(T)
        assert not stopper.is_alive() and gate.received == 3
    finally:
        gate.release.set()
        client.close(wait=False)
        coord.shutdown()


def test_a_producer_without_the_key_runs_nothing() -> None:
    gate = Gate()
    gate.release.set()
    with Coordinator(authkey=KEY) as coord:
        coord.add_local(gate, 1)
        addr = coord.serve_ingress()
        for key in (None, "wrong"):
            with pytest.raises(AuthenticationError):
                Client(addr, authkey=key)
        wait_for(lambda: coord.ingress_statistics()[0].refused == 2, what="two refusals")
        assert coord.statistics().submitted == 0 and gate.received == 0


def test_a_public_bind_without_a_key_is_refused() -> None:
    with Coordinator() as coord, pytest.raises(ValueError, match="without an authkey"):
        coord.serve_ingress(("0.0.0.0", 0))


def test_a_producer_never_has_more_than_its_window_outstanding() -> None:
    gate = Gate()
    with Coordinator(authkey=KEY) as coord:
        coord.add_local(gate, 8)  # room for more than the window
        addr = coord.serve_ingress()
        with Client(addr, authkey=KEY, window=3) as client:
            futures = [client.submit(i) for i in range(3)]
            gate.wait_received(3)
            with pytest.raises(queue.Full):
                client.submit(99, timeout=0.2)
            assert client.statistics().outstanding == 3
            out: list[Any] = []
            t = threading.Thread(target=lambda: out.extend(client.map(range(3, 10))))
            t.start()
            gate.release.set()
            t.join(T)
            assert [f.result(T) for f in futures] + out == list(range(10))
        # Eight threads could have run the map's seven items at once: the window kept it to 3.
        assert gate.received == 10 and gate.peak == 3


def test_the_server_drops_a_producer_that_exceeds_its_window() -> None:
    gate = Gate()
    with Coordinator(authkey=KEY) as coord:
        coord.add_local(gate, 8)
        addr = coord.serve_ingress(max_outstanding=2)
        conn = dial_once(addr, KEY.encode(), max_frame_size=1 << 20, timeout=T)
        try:
            assert conn.recv_within(T).header == {"op": "welcome", "window": 2}
            for seq in range(3):
                conn.send("put", {"seq": seq, "payload": seq})
            with pytest.raises(ConnectionLost):
                conn.recv_within(T)
        finally:
            gate.release.set()
            conn.abort()
        wait_for(lambda: coord.ingress_statistics()[0].dropped_producers == 1, what="dropped")
        assert gate.received <= 2


def test_garbage_and_truncated_frames_do_not_disturb_another_producer() -> None:
    with Coordinator(authkey=KEY) as coord:
        coord.add_local(Square(), 2)
        addr = coord.serve_ingress()
        with Client(addr, authkey=KEY, window=4) as good:
            assert good.submit(2).result(T) == 4
            for junk in (
                b"\x00" * 64,
                b"GET / HTTP/1.1\r\n\r\n",
                _protocol.encode_message("x")[:7],
            ):
                with socket.create_connection(addr, timeout=T) as s:
                    s.sendall(junk)
            after_auth = [
                b"garbage that is not a frame" * 10,
                _protocol.encode_message("put", {"seq": 0, "payload": 1})[:-3],  # truncated
                _protocol.encode_message("nonsense"),
                _protocol.encode_message("put", {"seq": 5, "payload": 1}),  # skips a seq
            ]
            for junk in after_auth:
                conn = dial_once(addr, KEY.encode(), max_frame_size=1 << 20, timeout=T)
                conn.recv_within(T)
                conn.sock.sendall(junk)
                conn.sock.shutdown(socket.SHUT_WR)
                with pytest.raises(ConnectionLost):
                    conn.recv_within(T)
                conn.abort()
            assert list(good.map(range(30))) == [i * i for i in range(30)]
        wait_for(lambda: coord.ingress_statistics()[0].producers == 0, what="all gone")
        stats = coord.ingress_statistics()[0]
        assert stats.dropped_producers == 4 and stats.refused >= 3


PRODUCER = """
import json, sys
from pytaskqml import Client
tag, n, addr = {tag!r}, {n}, ("127.0.0.1", {port})
out = []
with Client(addr, authkey={key!r}, window=8) as client:
    for i, r in enumerate(client.map([[f"{{tag}}:{{j}}", 0.01] for j in range(n)])):
        out.append(r[0])
        if i == 5:
            print("progress", file=sys.stderr, flush=True)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_three_producers_one_killed_two_spawned_workers(procs: Procs) -> None:
    with Coordinator(authkey=KEY, window=2) as coord:  # most of the 3 x 8 items wait queued
        coord.spawn(Pid, processes=2)
        port = coord.serve_ingress()[1]
        runs = {"a": 60, "b": 40, "victim": 400}
        ps = {
            tag: procs.python(PRODUCER.format(key=KEY, tag=tag, n=n, port=port))
            for tag, n in runs.items()
        }
        read_line_with(ps["victim"], "progress")
        ps["victim"].send_signal(signal.SIGKILL)
        for tag in ("a", "b"):
            stdout, stderr = ps[tag].communicate(timeout=60)
            assert ps[tag].returncode == 0, stderr
            assert json.loads(stdout) == [f"{tag}:{j}" for j in range(runs[tag])]
        assert ps["victim"].wait(T) == -signal.SIGKILL
        assert coord.wait_idle(T)  # nothing left queued or running for the victim
        stats = coord.statistics()
        assert stats.cancelled > 0 and stats.submitted < sum(runs.values())
        ingress = coord.ingress_statistics()[0]
        assert ingress.abandoned > 0 and ingress.producers == 0
        bad = procs.python(
            f"from pytaskqml import Client; Client(('127.0.0.1', {port}), authkey='no')"
        )
        _, err = bad.communicate(timeout=T)
        assert bad.returncode != 0 and "AuthenticationError" in err
        assert coord.statistics().submitted == stats.submitted


def _post(
    addr: tuple[str, int], path: str, body: bytes, token: str | None = None
) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://{addr[0]}:{addr[1]}{path}", data=body, method="POST")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=T) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_submit_and_map_with_the_token() -> None:
    with Coordinator(authkey=KEY) as coord:
        coord.add_local(Faulty(), 2)
        addr = coord.serve_control(http_ingress=True)
        token = _protocol.control_token(KEY.encode(), "act")
        read_token = _protocol.control_token(KEY.encode(), "read")
        assert _post(addr, "/submit", b'{"payload": 1}', read_token)[0] == 403  # cannot act
        assert _post(addr, "/submit", b'{"payload": [1, 2]}', token) == (200, {"result": [1, 2]})
        assert _post(addr, "/submit", b'"plain"', token) == (200, {"result": "plain"})
        status, body = _post(addr, "/submit", b'{"payload": "boom"}', token)
        assert status == 500 and body["type"] == "ValueError" and "boom" in body["error"]
        status, out = _post(addr, "/map", json.dumps([1, "boom", {"a": 3}]).encode(), token)
        assert status == 200 and out[0] == 1 and out[2] == {"a": 3}
        assert out[1]["type"] == "ValueError" and "Traceback" in out[1]["traceback"]
        assert _post(addr, "/map", b"[]", token) == (200, [])
        for path in ("/submit", "/map"):
            assert _post(addr, path, b"[1]")[0] == 401
            assert _post(addr, path, b"[1]", "wrong")[0] == 401
            status, body = _post(addr, path, b"{not json", token)
            assert status == 400 and "not JSON" in body["error"]
        status, body = _post(addr, "/map", b'{"a": 1}', token)
        assert status == 400 and "array" in body["error"]
        with socket.create_connection(addr, timeout=T) as s:  # a body over the cap: unread
            s.sendall(b"POST /map HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.1 413")
        assert coord.statistics().submitted == 6  # refused requests ran nothing


def test_a_producer_that_keeps_to_its_window_is_kept_even_when_its_next_item_beats_the_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race that dropped default clients: the producer reads a result and sends its next
    item while the server's write of that result has not yet returned. Here every write waits,
    after its bytes are out, until the server has read the producer's next item: that order,
    forced on each result, must not look like a window overrun."""
    puts = threading.Condition()
    read = [0]
    start = _ingress._Producer.start

    def forced(self: _ingress._Producer) -> None:
        send_json, put = self.conn.send_json, self._put

        def counting_put(header: dict[str, Any]) -> None:
            with puts:
                read[0] += 1
                puts.notify_all()
            put(header)

        def late_send(text: str, bufs: Any = ()) -> None:
            with puts:
                before = read[0]
            send_json(text, bufs)
            if '"op":"result"' in text and before < 200:  # a next item is still to come
                with puts:  # the next item comes once the producer has this result
                    puts.wait_for(lambda: read[0] > before, 0.5)

        self.conn.send_json = late_send  # type: ignore[method-assign]
        self._put = counting_put  # type: ignore[method-assign]
        start(self)

    monkeypatch.setattr(_ingress._Producer, "start", forced)
    with Coordinator() as coord:
        coord.add_local(Echo())
        addr = coord.serve_ingress(max_outstanding=2)
        with Client(addr) as client:
            assert client.window == 2
            assert list(client.map(range(200))) == list(range(200))
        # The server counts a result returned once its write is done, which may be just after
        # the client has read it.
        wait_for(lambda: coord.ingress_statistics()[0].returned == 200, what="200 returned")
        stats = coord.ingress_statistics()[0]
    assert stats.dropped_producers == 0
    assert read[0] == 200


def _default_client_rounds(addr: tuple[str, int], rounds: int, items: int) -> None:
    for r in range(rounds):
        with Client(addr) as client:
            assert client.window == 64
            out = list(client.map(range(items)))
        assert out == list(range(items)), f"round {r}"


def test_the_default_client_on_the_default_server_is_never_dropped() -> None:
    with Coordinator() as coord:
        coord.add_local(Echo())
        coord.add_local(Echo())
        addr = coord.serve_ingress()
        _default_client_rounds(addr, 1, 20_000)
        stats = coord.ingress_statistics()[0]
    assert stats.dropped_producers == 0 and stats.abandoned == 0


@pytest.mark.slow
def test_the_default_client_over_many_items_several_rounds_with_and_without_load() -> None:
    """Each round of 50k items ~5-20 s on a shared 2-core machine; the loaded rounds run beside
    two processes that spin and a second producer."""
    with Coordinator() as coord:
        coord.add_local(Echo())
        coord.add_local(Echo())
        addr = coord.serve_ingress()
        _default_client_rounds(addr, 2, 50_000)
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        other: list[BaseException] = []

        def second_producer() -> None:
            try:
                _default_client_rounds(addr, 1, 25_000)
            except BaseException as exc:
                other.append(exc)

        neighbour = threading.Thread(target=second_producer, daemon=True)
        try:
            neighbour.start()
            _default_client_rounds(addr, 1, 50_000)
            neighbour.join(120)
        finally:
            for p in spinners:
                p.kill()
                p.wait(T)
        assert not neighbour.is_alive() and not other, other
        stats = coord.ingress_statistics()[0]
    assert stats.dropped_producers == 0 and stats.abandoned == 0
    assert stats.returned == 175_000


class Ordered(Gate):
    """A Gate that records the order in which it ran its items."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[Any] = []

    def __call__(self, x: Any) -> Any:
        self.order.append(x)
        return super().__call__(x)


def test_priority_through_the_client_and_the_http_ingress() -> None:
    worker = Ordered()
    with Coordinator(authkey=KEY) as coord:
        coord.add_local(worker, 1)
        addr = coord.serve_ingress()
        control = coord.serve_control(http_ingress=True)
        token = _protocol.control_token(KEY.encode(), "act")
        with Client(addr, authkey=KEY, window=16) as client:
            first = client.submit("low0")
            worker.wait_received(1)  # running, held by the gate
            low = [client.submit(f"low{i}") for i in range(1, 6)]
            # An HTTP item at priority -1 waits for all of them, although it is a source of
            # its own (which alone would put it next).
            reply: list[Any] = []
            http = threading.Thread(
                target=lambda: reply.append(
                    _post(control, "/submit", b'{"payload": "late", "priority": -1}', token)
                )
            )
            http.start()
            wait_for(lambda: coord.statistics().queued == 6, what="six waiting")
            high = client.submit("high", priority=3)  # the same producer, a higher priority
            wait_for(lambda: coord.statistics().queued == 7, what="seven waiting")
            worker.release.set()
            assert high.result(T) == "high" and first.result(T) == "low0"
            assert [f.result(T) for f in low] == [f"low{i}" for i in range(1, 6)]
            http.join(T)
            assert reply == [(200, {"result": "late"})]
            assert worker.order == ["low0", "high"] + [f"low{i}" for i in range(1, 6)] + ["late"]
            with pytest.raises(TypeError):
                client.submit(1, priority="high")  # type: ignore[arg-type]
            # The producer is a source of its own while it is connected.
            names = [s.name for s in coord.statistics().sources]
            assert any(n.startswith("ingress ") for n in names), names
        status, body = _post(control, "/submit", b'{"payload": 1, "priority": "x"}', token)
        assert status == 400 and "priority" in body["error"]
        body_map = json.dumps({"payloads": [1, 2], "priority": 2}).encode()
        assert _post(control, "/map", body_map, token) == (200, [1, 2])


def test_silent_connections_beyond_the_handshake_cap_do_not_lock_out_a_producer() -> None:
    """100 connections that never start the handshake - more than the 64 that may be in it at
    once: each new one displaces the one that has waited longest, so a producer with the key
    is served at once instead of being turned away as busy until they time out (5 s)."""
    with Coordinator(authkey=KEY) as coord:
        coord.add_local(Square(), 1)
        host, port = coord.serve_ingress()
        idle = [socket.create_connection((host, port), timeout=T) for _ in range(100)]
        try:
            # Every one of them seen: 36 past the cap were displaced (or, without displacing,
            # turned away as busy - as the producer would be).
            wait_for(lambda: coord.ingress_statistics()[0].refused >= 36, what="the cap reached")
            started = time.monotonic()
            with Client((host, port), authkey=KEY) as client:
                assert client.submit(9).result(timeout=T) == 81
            assert time.monotonic() - started < 3.0
        finally:
            for s in idle:
                s.close()
        wait_for(
            lambda: coord.ingress_statistics()[0].refused >= 100, what="every silent one counted"
        )


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc/self/fd"
)
def test_worker_kills_under_a_producer_leave_no_descriptor_or_thread_behind() -> None:
    """The soak that held (2M tasks, 20 worker kills), scaled down: a default Client maps
    through the ingress port while a spawned worker is killed with SIGKILL in every round.
    Every round comes back whole and in order, and the coordinator's descriptors and threads
    do not grow with the kills: a descriptor or thread left per kill would be 7 more by the
    end."""
    rounds, n = 8, 3_000
    counts: list[tuple[int, int]] = []
    with Coordinator() as coord:
        coord.spawn(Echo, processes=2)
        assert coord.wait_workers(2, T)
        addr = coord.serve_ingress()
        with Client(addr) as client:
            for _ in range(rounds):
                before = {w.pid for w in coord.workers}
                out = []
                victim = None
                for i, result in enumerate(client.map(range(n))):
                    out.append(result)
                    if i == n // 3:
                        victim = coord.workers[0].pid
                        assert victim is not None
                        os.kill(victim, signal.SIGKILL)
                assert out == list(range(n))

                def replaced(gone: int | None = victim, old: set[Any] = before) -> bool:
                    now = {w.pid for w in coord.workers}
                    return len(now) == 2 and gone not in now and len(now - old) == 1

                wait_for(replaced, T, "the killed worker replaced")
                counts.append((_open_descriptors(), threading.active_count()))
        stats = coord.statistics()
        ingress = coord.ingress_statistics()[0]
    assert stats.workers_lost == rounds and stats.restarts == rounds
    assert ingress.dropped_producers == 0 and ingress.returned == rounds * n
    # After the first round (the producer's connection, the restart machinery) nothing grows.
    # A margin of 2 for a descriptor or thread on its way out when counted.
    fds, threads = counts[0]
    assert max(c[0] for c in counts) <= fds + 2, counts
    assert max(c[1] for c in counts) <= threads + 2, counts
