"""The live status page in a real headless Chromium (over the DevTools protocol, see
``cdp.py``): it loads, shows the coordinator's workers, and its numbers and charts move while a
stream runs. The screenshot it takes is the README's (``PYTASKQML_SCREENSHOT=path`` keeps a
copy; ``make screenshot`` writes ``docs/status-page.png``)."""

from __future__ import annotations

import os
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cdp import Browser, find_chromium
from sample_workers import Pid

from pytaskqml import Client, Coordinator
from pytaskqml.service.service import Service
from pytaskqml.wire.protocol import control_token

CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium (make test installs it where it can: apt-get install chromium)",
    ),
]
T = 30.0


def wait_page(browser: Browser, expression: str, what: str, timeout: float = T) -> Any:
    """Poll *expression* in the page until it is truthy: the condition lives in the browser,
    which polls the endpoint on its own clock."""
    deadline = time.monotonic() + timeout
    guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
    while time.monotonic() < deadline:
        value = browser.evaluate(guarded)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"page never showed {what}; browser log: {browser.log()}")


def number(browser: Browser, element: str) -> float:
    raw = browser.evaluate(f"document.getElementById({element!r}).dataset.value")
    return float(raw) if raw else 0.0


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_the_page_shows_the_workers_and_its_numbers_move_while_a_stream_runs(
    tmp_path: Path,
) -> None:
    assert CHROMIUM is not None
    stop = threading.Event()
    with Coordinator() as coord:
        coord.spawn(Pid, processes=2)
        coord.add_local(Pid(), threads=1)
        assert coord.wait_workers(3, timeout=T)
        host, port = coord.serve_control()
        stream = coord.stream()

        def produce() -> None:
            i = 0
            while not stop.is_set():
                stream.put([i, 0.004], timeout=T)  # 4 ms of "model" per frame
                i += 1
            stream.close()

        results: list[Any] = []
        producer = threading.Thread(target=produce, name="test-producer")
        consumer = threading.Thread(target=lambda: results.extend(stream), name="test-consumer")
        with Browser(CHROMIUM) as browser:
            browser.open(f"http://{host}:{port}/")
            wait_page(
                browser, "document.querySelectorAll('#workers tbody tr').length === 3", "3 rows"
            )
            shown = browser.evaluate(
                "[...document.querySelectorAll('#workers tbody tr')].map(r => r.dataset.name)"
            )
            assert sorted(shown) == sorted(w.name for w in coord.statistics().workers)
            assert number(browser, "workers-count") == 3
            assert browser.evaluate("document.getElementById('conn').className") == "ok"
            before = number(browser, "completed")
            producer.start()
            consumer.start()
            try:
                # Two later values, each higher than the one before, while the stream runs.
                wait_page(
                    browser,
                    f"+document.getElementById('completed').dataset.value > {before}",
                    "completed items going up",
                )
                first = number(browser, "completed")
                wait_page(
                    browser,
                    f"+document.getElementById('completed').dataset.value > {first}",
                    "completed items going up again",
                )
                assert not stop.is_set()
                wait_page(
                    browser, "+document.getElementById('throughput').dataset.value > 0", "a rate"
                )
                wait_page(
                    browser,
                    "[...document.querySelectorAll('#workers tbody tr td:nth-child(6)')]"
                    ".some(td => td.textContent !== '0')",
                    "a worker's tasks/s",
                )
                # The stream is a source of work: a row with its figures.
                wait_page(
                    browser,
                    "[...document.querySelectorAll('#sources tbody tr td:nth-child(4)')]"
                    ".some(td => td.textContent !== '0')",
                    "a source's processed items",
                )
                # Five samples make four intervals: a line on the throughput chart.
                wait_page(
                    browser,
                    "document.querySelector('#chart-throughput polyline')"
                    ".getAttribute('points').split(' ').length >= 4",
                    "a throughput line",
                )
                wait_page(
                    browser, "!!document.querySelector('#chart-latency polyline')", "latency line"
                )
                shot = browser.screenshot(tmp_path / "status-page.png")
            finally:
                stop.set()
                producer.join(T)
                consumer.join(T)
    assert not producer.is_alive() and not consumer.is_alive()
    assert len(results) > first  # the stream really ran as long as the page watched it
    width, height = png_size(shot)
    assert width == 1280 and height >= 400  # header, tiles, charts and the table
    target = os.environ.get("PYTASKQML_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "status-page.png", target)


def test_with_a_key_the_page_asks_for_the_token_and_works_with_it() -> None:
    assert CHROMIUM is not None
    key = b"s" * 32
    with Coordinator(authkey=key) as coord:
        coord.add_local(Pid(), threads=1)
        host, port = coord.serve_control()
        with Browser(CHROMIUM) as browser:
            browser.open(f"http://{host}:{port}/")
            wait_page(
                browser,
                "document.getElementById('conn').textContent === 'token needed'",
                "the token request",
            )
            assert browser.evaluate("getComputedStyle(document.getElementById('auth')).display")
            assert browser.evaluate("document.querySelectorAll('#workers tbody tr').length") == 0
        with Browser(CHROMIUM) as browser:
            browser.open(f"http://{host}:{port}/#token={control_token(key)}")
            wait_page(
                browser, "document.querySelectorAll('#workers tbody tr').length === 1", "the row"
            )
            # The token leaves the address bar once read.
            assert "token" not in browser.evaluate("location.href")


class _Canned:
    """Serves the status page and a /status document the test sets: the page's charts drawn
    from exactly the numbers the test chooses."""

    def __init__(self) -> None:
        import http.server
        import json

        from pytaskqml.observe.dashboard import _page

        page, policy = _page()
        self.doc: dict[str, Any] = {}
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/status"):
                    body, kind = json.dumps(owner.doc).encode(), "application/json"
                else:
                    body, kind = page, "text/html; charset=utf-8"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Security-Policy", policy)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-canned")
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def set_latency(self, p50: list[float], p99: list[float]) -> None:
        n = len(p99)
        self.doc = {
            "name": "canned", "pid": 1, "uptime": 60, "queued": 0, "in_flight": 0,
            "throughput": 10.0, "workers": [], "start_error": None,
            "latency": {"p50": p50[-1], "p99": p99[-1]},
            "counts": {"completed": 1, "failed": 0, "retried": 0, "restarts": 0},
            "history": {
                "interval": 1.0, "t": [float(i - n + 1) for i in range(n)],
                "throughput": [10.0] * n, "latency_p50": p50, "latency_p99": p99,
                "queued": [0] * n, "in_flight": [0] * n,
            },
        }  # fmt: skip

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(T)


UNITS = {"µs": 1e-6, "ms": 1e-3, "s": 1.0}
# The y axis' labels as drawn (right-aligned texts but "now"), top first, with where their
# ink is relative to the chart's box.
AXIS = """(() => {
  const svg = document.getElementById('chart-latency');
  const box = svg.getBoundingClientRect();
  return [...svg.querySelectorAll('text')]
    .filter(t => t.getAttribute('text-anchor') === 'end' && t.textContent !== 'now')
    .map(t => {
      const r = t.getBoundingClientRect();
      return {text: t.textContent, top: r.top, left: r.left - box.left,
              right: r.right - box.left, width: box.width};
    })
    .sort((a, b) => a.top - b.top);
})()"""


def _seconds(text: str) -> float:
    number, unit = [*text.split(), ""][:2]
    return float(number) * UNITS.get(unit, 1.0)


@pytest.mark.parametrize("window_width", [1280, 700])
def test_the_latency_axis_shows_every_digit_of_what_the_data_reach(window_width: int) -> None:
    """526 ms used to be drawn as "26.0 ms" (the label ran out of the chart on the left);
    each label is now whole, inside the chart, and the top one is at least the highest
    value drawn (and not far above it)."""
    assert CHROMIUM is not None
    canned = _Canned()
    try:
        canned.set_latency([0.001], [0.002])
        with Browser(CHROMIUM) as browser:
            browser.open(canned.url)
            browser.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": window_width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            )
            for p99 in ([0.3, 0.526], [0.2, 0.55], [0.09, 0.1688], [0.0004, 0.0009], [1.2, 2.5]):
                canned.set_latency([v / 2 for v in p99], p99)
                top = max(p99)
                # The page polls each second: wait for the chart of these values (the top
                # label's text, read as seconds, at or above their highest) ...
                labels = wait_page(
                    browser,
                    f"(() => {{ const a = {AXIS}; const t = a.length && a[0].text.split(' ');"
                    f" const v = t && +t[0] * ({{'µs': 1e-6, 'ms': 1e-3, 's': 1}}[t[1]] || 1);"
                    f" return v >= {top} && v <= {top * 1.5} ? a : null; }})()",
                    f"an axis for {p99}",
                )
                # ... whose every label is whole: inside the chart, nothing cut off.
                for label in labels:
                    assert label["left"] >= -0.5 and label["right"] <= label["width"], label
                shown = [_seconds(lb["text"]) for lb in labels]
                assert shown == sorted(shown, reverse=True) and shown[-1] == 0, labels
                assert top <= shown[0] <= top * 1.4, (labels, p99)
    finally:
        canned.close()


def test_a_served_pipeline_shows_its_stages_as_rows_and_their_numbers_move() -> None:
    """``pytaskqml serve``'s control port: the same page, one row per stage, the counts going
    up while a producer sends items through the ingress port."""
    assert CHROMIUM is not None
    doc = {
        "pipeline": {"name": "svc", "steps": ["pause", "tag"]},
        "stages": {
            "pause": {"worker": "pipeline_workers:Pause", "threads": 2, "kwargs": {"delay": 0.002}},
            "tag": {"worker": "pipeline_workers:Tag", "threads": 1, "kwargs": {"tag": "t"}},
        },
        "service": {"ingress": "127.0.0.1:0", "control": "127.0.0.1:0"},
    }
    stop = threading.Event()
    service = Service(doc, authkey=None).start()
    try:
        results: list[Any] = []

        def produce() -> None:
            with Client(service.addresses["ingress"], window=16) as client:
                i = 0
                while not stop.is_set():
                    results.extend(client.map(range(i, i + 50)))
                    i += 50

        producer = threading.Thread(target=produce, name="test-producer")
        with Browser(CHROMIUM) as browser:
            browser.open(f"http://{service.addresses['control']}/")
            wait_page(
                browser, "document.querySelectorAll('#workers tbody tr').length === 2", "2 rows"
            )
            shown = browser.evaluate(
                "[...document.querySelectorAll('#workers tbody tr')].map(r => r.dataset.name)"
            )
            assert shown == ["pause", "tag"]
            assert browser.evaluate("document.getElementById('workers-title').textContent") == (
                "Stages"
            )
            assert browser.evaluate("document.getElementById('workers-col').textContent") == (
                "Stage"
            )
            assert number(browser, "workers-count") == 2
            before = number(browser, "completed")
            producer.start()
            try:
                wait_page(
                    browser,
                    f"+document.getElementById('completed').dataset.value > {before}",
                    "items out going up",
                )
                wait_page(
                    browser, "+document.getElementById('throughput').dataset.value > 0", "a rate"
                )
                wait_page(
                    browser,
                    "[...document.querySelectorAll('#workers tbody tr td:nth-child(7)')]"
                    ".every(td => td.textContent !== '0')",
                    "each stage's completed count",
                )
                # Items timed end to end: the latency tiles and chart, as for a coordinator.
                wait_page(browser, "+document.getElementById('p50').dataset.value > 0", "p50")
                wait_page(
                    browser,
                    "!!document.querySelector('#chart-latency polyline')",
                    "the latency chart's line",
                )
            finally:
                stop.set()
                producer.join(T)
    finally:
        stop.set()
        service.stop()
    assert not producer.is_alive()
    assert results[:3] == [[0, "t"], [1, "t"], [2, "t"]]
