"""Connections the coordinator keeps to listening workers: :class:`Dialer`.

A dialer connects (with TLS and the handshake, see :mod:`._endpoints`), reads the worker's
hello, has the coordinator attach it, waits until that worker leaves, and dials again with
backoff. A first attempt refused for the key or a certificate ends it at once: retrying cannot
help, and ``connect()`` reports the reason instead of a timeout.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any

from ..errors import AuthenticationError, ConnectionLost, ProtocolError
from ..wire import connection as _connection
from ..wire.connection import Address, Connection
from ..wire.endpoints import Backoff, describe, dial_once, is_fatal, read_hello
from .handles import WorkerHandle

log = logging.getLogger(__name__)

Attach = Callable[[Connection, dict[str, Any], "Dialer"], "WorkerHandle | None"]


class Dialer:
    """Keeps a connection to one listening worker, reconnecting with backoff."""

    def __init__(
        self,
        attach: Attach,
        address: Address,
        key: bytes,
        *,
        window: int | None,
        ssl_context: ssl.SSLContext | None,
        max_frame_size: int,
        on_gave_up: Callable[[], None],
    ) -> None:
        self.address = address
        self.window = window
        self.connected = threading.Event()  # the first connection is up
        self.failed = threading.Event()  # it gave up (see fatal_error)
        self.active = True  # may still connect
        self.last_error: str | None = None
        self.fatal_error: BaseException | None = None
        self._attach = attach
        self._key = key
        self._ssl_context = ssl_context
        self._max_frame_size = max_frame_size
        self._on_gave_up = on_gave_up
        self._stop = threading.Event()
        self._left = threading.Event()
        self._handle: WorkerHandle | None = None
        self._thread = threading.Thread(
            target=self._loop,
            name=f"pytaskqml-dial-{_connection.format_address(address)}",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._left.set()
        handle = self._handle
        if handle is not None:
            handle.abort("the coordinator stopped dialling it")
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def worker_left(self, handle: WorkerHandle, graceful: bool, did_work: bool) -> None:
        self._left.set()

    def _loop(self) -> None:
        backoff = Backoff()
        where = _connection.format_address(self.address)
        try:
            while not self._stop.is_set():
                conn = None
                try:
                    conn = dial_once(
                        self.address,
                        self._key,
                        ssl_context=self._ssl_context,
                        max_frame_size=self._max_frame_size,
                    )
                    hello = read_hello(conn, _connection.DEFAULT_HANDSHAKE_TIMEOUT)
                except (AuthenticationError, ConnectionLost, ProtocolError, OSError) as exc:
                    if conn is not None:
                        conn.abort()
                    why = describe(exc, self.address)
                    if is_fatal(exc) and not self.connected.is_set():
                        log.error("giving up on the worker at %s: %s", where, why)
                        # A wrong key is the peer refusing us; a certificate that does not verify
                        # means no connection could be made.
                        self.fatal_error = (
                            AuthenticationError(f"worker at {where}: {why}")
                            if isinstance(exc, AuthenticationError)
                            else ConnectionLost(why)
                        )
                        self.last_error = why
                        return
                    if self.last_error != why:
                        log.info("worker at %s unavailable: %s", where, why)
                    self.last_error = why
                    self._stop.wait(backoff.next())
                    continue
                if self._stop.is_set():
                    conn.abort()
                    return
                self._left.clear()
                handle = self._attach(conn, hello, self)
                if handle is None:
                    return
                self._handle = handle
                self.connected.set()
                self.last_error = None
                backoff.reset()
                self._left.wait()
                self._handle = None
        except BaseException:
            log.exception("dialer thread for %s crashed", where)
        finally:
            self.active = False
            if not self._stop.is_set():
                self.failed.set()
                self._on_gave_up()
