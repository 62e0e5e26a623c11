"""The ``pytaskqml`` command line.

::

    pytaskqml worker myapp:WordCount --listen 127.0.0.1:7001 --control 127.0.0.1:7101
    pytaskqml worker myapp:WordCount --connect 127.0.0.1:7000
    pytaskqml shutdown 127.0.0.1:7101
    pytaskqml health 127.0.0.1:7101

Errors a user can cause (a bad ``module:Class``, a port in use, a malformed address, a wrong
key) end the command with one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__, _auth, _connection, _control
from ._bootstrap import (
    call_setup,
    call_teardown,
    load_worker_class,
    make_worker,
    setup_logging,
    tune_malloc,
)
from ._errors import AuthenticationError, ConnectionLost, WorkerStartError
from ._serve import WorkerServer

log = logging.getLogger("pytaskqml")

EXIT_USAGE = 2
EXIT_FAILURE = 1


class _UserError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pytaskqml",
        description="Run pytaskqml workers and control running processes.",
        epilog="Keys: set PYTASKQML_AUTHKEY or pass --authkey-file; "
        "the coordinator must use the same key.",
    )
    parser.add_argument("--version", action="version", version=f"pytaskqml {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    w = sub.add_parser(
        "worker",
        help="serve a Worker subclass to a coordinator",
        description="Serve a pytaskqml.Worker subclass, either listening for a coordinator "
        "(--listen) or dialling in to one (--connect). Stops gracefully on SIGTERM, Ctrl-C or "
        "POST /shutdown to its control endpoint.",
    )
    w.add_argument("target", metavar="MODULE:CLASS", help="the worker class, e.g. myapp:WordCount")
    mode = w.add_mutually_exclusive_group(required=True)
    mode.add_argument("--listen", metavar="HOST:PORT", help="wait for a coordinator to connect")
    mode.add_argument(
        "--connect", metavar="HOST:PORT", help="dial in to a coordinator (reconnects)"
    )
    w.add_argument(
        "--control",
        metavar="HOST:PORT",
        default="127.0.0.1:0",
        help="HTTP control endpoint (/health, /shutdown); default 127.0.0.1 on a free port",
    )
    w.add_argument("--no-control", action="store_true", help="do not start the control endpoint")
    w.add_argument(
        "--kwargs", metavar="JSON", default="{}", help="constructor arguments as a JSON object"
    )
    w.add_argument("--name", help="worker name shown in the coordinator's statistics")
    _add_key_args(w)
    w.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback address without a key"
    )
    tls = w.add_argument_group("TLS (for connections between machines)")
    tls.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="certificate (with --listen: the server's; with --connect: a client certificate)",
    )
    tls.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert, if separate")
    tls.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA to verify the peer (with --listen: require client certificates signed by it)",
    )
    w.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="drop a coordinator that stays silent this long (default 5)",
    )
    w.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")

    s = sub.add_parser("shutdown", help="ask a process to stop gracefully via its control endpoint")
    s.add_argument("address", metavar="HOST:PORT", help="the control endpoint")
    _add_key_args(s)
    s.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")

    h = sub.add_parser("health", help="print a process's /health as JSON")
    h.add_argument("address", metavar="HOST:PORT", help="the control endpoint")
    h.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    return parser


def _add_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--authkey-file",
        metavar="PATH",
        help="file holding the shared key (else $PYTASKQML_AUTHKEY)",
    )


def _read_key(path: str | None) -> bytes | None:
    if path:
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
        except OSError as exc:
            raise _UserError(f"cannot read --authkey-file: {exc.strerror or exc}") from None
        if not key:
            raise _UserError(f"--authkey-file {path} is empty")
        return key
    env = os.environ.get("PYTASKQML_AUTHKEY")
    return env.encode() if env else None


def _address(text: str, what: str) -> tuple[str, int]:
    try:
        return _connection.parse_address(text)
    except ValueError as exc:
        raise _UserError(f"{what}: {exc}") from None


def _cmd_worker(args: argparse.Namespace) -> int:
    setup_logging(
        "pytaskqml",
        logging.WARNING
        if args.verbose <= 0
        else logging.INFO
        if args.verbose == 1
        else logging.DEBUG,
    )
    key = _read_key(args.authkey_file)
    listen = _address(args.listen, "--listen") if args.listen else None
    connect = _address(args.connect, "--connect") if args.connect else None
    control = None if args.no_control else _address(args.control, "--control")
    try:
        kwargs = json.loads(args.kwargs)
    except ValueError as exc:
        raise _UserError(f"--kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise _UserError("--kwargs must be a JSON object")
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
            raise _UserError(str(exc)) from None
    ssl_context = _tls_context(args, server=bool(listen))
    try:
        cls = load_worker_class(args.target)
    except WorkerStartError as exc:
        raise _UserError(str(exc)) from None

    listener = None
    if listen:
        try:
            listener = _connection.Listener(listen)
        except OSError as exc:
            raise _UserError(
                f"cannot listen on {_connection.format_address(listen)}: {exc.strerror or exc}",
                EXIT_FAILURE,
            ) from None
    tune_malloc()  # this process is a worker from here on
    try:
        try:
            worker = make_worker(cls, kwargs)
            call_setup(worker)
        except WorkerStartError as exc:
            raise _UserError(str(exc), EXIT_FAILURE) from None
        server = WorkerServer(
            worker,
            ssl_context=ssl_context,
            authkey=key or b"",
            name=args.name or "",
            heartbeat_timeout=args.heartbeat_timeout,
        )
        ctl = None
        if control is not None:
            try:
                ctl = _control.ControlServer(
                    control,
                    health=lambda: {
                        "status": "ok",
                        "role": "worker",
                        "pid": os.getpid(),
                        "worker": args.target,
                        "tasks_done": server.tasks_done,
                        "stopping": server.stopping,
                    },
                    shutdown=server.request_stop,
                    authkey=key,
                    insecure=args.insecure,
                )
            except (OSError, ValueError) as exc:
                call_teardown(worker)
                msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise _UserError(
                    f"cannot serve --control on {args.control}: {msg}", EXIT_FAILURE
                ) from None
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
            f"pytaskqml worker {args.target} (pid {os.getpid()}) {where}"
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
            call_teardown(worker)
            if ctl is not None:
                ctl.stop()
    finally:
        if listener is not None:
            listener.close()
    return 0


def _tls_context(args: argparse.Namespace, *, server: bool) -> ssl.SSLContext | None:
    if not (args.tls_cert or args.tls_ca):
        if args.tls_key:
            raise _UserError("--tls-key needs --tls-cert")
        return None
    try:
        if server:
            if not args.tls_cert:
                raise _UserError("--listen with TLS needs --tls-cert (and --tls-key)")
            return _auth.tls_server_context(args.tls_cert, args.tls_key, args.tls_ca)
        return _auth.tls_client_context(args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise _UserError(f"cannot load TLS files: {exc}") from None


def _cmd_shutdown(args: argparse.Namespace) -> int:
    address = _address(args.address, "address")
    key = _read_key(args.authkey_file)
    try:
        status, body = _control.request_shutdown(address, authkey=key, timeout=args.timeout)
    except OSError as exc:
        raise _UserError(
            f"cannot reach {_connection.format_address(address)}: {exc.strerror or exc}",
            EXIT_FAILURE,
        ) from None
    if status >= 400:
        raise _UserError(
            f"{_connection.format_address(address)} refused: {status} "
            f"{body.get('error', '')}".rstrip(),
            EXIT_FAILURE,
        )
    print(f"{_connection.format_address(address)}: {body.get('status', status)}")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    address = _address(args.address, "address")
    try:
        status, body = _control.get_health(address, timeout=args.timeout)
    except OSError as exc:
        raise _UserError(
            f"cannot reach {_connection.format_address(address)}: {exc.strerror or exc}",
            EXIT_FAILURE,
        ) from None
    print(json.dumps(body, indent=2, sort_keys=True))
    return 0 if status == 200 else EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    commands: dict[str, Any] = {
        "worker": _cmd_worker,
        "shutdown": _cmd_shutdown,
        "health": _cmd_health,
    }
    try:
        return int(commands[args.command](args))
    except _UserError as exc:
        print(f"pytaskqml: error: {exc}", file=sys.stderr)
        return exc.code
    except (ConnectionLost, AuthenticationError) as exc:
        print(f"pytaskqml: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
