"""``pytaskqml models ADDR list | load | unload``: named models on a running coordinator, through
its control endpoint (``Coordinator.serve_control()``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..wire import connection as _connection
from ..wire import control as _control
from .common import EXIT_FAILURE, UserError, add_key_args, address, read_key, unreachable


def register(sub: Any) -> None:
    m = sub.add_parser(
        "models",
        help="list, load or unload named models on a running coordinator",
        description="Named models on a coordinator, through its control endpoint. Loading "
        "names the class as MODULE:CLASS; a worker started with `pytaskqml worker --models "
        "FILE` loads only the classes its file allows.",
    )
    m.add_argument("address", metavar="HOST:PORT", help="the coordinator's control endpoint")
    _add_options(m)
    # The same options after the action too (`models HOST:PORT unload NAME --timeout 5`), as
    # `status` takes them anywhere; SUPPRESS keeps an action's parser from resetting a value
    # given before it.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    _add_options(common)
    actions = m.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser(
        "list",
        help="the models and their state on every worker",
        description="Print each named model, its version and its state on every worker.",
        parents=[common],
    )
    ls.add_argument("--json", action="store_true", help="print the JSON the endpoint returns")
    load = actions.add_parser(
        "load",
        help="load (or update) a model on every worker",
        description="Load model NAME from MODULE:CLASS on every worker, or update it to a new "
        "version while tasks flow; exits 1 if no worker could load it.",
        parents=[common],
    )
    load.add_argument("name", help="the name tasks use (submit(..., model=NAME))")
    load.add_argument("cls", metavar="MODULE:CLASS", help="the pytaskqml.Model subclass to load")
    load.add_argument(
        "--config", default="{}", metavar="JSON", help="the model's load() config (default {})"
    )
    load.add_argument("--version", help="the version to call it (default: a counter)")
    unload = actions.add_parser(
        "unload",
        help="unload a model everywhere (exit code 1 if no worker knows it)",
        description="Unload model NAME from every worker; its tasks still waiting fail.",
        parents=[common],
    )
    unload.add_argument("name", help="the model's name")
    m.set_defaults(run=run)


def _add_options(p: argparse.ArgumentParser) -> None:
    add_key_args(p)
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="longest wait for the endpoint (and for a load) (default 60)",
    )


def run(args: argparse.Namespace) -> int:
    where = address(args.address, "address")
    key = read_key(args.authkey_file)
    if args.action == "list":
        _, body = _call(where, "GET", "/models", key, b"", args.timeout)
        if args.json:
            print(json.dumps(body, indent=2, sort_keys=True))
            return 0
        _print_table(body)
        return 0
    if args.action == "load":
        try:
            config = json.loads(args.config)
        except ValueError as exc:
            raise UserError(f"--config is not valid JSON: {exc}") from None
        request: dict[str, Any] = {
            "name": args.name,
            "spec": {"class": args.cls, "config": config},
            "timeout": args.timeout,
        }
        if args.version is not None:
            request["version"] = args.version
        _, body = _call(
            where, "POST", "/models/load", key, json.dumps(request).encode(), args.timeout + 5
        )
        for worker, state in sorted(body.get("loaded", {}).items()):
            print(f"{worker}: {state}")
        return 0
    _call(
        where,
        "POST",
        "/models/unload",
        key,
        json.dumps({"name": args.name}).encode(),
        min(args.timeout, 10.0),
    )
    print(f"unloaded {args.name}")
    return 0


def _call(
    where: tuple[str, int], method: str, path: str, key: bytes | None, body: bytes, timeout: float
) -> tuple[int, dict[str, Any]]:
    """Call a route; one line and exit 1 if it cannot be reached or refuses."""
    try:
        status, reply = _control.request(
            where, method, path, authkey=key, body=body, timeout=timeout
        )
    except OSError as exc:
        raise unreachable(where, exc) from None
    if not isinstance(reply, dict):
        reply = {"error": str(reply)}
    if status == 404 and reply.get("error"):  # the endpoint answered: no such model
        raise UserError(f"{_connection.format_address(where)}: {reply['error']}", EXIT_FAILURE)
    if status >= 400:
        raise UserError(
            f"{_connection.format_address(where)} refused: {status} {reply.get('error', '')}",
            EXIT_FAILURE,
        )
    return status, reply


def _print_table(body: dict[str, Any]) -> None:
    models = body.get("models", {})
    status = body.get("status", {})
    rows = [("MODEL", "VERSION", "WORKER", "STATE", "DETAIL")]
    for name in sorted(set(models) | set(status)):
        per = status.get(name) or {}
        if not per:
            rows.append((name, str(models.get(name, "")), "-", "-", ""))
        for worker, st in sorted(per.items()):
            detail = str(st.get("error", ""))
            update = st.get("update")
            if isinstance(update, dict):  # a newer version loading, or failed, beside it
                detail = f"update to {update.get('version', '?')} {update.get('state', '')}"
                if update.get("error"):
                    detail += f": {update['error']}"
            rows.append(
                (name, str(st.get("version", models.get(name, ""))), worker,
                 str(st.get("state", "")), detail)
            )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    sys.stdout.flush()
