"""The HTTP control endpoint of a process, and its client.

A :class:`ControlServer` serves a table of routes: ``GET /health`` (open) and ``POST
/shutdown`` to begin with; other parts add theirs with :meth:`ControlServer.add_route`. A route
marked ``auth`` requires, when a shared key is configured, ``Authorization: Bearer <token>``
where the token is derived from the key (:func:`~._protocol.control_token`). Bound to
127.0.0.1 unless told otherwise; binding another address without a key is refused unless
explicitly ``insecure``.

Hostile clients get a plain 4xx and change nothing: a method a path does not take is 405, an
unknown path 404, a bad ``Content-Length`` 400, a body over the route's limit (4 KiB unless it
says otherwise) 413 - checked before the token, so nothing is read for a refused request - and
a missing or wrong token 401. A whole request must arrive within ``REQUEST_DEADLINE`` seconds
(the route's handler itself is not bounded by it),
and at most ``max_connections`` are served at once.
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import logging
import socket
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import _connection, _protocol

log = logging.getLogger(__name__)

MAX_BODY = 4096
# A request (headers and body) must arrive within this many seconds in all.
REQUEST_DEADLINE = 5.0


@dataclass(frozen=True)
class Request:
    """What a route handler gets: the method, the path without its query, the query's
    parameters (last value of each), the headers, the body and the client's address."""

    method: str
    path: str
    query: dict[str, str]
    headers: Any
    body: bytes
    client: str


@dataclass
class Reply:
    """What a route handler returns. A ``dict`` or ``list`` body is sent as JSON."""

    status: int
    body: bytes | str | dict[str, Any] | list[Any]
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Reply]


@dataclass(frozen=True)
class _Route:
    handler: Handler
    auth: bool
    max_body: int


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
    """A small HTTP server for one process's control routes (see the module's docstring)."""

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
        self.token = _protocol.control_token(authkey) if authkey else None
        self._routes: dict[tuple[str, str], _Route] = {}
        self._requested = False
        self.stopped = threading.Event()  # set by stop(): what serves alongside it ends too
        self.companions: list[threading.Thread] = []  # such threads, joined by stop()

        def stop(request: Request) -> Reply:
            log.info("shutdown requested through the control endpoint")
            self._requested = True
            shutdown()
            return Reply(202, {"status": "shutting down"})

        self.add_route("GET", "/health", lambda request: Reply(200, health()))
        self.add_route("POST", "/shutdown", stop, auth=True)
        self._server = _Server(address, _make_handler(self))
        name = self._server.server_address
        self.address: tuple[str, int] = (str(name[0]), int(name[1]))
        self._thread = threading.Thread(
            target=self._serve, name=f"pytaskqml-control-{self.address[1]}", daemon=True
        )

    def add_route(
        self,
        method: str,
        path: str,
        handler: Handler,
        *,
        auth: bool = False,
        max_body: int = MAX_BODY,
    ) -> None:
        """Serve *handler* for *method* *path*. With *auth* the token is required (when a key
        is set). *max_body* bounds the request body in bytes."""
        self._routes[(method, path)] = _Route(handler, auth, max_body)

    def _route(self, method: str, path: str) -> tuple[_Route | None, int]:
        route = self._routes.get((method, path))
        if route is not None:
            return route, 200
        known = any(p == path for _, p in self._routes)
        return None, 405 if known else 404

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
        self.stopped.set()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        for t in self.companions:
            if t is not threading.current_thread():
                t.join(5.0)


def _make_handler(owner: ControlServer) -> type[BaseHTTPRequestHandler]:
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

        def _send(self, reply: Reply) -> None:
            body = reply.body
            if isinstance(body, dict | list):
                data = json.dumps(body).encode()
            elif isinstance(body, str):
                data = body.encode()
            else:
                data = body
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
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
            self._send(Reply(code, {"error": why}))

        def _handle(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            route, status = owner._route(self.command, url.path)
            if route is None:
                self._refuse(status, "method not allowed" if status == 405 else "not found")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self._refuse(400, "bad Content-Length")
                return
            if length < 0 or length > route.max_body:
                self._refuse(413, "body too large")
                return
            body = self.rfile.read(length) if length else b""
            if route.auth and owner.token is not None:
                auth = self.headers.get("Authorization") or ""
                given = auth[7:] if auth.startswith("Bearer ") else ""
                if not hmac.compare_digest(given.encode(), owner.token.encode()):
                    self._refuse(401, "missing or wrong token")
                    return
            self._deadline.__exit__()  # the request is in: a route may take its time
            request = Request(
                self.command,
                url.path,
                dict(urllib.parse.parse_qsl(url.query)),
                self.headers,
                body,
                str(self.client_address[0]),
            )
            try:
                reply = route.handler(request)
            except Exception:
                log.exception("control route %s %s crashed", self.command, url.path)
                reply = Reply(500, {"error": "internal error"})
            self._send(reply)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

    return Handler


def request(
    address: tuple[str, int],
    method: str,
    path: str,
    *,
    authkey: bytes | None = None,
    body: bytes = b"",
    timeout: float = 5.0,
) -> tuple[int, Any]:
    """Call a control endpoint route; returns (HTTP status, the JSON body decoded, or the
    text when it is not JSON)."""
    token = _protocol.control_token(authkey) if authkey else None
    conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    try:
        headers = {"Content-Length": str(len(body))}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        raw = resp.read(16 * 1024 * 1024)
        try:
            return resp.status, json.loads(raw or b"{}")
        except ValueError:
            return resp.status, raw.decode("utf-8", "replace")
    finally:
        conn.close()


def _as_dict(status: int, body: Any) -> tuple[int, dict[str, Any]]:
    if isinstance(body, dict):
        return status, body
    return status, {"error": body} if isinstance(body, str) else {"body": body}


def request_shutdown(
    address: tuple[str, int], *, authkey: bytes | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, Any]]:
    """POST /shutdown to a control endpoint (with the token derived from *authkey*, if
    given), waiting up to *timeout* seconds; returns (HTTP status, JSON body): 200 when it
    accepts, 401 for a missing or wrong token. ``OSError`` when it cannot be reached in
    time."""
    return _as_dict(*request(address, "POST", "/shutdown", authkey=authkey, timeout=timeout))


def get_health(address: tuple[str, int], *, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """GET /health of a control endpoint at ``(host, port)``, waiting up to *timeout* seconds;
    returns (HTTP status, JSON body). ``OSError`` when it cannot be reached in time."""
    return _as_dict(*request(address, "GET", "/health", timeout=timeout))
