"""A coordinator's ingress ports: the :class:`~.server.IngressServer`\\ s it started on its own
streams, their statistics, and stopping them when it shuts down."""

from __future__ import annotations

import ssl
import threading

from ..wire.connection import Address
from .server import IngressServer, IngressStats, IngressTarget


class IngressPorts:
    """The ingress ports serving one *target* (a coordinator's ``stream()``), all with its key,
    frame limit and name; kept in the order they were started."""

    def __init__(
        self, target: IngressTarget, *, key: bytes | None, max_frame_size: int, name: str
    ) -> None:
        self._target = target
        self._key = key
        self._max_frame_size = max_frame_size
        self._name = name
        self._lock = threading.Lock()
        self._servers: list[IngressServer] = []

    def start(
        self,
        address: Address | str,
        *,
        tls: ssl.SSLContext | None,
        max_outstanding: int,
        insecure: bool,
    ) -> tuple[str, int]:
        """Start one more port on *address*; returns the bound address (see
        :class:`IngressServer` for what it refuses)."""
        server = IngressServer(
            self._target,
            address,
            key=self._key,
            tls=tls,
            max_outstanding=max_outstanding,
            max_frame_size=self._max_frame_size,
            insecure=insecure,
            name=f"{self._name}-ingress",
        )
        with self._lock:
            self._servers.append(server)
        return server.start().address

    def statistics(self) -> list[IngressStats]:
        """Each port's statistics, in the order they were started."""
        with self._lock:
            servers = list(self._servers)
        return [s.statistics() for s in servers]

    def stop(self) -> None:
        """Stop every port (each waits for the results it is writing)."""
        with self._lock:
            servers = list(self._servers)
        for server in servers:
            server.stop()
