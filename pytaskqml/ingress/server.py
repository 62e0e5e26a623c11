"""The ingress port: producers in other processes submit work over an authenticated socket.

An :class:`IngressServer` serves any *target* with ``stream()`` (a :class:`Coordinator`, or a
pipeline): each producer connection gets its own ordered stream on it, so one producer's
results never reach another and one slow producer holds up nobody else.

Wire messages (framed by :mod:`._protocol`, payloads JSON plus raw buffers, never pickle),
after the mutual HMAC handshake of :mod:`._auth` with the target's key:

* server -> producer ``{"op": "welcome", "window": W}``: the producer may have at most W items
  outstanding (sent and their results not yet received); every result returns one credit.
* producer -> server ``{"op": "put", "seq": n, "payload": ...}``: one item; ``seq`` counts
  from 0 on the connection, one by one.
* server -> producer ``{"op": "result", "seq": n, "value": ...}`` or ``{"op": "result",
  "seq": n, "error": {"type", "message", "traceback"}}`` (``type`` ``"TaskTimeout"`` for a
  result that missed its deadline), in the order of ``seq`` - except that an item the
  target refuses at once (it is shutting down, say) is answered at once.
* producer -> server ``{"op": "bye"}`` (or simply closing): nothing more is coming.

A producer that exceeds its window, skips a ``seq`` or sends a frame that does not decode is
disconnected with a logged reason. A producer that goes away with work outstanding has that
work cancelled: its queued tasks are dropped (counted as cancelled by the target) and its
stream ended - at once when the stream has ``cancel(why)`` (:class:`~._iterate.Stream` does),
else when its next result arrives and the stream is abandoned; what is already running finishes
and its results are discarded.

Why a producer that keeps to its window is never taken for one that does not. The server
credits an item back (under the producer's lock) *before* it starts writing the item's result,
or the error that stands for it. Say the producer sends item k (counting from 0) after reading
r results: it keeps to its window W, so k + 1 - r <= W. Each of those r results was credited
before its first byte left the server, hence before the producer read it, hence before the
producer sent item k, hence before the server reads item k. So when the server reads item k
it has received k items and credited at least r of them: at most k - r <= W - 1 are
outstanding, and the item is accepted, whichever of the server's reader and writer threads
runs first. (Crediting once the write has returned would break this: the producer can read the
result and send its next item before the write returns.) The count of results
actually written, which :meth:`IngressServer.stop` waits for, is kept apart.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ..core.tasks import TaskTimeout
from ..errors import ClosedError, ConnectionLost, ProtocolError, TaskFailed
from ..wire import codec as _codec
from ..wire import connection as _connection
from ..wire.connection import Address, Connection
from ..wire.endpoints import Acceptor

log = logging.getLogger(__name__)

DEFAULT_MAX_OUTSTANDING = 64


class IngressStream(Protocol):
    """What the ingress needs of a target's stream (:class:`~._iterate.Stream` has it)."""

    def put(self, item: Any, *, timeout: float | None = None) -> None: ...
    def close(self) -> None: ...
    def end(self, why: str) -> None: ...
    def cancel(self, why: str) -> None: ...
    def __iter__(self) -> Iterator[Any]: ...


class IngressTarget(Protocol):
    """What the ingress serves: a coordinator or a pipeline."""

    def stream(
        self,
        *,
        buffersize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        on_error: Literal["raise", "return"] = "return",
    ) -> IngressStream: ...


@dataclass(frozen=True, slots=True)
class IngressStats:
    """``producers`` connected now; ``accepted`` producers ever; ``refused`` connections that
    failed the handshake; ``dropped_producers`` disconnected for a protocol violation or a bad
    frame; ``received`` items; ``returned`` results sent back; ``abandoned`` items whose
    producer went away before their result; ``address`` where it listens (``HOST:PORT``)."""

    producers: int
    accepted: int
    refused: int
    dropped_producers: int
    received: int
    returned: int
    abandoned: int
    address: str = ""  # where it listens, HOST:PORT


def error_fields(value: Any) -> dict[str, str] | None:
    """The ``error`` of a result message for an outcome that is not a value, else None."""
    if isinstance(value, TaskFailed):
        return {
            "type": value.remote_type,
            "message": value.message,
            "traceback": value.remote_traceback,
        }
    if isinstance(value, TaskTimeout):
        return {
            "type": "TaskTimeout",
            "message": f"no result within {value.timeout}s",
            "traceback": "",
        }
    if isinstance(value, CancelledError):
        return {"type": "CancelledError", "message": str(value) or "cancelled", "traceback": ""}
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "message": str(value), "traceback": ""}
    return None


class _Producer:
    """One producer connection: a reader thread feeding its stream, a writer thread sending
    its results back."""

    def __init__(self, server: IngressServer, conn: Connection) -> None:
        self.server = server
        self.conn = conn
        self.window = server.max_outstanding
        target: Any = server.target
        try:  # a Coordinator's stream takes a name: the producer's, in statistics().sources
            self.stream = target.stream(
                buffersize=self.window, ordered=True, on_error="return", name=f"ingress {conn.peer}"
            )
        except TypeError:
            self.stream = target.stream(buffersize=self.window, ordered=True, on_error="return")
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self._outstanding = 0  # received and not yet credited back (see the module's docstring)
        self._unwritten = 0  # received and whose result is not yet written (for drain())
        # Received and whose result is not yet being written: what a producer that leaves
        # now abandons (one whose result is on its way when it goes has it already, often).
        self._unanswered = 0
        self._refused: dict[int, BaseException] = {}
        self._received = 0
        self._gone = False

    def start(self) -> None:
        peer = self.conn.peer
        for role, target in (("in", self._read), ("out", self._write)):
            threading.Thread(
                target=target, name=f"pytaskqml-ingress-{role}-{peer}", daemon=True
            ).start()

    # ------------------------------------------------------------------ reading

    def _read(self) -> None:
        why = "closed the connection"
        try:
            self.conn.send("welcome", {"window": self.window})
            while True:
                msg = self.conn.recv()
                if msg.op == "bye":
                    why = "said bye"
                    break
                if msg.op != "put":
                    raise ProtocolError(f"unexpected message {msg.op!r}")
                self._put(msg.header)
        except ConnectionLost as exc:
            why = str(exc)
        except ProtocolError as exc:
            why = f"sent a bad frame: {exc}"
            log.warning("ingress: producer %s disconnected: %s", self.conn.peer, exc)
            self.server._count("dropped_producers")
        except BaseException:
            log.exception("ingress reader for %s crashed", self.conn.peer)
            why = "reader crashed"
        finally:
            self._finish(why)

    def _put(self, header: dict[str, Any]) -> None:
        seq = header.get("seq")
        if seq != self._received:
            raise ProtocolError(f"expected seq {self._received}, got {seq!r}")
        with self._lock:
            if self._outstanding >= self.window:
                raise ProtocolError(f"more than its window of {self.window} items outstanding")
            self._outstanding += 1
            self._unwritten += 1
            self._unanswered += 1
        self._received += 1
        self.server._count("received")
        priority = header.get("priority")
        try:
            if priority is None:
                self.stream.put(header.get("payload"))
            else:
                # (An item's priority: a Coordinator's stream takes it; a bad one is the
                # item's error, as is a target whose streams have no priorities.)
                stream: Any = self.stream
                stream.put(header.get("payload"), priority=priority)
        except Exception as exc:  # e.g. ClosedError while the target drains: the item's error
            self._refuse(seq, exc)

    def _refuse(self, seq: int, exc: BaseException) -> None:
        with self._lock:
            self._refused[seq] = exc
        self._send_result(seq, exc)

    def _finish(self, why: str) -> None:
        with self._lock:
            self._gone = True
            pending = self._unanswered
        if pending:
            log.info(
                "ingress: producer %s %s with %d items outstanding: cancelling them",
                self.conn.peer,
                why,
                pending,
            )
            self.server._count("abandoned", pending)
        self.stream.end(f"producer {why}")
        cancel = getattr(self.stream, "cancel", None)
        if pending and cancel is not None:
            cancel(f"producer {why}")
        self.stream.close()
        self.conn.abort()
        self.server._gone(self)

    # ------------------------------------------------------------------ writing

    def _write(self) -> None:
        it = iter(self.stream)
        seq = 0
        try:
            for value in it:
                with self._lock:
                    while seq in self._refused:
                        del self._refused[seq]
                        seq += 1
                    gone = self._gone
                if gone:
                    break
                self._send_result(seq, value)
                seq += 1
        except BaseException:
            log.exception("ingress writer for %s crashed", self.conn.peer)
            self.conn.abort()
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # an abandoned stream: what is still queued for it is cancelled

    def _send_result(self, seq: int, value: Any) -> None:
        # Credit first: the producer may send its next item the moment this result reaches
        # it, possibly before send_json() below has returned here.
        with self._lock:
            self._outstanding -= 1
            self._unanswered -= 1
        error = error_fields(value)
        try:
            if error is None:
                try:
                    text, bufs = _codec.encode({"op": "result", "seq": seq, "value": value})
                except (TypeError, ValueError) as exc:
                    error = {"type": type(exc).__name__, "message": str(exc), "traceback": ""}
            if error is not None:
                text, bufs = _codec.encode({"op": "result", "seq": seq, "error": error})
            self.conn.send_json(text, bufs)
        except ConnectionLost:
            self.server._count("abandoned")  # the producer went before this one was sent
            return
        finally:
            with self._lock:
                self._unwritten -= 1
                self._answered.notify_all()
        self.server._count("returned")

    def drain(self, deadline: float) -> None:
        """Wait until every item has been answered (or *deadline*, a monotonic time)."""
        with self._lock:
            self._answered.wait_for(
                lambda: self._unwritten <= 0 or self._gone, max(0.0, deadline - time.monotonic())
            )


class IngressServer:
    """Serves *target* to producers that connect to *address* with *key* (see the module's
    docstring); :meth:`start`, :meth:`stop`, :attr:`address`, :meth:`statistics`.

    *address* defaults to ``127.0.0.1`` and a free port; *key* ``None`` means no
    authentication, allowed only on loopback unless *insecure* (which logs a warning). *tls*
    (default ``None``: plain TCP) is a server context (:func:`tls_server_context`) wrapped
    around each connection before the key check. *max_outstanding* (default 64) is each
    producer's window: items sent and not yet answered. *max_frame_size* bounds one frame, in
    bytes. *name* labels its connections in log lines (default ``"ingress"``). ``ValueError``
    for a *max_outstanding* below 1 or a non-loopback *address* without a key."""

    def __init__(
        self,
        target: IngressTarget,
        address: Address | str = ("127.0.0.1", 0),
        *,
        key: bytes | None,
        tls: ssl.SSLContext | None = None,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        max_frame_size: int,
        insecure: bool = False,
        name: str = "ingress",
    ) -> None:
        if not isinstance(max_outstanding, int) or max_outstanding < 1:
            raise ValueError(f"max_outstanding must be a positive integer; got {max_outstanding!r}")
        addr = _connection.parse_address(address) if isinstance(address, str) else address
        _connection.check_bind(
            addr[0],
            key,
            insecure=insecure,
            what="serve the ingress port",
            fix="set authkey= or PYTASKQML_AUTHKEY, or pass insecure=True",
            key_name="an authkey",
        )
        self.target = target
        self.max_outstanding = max_outstanding
        self._lock = threading.Lock()
        self._producers: set[_Producer] = set()
        self._counts = dict.fromkeys(
            ("accepted", "refused", "dropped_producers", "received", "returned", "abandoned"), 0
        )
        self._stopped = False
        self._acceptor = Acceptor(
            _connection.Listener(addr),
            key or b"",
            on_connection=self._accepted,
            on_refused=self._refused,
            ssl_context=tls,
            max_frame_size=max_frame_size,
            name=name,
            displace=True,  # silent connections never lock producers with the key out
        )
        self.address: tuple[str, int] = self._acceptor.address

    def start(self) -> IngressServer:
        """Start accepting producers; returns the server (``IngressServer(...).start()``)."""
        self._acceptor.start()
        return self

    def stop(self, *, drain: float = 2.0) -> None:
        """Stop accepting producers; give those connected up to *drain* seconds to receive the
        results still on their way, then disconnect them (what is left is cancelled)."""
        with self._lock:
            self._stopped = True
            producers = list(self._producers)
        self._acceptor.stop()
        deadline = time.monotonic() + drain
        for p in producers:
            p.drain(deadline)
            p.conn.abort()

    def statistics(self) -> IngressStats:
        """A snapshot of the counters of this port's producers (see :class:`IngressStats`)."""
        with self._lock:
            counts = dict(self._counts)
            producers = len(self._producers)
        host, port = self.address[0], self.address[1]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return IngressStats(producers=producers, address=where, **counts)

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self._counts[what] += n

    def _accepted(self, conn: Connection) -> None:
        try:
            producer = _Producer(self, conn)
        except ClosedError as exc:
            log.info("ingress: turned away %s: %s", conn.peer, exc)
            conn.abort()
            return
        with self._lock:
            if self._stopped:
                conn.abort()
                return
            self._producers.add(producer)
            self._counts["accepted"] += 1
        producer.start()

    def _refused(self, peer: str, why: object) -> None:
        log.warning("ingress: refused connection from %s: %s", peer, why)
        self._count("refused")

    def _gone(self, producer: _Producer) -> None:
        with self._lock:
            self._producers.discard(producer)
