"""A coordinator's control routes (the endpoint is started by ``Coordinator.serve_control()``).

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
from typing import Any, Protocol

from .core.stats import Statistics
from .engine.modelreg import Models
from .errors import ModelLoadError
from .wire import connection as _connection
from .wire.control import ControlServer, Reply, Request, parse_json

MAX_MODEL_BODY = 64 * 1024


class Controlled(Protocol):
    """What the routes use of a :class:`~pytaskqml.Coordinator` (which holds this endpoint:
    described here rather than imported, so the two modules do not import each other)."""

    @property
    def authkey(self) -> bytes | None: ...
    @property
    def models(self) -> Models: ...
    def statistics(self) -> Statistics: ...
    def shutdown(self) -> None: ...


def coordinator_control(
    coord: Controlled,
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


def _models(coord: Controlled) -> dict[str, Any]:
    return {"models": coord.models.list(), "status": coord.models.status()}


def _body(request: Request) -> dict[str, Any]:
    body = parse_json(request.body or b"{}")
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise ValueError('the body is a JSON object with a "name"')
    return body


def _load(coord: Controlled, request: Request) -> Reply:
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


def _unload(coord: Controlled, request: Request) -> Reply:
    try:
        body = _body(request)
    except ValueError as exc:
        return Reply(400, {"error": str(exc)})
    try:
        coord.models.unload(body["name"])
    except KeyError as exc:
        return Reply(404, {"error": exc.args[0]})
    return Reply(200, {"unloaded": body["name"]})
