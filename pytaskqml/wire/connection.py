"""The only module that touches a worker connection's socket (the HTTP control endpoint, in
:mod:`._control`, is served by the standard library's ``http.server``).

:class:`Connection` wraps a connected socket: it frames outgoing messages (scatter/gather, so
buffers are never copied into one string), decodes incoming bytes with a
:class:`~._protocol.FrameDecoder`, and turns every way a peer can vanish - EOF, reset, broken
pipe, a close from the heartbeat watchdog - into one exception, :class:`ConnectionLost`.

Sockets stay in blocking mode. A reader thread blocks in ``recv``; liveness is judged from the
outside (a watchdog compares :attr:`Connection.last_recv` with the clock and calls
:meth:`Connection.abort`, which makes the blocked ``recv`` return at once).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConnectionLost, ProtocolError
from . import codec as _codec
from . import protocol as _protocol

log = logging.getLogger(__name__)

Address = tuple[str, int]

# sendmsg takes at most IOV_MAX (1024 on Linux) chunks at once.
_MAX_IOV = 512
DEFAULT_HANDSHAKE_TIMEOUT = 5.0


def parse_address(text: str, *, default_host: str = "127.0.0.1") -> Address:
    """Parse ``host:port``, ``[v6]:port`` or ``:port``; raise ``ValueError`` with a clear reason."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("address is empty (expected HOST:PORT)")
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad address {text!r} (expected [IPv6]:PORT)")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"bad address {text!r} (expected HOST:PORT)")
        if ":" in host:
            raise ValueError(f"bad address {text!r} (write IPv6 addresses as [ADDR]:PORT)")
    host = host or default_host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {text!r} (expected a number from 0 to 65535)")
    return host, int(port_text)


def format_address(address: Address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def open_listener(address: Address, *, backlog: int = 128) -> socket.socket:
    """A listening socket with SO_REUSEADDR, so a restarted process can rebind at once."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)


def check_bind(
    host: str, key: bytes | None, *, insecure: bool, what: str, fix: str, key_name: str = "a key"
) -> None:
    """The one rule for listening: nothing binds beyond loopback without a key, unless the
    caller insists (*insecure*), and then with a warning. *what* names the listener ("listen",
    "serve the control endpoint"), *fix* says how to provide a key."""
    if is_loopback(host) or key:
        return
    if not insecure:
        raise ValueError(f"refusing to {what} on non-loopback {host} without {key_name} ({fix})")
    log.warning("%s on %s without a key: anyone who can reach it may connect", what, host)


class Listener:
    """A listening TCP socket: :meth:`accept` connections until :meth:`close`."""

    def __init__(self, address: Address, *, backlog: int = 128) -> None:
        self._sock = open_listener(address, backlog=backlog)
        name = self._sock.getsockname()
        self.address: Address = (str(name[0]), int(name[1]))
        self.closed = False

    def accept(self) -> tuple[socket.socket, str]:
        """The next connection and its peer's address; ``OSError`` once closed."""
        sock, peer = self._sock.accept()
        return sock, format_address(peer[:2])

    def close(self) -> None:
        """Stop listening; an :meth:`accept` blocked in another thread returns with OSError."""
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of sockets (one end for a child process to inherit)."""
    return socket.socketpair()


def from_fd(fd: int) -> socket.socket:
    """The socket behind an inherited file descriptor."""
    return socket.socket(fileno=fd)


def refuse(sock: socket.socket, goodbye: bytes) -> None:
    """Send *goodbye* if it fits in the socket's buffer right now (never wait), then close."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(goodbye)
    close_socket(sock)


def shutdown_socket(sock: socket.socket) -> None:
    """Shut a socket down for both directions: a thread blocked reading it wakes at once
    (closing it alone would not wake it)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def close_socket(sock: socket.socket) -> None:
    """Close a socket that never became a :class:`Connection`."""
    with contextlib.suppress(OSError):
        sock.close()


def dial(
    address: Address, *, timeout: float | None = 5.0, ssl_context: ssl.SSLContext | None = None
) -> socket.socket:
    """Connect (and with *ssl_context* complete the TLS handshake) within *timeout*."""
    sock = socket.create_connection(address, timeout=timeout)
    try:
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=address[0])
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def tls_accept(
    sock: socket.socket, ssl_context: ssl.SSLContext, *, timeout: float | None
) -> socket.socket:
    """Run the server side of a TLS handshake on an accepted socket, within *timeout*."""

    def abort() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    try:
        sock.settimeout(timeout)
        with Deadline(abort, timeout):
            tls = ssl_context.wrap_socket(sock, server_side=True)
        tls.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return tls


class Deadline:
    """Abort a socket if the block inside does not finish within *timeout* seconds.

    A socket timeout alone bounds each recv, not the whole exchange: a peer sending a byte
    just before every timeout would be served forever (slow-loris). This bounds the total.
    """

    def __init__(self, abort: Callable[[], None], timeout: float | None) -> None:
        self.expired = False
        self._abort = abort
        self._timer = None if timeout is None else threading.Timer(timeout, self._fire)
        if self._timer is not None:
            self._timer.daemon = True

    def _fire(self) -> None:
        self.expired = True
        self._abort()

    def __enter__(self) -> Deadline:
        if self._timer is not None:
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()


class Connection:
    """A framed, thread-safe-for-send connection to one peer."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str = "",
        max_frame_size: int = _protocol.DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        _tune(sock)
        sock.settimeout(None)
        self.sock = sock
        self.name = name
        self.max_frame_size = max_frame_size
        self._decoder = _protocol.FrameDecoder(
            max_frame_size=_protocol.HANDSHAKE_MAX_FRAME_SIZE,
            max_depth=_protocol.DEFAULT_MAX_DEPTH,
            scratch_size=_protocol.HANDSHAKE_MAX_FRAME_SIZE,
        )
        self._ready: deque[_protocol.Message] = deque()
        self._shared: _codec.SharedMemory | None = None
        self._send_lock = threading.Lock()
        self._closed = False
        self._send_broken = False
        self._interrupted = False
        self._is_ssl = isinstance(sock, ssl.SSLSocket)
        self._can_sendmsg = hasattr(sock, "sendmsg") and not self._is_ssl
        now = time.monotonic()
        self.last_recv = now
        self.last_send = now
        self.bytes_in = 0
        self.bytes_out = 0
        try:
            peer = sock.getpeername()
            self.peer = format_address(peer) if isinstance(peer, tuple) else str(peer)
        except OSError:
            self.peer = "?"

    # ------------------------------------------------------------------ sending

    def send_frame(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Send one frame's chunks; raise :class:`ConnectionLost` if the peer is gone."""
        try:
            with self._send_lock:
                if self._closed or self._send_broken:
                    raise ConnectionLost(f"connection to {self.peer} is closed")
                if len(chunks) == 1:
                    self.sock.sendall(chunks[0])
                    n = len(chunks[0])
                elif self._can_sendmsg:
                    n = self._sendmsg_all(chunks)
                else:
                    n = 0
                    for c in chunks:
                        self.sock.sendall(c)
                        n += memoryview(c).nbytes
                self.bytes_out += n
                self.last_send = time.monotonic()
        except (OSError, ValueError) as exc:
            # The socket is not closed here: a reader may still have frames to take from it
            # (a peer's "bye" sent just before it closed), and it sees the end right after them.
            self._send_failed()
            raise ConnectionLost(f"lost connection to {self.peer}: {exc}") from None

    def _send_failed(self) -> None:
        self._send_broken = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_WR)

    def _sendmsg_all(self, chunks: Sequence[bytes | memoryview]) -> int:
        # Empty chunks are left out: sendmsg() of nothing returns 0 and would never finish.
        views = deque(v for v in (memoryview(c).cast("B") for c in chunks) if v.nbytes)
        total = 0
        while views:
            batch = [views[i] for i in range(min(len(views), _MAX_IOV))]
            sent = self.sock.sendmsg(batch)
            total += sent
            while sent:
                head = views[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    views.popleft()
                else:
                    views[0] = head[sent:]
                    sent = 0
        return total

    def ping(self) -> None:
        """Send a heartbeat unless a frame is being sent right now (which proves life just as
        well): a heartbeat thread must never queue up behind a long send."""
        if self._send_lock.locked():
            return
        self.send("ping")

    def send(self, op: str, fields: dict[str, Any] | None = None) -> None:
        self.send_frame([_protocol.encode_message(op, fields)])

    def send_json(self, header_json: str, buffers: Sequence[memoryview] = ()) -> None:
        self.send_frame(_protocol.encode_frame(header_json, buffers))

    # ---------------------------------------------------------------- receiving

    def recv(self) -> _protocol.Message:
        """Block until a whole message arrives.

        Raises :class:`ConnectionLost` when the peer goes away (or :meth:`abort` is called) and
        :class:`ProtocolError` when it sends something that is not a valid frame.
        """
        while not self._ready:
            decoder = self._decoder
            try:
                n = self.sock.recv_into(decoder.recv_target())
            except TimeoutError:
                raise
            except (OSError, ValueError) as exc:
                self.abort()
                raise ConnectionLost(f"lost connection to {self.peer}: {exc}") from None
            if not n:
                if self._interrupted:
                    # Our own interrupt_recv(), not the peer: the sending side stays open.
                    raise ConnectionLost("receiving was interrupted")
                pending = self._decoder.buffered
                self.abort()
                if pending:
                    raise ProtocolError(
                        f"{self.peer} closed the connection mid-frame ({pending} bytes pending)"
                    )
                raise ConnectionLost(f"{self.peer} closed the connection")
            self.bytes_in += n
            self.last_recv = time.monotonic()
            got = decoder.commit(n)
            if len(got) == 1:
                return got[0]  # (nothing was waiting: the loop ran)
            self._ready.extend(got)
        return self._ready.popleft()

    def recv_within(self, timeout: float | None, what: str = "message") -> _protocol.Message:
        """:meth:`recv` one message within *timeout* seconds in all (a peer trickling bytes
        cannot stretch it); on expiry the connection is closed and ConnectionLost raised,
        saying the peer sent no *what* in time."""
        if self._ready:
            return self._ready.popleft()
        self.sock.settimeout(timeout)
        try:
            with Deadline(self.abort, timeout) as deadline:
                return self.recv()
        except (TimeoutError, ConnectionLost) as exc:
            if isinstance(exc, TimeoutError) or deadline.expired:
                self.abort()
                raise ConnectionLost(f"{self.peer} sent no {what} in time") from None
            raise
        finally:
            if not self._closed:
                with contextlib.suppress(OSError):
                    self.sock.settimeout(None)

    def peer_hung_up(self) -> bool:
        """Has the peer closed its end, even with unread data still queued? (Linux: POLLRDHUP;
        elsewhere POLLHUP, which only a full close raises.) False where poll is missing."""
        try:
            poller = select.poll()
            mask = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR
            poller.register(self.sock.fileno(), mask)
            return any(ev & mask for _, ev in poller.poll(0))
        except (AttributeError, OSError, ValueError):
            return False

    def set_shared(self, shared: _codec.SharedMemory | None) -> None:
        """Let received frames refer to the shared segment *shared* (call before the first such
        frame can arrive)."""
        self._shared = shared
        self._decoder.shared = shared

    def interrupt_recv(self) -> None:
        """Make a ``recv`` blocked in another thread return (with ConnectionLost) while
        leaving the connection open for sending - e.g. a last goodbye."""
        self._interrupted = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RD)

    def set_authenticated(self) -> None:
        """Lift the handshake's tiny frame limit to the configured one."""
        old = self._decoder
        self._decoder = _protocol.FrameDecoder(max_frame_size=self.max_frame_size)
        self._decoder.shared = self._shared
        # Bytes of a frame the peer sent right behind the handshake carry over.
        self._ready.extend(self._decoder.feed(old.take_buffered()))

    # ------------------------------------------------------------------ closing

    @property
    def closed(self) -> bool:
        return self._closed

    def abort(self) -> None:
        """Close at once, from any thread; a blocked :meth:`recv` returns with ConnectionLost."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    close = abort
