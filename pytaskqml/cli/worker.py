"""``pytaskqml worker``: serve a Worker subclass to coordinators."""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys
from typing import Any

from ..errors import WorkerStartError
from ..observe.dashboard import install_worker
from ..wire import auth as _auth
from ..wire import connection as _connection
from ..wire import control as _control
from ..worker.bootstrap import (
    call_setup,
    call_teardown,
    load_worker_class,
    make_worker,
    tune_malloc,
)
from ..worker.functions import FunctionWorker
from ..worker.models import ModelTable, read_model_file
from ..worker.serve import WorkerServer
from .common import (
    EXIT_FAILURE,
    UserError,
    add_key_args,
    address,
    log_verbosity,
    read_key,
)


def register(sub: Any) -> None:
    w = sub.add_parser(
        "worker",
        help="serve a Worker subclass to a coordinator",
        description="Serve a pytaskqml.Worker subclass, either listening for a coordinator "
        "(--listen) or dialling in to one (--connect). Stops gracefully on SIGTERM, Ctrl-C or "
        "POST /shutdown to its control endpoint. MODULE is imported from the current "
        "directory first, as with `python -m pytaskqml`.",
    )
    w.add_argument(
        "target",
        metavar="MODULE:CLASS",
        nargs="?",
        help="the worker class, e.g. myapp:WordCount (optional with --models: a worker that "
        "serves only named models)",
    )
    w.add_argument(
        "--models",
        metavar="FILE",
        help="model file (JSON, or TOML on Python 3.11+): the model classes this worker may "
        "load when a coordinator asks, and models to load at start",
    )
    mode = w.add_mutually_exclusive_group(required=True)
    mode.add_argument("--listen", metavar="HOST:PORT", help="wait for a coordinator to connect")
    mode.add_argument(
        "--connect", metavar="HOST:PORT", help="dial in to a coordinator (reconnects)"
    )
    w.add_argument(
        "--control",
        metavar="HOST:PORT",
        default="127.0.0.1:0",
        help="HTTP control endpoint (/health, /shutdown, /status, /metrics); default 127.0.0.1 "
        "on a free port",
    )
    w.add_argument("--no-control", action="store_true", help="do not start the control endpoint")
    w.add_argument(
        "--open-metrics",
        action="store_true",
        help="serve /metrics and /status without the token (for a scraper that can reach "
        "--control); /shutdown still needs it",
    )
    w.add_argument(
        "--kwargs",
        metavar="JSON",
        default="{}",
        help="constructor arguments as a JSON object (default {}: none)",
    )
    w.add_argument("--name", help="worker name shown in the coordinator's statistics")
    add_key_args(w)
    w.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback address without a key"
    )
    w.add_argument(
        "--keyless-actions",
        action="store_true",
        help="without a key, let loopback clients (every local user) POST /shutdown to "
        "--control; without this it needs a key's act token",
    )
    add_tls_args(
        w,
        cert="certificate (with --listen: the server's; with --connect: a client certificate)",
        ca="CA to verify the peer (with --listen: require client certificates signed by it)",
    )
    w.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="drop a coordinator that stays silent this long (default 5)",
    )
    w.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    w.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    log_verbosity(args.verbose)
    key = read_key(args.authkey_file)
    listen = address(args.listen, "--listen") if args.listen else None
    connect = address(args.connect, "--connect") if args.connect else None
    control = None if args.no_control else address(args.control, "--control")
    try:
        kwargs = json.loads(args.kwargs)
    except ValueError as exc:
        raise UserError(f"--kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise UserError("--kwargs must be a JSON object")
    if listen:
        try:
            _connection.check_bind(
                listen[0],
                key,
                insecure=args.insecure,
                what="listen",
                fix="set PYTASKQML_AUTHKEY or --authkey-file, or pass --insecure",
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
    ssl_context = tls_context(args, server=bool(listen))
    if args.target is None and not args.models:
        raise UserError("name a worker class (MODULE:CLASS), or give --models")
    allowed: set[str] = set()
    initial: dict[str, tuple[dict[str, Any], str]] = {}
    if args.models:
        try:
            allowed, initial = read_model_file(args.models)
        except ValueError as exc:
            raise UserError(f"--models: {exc}") from None
    target = args.target or "pytaskqml.worker.models:ModelWorker"
    try:
        cls = load_worker_class(target)
    except WorkerStartError as exc:
        raise UserError(str(exc)) from None
    # A peer names the function a task calls: only the operator's list may be imported.
    problem = FunctionWorker.standalone_problem(kwargs) if issubclass(cls, FunctionWorker) else None
    if problem:
        raise UserError(f"{target}: {problem}")

    listener = None
    if listen:
        try:
            listener = _connection.Listener(listen)
        except OSError as exc:
            raise UserError(
                f"cannot listen on {_connection.format_address(listen)}: {exc.strerror or exc}",
                EXIT_FAILURE,
            ) from None
    tune_malloc()  # this process is a worker from here on
    try:
        try:
            worker = make_worker(cls, kwargs)
            call_setup(worker)
        except WorkerStartError as exc:
            raise UserError(str(exc), EXIT_FAILURE) from None
        server = WorkerServer(
            worker,
            ssl_context=ssl_context,
            authkey=key or b"",
            name=args.name or "",
            heartbeat_timeout=args.heartbeat_timeout,
        )
        # Only the classes of the --models file can be loaded: a peer names a model by data,
        # never a module of its choosing.
        server.models = ModelTable(allowed, server.report_model)
        for name, (spec, version) in initial.items():
            if not server.models.load_now(name, spec, version):
                call_teardown(worker)
                raise UserError(f"--models: model {name!r} failed to load", EXIT_FAILURE)
        ctl = None
        if control is not None:
            try:
                ctl = _control.ControlServer(
                    control,
                    health=lambda: {
                        "status": "ok",
                        "role": "worker",
                        "pid": os.getpid(),
                        "worker": target,
                        "models": server.models.loaded() if server.models else {},
                        "tasks_done": server.tasks_done,
                        "stopping": server.stopping,
                    },
                    shutdown=server.request_stop,
                    authkey=key,
                    insecure=args.insecure,
                    keyless_actions=args.keyless_actions,
                )
            except (OSError, ValueError) as exc:
                call_teardown(worker)
                msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise UserError(
                    f"cannot serve --control on {args.control}: {msg}", EXIT_FAILURE
                ) from None
            install_worker(
                ctl, server.statistics, target=args.target, open_metrics=args.open_metrics
            )
            ctl.start()
            server.control_address = _connection.format_address(ctl.address)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: server.request_stop())
        where = (
            f"listening on {_connection.format_address(listener.address)}"
            if listener
            else f"dialling {_connection.format_address(connect)}"
            if connect
            else ""
        )
        print(
            f"pytaskqml worker {target} (pid {os.getpid()}) {where}"
            + (f"; control at http://{server.control_address}" if ctl else ""),
            file=sys.stderr,
            flush=True,
        )
        try:
            if listener is not None:
                server.run_listen(listener)
            else:
                assert connect is not None
                server.run_dial(connect, reconnect=True)
        finally:
            server.models.close()
            call_teardown(worker)
            if ctl is not None:
                ctl.stop()
    finally:
        if listener is not None:
            listener.close()
    return 0


def add_tls_args(p: argparse.ArgumentParser, *, cert: str, ca: str) -> None:
    tls = p.add_argument_group("TLS (for connections between machines)")
    tls.add_argument("--tls-cert", metavar="PEM", help=cert)
    tls.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert, if separate")
    tls.add_argument("--tls-ca", metavar="PEM", help=ca)


def tls_context(args: argparse.Namespace, *, server: bool) -> ssl.SSLContext | None:
    if not (args.tls_cert or args.tls_ca):
        if args.tls_key:
            raise UserError("--tls-key needs --tls-cert")
        return None
    try:
        if server:
            if not args.tls_cert:
                raise UserError("--listen with TLS needs --tls-cert (and --tls-key)")
            return _auth.tls_server_context(args.tls_cert, args.tls_key, args.tls_ca)
        return _auth.tls_client_context(args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot load TLS files: {exc}") from None
