"""A pipeline run as a service: its stages, the ingress port, the HTTP ingress and a control
endpoint, until asked to stop; then a drain.

Draining (:meth:`Service.drain`): every stream the ingresses opened is ended, so a producer's
next ``put`` is answered with ``ClosedError`` saying the service is draining (and a new
producer is turned away), while what was accepted goes on through the pipeline and is answered.
:meth:`Service.wait_drained` returns once every accepted item's result has been taken by the
ingress that sends it back (or that producer has gone), and only then are the ports closed and
the stages stopped.

The :class:`Gate` stands between the ingresses and the pipeline to make that possible: it is
the target they serve (``stream()``, ``submit()``), it refuses new work once draining, and it
counts, per stream, the items accepted and the results taken.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from ..errors import ClosedError
from ..ingress.http import install_http_ingress
from ..ingress.server import IngressServer
from ..observe.dashboard import install_service
from ..pipeline import config as _pipeconfig
from ..pipeline.pipeline import Pipeline
from ..wire import connection as _connection
from ..wire.control import ControlServer
from ..wire.protocol import DEFAULT_MAX_FRAME_SIZE

log = logging.getLogger(__name__)


class _Tracked:
    """A stream of the pipeline as the gate hands it out: the same interface, counted."""

    def __init__(self, inner: Any, gate: Gate) -> None:
        self._inner = inner
        self._gate = gate
        self.accepted = 0  # put()s that went in
        self.taken = 0  # results the consumer has finished with
        self.done = False  # the consumer stopped iterating

    def put(self, item: Any, *, timeout: float | None = None) -> None:
        self._inner.put(item, timeout=timeout)
        with self._gate.changed:
            self.accepted += 1

    def put_nowait(self, item: Any) -> None:
        self.put(item, timeout=0)

    def close(self) -> None:
        self._inner.close()

    def end(self, why: str) -> None:
        self._inner.end(why)

    def cancel(self, why: str) -> None:
        cancel = getattr(self._inner, "cancel", None)
        if cancel is not None:
            cancel(why)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self._inner)
        try:
            for value in it:
                yield value
                # The consumer is back for the next one: it has sent (or dropped) this one.
                with self._gate.changed:
                    self.taken += 1
                    self._gate.changed.notify_all()
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            with self._gate.changed:
                self.done = True
                self._gate.changed.notify_all()

    @property
    def settled(self) -> bool:
        return self.done or self.taken >= self.accepted


class Gate:
    """*target* (a pipeline, or a coordinator) as the ingresses see it (module docstring)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.changed = threading.Condition(threading.Lock())
        self._streams: weakref.WeakSet[_Tracked] = weakref.WeakSet()
        self.draining: str | None = None

    def stream(self, **options: Any) -> _Tracked:
        with self.changed:
            if self.draining is not None:
                raise ClosedError(self.draining)
        tracked = _Tracked(self.target.stream(**options), self)
        with self.changed:
            self._streams.add(tracked)
            late = self.draining
        if late is not None:
            tracked.end(late)
        return tracked

    def submit(self, payload: Any) -> Future[Any]:
        if self.draining is not None:
            raise ClosedError(self.draining)
        fut: Future[Any] = self.target.submit(payload)
        return fut

    def drain(self, why: str) -> None:
        with self.changed:
            self.draining = why
            streams = list(self._streams)
        for s in streams:
            s.end(why)

    def wait_settled(self, timeout: float | None) -> bool:
        """Block until every stream has had each accepted item's result taken; False on
        timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            while not all(s.settled for s in self._streams):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.changed.wait(left)
            return True

    def outstanding(self) -> int:
        with self.changed:
            return sum(max(0, s.accepted - s.taken) for s in self._streams if not s.done)


class Service:
    """The pipeline that *doc* (a checked config, :mod:`._pipeconfig`) describes, served on the
    addresses of its ``[service]`` table (*overrides* win). :meth:`start`, :attr:`addresses`,
    :meth:`drain`, :meth:`wait_drained`, :meth:`stop`."""

    def __init__(
        self,
        doc: dict[str, Any],
        *,
        authkey: bytes | None,
        tls: ssl.SSLContext | None = None,
        insecure: bool = False,
        keyless_actions: bool = False,
        overrides: dict[str, str] | None = None,
    ) -> None:
        self.doc = doc
        self.authkey = authkey
        self.tls = tls
        self.insecure = insecure
        self.keyless_actions = keyless_actions  # without a key: /submit etc. from loopback
        service = dict(doc.get("service", {}))
        service.update(overrides or {})
        self.settings = service
        if not any(k in service for k in ("ingress", "http")):
            raise ValueError(
                "nothing to serve: give the config a [service] table with ingress and/or "
                "http addresses (or pass --ingress / --http)"
            )
        self.pipeline: Pipeline | None = None
        self.gate: Gate | None = None
        self.stopping = threading.Event()  # set by /shutdown (and by the CLI's signals)
        self._ingress: IngressServer | None = None
        self._controls: list[ControlServer] = []
        self.addresses: dict[str, str] = {}

    def _address(self, what: str) -> tuple[str, int]:
        return _connection.parse_address(str(self.settings[what]))

    def start(self) -> Service:
        """Build and start the stages, then open the ports; on a failure what was started is
        stopped again."""
        pipe = self.doc.get("pipeline", {})
        self.pipeline = Pipeline(
            _pipeconfig.build(self.doc, authkey=self.authkey),
            name=pipe.get("name", "pipeline"),
            buffersize=pipe.get("buffersize", 64),
        )
        gate = self.gate = Gate(self.pipeline)
        try:
            if "ingress" in self.settings:
                self._ingress = IngressServer(
                    gate,
                    self._address("ingress"),
                    key=self.authkey,
                    tls=self.tls,
                    max_frame_size=DEFAULT_MAX_FRAME_SIZE,
                    insecure=self.insecure,
                    name="service-ingress",
                ).start()
                self.addresses["ingress"] = _connection.format_address(self._ingress.address)
            http = self.settings.get("http")
            control = self.settings.get("control")
            if http is not None:
                server = self._control(self._address("http"))
                install_http_ingress(server, gate)
                self.addresses["http"] = _connection.format_address(server.address)
            if control is not None and control != http:
                server = self._control(self._address("control"))
                self.addresses["control"] = _connection.format_address(server.address)
            elif control is not None:
                self.addresses["control"] = self.addresses["http"]
        except BaseException:
            self.stop(cancel=True)
            raise
        return self

    def _control(self, address: tuple[str, int]) -> ControlServer:
        def health() -> dict[str, Any]:
            gate = self.gate
            return {
                "status": "draining" if gate is not None and gate.draining else "ok",
                "role": "service",
                "outstanding": gate.outstanding() if gate is not None else 0,
            }

        server = ControlServer(
            address,
            health=health,
            shutdown=self.stopping.set,
            authkey=self.authkey,
            insecure=self.insecure,
            keyless_actions=self.keyless_actions,
        )
        install_service(
            server,
            lambda: self.pipeline,
            lambda: [self._ingress.statistics()] if self._ingress is not None else [],
        )
        server.start()  # routes may be added to a running server
        self._controls.append(server)
        return server

    def drain(self, why: str = "service is draining") -> None:
        """Refuse new work with ClosedError(*why*); what was accepted goes on."""
        if self.gate is not None:
            log.info("draining: %d accepted items still to answer", self.gate.outstanding())
            self.gate.drain(why)

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Block until every accepted item has been answered (or its producer left)."""
        return self.gate.wait_settled(timeout) if self.gate is not None else True

    def stop(self, *, cancel: bool = False) -> None:
        """Close the ports and stop the stages (cancelling what is left with *cancel*)."""
        if self._ingress is not None:
            self._ingress.stop()
        if self.pipeline is not None:
            self.pipeline.shutdown(wait=not cancel, cancel_futures=cancel)
        for server in self._controls:
            server.stop()
