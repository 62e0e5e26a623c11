"""A coordinator's control endpoint: ``serve_control()`` and its routes.

``GET /health`` (open), ``POST /shutdown``; the models of :attr:`Coordinator.models`:
``GET /models`` (their status per worker, a read route), ``POST /models/load`` with a JSON
body ``{"name", "spec": {"class": "module:Class", "config": {...}}, "version"?}`` and ``POST
/models/unload`` with ``{"name"}`` (acting routes: the act token, see :mod:`._control`). A
load names only a class the operator allowed (``serve_control(allow_models=...)``, see
:meth:`~._modelreg.Models.load_requested`): 403 for any other.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from .errors import ModelLoadError
from .ingress.http import install_http_ingress
from .observe.dashboard import install_coordinator as install_status
from .wire import connection as _connection
from .wire.control import ControlServer, ControlStats, Reply, Request, parse_json

if TYPE_CHECKING:
    from .coordinator import Coordinator
    from .worker.models import Model

MAX_MODEL_BODY = 64 * 1024


class ControlHost:
    """:meth:`serve_control` for a :class:`Coordinator`."""

    def serve_control(
        self,
        address: tuple[str, int] | str = ("127.0.0.1", 0),
        *,
        insecure: bool = False,
        open_metrics: bool = False,
        http_ingress: bool = False,
        keyless_actions: bool = False,
        allow_models: Iterable[type[Model] | str] = (),
    ) -> tuple[str, int]:
        """Start the HTTP control endpoint: ``GET /health``, ``POST /shutdown``, ``GET /``
        (the live status page), ``GET /status`` (JSON), ``GET /metrics`` (Prometheus) and
        the ``/models`` routes; with ``http_ingress`` also ``POST /submit`` and ``POST /map``
        (:mod:`._httpingress`).

        With a key, ``/status``, ``/metrics`` and ``GET /models`` need its read token
        (``pytaskqml token``) unless ``open_metrics`` lets anyone who can reach *address*
        read the first two (see :mod:`pytaskqml.observe.dashboard`); the routes that act need the
        act token (``pytaskqml token --act``). Without a key those are refused unless
        *keyless_actions* opens them to loopback clients (every local user). ``POST
        /models/load`` may name only the model classes of *allow_models* (class objects or
        ``"module:Class"``; see :meth:`Models.allow`)."""
        coord = cast("Coordinator", self)
        if coord._control is not None:
            raise RuntimeError("the control endpoint is already running")
        coord.models.allow(*allow_models)
        server = coord._control = coordinator_control(
            coord, address, insecure=insecure, keyless_actions=keyless_actions
        )
        install_status(
            server,
            coord.statistics,
            name=coord.name,
            open_metrics=open_metrics,
            ingress=coord.ingress_statistics,
        )
        if http_ingress:
            install_http_ingress(server, coord)
        server.start()
        return server.address

    def control_statistics(self) -> ControlStats | None:
        """The control endpoint's counters (connections open, served, refused, turned away
        with 503, timed out, broken pipes), or None if it is not running."""
        control = cast("Coordinator", self)._control
        return None if control is None else control.statistics()


def coordinator_control(
    coord: Coordinator,
    address: tuple[str, int] | str,
    *,
    insecure: bool,
    keyless_actions: bool = False,
) -> ControlServer:
    addr = _connection.parse_address(address) if isinstance(address, str) else address

    def health() -> dict[str, Any]:
        s = coord.statistics()
        return {
            "status": "ok",
            "role": "coordinator",
            "pid": os.getpid(),
            "workers": len(s.workers),
            "submitted": s.submitted,
            "completed": s.completed,
            "queued": s.queued,
            "in_flight": s.in_flight,
            "queue": None if s.queue is None else dataclasses.asdict(s.queue),
        }

    def stop() -> None:
        threading.Thread(
            target=coord.shutdown, name="pytaskqml-control-shutdown", daemon=True
        ).start()

    server = ControlServer(
        addr,
        health=health,
        shutdown=stop,
        authkey=coord.authkey,
        insecure=insecure,
        keyless_actions=keyless_actions,
    )
    server.add_route("GET", "/models", lambda r: Reply(200, _models(coord)), auth=True)
    server.add_route("POST", "/models/load", lambda r: _load(coord, r), max_body=MAX_MODEL_BODY)
    server.add_route("POST", "/models/unload", lambda r: _unload(coord, r))
    return server


def _models(coord: Coordinator) -> dict[str, Any]:
    return {"models": coord.models.list(), "status": coord.models.status()}


def _body(request: Request) -> dict[str, Any]:
    body = parse_json(request.body or b"{}")
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise ValueError('the body is a JSON object with a "name"')
    return body


def _load(coord: Coordinator, request: Request) -> Reply:
    try:
        body = _body(request)
        version = body.get("version")
        timeout = body.get("timeout", 60.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        result = coord.models.load_requested(
            body["name"],
            body.get("spec"),
            version=str(version) if version is not None else None,
            timeout=min(float(timeout), 3600.0),
        )
    except PermissionError as exc:
        return Reply(403, {"error": str(exc)})
    except (ValueError, TypeError) as exc:
        return Reply(400, {"error": str(exc)})
    except (ModelLoadError, TimeoutError) as exc:
        return Reply(409, {"error": str(exc)})
    return Reply(200, {"loaded": result})


def _unload(coord: Coordinator, request: Request) -> Reply:
    try:
        body = _body(request)
    except ValueError as exc:
        return Reply(400, {"error": str(exc)})
    try:
        coord.models.unload(body["name"])
    except KeyError as exc:
        return Reply(404, {"error": exc.args[0]})
    return Reply(200, {"unloaded": body["name"]})
