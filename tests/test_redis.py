"""The Redis Streams queue against a real Redis: coordinators sharing a stream, a coordinator
killed mid-run, a producer restarted, bad entries, AUTH and TLS."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import HERE, child_env, free_port, read_line_with, wait_for
from redisfixtures import redis_url, stream  # noqa: F401 - fixtures
from sample_workers import Faulty, Slow, Square

from pytaskqml import Coordinator, TaskFailed, TaskTimeout
from pytaskqml.redis import RedisQueue

T = 30.0


def _queue(url: str, name: str, **kw: Any) -> RedisQueue:
    return RedisQueue(url, stream=name, **kw)


def test_map_and_submit_through_redis_in_order(redis_url: str, stream: str) -> None:  # noqa: F811
    q = _queue(redis_url, stream)
    with Coordinator(queue=q) as coord:
        coord.add_local(Square(), threads=2)
        with q.client() as producer:
            assert list(producer.map(range(3000))) == [i * i for i in range(3000)]
            assert producer.submit(12).result(T) == 144
            # Chunks of tiny items, as whichever coordinator splits them, come back in order.
            assert list(producer.map(range(5000), chunksize=700)) == [i * i for i in range(5000)]
            stats = producer.statistics()
        assert stats.taken == stats.submitted == 8001
        assert coord.wait_until(lambda s: s.queue is not None and s.queue.holding == 0, T)
        qs = coord.statistics().queue
    assert qs is not None and qs.completed == qs.read > 0 and qs.claimed == qs.dead_lettered == 0
    left = q.status()
    assert left["length"] == 0  # acknowledged entries leave the stream
    assert left["result_streams"] == {stats.name: 0}  # taken results are deleted


@pytest.mark.slow
def test_errors_and_timeouts_come_back_in_their_place(redis_url: str, stream: str) -> None:  # noqa: F811
    q = _queue(redis_url, stream)
    with Coordinator(queue=q) as coord:
        coord.add_local(Faulty(), threads=2)
        with q.client() as producer:
            out = list(producer.map(["a", "boom", "c"] * 50, on_error="return", chunksize=7))
            assert out[0::3] == ["a"] * 50 and out[2::3] == ["c"] * 50
            assert all(
                isinstance(e, TaskFailed) and "cannot process boom" in str(e) for e in out[1::3]
            )
            with pytest.raises(TaskFailed, match="boom"):
                producer.submit("boom").result(T)
            with pytest.raises(TaskFailed, match="boom"):
                list(producer.map(["x", "boom"]))
    with Coordinator(queue=q) as coord:
        coord.add_local(Slow(0.5))
        with q.client() as producer:
            out = list(producer.map(["late"], timeout=0.05))
    assert out == [TaskTimeout(0, 0.05)]


def test_a_malformed_entry_goes_to_the_dead_letter_stream(redis_url: str, stream: str) -> None:  # noqa: F811
    import redis

    q = _queue(redis_url, stream)
    r = redis.Redis.from_url(redis_url)
    bad = [
        {b"x": b"no header"},
        {b"h": b"{not json", b"d": b"1"},
        {b"h": b'{"v":1,"p":"../../etc","s":0,"n":1,"b":0}', b"d": b"1"},
        {b"h": b'{"v":1,"p":"px","s":0,"n":1,"b":1}', b"d": b'{"\\u0000pq":5}', b"0": b"abc"},
        {b"h": b'{"v":1,"p":"px","s":1,"n":2,"b":0}', b"d": b"[1,2,3]"},
        {b"h": b'{"v":1,"p":"px","s":3,"n":1,"b":0}', b"d": b"\xff\xfe"},
        {b"h": b'{"v":2,"p":"px","s":4,"n":1,"b":0}', b"d": b"1"},
    ]
    with Coordinator(queue=q) as coord:
        coord.add_local(Square())
        for fields in bad:
            r.xadd(stream, fields)
        assert coord.wait_until(lambda s: s.queue is not None and s.queue.dead_lettered == 7, T)
        with q.client() as producer:  # still serving
            assert list(producer.map(range(10))) == [i * i for i in range(10)]
    dead = r.xrange(q.dead_stream)
    reasons = [f[b"reason"].decode() for _, f in dead]
    assert len(reasons) == 7
    assert "no header" in reasons[0] and "not JSON" in reasons[1] and "producer" in reasons[2]
    assert "declared 5 bytes" in reasons[3] and "not a list of 2" in reasons[4]
    assert "UTF-8" in reasons[5] or "decode" in reasons[5]
    assert "version" in reasons[6]
    assert all(f[b"by"] for _, f in dead) and r.xlen(stream) == 0
    # An entry whose header names its producer: that producer hears why, instead of waiting.
    told = r.xrange(q.results_key("px"))
    assert [json.loads(f[b"h"])["s"] for _, f in told] == [0, 1, 3]
    assert all(b"DeadLetter" in f[b"d"] for _, f in told)


@pytest.mark.slow
def test_a_producer_restarted_under_its_name_resumes(redis_url: str, stream: str) -> None:  # noqa: F811
    q = _queue(redis_url, stream)
    with Coordinator(queue=q) as coord:
        coord.add_local(Square(), threads=2)
        first = q.client("camera-1")
        it = first.map(range(1000), buffersize=1000, chunksize=9)
        got = list(itertools.islice(it, 400))  # stops part-way through an entry of 9
        assert got == [i * i for i in range(400)]
        first.close()  # with the map still open: its items that were not taken stay expected
        del it
        again = q.client("camera-1")
        try:
            assert again.expected == 600
            assert list(again.resume(timeout=T)) == [i * i for i in range(400, 1000)]
            assert list(again.map([5, 6])) == [25, 36]  # numbering goes on after the old ones
        finally:
            again.close()
        third = q.client("camera-1")
        try:
            assert third.expected == 0 and list(third.resume(timeout=1)) == []
        finally:
            third.close()


@pytest.mark.slow
def test_shutdown_releases_held_entries_to_another_coordinator(redis_url: str, stream: str) -> None:  # noqa: F811
    q = _queue(redis_url, stream, claim_idle=30.0)
    with q.client() as producer:
        futures = [producer.submit(i) for i in range(200)]
        first = Coordinator(queue=q)
        try:
            first.add_local(Slow(0.05))
            assert first.wait_until(lambda s: s.queue is not None and s.queue.holding >= 4, T)
        finally:
            first.shutdown(cancel_futures=True)
        held = first.statistics().queue
        assert held is not None and held.released >= 1
        # Released entries are claimable at once, not after claim_idle (30 s).
        with Coordinator(queue=q) as second:
            second.add_local(Square(), threads=2)
            assert [f.result(T) for f in futures] == [i * i for i in range(200)]
            qs = second.statistics().queue
        assert qs is not None and qs.claimed >= held.released


class _Node:
    """A coordinator process (tests/redis_node.py) whose latest statistics line is kept."""

    def __init__(self, url: str, name: str, claim_idle: float, delay: float = 0.0005) -> None:
        args = [
            url,
            name,
            "sample_workers:Slow",
            "2",
            str(claim_idle),
            json.dumps({"delay": delay}),
        ]
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "redis_node.py"), *args],
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(HERE),
        )
        self.last: dict[str, Any] = {}
        read_line_with(self.proc, "ready", timeout=T)
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.last = json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(T)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(T)
        self._pump_thread.join(T)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.mark.slow
def test_two_coordinators_one_killed_mid_run(redis_url: str, stream: str) -> None:  # noqa: F811
    """2 coordinator processes x 2 workers, 1 producer, 20,000 ordered tasks; one coordinator
    is kill -9'd mid-run: every result arrives once, in order; the survivor claimed the dead
    one's entries."""
    import redis

    n = 20_000
    nodes = [_Node(redis_url, stream, 1.5) for _ in range(2)]
    try:
        q = _queue(redis_url, stream)
        victim, survivor = nodes
        results = []
        killed_holding = 0
        with q.client("producer") as producer:
            for i, value in enumerate(producer.map(range(n), chunksize=1)):
                results.append(value)
                if i == n // 4:
                    wait_for(
                        lambda: victim.last.get("holding", 0) > 0, T, "the victim to hold work"
                    )
                    killed_holding = victim.last["holding"]
                    victim.proc.kill()  # kill -9: its spawned workers follow it
            stats = producer.statistics()
        assert results == [i * 0 + i for i in range(n)]  # Slow echoes: all, once, in order
        assert stats.taken == n
        wait_for(lambda: survivor.last.get("claimed", 0) > 0, T, "the survivor's claim count")
        assert killed_holding > 0 and survivor.last["claimed"] >= 1
        r = redis.Redis.from_url(redis_url)
        consumers = r.xinfo_consumers(stream, q.group)
        assert sum(c["pending"] for c in consumers) == 0  # nothing left pending anywhere
        assert r.xlen(stream) == 0
    finally:
        for node in nodes:
            node.stop()


PRODUCER = """
import sys
from pytaskqml.redis import RedisQueue
q = RedisQueue(sys.argv[1], stream=sys.argv[2])
p = q.client("restartable", commit_interval=0.05)
if sys.argv[3] == "start":
    it = p.map(range(3000), chunksize=5, buffersize=3000)
else:
    it = p.resume(timeout=30)
for value in it:
    print(value, flush=True)
p.close()
"""


@pytest.mark.slow
def test_a_producer_killed_mid_stream_loses_nothing(redis_url: str, stream: str) -> None:  # noqa: F811
    """kill -9 of a producer: the restarted one resumes where the stored cursor says: nothing
    is lost, and only results handed over in the last commit interval come again."""
    q = _queue(redis_url, stream)
    with Coordinator(queue=q) as coord:
        coord.add_local(Slow(0.0005), threads=2)
        seen = []
        with subprocess.Popen(
            [sys.executable, "-c", PRODUCER, redis_url, stream, "start"],
            env=child_env(),
            stdout=subprocess.PIPE,
            text=True,
        ) as start:
            try:
                assert start.stdout is not None
                for line in start.stdout:
                    seen.append(int(line))
                    if len(seen) == 1200:
                        break
            finally:
                start.kill()  # kill -9, mid-stream
        resumed = subprocess.run(
            [sys.executable, "-c", PRODUCER, redis_url, stream, "resume"],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        rest = [int(x) for x in resumed.stdout.split()]
    assert seen == list(range(1200))
    assert rest and rest[0] <= 1200 and rest == list(range(rest[0], 3000))
    assert 1200 - rest[0] < 1200  # only the last commit interval's worth again


@pytest.mark.slow
def test_redis_with_tls_and_a_password(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    """rediss:// to a Redis that requires TLS (verified against our own CA) and AUTH."""
    import shutil

    import redis

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    from test_tls import _issue, _run

    _run(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(tmp_path / "ca.key"),
        "-out",
        str(tmp_path / "ca.pem"),
        "-days",
        "2",
        "-subj",
        "/CN=pytaskqml redis test ca",
    )
    _issue(tmp_path, "ca", "redis", "localhost")
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(tmp_path / "redis.pem"),
            "--tls-key-file",
            str(tmp_path / "redis.key"),
            "--tls-ca-cert-file",
            str(tmp_path / "ca.pem"),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"rediss://:s3cret@127.0.0.1:{port}/0"
        ca = str(tmp_path / "ca.pem")
        wait_for(lambda: _pings(url, ca), 15, "the TLS Redis")
        q = RedisQueue(url, stream="tls", ssl_ca_certs=ca)
        with Coordinator(queue=q) as coord:
            coord.add_local(Square())
            with q.client() as producer:
                assert list(producer.map(range(50))) == [i * i for i in range(50)]
        with pytest.raises(redis.AuthenticationError):
            RedisQueue(f"rediss://:wrong@127.0.0.1:{port}/0", ssl_ca_certs=ca).client()
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            RedisQueue(f"rediss://:s3cret@127.0.0.1:{port}/0").client()  # not our CA
        with pytest.raises(redis.ConnectionError):
            RedisQueue(f"redis://:s3cret@127.0.0.1:{port}/0", socket_timeout=2).client()
    finally:
        server.kill()
        server.wait(10)


def _pings(url: str, ca: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, ssl_ca_certs=ca, socket_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.mark.slow
def test_statistics_and_status_show_the_queue(redis_url: str, stream: str) -> None:  # noqa: F811
    q = _queue(redis_url, stream)
    with q.client() as producer:
        pending = [producer.submit(i) for i in range(5)]
        status = q.status()
        assert status["length"] == 5 and status["group"]["lag"] == 5
        with Coordinator(queue=q) as coord:
            coord.add_local(Square())
            assert [f.result(T) for f in pending] == [0, 1, 4, 9, 16]
            assert coord.wait_until(
                lambda s: (
                    s.queue is not None and s.queue.completed == 5 and s.queue.age is not None
                ),
                T,
            )
            health = coord.statistics().queue
    assert health is not None and health.stream == stream and health.backend == "redis"


@pytest.mark.slow
def test_import_needs_no_redis() -> None:
    code = "import sys; sys.modules['redis'] = None; import pytaskqml; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok"
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from pytaskqml import RedisQueue\n"
        "try:\n    RedisQueue().client()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'pytaskqml[redis]'" in out.stdout


@pytest.mark.slow
def test_the_redis_demo_and_the_queue_commands(redis_url: str, stream: str) -> None:  # noqa: F811
    """make redis-demo (smaller), and pytaskqml queue status on what is left of a queue."""
    from conftest import ROOT

    demo = subprocess.run(
        [sys.executable, "-m", "demo.redisqueue", "--n", "4000", "--url", redis_url],
        cwd=str(ROOT), env=child_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "in submission order, each once" in demo.stdout and "claimed" in demo.stdout
    q = _queue(redis_url, stream)
    with q.client() as producer:
        producer.submit(1)
        out = subprocess.run(
            [sys.executable, "-m", "pytaskqml", "queue", "status", redis_url, "--stream", stream],
            env=child_env(), capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    status = json.loads(out.stdout)
    assert status["length"] == 1 and status["group"]["pending"] == 0 and status["dead_letters"] == 0


@pytest.mark.slow
def test_with_the_default_claim_idle_a_dead_coordinators_work_moves_on_in_seconds(
    redis_url: str,  # noqa: F811
    stream: str,  # noqa: F811
) -> None:
    """kill -9 of the coordinator holding a producer's next items: with the default
    claim_idle the producer waits seconds, not the half-minute it used to."""
    import time

    default = RedisQueue(redis_url).claim_idle
    nodes = [_Node(redis_url, stream, default) for _ in range(2)]
    try:
        victim = nodes[0]
        q = _queue(redis_url, stream)
        n = 4000
        gaps = []
        with q.client("producer") as producer:
            last = time.monotonic()
            for i, value in enumerate(producer.map(range(n), chunksize=1)):
                assert value == i
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                if i == n // 4:
                    wait_for(lambda: victim.last.get("holding", 0) > 0, T, "the victim's work")
                    victim.proc.kill()
                    last = time.monotonic()
        stall = max(gaps[n // 4 + 1 :])
        print(f"longest wait after the kill: {stall:.1f} s (claim_idle {default:g} s)")
        assert stall < default + 5.0 < 15.0, stall
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.slow
def test_a_dead_coordinator_leaves_the_group_once_its_entries_moved(
    redis_url: str,  # noqa: F811
    stream: str,  # noqa: F811
) -> None:
    # 10 ms tasks: about a second of work for the two nodes, so the victim is seen holding
    # some (nodes report every 0.1 s) however the entries are shared out.
    nodes = [_Node(redis_url, stream, 0.3, delay=0.01) for _ in range(2)]
    try:
        victim, survivor = nodes
        q = _queue(redis_url, stream)
        with q.client("producer") as producer:
            futures = [producer.submit(i) for i in range(400)]
            wait_for(lambda: victim.last.get("holding", 0) > 0, T, "the victim's work")
            dead = victim.last["consumer"]
            victim.proc.kill()
            assert [f.result(T) for f in futures] == list(range(400))

        def listed() -> set[str]:
            return {c["name"] for c in q.status()["consumers"]}

        wait_for(lambda: dead not in listed(), T, "the dead consumer to be removed")
        assert survivor.last["consumer"] in listed()  # the live one stays
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.slow
@pytest.mark.parametrize("keyless", [False, True])
def test_queue_serve_control_shutdown_needs_a_token_or_keyless_actions(
    redis_url: str,  # noqa: F811
    stream: str,  # noqa: F811
    keyless: bool,
) -> None:
    """`pytaskqml queue serve --control` without a key: POST /shutdown is refused (403) and
    the coordinator serves on, unless --keyless-actions opens it to loopback clients."""
    import urllib.error
    import urllib.request

    ctl = free_port()
    args = [
        sys.executable, "-m", "pytaskqml", "queue", "serve", redis_url, "--stream", stream,
        "--worker", "sample_workers:Square", "--control", f"127.0.0.1:{ctl}",
    ]  # fmt: skip
    if keyless:
        args.append("--keyless-actions")
    env = child_env()
    env.pop("PYTASKQML_AUTHKEY", None)
    proc = subprocess.Popen(
        args, env=env, cwd=str(HERE), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        read_line_with(proc, "serving", timeout=T)
        request = urllib.request.Request(f"http://127.0.0.1:{ctl}/shutdown", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=T) as reply:
                status = reply.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        if keyless:
            assert status == 202  # accepted: it drains and exits
            assert proc.wait(T) == 0
        else:
            assert status == 403
            with _queue(redis_url, stream).client() as producer:
                assert producer.submit(7).result(T) == 49  # still serving
            assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(T)
        assert proc.stderr is not None
        proc.stderr.close()
