"""The producer side of the ingress port: :class:`Client` (see :mod:`._ingress` for the wire
messages)."""

from __future__ import annotations

import contextlib
import logging
import queue
import ssl
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ClosedError, ConnectionLost, ProtocolError, RemoteTraceback, TaskFailed
from .wire import codec as _codec
from .wire import connection as _connection
from .wire import protocol as _protocol
from .wire.auth import resolve_authkey
from .wire.connection import Address
from .wire.endpoints import dial_once

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 64

__all__ = ["Client", "ClientStats", "ClientStream"]


@dataclass(frozen=True, slots=True)
class ClientStats:
    """``window`` items this client may have outstanding (its own, capped by the server's);
    ``submitted``, ``completed`` (a value), ``failed`` (an error) and ``outstanding`` now."""

    window: int
    submitted: int
    completed: int
    failed: int
    outstanding: int


def remote_error(error: Any) -> BaseException:
    """The exception a result message's ``error`` stands for."""
    if not (
        isinstance(error, dict)
        and all(isinstance(error.get(k), str) for k in ("type", "message", "traceback"))
    ):
        raise ProtocolError("malformed error in a result")
    kind, message, tb = error["type"], error["message"], error["traceback"]
    if kind == "TaskTimeout":
        return TimeoutError(message)
    if kind == "CancelledError":
        return CancelledError(message)
    if kind == "ClosedError":
        return ClosedError(f"the service takes no more work: {message}")
    err = TaskFailed(kind, message, tb)
    if tb:
        err.__cause__ = RemoteTraceback(tb)
    return err


class Client:
    """A producer connected to an ingress port (:meth:`Coordinator.serve_ingress`).

    ``submit()`` returns a :class:`concurrent.futures.Future`; ``map()`` and ``stream()`` give
    results in order. At most *window* items are outstanding at once (fewer if the server
    grants fewer): ``submit()`` blocks until one returns. A task that fails remotely is a
    :class:`TaskFailed` with the remote traceback text; when the service goes away every
    outstanding future fails with :class:`ConnectionLost`; after :meth:`close`, calls raise
    :class:`ClosedError`.

    *address* is ``(host, port)`` or ``"host:port"``; *authkey* defaults to the
    ``PYTASKQML_AUTHKEY`` environment variable; *tls* (see :func:`tls_client_context`) makes
    the connection TLS; *window* (default 64) is the most items outstanding;
    *connect_timeout* (seconds, default 10) bounds connecting and the handshake;
    *max_frame_size* (bytes, default 64 MiB) the largest frame. Connecting raises ``OSError``
    when nothing answers, :class:`AuthenticationError` for a wrong key, :class:`ConnectionLost`
    or ``ssl.SSLError`` when the handshake breaks, ``ValueError`` for a *window* below 1.
    """

    def __init__(
        self,
        address: Address | str,
        *,
        authkey: bytes | str | None = None,
        tls: ssl.SSLContext | None = None,
        window: int = DEFAULT_WINDOW,
        connect_timeout: float = 10.0,
        max_frame_size: int = _protocol.DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer; got {window!r}")
        addr = _connection.parse_address(address) if isinstance(address, str) else address
        self._conn = dial_once(
            addr,
            resolve_authkey(authkey) or b"",
            ssl_context=tls,
            name="client",
            max_frame_size=max_frame_size,
            timeout=connect_timeout,
        )
        try:
            welcome = self._conn.recv_within(connect_timeout, "welcome")
            granted = welcome.header.get("window")
            if welcome.op != "welcome" or not isinstance(granted, int) or granted < 1:
                raise ProtocolError(f"expected welcome, got {welcome.header!r}")
        except BaseException:
            self._conn.abort()
            raise
        self.window = min(window, granted)
        self._cv = threading.Condition(threading.Lock())
        self._send_lock = threading.Lock()
        self._futures: dict[int, Future[Any]] = {}
        self._seq = 0
        self._completed = 0
        self._failed = 0
        self._closed = False
        self._lost: BaseException | None = None
        self._reader = threading.Thread(
            target=self._read, name=f"pytaskqml-client-{self._conn.peer}", daemon=True
        )
        self._reader.start()

    # ------------------------------------------------------------------ submitting

    def submit(
        self, payload: Any, *, timeout: float | None = None, priority: int | None = None
    ) -> Future[Any]:
        """Send one item; its future. Blocks while the window is full (``queue.Full`` after
        *timeout* seconds). A payload that is not JSON (plus bytes/arrays) raises ``TypeError``.
        *priority*: the item's priority at the service (higher goes first; default 0)."""
        if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
            raise TypeError(f"priority must be an int, got {priority!r}")
        fut: Future[Any] = Future()
        with self._cv:
            if not self._cv.wait_for(
                lambda: self._closed or self._lost is not None or len(self._futures) < self.window,
                timeout,
            ):
                raise queue.Full("the client's window stayed full")
            self._check_open()
            seq = self._seq
            msg: dict[str, Any] = {"op": "put", "seq": seq, "payload": payload}
            if priority is not None:
                msg["priority"] = priority
            text, bufs = _codec.encode(msg)
            self._seq += 1
            self._futures[seq] = fut
            # Taken before the seq lock is let go, so frames go out in seq order, while results
            # (which need only the seq lock) keep coming in during a long send.
            self._send_lock.acquire()
        try:
            self._conn.send_json(text, bufs)
        except ConnectionLost as exc:
            self._lose(exc)
            raise
        finally:
            self._send_lock.release()
        return fut

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the client is closed")
        if self._lost is not None:
            raise ConnectionLost(f"the ingress service went away: {self._lost}")

    def map(
        self,
        iterable: Iterable[Any],
        *,
        ordered: bool = True,
        on_error: Literal["raise", "return"] = "raise",
        timeout: float | None = None,
        priority: int | None = None,
    ) -> Iterator[Any]:
        """Results of *iterable*'s items, lazily (at most the window ahead), in order unless
        *ordered* is False. A failed item raises (``on_error="raise"``) or is yielded as its
        exception (``"return"``); *timeout* bounds the wait for each result (``TimeoutError``);
        *priority* as for :meth:`submit`."""
        if on_error not in ("raise", "return"):
            raise ValueError('on_error must be "raise" or "return"')
        self._check_open()
        return self._map(iter(iterable), ordered, on_error == "raise", timeout, priority)

    def _map(
        self,
        it: Iterator[Any],
        ordered: bool,
        raise_errors: bool,
        timeout: float | None,
        priority: int | None = None,
    ) -> Iterator[Any]:
        pending: deque[Future[Any]] = deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.window:
                    try:
                        item = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append(self.submit(item, priority=priority))
                if not pending:
                    return
                if ordered:
                    fut = pending.popleft()
                else:
                    done, _ = wait(pending, timeout, return_when=FIRST_COMPLETED)
                    if not done:
                        raise TimeoutError(f"no result within {timeout}s")
                    fut = next(f for f in pending if f in done)
                    pending.remove(fut)
                yield _outcome(fut, timeout, raise_errors)
        finally:
            for fut in pending:
                fut.cancel()

    def stream(
        self, *, on_error: Literal["raise", "return"] = "return", priority: int | None = None
    ) -> ClientStream:
        """A stream: ``put()`` items from one thread, iterate results in order from another,
        ``close()`` when done. *on_error*: a failed item's :class:`TaskFailed` is yielded in
        its place (``"return"``, the default) or raised at its position (``"raise"``).
        *priority*: its items' priority (default ``None``: the server's; ``put(priority=)``
        per item). :class:`ClosedError` once the client is closed, :class:`ConnectionLost`
        once its connection is lost."""
        self._check_open()
        return ClientStream(self, on_error == "raise", priority)

    # ------------------------------------------------------------------ results

    def _read(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                if msg.op != "result":
                    raise ProtocolError(f"unexpected message {msg.op!r}")
                self._resolve(msg.header)
        except (ConnectionLost, ProtocolError) as exc:
            self._lose(exc)
        except BaseException as exc:
            log.exception("client reader for %s crashed", self._conn.peer)
            self._lose(exc)

    def _resolve(self, header: dict[str, Any]) -> None:
        with self._cv:
            fut = self._futures.pop(header.get("seq", -1), None)
            if fut is None:
                raise ProtocolError(f"a result for no outstanding item: {header.get('seq')!r}")
            if "error" in header:
                self._failed += 1
            else:
                self._completed += 1
            self._cv.notify_all()
        if "error" in header:
            fut.set_exception(remote_error(header["error"]))
        else:
            fut.set_result(header.get("value"))

    def _lose(self, exc: BaseException) -> None:
        with self._cv:
            if self._lost is None and not self._closed:
                self._lost = exc
            futures = list(self._futures.values())
            self._futures.clear()
            self._cv.notify_all()
        self._conn.abort()
        for fut in futures:
            if not fut.done():
                fut.set_exception(ConnectionLost(f"the ingress service went away: {exc}"))

    # ------------------------------------------------------------------ the rest

    def statistics(self) -> ClientStats:
        """A snapshot of this producer's counters (see :class:`ClientStats`)."""
        with self._cv:
            return ClientStats(
                window=self.window,
                submitted=self._seq,
                completed=self._completed,
                failed=self._failed,
                outstanding=len(self._futures),
            )

    def close(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """No more items. With *wait*, first wait (up to *timeout* seconds) for the outstanding
        results; whatever is still outstanding then is cancelled on the server."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
            if wait:
                self._cv.wait_for(lambda: not self._futures or self._lost is not None, timeout)
        with contextlib.suppress(ConnectionLost):
            self._conn.send("bye")
        self._conn.abort()
        self._reader.join(5.0)
        self._lose(ClosedError("the client was closed"))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=exc[0] is None)

    def __repr__(self) -> str:
        return f"<Client {self._conn.peer} window={self.window}>"


def _outcome(fut: Future[Any], timeout: float | None, raise_errors: bool) -> Any:
    try:
        return fut.result(timeout)
    except TimeoutError:
        if not fut.done():
            raise
        if raise_errors:
            raise
        return fut.exception()
    except Exception as exc:
        if raise_errors:
            raise
        return exc


class ClientStream:
    """:meth:`Client.stream`: ``put(item, timeout=)``, ``put_nowait``, ``close()``, iteration
    in order (a failed item is its exception, or raised with ``on_error="raise"``)."""

    def __init__(self, client: Client, raise_errors: bool, priority: int | None = None) -> None:
        self._client = client
        self._priority = priority
        self._raise = raise_errors
        self._cv = threading.Condition(threading.Lock())
        self._send_lock = threading.Lock()
        self._futures: deque[Future[Any]] = deque()
        self._closed = False

    def put(self, item: Any, *, timeout: float | None = None, priority: int | None = None) -> None:
        """Send one item; its result comes out of the iteration in its place. Blocks while the
        client's window is full (:class:`queue.Full` after *timeout* seconds); :class:`ClosedError`
        after :meth:`close`. While the service drains, the item is refused: it comes out as a
        :class:`ClosedError` in its place (raised with ``on_error="raise"``). *priority*
        overrides the stream's for this item."""
        with self._cv:
            if self._closed:
                raise ClosedError("put() on a closed stream")
        fut = self._client.submit(
            item, timeout=timeout, priority=self._priority if priority is None else priority
        )
        with self._cv:
            self._futures.append(fut)
            self._cv.notify_all()

    def put_nowait(self, item: Any) -> None:
        """``put(item, timeout=0)``: :class:`queue.Full` at once when the window is full."""
        self.put(item, timeout=0)

    def close(self) -> None:
        """No more items: iteration ends after the results of those already put."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __enter__(self) -> ClientStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._futures) or self._closed)
                if not self._futures:
                    return
                fut = self._futures.popleft()
            yield _outcome(fut, None, self._raise)
