"""The HTTP JSON ingress: ``POST /submit`` and ``POST /map`` on a control endpoint.

``POST /submit`` takes ``{"payload": ..., "priority": n}`` (``priority`` optional; or any
other JSON value, taken as the payload itself) and replies ``200 {"result": ...}``; a task
that failed replies ``500 {"error", "type", "traceback"}``, one that missed its deadline
``504``, a target that no longer takes work ``503``. ``POST /map`` takes a JSON array (or
``{"payloads": [...], "priority": n}``) and replies ``200`` with a JSON array of the
results in order, a failed item in its place as ``{"error", "type", "traceback"}``. A body that
is not strict JSON - nested deeper than :data:`~._control.MAX_JSON_DEPTH`, holding ``NaN``,
``Infinity`` or a number out of a double's range, or a ``/map`` body that is not an array - is
``400`` with the reason; a body over *max_body* bytes ``413``. A result that is not strict
JSON (a ``NaN``, say) is a ``500`` saying so, never a reply that is not JSON. A client that
hangs up before its reply leaves nothing running for it: its items not started yet are
cancelled (see :data:`HANG_UP_POLL`). Both routes act:
they need the act token when the endpoint has a key, like ``POST /shutdown``. Payloads and
results are plain JSON here (no raw buffers).

:func:`install_http_ingress` adds the routes for any target with ``stream()`` (a
:class:`Coordinator`, or a pipeline); :meth:`Coordinator.serve_control` takes
``http_ingress=True``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ..errors import ClosedError
from ..wire.control import ControlServer, Reply, Request, encode_json, parse_json
from .server import IngressTarget, error_fields

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20
MAX_BUFFERSIZE = 64
# How often a request's items look whether its client is still there (seconds).
HANG_UP_POLL = 0.25


def install_http_ingress(
    server: ControlServer,
    target: IngressTarget,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    timeout: float | None = None,
) -> None:
    """Serve ``POST /submit`` and ``POST /map`` for *target* on *server* (see the module's
    docstring); *timeout* bounds each item as the stream's ``timeout`` does."""

    def submit(request: Request) -> Reply:
        try:
            body = _parse(request.body)
        except ValueError as exc:
            return Reply(400, {"error": str(exc)})
        payload = body["payload"] if isinstance(body, dict) and "payload" in body else body
        priority = body.get("priority") if isinstance(body, dict) and "payload" in body else None
        if not _priority_ok(priority):
            return Reply(400, {"error": "priority must be an integer"})
        try:
            (value,) = run(target, [payload], timeout, priority, request.hung_up)
        except ClosedError as exc:
            return Reply(503, {"error": str(exc)})
        error = error_fields(value)
        if error is not None:
            status = 504 if error["type"] == "TaskTimeout" else 500
            return Reply(status, _error_body(error))
        return _json_reply({"result": value})

    def map_(request: Request) -> Reply:
        try:
            body = _parse(request.body)
        except ValueError as exc:
            return Reply(400, {"error": str(exc)})
        priority = None
        if isinstance(body, dict) and isinstance(body.get("payloads"), list):
            body, priority = body["payloads"], body.get("priority")
        if not isinstance(body, list):
            return Reply(
                400,
                {"error": 'the body of /map is a JSON array of payloads (or {"payloads": [...]})'},
            )
        if not _priority_ok(priority):
            return Reply(400, {"error": "priority must be an integer"})
        try:
            values = run(target, body, timeout, priority, request.hung_up)
        except ClosedError as exc:
            return Reply(503, {"error": str(exc)})
        out = []
        for value in values:
            error = error_fields(value)
            out.append(value if error is None else _error_body(error))
        return _json_reply(out)

    server.add_route("POST", "/submit", submit, max_body=max_body)
    server.add_route("POST", "/map", map_, max_body=max_body)


def _priority_ok(priority: Any) -> bool:
    return priority is None or (isinstance(priority, int) and not isinstance(priority, bool))


def _parse(body: bytes) -> Any:
    if not body:
        raise ValueError("the body is empty: send JSON")
    return parse_json(body)


def _error_body(error: dict[str, str]) -> dict[str, str]:
    return {"error": error["message"], "type": error["type"], "traceback": error["traceback"]}


def _json_reply(body: Any) -> Reply:
    try:
        data = encode_json(body)
    except (TypeError, ValueError) as exc:
        return Reply(500, {"error": f"the result is not plain JSON: {exc}"})
    return Reply(200, data)


def run(
    target: IngressTarget,
    payloads: list[Any],
    timeout: float | None,
    priority: int | None = None,
    hung_up: Callable[[], bool] | None = None,
) -> list[Any]:
    """The outcomes of *payloads* on an ordered stream of *target*, in order: a value, or the
    error (or ``TaskTimeout``) in its place. ``ClosedError`` when the target takes no work.
    *priority*: the items' priority (a target whose streams have none refuses them).
    *hung_up*: tells whether the client that asked has gone; looked at every
    :data:`HANG_UP_POLL` seconds while the items run, and once it has, the items not started
    are cancelled (their places hold ``CancelledError``) - nobody would read their results."""
    stream = target.stream(
        buffersize=max(1, min(len(payloads), MAX_BUFFERSIZE)),
        ordered=True,
        on_error="return",
        timeout=timeout,
    )
    refused: list[BaseException] = []

    def feed() -> None:
        try:
            put: Any = stream.put
            for p in payloads:
                if priority is None:
                    put(p)
                else:
                    put(p, priority=priority)
        except BaseException as exc:
            refused.append(exc)
        finally:
            stream.close()

    feeder = threading.Thread(target=feed, name="pytaskqml-http-ingress-feed", daemon=True)
    feeder.start()
    done = threading.Event()
    if hung_up is not None:

        def watch() -> None:
            while not done.wait(HANG_UP_POLL):
                if hung_up():
                    log.info("http ingress: the client hung up; cancelling its items")
                    stream.cancel("client hung up")
                    return

        threading.Thread(target=watch, name="pytaskqml-http-ingress-watch", daemon=True).start()
    try:
        out = list(stream)
    finally:
        done.set()
    feeder.join()
    if refused:
        if isinstance(refused[0], ClosedError):
            raise refused[0]
        log.warning("http ingress: an item was refused: %s", refused[0])
        out += [refused[0]] * (len(payloads) - len(out))
    return out
