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

from pytaskqml import Coordinator
from pytaskqml._protocol import control_token

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
