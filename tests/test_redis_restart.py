"""A Redis that restarts without persistence, or stops answering: the producer notices the
entries it lost and submits them again (or fails them, as told), bounded by its
``lost_timeout``; a coordinator creates the group again and goes on. Each test starts a
redis-server of its own on a free port, so it can be restarted."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_for

from pytaskqml import Coordinator, Worker
from pytaskqml.errors import EntryLostError
from pytaskqml.redis import RedisQueue

T = 30.0
SERVER = shutil.which("redis-server")

pytestmark = pytest.mark.skipif(
    SERVER is None, reason="needs redis-server on PATH (apt-get install redis-server)"
)


class RedisServer:
    """A redis-server without persistence on *port*; :meth:`restart` loses everything."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port = port
        self.folder = folder
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert SERVER is not None
        self.proc = subprocess.Popen(
            [SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        def answers() -> bool:
            try:
                return bool(redis.Redis.from_url(self.url, socket_connect_timeout=1).ping())
            except redis.RedisError:
                return False

        wait_for(answers, T, "redis-server to answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # as a crash: nothing saved (nothing would be, without persistence)
            self.proc.wait(T)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    pytest.importorskip("redis", reason="needs redis-py")
    s = RedisServer(free_port(), tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.stop()


class Gated(Worker):
    """Squares, once the test opens the gate."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def process(self, x: int) -> int:
        if not self.gate.wait(T):
            raise TimeoutError("the gate never opened")
        return x * x


def _results(futures: list[Future[Any]]) -> list[Any]:
    return [f.result(T) for f in futures]


def test_entries_a_restarted_redis_lost_are_submitted_again(server: RedisServer) -> None:
    """Some entries are held by the coordinator when Redis restarts empty, the others only
    existed in Redis: every future still gets its result, once, and the coordinator carries
    on with the new server."""
    q = RedisQueue(server.url, stream="restart", claim_idle=1.0)
    gate = threading.Event()
    with Coordinator(queue=q) as coord:
        coord.add_local(Gated(gate), threads=2)
        with q.client("p") as producer:
            futures = [producer.submit(i) for i in range(300)]
            assert coord.wait_until(lambda s: s.queue is not None and s.queue.holding > 0, T)
            server.restart()  # the stream, the group, the cursor and the results are gone
            gate.set()
            assert _results(futures) == [i * i for i in range(300)]
            stats = producer.statistics()
            assert stats.lost > 0 and stats.resubmitted == stats.lost, stats
            # The coordinator reads through a group created again: new work runs too.
            assert list(producer.map(range(50))) == [i * i for i in range(50)]
            assert producer.statistics().outstanding == 0


def test_a_producer_told_to_fail_lost_entries_fails_them(server: RedisServer) -> None:
    q = RedisQueue(server.url, stream="restart")
    with q.client("p", on_lost="fail") as producer:
        futures = [producer.submit(i) for i in range(5)]  # no coordinator: they wait in Redis
        server.restart()
        for f in futures:
            with pytest.raises(EntryLostError, match="Redis lost the task entry"):
                f.result(T)
        assert producer.statistics().lost == 5
        # map() raises it at the item's place.
        caught: list[BaseException] = []

        def consume() -> None:
            try:
                list(producer.map(range(3)))
            except BaseException as exc:
                caught.append(exc)

        t = threading.Thread(target=consume, name="test-map")
        t.start()
        try:
            wait_for(lambda: producer.statistics().submitted == 8, T, "the map's entries")
            server.restart()
        finally:
            t.join(T)
        assert not t.is_alive() and len(caught) == 1 and isinstance(caught[0], EntryLostError)


def test_a_producer_fails_its_items_once_redis_is_gone_past_lost_timeout(
    server: RedisServer,
) -> None:
    q = RedisQueue(server.url, stream="gone", socket_timeout=1.0)
    producer = q.client("p", lost_timeout=1.0)
    try:
        futures = [producer.submit(i) for i in range(3)]
        server.stop()
        began = time.monotonic()
        for f in futures:
            with pytest.raises(EntryLostError, match="did not answer"):
                f.result(T)
        assert time.monotonic() - began < 15.0
    finally:
        server.start()  # so that close() can store the cursor
        producer.close()
