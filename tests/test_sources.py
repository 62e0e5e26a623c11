"""Sources of work through the public API: map() calls and ingress producers take turns (by
weight), map(priority=) goes first, and a keyed submit() honours its priority in the key's own
queue. One worker thread, held by a gate on its first task, so the order in which it runs the
waiting tasks is the scheduler's choice and nothing else."""

from __future__ import annotations

import json
import queue
import threading
import urllib.request
from typing import Any

import pytest

from pytaskqml import Client, Coordinator
from pytaskqml.wire import protocol as _protocol

T = 20.0
KEY = "sources-test-key"


class Ordered:
    """Blocks on its first task until released; records the order it ran its items in."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.cv = threading.Condition()
        self.order: list[Any] = []

    def __call__(self, x: Any) -> Any:
        with self.cv:
            self.order.append(x)
            self.cv.notify_all()
        assert self.release.wait(T)
        return x

    def wait_received(self, n: int) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.order) >= n, T), self.order


def consume(coord: Coordinator, items: list[Any], out: dict[str, list[Any]], **kw: Any) -> None:
    out[str(items[0])] = list(coord.map(items, **kw))


def start_map(coord: Coordinator, items: list[Any], out: dict[str, list[Any]], **kw: Any) -> Any:
    th = threading.Thread(target=consume, args=(coord, items, out), kwargs=kw)
    th.start()
    return th


def test_a_second_map_call_does_not_wait_behind_the_first_ones_backlog() -> None:
    worker = Ordered()
    out: dict[str, list[Any]] = {}
    with Coordinator() as coord:
        coord.add_local(worker, 1)
        flood = [f"a{i}" for i in range(30)]
        th_a = start_map(coord, flood, out)
        worker.wait_received(1)  # a0 runs, held by the gate
        assert coord.wait_until(lambda s: s.queued == 29, T)
        th_b = start_map(coord, ["b0", "b1"], out)
        assert coord.wait_until(lambda s: s.queued == 31, T)
        worker.release.set()
        th_a.join(T)
        th_b.join(T)
        assert out == {"a0": flood, "b0": ["b0", "b1"]}  # each in its own order
        # The two calls take turns: b's items do not wait for a's 29.
        assert worker.order[:5] == ["a0", "b0", "a1", "b1", "a2"]


def test_map_weight_and_priority() -> None:
    worker = Ordered()
    out: dict[str, list[Any]] = {}
    with Coordinator() as coord:
        coord.add_local(worker, 1)
        th_x = start_map(coord, [f"x{i}" for i in range(10)], out)
        worker.wait_received(1)
        assert coord.wait_until(lambda s: s.queued == 9, T)
        th_y = start_map(coord, [f"y{i}" for i in range(10)], out, weight=2)
        assert coord.wait_until(lambda s: s.queued == 19, T)
        th_z = start_map(coord, ["z0", "z1"], out, priority=1)
        assert coord.wait_until(lambda s: s.queued == 21, T)
        worker.release.set()
        for th in (th_x, th_y, th_z):
            th.join(T)
        assert out["z0"] == ["z0", "z1"] and out["y0"] == [f"y{i}" for i in range(10)]
        # The priority-1 map first; then two of y's (weight 2) for one of x's.
        assert worker.order[:3] == ["x0", "z0", "z1"]
        rest = worker.order[3:12]
        assert sum(1 for v in rest if v.startswith("y")) == 6, rest
        names = {s.name: s for s in coord.statistics().sources}
        assert {s.weight for n, s in names.items() if n.startswith("map-")} == {1, 2}


def test_two_client_producers_take_turns() -> None:
    worker = Ordered()
    with Coordinator(authkey=KEY) as coord:
        coord.add_local(worker, 1)
        addr = coord.serve_ingress()
        with Client(addr, authkey=KEY, window=32) as busy, Client(addr, authkey=KEY) as quiet:
            first = busy.submit("busy0")
            worker.wait_received(1)
            backlog = [busy.submit(f"busy{i}") for i in range(1, 20)]
            assert coord.wait_until(lambda s: s.queued == 19, T)
            mine = quiet.submit("quiet0")
            assert coord.wait_until(lambda s: s.queued == 20, T)
            worker.release.set()
            assert mine.result(T) == "quiet0" and first.result(T) == "busy0"
            assert [f.result(T) for f in backlog] == [f"busy{i}" for i in range(1, 20)]
            assert worker.order[:3] == ["busy0", "quiet0", "busy1"]
            ingress = [s for s in coord.statistics().sources if s.name.startswith("ingress ")]
            assert len(ingress) == 2 and sorted(s.processed for s in ingress) == [1, 20]


def test_a_keyed_submit_of_a_higher_priority_goes_first_in_its_keys_queue() -> None:
    worker = Ordered()
    with Coordinator() as coord:
        coord.add_local(worker, 1)
        first = coord.submit("k0", key="cam")
        worker.wait_received(1)
        low = [coord.submit(f"k{i}", key="cam") for i in range(1, 5)]
        urgent = coord.submit("urgent", key="cam", priority=3)
        assert coord.wait_until(lambda s: s.queued == 5, T)
        worker.release.set()
        assert urgent.result(T) == "urgent" and first.result(T) == "k0"
        assert [f.result(T) for f in low] == [f"k{i}" for i in range(1, 5)]
        assert worker.order == ["k0", "urgent", "k1", "k2", "k3", "k4"]


def post(addr: tuple[str, int], path: str, body: Any, token: str) -> Any:
    req = urllib.request.Request(
        f"http://{addr[0]}:{addr[1]}{path}", data=json.dumps(body).encode(), method="POST"
    )
    req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=T) as resp:
        return json.loads(resp.read())


def test_http_requests_are_sources_of_their_own() -> None:
    """A big /map request does not hold up a later /submit: each request takes its turn."""
    worker = Ordered()
    with Coordinator(authkey=KEY) as coord:
        coord.add_local(worker, 1)
        addr = coord.serve_control(http_ingress=True)
        token = _protocol.control_token(KEY.encode(), "act")
        replies: dict[str, Any] = {}

        def call(name: str, path: str, body: Any) -> None:
            replies[name] = post(addr, path, body, token)

        big = [f"m{i}" for i in range(20)]
        th_map = threading.Thread(target=call, args=("map", "/map", {"payloads": big}))
        th_map.start()
        worker.wait_received(1)
        assert coord.wait_until(lambda s: s.queued == 19, T)
        th_one = threading.Thread(target=call, args=("one", "/submit", {"payload": "s0"}))
        th_one.start()
        assert coord.wait_until(lambda s: s.queued == 20, T)
        worker.release.set()
        th_map.join(T)
        th_one.join(T)
        assert replies == {"map": big, "one": {"result": "s0"}}
        assert worker.order[:3] == ["m0", "s0", "m1"]


def test_a_full_stream_holds_back_only_its_own_producer() -> None:
    """A stream with as many items outstanding as its buffersize refuses more (put_nowait
    raises) while another stream on the same coordinator takes items and delivers them; once
    its consumer takes a result, it takes items again."""
    worker = Ordered()
    with Coordinator() as coord:
        coord.add_local(worker, 1)
        full = coord.stream(buffersize=3)
        other = coord.stream(buffersize=3)
        for i in range(3):
            full.put(f"f{i}")
        worker.wait_received(1)
        with pytest.raises(queue.Full):
            full.put_nowait("f3")
        other.put_nowait("o0")  # not held back by the other stream's bound
        worker.release.set()
        other.close()
        assert list(other) == ["o0"]
        results = iter(full)
        assert next(results) == "f0"
        full.put("f3", timeout=T)
        full.close()
        assert list(results) == ["f1", "f2", "f3"]
