"""Accepting and dialling authenticated connections: one implementation for both sides.

The coordinator listens for workers that dial in and dials workers that listen; a worker does
the mirror image. Both sides use :class:`Acceptor` (each connection authenticated in its own
short-lived thread, so a peer that stalls in the handshake holds up nobody, with a cap on how
many wait at once) and :func:`dial_once` / :class:`Backoff` (connect, TLS, handshake; retry
with growing delays). What happens with an authenticated connection is the caller's business.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import AuthenticationError, ConnectionLost, ProtocolError
from . import auth as _auth
from . import connection as _connection
from . import protocol as _protocol
from .auth import BUSY, TLSExpected
from .connection import Address, Connection

log = logging.getLogger(__name__)

HELLO_OPS = ("hello", "failed")


def read_hello(conn: Connection, timeout: float | None) -> dict[str, Any]:
    """The worker's first message after the handshake: ``hello`` (or ``failed`` with the reason
    it could not start), within *timeout* seconds."""
    msg = conn.recv_within(timeout, "hello")
    if msg.op not in HELLO_OPS:
        raise ProtocolError(f"expected hello, got {msg.op!r}")
    return msg.header


def is_fatal(exc: BaseException) -> bool:
    """An error that retrying will not cure: the peer refused our key, or its certificate (or
    ours) does not verify."""
    return isinstance(exc, AuthenticationError | TLSExpected | ssl.SSLCertVerificationError) or (
        isinstance(exc, ssl.SSLError) and "CERTIFICATE" in str(exc).upper()
    )


def describe(exc: BaseException, address: Address) -> str:
    """What went wrong when dialling *address*, with a hint where a hint helps."""
    where = _connection.format_address(address)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate of {where} not accepted: {exc}"
    if isinstance(exc, ssl.SSLError):
        text = str(exc)
        if "WRONG_VERSION_NUMBER" in text.upper() or "wrong version" in text:
            return f"{where} does not speak TLS (is it started without --tls-cert?)"
        return f"TLS with {where} failed: {text}"
    return str(exc)


def dial_once(
    address: Address,
    key: bytes,
    *,
    ssl_context: ssl.SSLContext | None = None,
    name: str = "",
    max_frame_size: int,
    timeout: float | None = None,
) -> Connection:
    """Connect to *address* and run the dialling side of the handshake; an authenticated
    connection, or ``OSError`` / :class:`ConnectionLost` / :class:`AuthenticationError` /
    ``ssl.SSLError``."""
    if timeout is None:
        timeout = _connection.DEFAULT_HANDSHAKE_TIMEOUT
    sock = _connection.dial(address, timeout=timeout, ssl_context=ssl_context)
    conn = Connection(sock, name=name, max_frame_size=max_frame_size)
    try:
        _auth.client_handshake(conn, key, timeout=timeout)
    except BaseException:
        conn.abort()
        raise
    return conn


class Backoff:
    """Delays between attempts: *first*, doubling up to *cap*; :meth:`reset` after a success."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return d

    def reset(self) -> None:
        self.delay = self.first


class Acceptor:
    """Accepts connections on a :class:`~._connection.Listener` until stopped.

    Each connection gets its own short-lived thread for TLS (with *ssl_context*) and the
    listening side of the handshake, at most *max_pending* at once; more are closed at once
    and reported to *on_refused* - or, with *displace*, the connection that has waited longest
    in its handshake is cut to make room for the new one, so that silent connections can delay
    a peer with the key by no more than its own handshake, however many there are (a flood
    that opens *max_pending* connections within one handshake's time still can). An
    authenticated connection is handed to *on_connection*, in that thread; if it raises
    :class:`ConnectionLost`, :class:`ProtocolError`, :class:`AuthenticationError` or
    ``OSError`` the connection is closed and reported too.
    """

    def __init__(
        self,
        listener: _connection.Listener,
        key: bytes,
        *,
        on_connection: Callable[[Connection], None],
        on_refused: Callable[[str, object], None],
        ssl_context: ssl.SSLContext | None = None,
        max_pending: int = 64,
        max_frame_size: int,
        name: str = "",
        handshake_timeout: float | None = None,
        displace: bool = False,
    ) -> None:
        self.listener = listener
        self.address = listener.address
        self._key = key
        self._on_connection = on_connection
        self._on_refused = on_refused
        self._ssl_context = ssl_context
        self._max_frame_size = max_frame_size
        self._name = name
        # None: the module default at the time of each handshake.
        self._timeout = handshake_timeout
        self._pending = threading.BoundedSemaphore(max_pending)
        self._displace = displace
        # Sockets in their handshake, oldest first (with displace); a handshake that finds
        # its socket gone from here was displaced, whatever it read meanwhile.
        self._waiting: dict[int, Any] = {}
        self._waiting_lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(
            target=self._loop,
            name=f"pytaskqml-accept-{_connection.format_address(self.address)}",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and wait (briefly) for the accepting thread to end."""
        self._stopped = True
        self.listener.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def _loop(self) -> None:
        try:
            while not self._stopped:
                try:
                    sock, peer = self.listener.accept()
                except OSError as exc:
                    if self._stopped or self.listener.closed:
                        return
                    log.warning("accept() failed on %s: %s", self.address, exc)
                    time.sleep(0.05)  # e.g. out of file descriptors: do not spin
                    continue
                if not self._pending.acquire(blocking=False) and not self._make_room():
                    self._on_refused(peer, "too many connections waiting for the handshake")
                    _connection.refuse(sock, _protocol.encode_message("denied", {"why": BUSY}))
                    continue
                if self._displace:
                    with self._waiting_lock:
                        self._waiting[id(sock)] = sock
                threading.Thread(
                    target=self._admit, args=(sock, peer), name="pytaskqml-handshake", daemon=True
                ).start()
        except BaseException:
            log.exception("acceptor thread for %s crashed", self.address)

    def _make_room(self) -> bool:
        """With displace: cut the connection longest in its handshake and take its place once
        its thread has let go (a moment: its next read fails at once)."""
        if not self._displace:
            return False
        with self._waiting_lock:
            if not self._waiting:
                return False
            oldest = self._waiting.pop(next(iter(self._waiting)))
        _connection.shutdown_socket(oldest)
        return self._pending.acquire(timeout=1.0)

    def _still_waiting(self, sock: Any) -> bool:
        if not self._displace:
            return True
        with self._waiting_lock:
            return self._waiting.pop(id(sock), None) is not None

    def _admit(self, sock: Any, peer: str) -> None:
        raw = sock
        conn: Connection | None = None
        timeout = self._timeout
        if timeout is None:
            timeout = _connection.DEFAULT_HANDSHAKE_TIMEOUT
        try:
            if self._ssl_context is not None:
                sock = _connection.tls_accept(sock, self._ssl_context, timeout=timeout)
                if self._displace:
                    with self._waiting_lock:  # the TLS socket is the one to cut now
                        if id(raw) in self._waiting:
                            self._waiting[id(raw)] = sock
            conn = Connection(sock, name=self._name, max_frame_size=self._max_frame_size)
            _auth.server_handshake(conn, self._key, timeout=timeout)
            if not self._still_waiting(raw):
                raise ConnectionLost("displaced by a newer connection during its handshake")
            self._on_connection(conn)
        except (AuthenticationError, ConnectionLost, ProtocolError, OSError) as exc:
            why: object = exc
            if isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(exc).upper():
                why = f"{exc} (a client without TLS?)"
            self._on_refused(conn.peer if conn is not None else peer, why)
            _close(conn, sock)
        except BaseException:
            log.exception("handshake thread crashed")
            _close(conn, sock)
        finally:
            self._still_waiting(raw)
            self._pending.release()


def _close(conn: Connection | None, sock: Any) -> None:
    if conn is not None:
        conn.abort()
    else:
        _connection.close_socket(sock)
