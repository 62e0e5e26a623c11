"""The HTTP control endpoint of a process, and its client.

A :class:`ControlServer` serves a table of routes: ``GET /health`` and ``POST /shutdown`` to
begin with; other parts add theirs with :meth:`ControlServer.add_route`. Bound to 127.0.0.1
unless told otherwise; binding another address without a key is refused unless explicitly
``insecure``.

Who may call what. Every route has an *access*:

* ``open`` - anyone who can reach the address: ``/health`` and the status page ``/``, which
  carry no data worth protecting.
* ``read`` - ``/status``, ``/metrics``, ``GET /models``: with a key they need a bearer token,
  the *read* token (``control_token(key, "read")``, what ``pytaskqml token`` prints for a
  scraper) or the act token. Without a key they are open, as ``/health`` is.
* ``act`` - every route that is not a ``GET`` (``/shutdown``, ``/models/load``, ``/submit``,
  ...): with a key they need the *act* token (``control_token(key, "act")``); a read token
  gets 403, so a scraper's credential cannot act. Without a key they are refused with 403
  unless the server was started with ``keyless_actions``, and then only for clients on
  loopback (every local user); the start-up log says which.

Hostile clients get a plain 4xx and change nothing: a method a path does not take is 405, an
unknown path 404, a bad ``Content-Length`` 400, a chunked body 411, a body over the route's
limit (4 KiB unless it says otherwise) 413 - checked before the token, so nothing is read for
a refused request - a missing or wrong token 401, and headers over 16 KiB 431.

Under load. One thread reads every connection through a selector, so a connection costs a
thread only once its whole request is in (then its route runs on a thread of its own): a
client that trickles its request (slow-loris) holds nothing but a socket, and ``/health``
keeps answering beside hundreds of them. The request line and headers must arrive within
``header_timeout`` seconds of the connection, the body within ``body_timeout`` of the headers
(408, closed). At most ``max_connections`` are open at once; past that a new connection
displaces the oldest one still sending its request if that one has been at it for
``evict_after`` seconds (1 by default), else it is answered ``503`` with ``Retry-After`` and
closed - never reset without an answer (hence a listen backlog deeper than the limit, and a
short read of what a refused client still sends before its socket is closed). A peer that
hangs up before reading its reply is counted in :attr:`ControlStats.broken_pipes`, not logged
with a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hmac
import http.client
import io
import json
import logging
import math
import selectors
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal

from .connection import check_bind, format_address, is_loopback, open_listener
from .protocol import control_token, json_depth_exceeds

log = logging.getLogger(__name__)

MAX_BODY = 4096
MAX_HEADER = 16 * 1024
# The request line and headers must arrive within this many seconds of the connection...
HEADER_TIMEOUT = 5.0
# ...and the body within this many of the headers.
BODY_TIMEOUT = 10.0
# A reply must be taken by the client within this many seconds.
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 256
# A connection still sending its request after this long may be displaced by a new one.
MIN_AGE_TO_EVICT = 1.0
RETRY_AFTER = 1
# A refused or finished connection is read (and what it sends dropped) this long at most before
# it is closed, so the reply is not destroyed by a reset for unread data.
LINGER = 1.0
# JSON bodies deeper than this are refused with 400.
MAX_JSON_DEPTH = 64

Access = Literal["open", "read", "act"]


@dataclass(frozen=True)
class Request:
    """What a route handler gets: the method, the path without its query, the query's
    parameters (last value of each), the headers, the body and the client's address.
    ``hung_up()`` tells a long handler whether the client has closed its connection since
    (its reply would go nowhere: a handler may stop the work it does for it)."""

    method: str
    path: str
    query: dict[str, str]
    headers: Any
    body: bytes
    client: str
    hung_up: Callable[[], bool] = field(default=lambda: False, repr=False, compare=False)


def _hung_up(sock: socket.socket) -> bool:
    """Whether the client of a request being handled has closed its end. A connection carries
    one request, so what there is to read after it is the client's end (or bytes it should
    not have sent, which are not its end)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | _DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # nothing to read: still there
    except OSError:
        return True  # reset


_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)  # (elsewhere the socket is non-blocking)


@dataclass
class Reply:
    """What a route handler returns. A ``dict`` or ``list`` body is sent as JSON (``NaN``
    and infinities are not JSON: a body holding one is a 500)."""

    status: int
    body: bytes | str | dict[str, Any] | list[Any]
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    # Called once the reply has been written (or the client has gone): what must not race it,
    # such as stopping the process.
    then: Callable[[], None] | None = None


Handler = Callable[[Request], Reply]


@dataclass(frozen=True, slots=True)
class ControlStats:
    """``open`` connections now; ``served`` requests that reached their route; ``refused``
    4xx answers; ``busy`` connections answered 503 at the connection limit; ``evicted``
    slow requests displaced by a new connection; ``timed_out`` requests that missed their
    read deadline; ``broken_pipes`` replies the client hung up on."""

    open: int
    served: int
    refused: int
    busy: int
    evicted: int
    timed_out: int
    broken_pipes: int


@dataclass(frozen=True)
class _Route:
    handler: Handler
    access: Access
    max_body: int


class _Conn:
    """One connection while the selector reads its request."""

    __slots__ = (
        "buf",
        "client",
        "counted",
        "deadline",
        "head",
        "length",
        "lingering",
        "opened",
        "sock",
    )

    def __init__(
        self, sock: socket.socket, client: str, now: float, timeout: float, *, counted: bool = True
    ) -> None:
        self.counted = counted  # in ControlServer._open (else one turned away at the limit)
        self.sock = sock
        self.client = client
        self.opened = now
        self.deadline = now + timeout
        self.buf = bytearray()
        self.head: tuple[str, str, Any, _Route] | None = None  # once the headers are in
        self.length = 0
        self.lingering = False


def encode_json(body: Any) -> bytes:
    """*body* as strict JSON (``ValueError`` for NaN or an infinity, ``TypeError`` for what
    is not JSON)."""
    return json.dumps(body, allow_nan=False).encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a JSON number")
    return value


def parse_json(body: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode a request body as strict JSON: ``ValueError`` with the reason for one that is
    not UTF-8, nests deeper than *max_depth*, holds ``NaN``/``Infinity`` or a number out of a
    double's range, or is not JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the body is not UTF-8") from None
    if json_depth_exceeds(text, max_depth):
        raise ValueError(f"the body nests deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError(f"the body nests deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None


def _route_access(method: str, auth: bool) -> Access:
    # Only a GET merely reads: whatever else a route does, it needs the right to act, so a
    # route added later cannot be left open by mistake.
    if method not in ("GET", "HEAD"):
        return "act"
    return "read" if auth else "open"


def _is_peer_gone(exc: OSError) -> bool:
    return isinstance(exc, BrokenPipeError | ConnectionResetError | TimeoutError) or exc.errno in (
        errno.EPIPE,
        errno.ECONNRESET,
        errno.ENOTCONN,
        errno.ESHUTDOWN,
    )


class ControlServer:
    """A small HTTP server for one process's control routes (see the module's docstring).

    *keyless_actions*: without *authkey*, serve the acting routes to loopback clients anyway
    (any local user may then call them). *max_connections*, *header_timeout*,
    *body_timeout* and *evict_after* bound what clients can hold (see the module's
    docstring)."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        health: Callable[[], dict[str, Any]],
        shutdown: Callable[[], None],
        authkey: bytes | None = None,
        insecure: bool = False,
        keyless_actions: bool = False,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        evict_after: float = MIN_AGE_TO_EVICT,
    ) -> None:
        check_bind(
            address[0],
            authkey,
            insecure=insecure,
            what="serve the control endpoint",
            fix="set a key, or allow it explicitly",
        )
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.token = control_token(authkey, "read") if authkey else None
        self.act_token = control_token(authkey, "act") if authkey else None
        self.keyless_actions = keyless_actions
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.evict_after = evict_after
        self._routes: dict[tuple[str, str], _Route] = {}
        self.stopped = threading.Event()  # set by stop(): what serves alongside it ends too
        self.companions: list[threading.Thread] = []  # such threads, joined by stop()
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("served", "refused", "busy", "evicted", "timed_out", "broken_pipes"), 0
        )
        self._open = 0  # connections read by the selector plus those a route thread holds
        self._reading: dict[socket.socket, _Conn] = {}  # in the order they came: oldest first
        self._turned_away = 0  # answered 503 and lingering (selector thread only)
        self._last_warning = -math.inf

        def stop(request: Request) -> Reply:
            log.info("shutdown requested through the control endpoint")
            return Reply(202, {"status": "shutting down"}, then=shutdown)

        self.add_route("GET", "/health", lambda request: Reply(200, health()))
        self.add_route("POST", "/shutdown", stop)
        # A deep backlog: past a full accept queue the kernel may reset a connection before
        # this server sees it, and a client past the limit is owed a 503, not a reset.
        self._listener = open_listener(address, backlog=max(1024, max_connections))
        self._listener.setblocking(False)
        name = self._listener.getsockname()
        self.address: tuple[str, int] = (str(name[0]), int(name[1]))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stopping = False
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
        access: Access | None = None,
    ) -> None:
        """Serve *handler* for *method* *path*. A ``GET`` is open, or needs the read token
        with *auth*; any other method needs the act token (see the module's docstring);
        *access* says it explicitly. *max_body* bounds the request body in bytes."""
        self._routes[(method, path)] = _Route(
            handler, access or _route_access(method, auth), max_body
        )

    def _route(self, method: str, path: str) -> tuple[_Route | None, int]:
        route = self._routes.get((method, path))
        if route is not None:
            return route, 200
        known = any(p == path for _, p in self._routes)
        return None, 405 if known else 404

    @property
    def url(self) -> str:
        return f"http://{format_address(self.address)}"

    @property
    def rejected(self) -> int:
        """Connections turned away at the connection limit (503)."""
        return self.statistics().busy

    def statistics(self) -> ControlStats:
        with self._lock:
            return ControlStats(open=self._open, **self._counts)

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def start(self) -> None:
        acting = sorted(p for (m, p), r in self._routes.items() if r.access == "act")
        if self.act_token is None and self.keyless_actions:
            log.warning(
                "control endpoint %s has no key and keyless actions on: every local user may "
                "call its acting routes (%s)",
                self.url,
                ", ".join(acting),
            )
        elif self.act_token is None:
            log.info(
                "control endpoint %s has no key: its acting routes (%s) are refused; set a key, "
                "or enable keyless actions to allow them from loopback",
                self.url,
                ", ".join(acting),
            )
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        if not self._thread.is_alive():
            self._close_all()
        for t in self.companions:
            if t is not threading.current_thread():
                t.join(5.0)

    # ------------------------------------------------------------------ the selector thread

    def _serve(self) -> None:
        try:
            while not self._stopping:
                for key, _ in self._selector.select(self._next_timeout()):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        try:
                            self._readable(key.data)
                        except Exception:  # one connection's bug must not end the server
                            log.exception("control endpoint: reading %s failed", key.data.client)
                            self._drop(key.data)
                self._expire(time.monotonic())
        except BaseException:
            log.exception("control endpoint thread crashed")
        finally:
            self._close_all()

    def _close_all(self) -> None:
        for c in list(self._reading.values()):
            self._drop(c)
        with contextlib.suppress(OSError, KeyError, ValueError):
            self._selector.unregister(self._listener)
        self._listener.close()
        for s in (self._wake_r, self._wake_w):
            s.close()
        with contextlib.suppress(OSError, RuntimeError):
            self._selector.close()

    def _next_timeout(self) -> float | None:
        if not self._reading:
            return None
        soonest = min(c.deadline for c in self._reading.values())
        return max(0.0, soonest - time.monotonic())

    def _accept(self) -> None:
        # Several may be waiting: take them all, so a burst is answered in one pass.
        for _ in range(64):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control endpoint: accept failed: %s", exc)
                return
            sock.setblocking(False)
            now = time.monotonic()
            with self._lock:
                full = self._open >= self.max_connections
            if full and not self._evict_one(now):
                self._count("busy")
                self._warn_busy()
                self._send_now(
                    sock, _response(503, {"error": "too many connections"}, retry_after=True)
                )
                # Linger like a refusal, so the request already sent does not reset the 503.
                c = _Conn(sock, str(peer[0]), now, 0.0, counted=False)
                self._turned_away += 1
                self._reading[sock] = c
                self._selector.register(sock, selectors.EVENT_READ, c)
                self._linger(c)
                continue
            with self._lock:
                self._open += 1
            c = _Conn(sock, str(peer[0]), now, self.header_timeout)
            self._reading[sock] = c
            self._selector.register(sock, selectors.EVENT_READ, c)

    def _evict_one(self, now: float) -> bool:
        """Close the oldest connection still sending its request, if it has had time enough:
        a slow client gives way to a new one rather than the other way round."""
        for c in self._reading.values():
            if c.opened > now - self.evict_after:
                return False  # the rest are younger still
            if not c.lingering and c.counted:
                self._count("evicted")
                self._send_now(c.sock, _response(408, {"error": "request too slow"}))
                self._linger(c)
                return True
        return False

    def _warn_busy(self) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 60.0:
            self._last_warning = now
            log.warning(
                "control endpoint %s at its limit of %d connections: turning new ones away "
                "with 503 (counted in its statistics)",
                self.url,
                self.max_connections,
            )

    def _expire(self, now: float) -> None:
        for c in [c for c in self._reading.values() if c.deadline <= now]:
            if c.lingering:
                self._drop(c)
                continue
            self._count("timed_out")
            log.debug("control endpoint: %s too slow to send its request", c.client)
            self._send_now(c.sock, _response(408, {"error": "request too slow"}))
            self._linger(c)

    def _drop(self, c: _Conn) -> None:
        """Forget a connection the selector reads and close it."""
        if self._reading.pop(c.sock, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(c.sock)
        _close(c.sock)
        if not c.counted:
            self._turned_away -= 1
            return
        with self._lock:
            self._open -= 1

    def _send_now(self, sock: socket.socket, data: bytes) -> None:
        """A short reply without waiting: a fresh socket's buffer takes it whole, and a peer
        that does not read it loses it."""
        try:
            sock.send(data)
        except OSError as exc:
            if _is_peer_gone(exc):
                self._count("broken_pipes")

    def _readable(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        if c.lingering:
            return  # what a refused client still sends is dropped
        c.buf += data
        if c.head is None:
            end = c.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(c.buf) > MAX_HEADER:
                    self._refuse(c, 431, "headers too large", "?", "?")
                return
            if end + 4 > MAX_HEADER:
                self._refuse(c, 431, "headers too large", "?", "?")
                return
            head = bytes(c.buf[:end])
            del c.buf[: end + 4]
            if not self._headers_in(c, head):
                return
        if c.head is not None and len(c.buf) >= c.length:
            self._dispatch(c)

    def _headers_in(self, c: _Conn, head: bytes) -> bool:
        """Check the request line and headers; False if the request was refused."""
        line, _, rest = head.partition(b"\r\n")
        parts = line.split(b" ")
        if len(parts) != 3 or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
            self._refuse(c, 400, "bad request line", "?", "?")
            return False
        method = parts[0].decode("latin-1")
        target = parts[1].decode("latin-1")
        if not method.isalpha() or not method.isupper() or not target.startswith("/"):
            self._refuse(c, 400, "bad request line", method[:16], target[:64])
            return False
        try:
            headers = http.client.parse_headers(io.BytesIO(rest + b"\r\n\r\n"))
        except http.client.HTTPException:
            self._refuse(c, 431, "too many headers", method, target)
            return False
        path = urllib.parse.urlsplit(target).path
        route, status = self._route(method, path)
        if route is None:
            why = "method not allowed" if status == 405 else "not found"
            self._refuse(c, status, why, method, target)
            return False
        if headers.get("Transfer-Encoding"):
            self._refuse(c, 411, "send the body with a Content-Length", method, target)
            return False
        lengths = set(headers.get_all("Content-Length") or ["0"])
        try:
            (length,) = (int(v) for v in lengths)
        except ValueError:
            self._refuse(c, 400, "bad Content-Length", method, target)
            return False
        if length < 0 or length > route.max_body:
            self._refuse(c, 413, "body too large", method, target)
            return False
        refusal = self._check_access(route, headers, c.client)
        if refusal is not None:
            self._refuse(c, refusal[0], refusal[1], method, target)
            return False
        c.head = (method, target, headers, route)
        c.length = length
        c.deadline = time.monotonic() + self.body_timeout
        if length > len(c.buf) and "100-continue" in (headers.get("Expect") or "").lower():
            self._send_now(c.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _check_access(self, route: _Route, headers: Any, client: str) -> tuple[int, str] | None:
        if route.access == "open":
            return None
        if self.act_token is None:
            if route.access == "read":
                return None
            if self.keyless_actions and is_loopback(client):
                return None
            return 403, (
                "this endpoint has no key, so its acting routes are off (start it with a key, "
                "or allow keyless actions from loopback)"
            )
        auth = headers.get("Authorization") or ""
        given = (auth[7:] if auth.startswith("Bearer ") else "").encode()
        assert self.token is not None
        if hmac.compare_digest(given, self.act_token.encode()):
            return None
        if hmac.compare_digest(given, self.token.encode()):
            if route.access == "read":
                return None
            return 403, "the read token cannot act: this route needs the act token"
        return 401, "missing or wrong token"

    def _refuse(self, c: _Conn, code: int, why: str, method: str, target: str) -> None:
        self._count("refused")
        log.warning(
            "control endpoint refused %s %s from %s: %s", method, target[:200], c.client, why
        )
        self._send_now(c.sock, _response(code, {"error": why}))
        self._linger(c)

    def _linger(self, c: _Conn) -> None:
        """After a refusal: half-close and read what the client still sends before closing,
        since closing with unread data would reset the connection and could destroy the reply
        on its way. A lingering connection no longer counts against max_connections; past as
        many lingering at once, it is closed at once."""
        if c.counted:
            c.counted = False
            self._turned_away += 1
            with self._lock:
                self._open -= 1
        if self._turned_away > self.max_connections:
            self._drop(c)
            return
        with contextlib.suppress(OSError):
            c.sock.shutdown(socket.SHUT_WR)
        c.lingering = True
        c.deadline = time.monotonic() + LINGER

    def _dispatch(self, c: _Conn) -> None:
        assert c.head is not None
        method, target, headers, route = c.head
        body = bytes(c.buf[: c.length])
        self._reading.pop(c.sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(c.sock)
        url = urllib.parse.urlsplit(target)
        request = Request(
            method,
            url.path,
            dict(urllib.parse.parse_qsl(url.query)),
            headers,
            body,
            c.client,
            functools.partial(_hung_up, c.sock),
        )
        self._count("served")
        try:
            threading.Thread(
                target=self._run,
                args=(c.sock, route, request),
                name=f"pytaskqml-control-{self.address[1]}-request",
                daemon=True,
            ).start()
        except RuntimeError:  # no thread to be had: the client may try again
            self._send_now(c.sock, _response(503, {"error": "busy"}, retry_after=True))
            _close(c.sock)
            with self._lock:
                self._open -= 1

    # ------------------------------------------------------------------ a route's thread

    def _run(self, sock: socket.socket, route: _Route, request: Request) -> None:
        reply = None
        try:
            try:
                reply = route.handler(request)
            except Exception:
                log.exception("control route %s %s crashed", request.method, request.path)
                reply = Reply(500, {"error": "internal error"})
            data = _encode_reply(reply, head_only=request.method == "HEAD")
            sock.setblocking(True)
            sock.settimeout(WRITE_TIMEOUT)
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                if reply.then is not None:
                    then, reply.then = reply.then, None
                    then()
                # Wait (briefly) for the client to close first, so the reply is not reset.
                sock.settimeout(LINGER)
                until = time.monotonic() + LINGER
                while sock.recv(4096) and time.monotonic() < until:
                    pass
            except OSError as exc:
                if _is_peer_gone(exc):
                    self._count("broken_pipes")
                    log.debug("control endpoint: %s hung up before its reply", request.client)
                elif not isinstance(exc, socket.timeout):
                    log.debug("control endpoint: reply to %s failed: %s", request.client, exc)
        except BaseException:
            log.exception("control endpoint request thread crashed")
        finally:
            _close(sock)
            with self._lock:
                self._open -= 1
            if reply is not None and reply.then is not None:  # the client went away first
                try:
                    reply.then()
                except Exception:
                    log.exception(
                        "control route %s %s: its follow-up failed", request.method, request.path
                    )


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


_REASONS = {s.value: s.phrase for s in HTTPStatus}


def _response(
    status: int,
    body: bytes | dict[str, Any],
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    retry_after: bool = False,
    head_only: bool = False,
) -> bytes:
    if isinstance(body, dict):
        body = encode_json(body)
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        "Server: pytaskqml",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if retry_after:
        lines.append(f"Retry-After: {RETRY_AFTER}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if head_only else out + body


def _encode_reply(reply: Reply, *, head_only: bool) -> bytes:
    body = reply.body
    status = reply.status
    if isinstance(body, dict | list):
        try:
            data = encode_json(body)
        except (TypeError, ValueError) as exc:
            status, data = 500, encode_json({"error": f"the reply is not plain JSON: {exc}"})
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = body
    return _response(
        status, data, content_type=reply.content_type, headers=reply.headers, head_only=head_only
    )


def request(
    address: tuple[str, int],
    method: str,
    path: str,
    *,
    authkey: bytes | None = None,
    body: bytes = b"",
    timeout: float = 5.0,
) -> tuple[int, Any]:
    """Call a control endpoint route with the act token derived from *authkey* (if given);
    returns (HTTP status, the JSON body decoded, or the text when it is not JSON)."""
    token = control_token(authkey, "act") if authkey else None
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
    """POST /shutdown to a control endpoint (with the act token derived from *authkey*, if
    given), waiting up to *timeout* seconds; returns (HTTP status, JSON body): 202 when it
    accepts, 401 for a missing or wrong token, 403 for a read token or, without a key, when
    the endpoint does not allow keyless actions. ``OSError`` when it cannot be reached in
    time."""
    return _as_dict(*request(address, "POST", "/shutdown", authkey=authkey, timeout=timeout))


def get_health(address: tuple[str, int], *, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """GET /health of a control endpoint at ``(host, port)``, waiting up to *timeout* seconds;
    returns (HTTP status, JSON body). ``OSError`` when it cannot be reached in time."""
    return _as_dict(*request(address, "GET", "/health", timeout=timeout))
