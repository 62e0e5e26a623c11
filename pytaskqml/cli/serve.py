"""``pytaskqml serve CONFIG``: run a pipeline (see :mod:`._pipeconfig`) as a service (see
:mod:`._service`) until SIGTERM, SIGINT or ``POST /shutdown``; then drain and exit."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

from ..errors import WorkerStartError
from ..pipeline import config as _pipeconfig
from ..service.service import Service
from ..worker.bootstrap import setup_logging
from .common import EXIT_FAILURE, EXIT_USAGE, UserError, add_key_args, read_key
from .worker import add_tls_args, tls_context

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 30.0


def register(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="run a pipeline from a TOML/JSON file as a service (ingress port, HTTP ingress)",
        description="Start the pipeline CONFIG describes and serve it on the addresses of its "
        "[service] table: `ingress` (producers using pytaskqml.Client), `http` (POST /submit, "
        "POST /map, GET /health, POST /shutdown) and `control` (GET /health, POST /shutdown); "
        "both also serve the status page GET /, GET /status (for pytaskqml status: the "
        "stages as rows) and GET /metrics. "
        "Prints one JSON line with the bound addresses on stdout once serving. On SIGTERM, "
        "SIGINT or POST /shutdown it drains: new work is refused with a clear error, every "
        "accepted item is finished and answered (for at most --drain-timeout seconds), then "
        "it exits 0 (1 if the drain timed out). A second SIGINT stops at once. Workers "
        "named MODULE:NAME are imported from the current directory first.",
    )
    s.add_argument("config", metavar="CONFIG", help="the pipeline file (.toml or .json)")
    s.add_argument("--ingress", metavar="HOST:PORT", help="override [service] ingress")
    s.add_argument("--http", metavar="HOST:PORT", help="override [service] http")
    s.add_argument("--control", metavar="HOST:PORT", help="override [service] control")
    s.add_argument("--log-file", metavar="PATH", help="log there instead of stderr")
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=DRAIN_TIMEOUT,
        metavar="SECONDS",
        help=f"longest wait for accepted work at shutdown (default {DRAIN_TIMEOUT:g})",
    )
    s.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback address without a key"
    )
    s.add_argument(
        "--keyless-actions",
        action="store_true",
        help="without a key, let loopback clients (every local user) call POST /submit, /map "
        "and /shutdown; without this they need a key's act token",
    )
    add_key_args(s)
    add_tls_args(
        s,
        cert="the ingress port's certificate",
        ca="require producers' certificates signed by this CA",
    )
    s.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    s.set_defaults(run=run)


def _doc(args: argparse.Namespace) -> dict[str, Any]:
    try:
        doc = _pipeconfig.read(args.config)
    except _pipeconfig.ConfigError as exc:
        raise UserError(exc.problems[0], code=EXIT_USAGE) from None
    for what in ("ingress", "http", "control"):
        value = getattr(args, what)
        if value is not None:
            service = doc.setdefault("service", {})
            if isinstance(service, dict):
                service[what] = value
    if args.log_file is None and isinstance(doc.get("service"), dict):
        args.log_file = doc["service"].get("log_file")
    return doc


def run(args: argparse.Namespace) -> int:
    if not args.drain_timeout >= 0:
        raise UserError("--drain-timeout must be 0 or more")
    doc = _doc(args)
    problems = _pipeconfig.check(doc)
    if problems:
        for line in problems:
            print(f"pytaskqml: {args.config}: {line}", file=sys.stderr)
        return EXIT_USAGE
    try:
        setup_logging(
            "pytaskqml serve", logging.WARNING if args.quiet else logging.INFO, args.log_file
        )
    except OSError as exc:
        raise UserError(f"cannot open --log-file: {exc.strerror or exc}") from None
    key = read_key(args.authkey_file)
    try:
        service = Service(
            doc,
            authkey=key,
            tls=tls_context(args, server=True),
            insecure=args.insecure,
            keyless_actions=args.keyless_actions,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None

    interrupts = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        service.stopping.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        service.start()
    except (OSError, ValueError, WorkerStartError) as exc:
        raise UserError(f"cannot start the service: {exc}", EXIT_FAILURE) from None
    drained = False
    try:
        log.info("serving %s", ", ".join(f"{k} {v}" for k, v in service.addresses.items()))
        print(json.dumps(service.addresses), flush=True)
        while not service.stopping.wait(0.5):
            pass
        log.info("stop requested: draining (at most %gs)", args.drain_timeout)
        service.drain("service is draining: it takes no new work")
        drained = service.wait_drained(args.drain_timeout)
        if not drained:
            log.warning(
                "drain timed out: %d items unanswered",
                service.gate.outstanding() if service.gate else 0,
            )
        service.stop(cancel=not drained)
    except KeyboardInterrupt:
        service.stop(cancel=True)
        return 130
    log.info("stopped")
    return 0 if drained else EXIT_FAILURE
