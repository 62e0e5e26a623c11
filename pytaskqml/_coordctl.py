"""A coordinator's control endpoint: ``serve_control()`` and its routes.

``GET /health`` (open), ``POST /shutdown``; the models of :attr:`Coordinator.models`:
``GET /models`` (their status per worker), ``POST /models/load`` with a JSON body
``{"name", "spec": {"class": "module:Class", "config": {...}}, "version"?}`` and ``POST
/models/unload`` with ``{"name"}``. Every route that changes something needs the token when
the coordinator has a key (see :mod:`._control`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import TYPE_CHECKING, Any, cast

from . import _connection
from ._control import ControlServer, Reply, Request
from ._dashboard import install_coordinator as install_status
from ._errors import ModelLoadError
from ._httpingress import install_http_ingress

if TYPE_CHECKING:
    from ._coordinator import Coordinator

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
    ) -> tuple[str, int]:
        """Start the HTTP control endpoint: ``GET /health``, ``POST /shutdown``, ``GET /``
        (the live status page), ``GET /status`` (JSON) and ``GET /metrics`` (Prometheus);
        with ``http_ingress`` also ``POST /submit`` and ``POST /map`` (:mod:`._httpingress`).

        With a key, ``/status`` and ``/metrics`` need its token (``pytaskqml token``) unless
        ``open_metrics`` lets anyone who can reach *address* read them (see
        :mod:`pytaskqml._dashboard`)."""
        coord = cast("Coordinator", self)
        if coord._control is not None:
            raise RuntimeError("the control endpoint is already running")
        server = coord._control = coordinator_control(coord, address, insecure=insecure)
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


def coordinator_control(
    coord: Coordinator, address: tuple[str, int] | str, *, insecure: bool
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
        addr, health=health, shutdown=stop, authkey=coord.authkey, insecure=insecure
    )
    server.add_route("GET", "/models", lambda r: Reply(200, _models(coord)), auth=True)
    server.add_route(
        "POST", "/models/load", lambda r: _load(coord, r), auth=True, max_body=MAX_MODEL_BODY
    )
    server.add_route("POST", "/models/unload", lambda r: _unload(coord, r), auth=True)
    return server


def _models(coord: Coordinator) -> dict[str, Any]:
    return {"models": coord.models.list(), "status": coord.models.status()}


def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise ValueError('the body is a JSON object with a "name"')
    return body


def _load(coord: Coordinator, request: Request) -> Reply:
    try:
        body = _body(request)
        version = body.get("version")
        result = coord.models.load(
            body["name"],
            body.get("spec"),
            version=str(version) if version is not None else None,
            timeout=float(body.get("timeout", 60.0)),
        )
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
