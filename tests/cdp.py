"""A headless Chromium driven over the DevTools protocol, through ``--remote-debugging-pipe``
(JSON messages separated by NUL bytes on file descriptors 3 and 4): no port, no websocket, no
driver binary. Just enough for the tests: open a page, evaluate JavaScript, take a screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

# The machine's network is closed: without these, Chromium's background connections get
# refused (and slow it down); as root it needs --no-sandbox.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-color-profile=srgb",
    "--window-size=1280,900",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


class CDPError(RuntimeError):
    pass


class Browser:
    """One Chromium process with a fresh profile; :meth:`close` (or ``with``) ends it."""

    def __init__(self, executable: str, *, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="pytaskqml-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # The shell puts our pipe ends on 3 and 4, where Chromium expects them (bash: dash
        # takes single-digit descriptors only).
        script = f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w}'
        self.proc = subprocess.Popen(
            [
                shutil.which("bash") or "/bin/bash",
                "-c",
                script,
                executable,
                *FLAGS,
                f"--user-data-dir={self._profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._ids = iter(range(1, 1 << 62))
        self._waiting: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._stderr: list[bytes] = []
        self._reader = threading.Thread(target=self._read, name="test-cdp-reader", daemon=True)
        self._reader.start()
        self._drainer = threading.Thread(
            target=self._drain_stderr, name="test-cdp-stderr", daemon=True
        )
        self._drainer.start()
        self.session: str | None = None

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        waiter = self._waiting.pop(msg["id"], None)
                    if waiter is not None:
                        waiter.put(msg)
        with self._lock:  # the browser is gone: wake everyone still waiting
            for waiter in self._waiting.values():
                waiter.put({"error": {"message": "the browser exited"}})
            self._waiting.clear()

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True):  # type: ignore[no-untyped-def]
        """Call *method*; returns its result or raises :class:`CDPError`."""
        msg: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if session and self.session is not None:
            msg["sessionId"] = self.session
        waiter: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._waiting[msg["id"]] = waiter
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        try:
            reply = waiter.get(timeout=self.timeout)
        except queue.Empty:
            raise CDPError(f"{method}: no answer in {self.timeout} s; {self.log()}") from None
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')}; {self.log()}")
        return reply.get("result", {})

    def log(self) -> str:
        return b"".join(self._stderr[-20:]).decode(errors="replace")

    def open(self, url: str) -> None:
        """Open *url* in a new tab and attach to it (later calls go to that page)."""
        target = self.send("Target.createTarget", {"url": url}, session=False)["targetId"]
        self.session = self.send(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, session=False
        )["sessionId"]
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        self.send("Runtime.enable")

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> bytes:
        """The whole page, 1280 pixels wide and as high as its content, as a PNG."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": 1280, "height": max(200, size["height"]), "scale": 1}
        shot = self.send(
            "Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True}
        )
        data = base64.b64decode(shot["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                self.send("Browser.close", session=False)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.close(self._to_child)
        self._reader.join(timeout=10)
        with contextlib.suppress(OSError):
            os.close(self._from_child)
        self._drainer.join(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
