"""The HTTP control endpoint of a process, and its client.

Routes: ``GET /health`` (open) and ``POST /shutdown``. With a shared key configured, every
state-changing route requires ``Authorization: Bearer <token>`` where the token is derived
from the key (:func:`~._protocol.control_token`). Bound to 127.0.0.1 unless told otherwise;
binding another address without a key is refused unless explicitly ``insecure``.

Hostile clients get a plain 4xx and change nothing: any method but GET/POST is 405, unknown
paths 404, a missing or wrong token 401, a body over 4 KiB 413. A client that sends a byte a
minute is cut off by the socket timeout, and at most ``max_connections`` are served at once.
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import _connection, _protocol

log = logging.getLogger(__name__)

MAX_BODY = 4096
# A request (headers and body) must arrive within this many seconds in all.
REQUEST_DEADLINE = 5.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    max_connections = 16

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._capacity = threading.BoundedSemaphore(self.max_connections)
        self.rejected = 0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._capacity.acquire(blocking=False):
            self.rejected += 1
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._capacity.release()


class ControlServer:
    def __init__(
        self,
        address: tuple[str, int],
        *,
        health: Callable[[], dict[str, Any]],
        shutdown: Callable[[], None],
        authkey: bytes | None = None,
        insecure: bool = False,
    ) -> None:
        _connection.check_bind(
            address[0],
            authkey,
            insecure=insecure,
            what="serve the control endpoint",
            fix="set a key, or allow it explicitly",
        )
        token = _protocol.control_token(authkey) if authkey else None
        owner = self

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_DEADLINE  # per read; the Deadline below bounds the whole request
            server_version = "pytaskqml"
            sys_version = ""

            def setup(self) -> None:
                super().setup()
                sock = self.connection

                def cut() -> None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

                self._deadline = _connection.Deadline(cut, REQUEST_DEADLINE)
                self._deadline.__enter__()

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    self._deadline.__exit__()

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("control %s: " + format, self.client_address[0], *args)

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True

            def _refuse(self, code: int, why: str) -> None:
                log.warning(
                    "control endpoint refused %s %s from %s: %s",
                    self.command,
                    self.path,
                    self.client_address[0],
                    why,
                )
                self._reply(code, {"error": why})

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._reply(200, health())
                elif self.path == "/shutdown":
                    self._refuse(405, "use POST")
                else:
                    self._refuse(404, "not found")

            def do_POST(self) -> None:
                if self.path != "/shutdown":
                    self._refuse(405 if self.path == "/health" else 404, "not found")
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    self._refuse(400, "bad Content-Length")
                    return
                if length < 0 or length > MAX_BODY:
                    self._refuse(413, "body too large")
                    return
                if length:
                    self.rfile.read(length)
                if token is not None:
                    auth = self.headers.get("Authorization") or ""
                    given = auth[7:] if auth.startswith("Bearer ") else ""
                    if not hmac.compare_digest(given.encode(), token.encode()):
                        self._refuse(401, "missing or wrong token")
                        return
                self._reply(202, {"status": "shutting down"})
                log.info("shutdown requested through the control endpoint")
                owner._requested = True
                shutdown()

            def _not_allowed(self) -> None:
                self._refuse(405, "method not allowed")

            do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

        self._requested = False
        self._server = _Server(address, Handler)
        name = self._server.server_address
        self.address: tuple[str, int] = (str(name[0]), int(name[1]))
        self._thread = threading.Thread(
            target=self._serve, name=f"pytaskqml-control-{self.address[1]}", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{_connection.format_address(self.address)}"

    @property
    def rejected(self) -> int:
        return self._server.rejected

    def _serve(self) -> None:
        try:
            self._server.serve_forever(poll_interval=0.5)
        except BaseException:
            log.exception("control endpoint thread crashed")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def _request(
    address: tuple[str, int], method: str, path: str, *, token: str | None, timeout: float
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    try:
        headers = {"Content-Length": "0"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        raw = resp.read(65536)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"error": raw.decode("utf-8", "replace")}
        return resp.status, body if isinstance(body, dict) else {"body": body}
    finally:
        conn.close()


def request_shutdown(
    address: tuple[str, int], *, authkey: bytes | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, Any]]:
    """POST /shutdown to a control endpoint; returns (HTTP status, JSON body)."""
    token = _protocol.control_token(authkey) if authkey else None
    return _request(address, "POST", "/shutdown", token=token, timeout=timeout)


def get_health(address: tuple[str, int], *, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    return _request(address, "GET", "/health", token=None, timeout=timeout)
