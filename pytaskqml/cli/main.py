"""The ``pytaskqml`` command line.

::

    pytaskqml worker pytaskqml.examples:WordCount --listen 127.0.0.1:7001 --control 127.0.0.1:7101
    pytaskqml worker myapp:WordCount --connect 127.0.0.1:7000
    pytaskqml shutdown 127.0.0.1:7101
    pytaskqml health 127.0.0.1:7101
    pytaskqml queue serve redis://127.0.0.1:6379/0 --stream jobs --worker myapp:Model -n 2
    pytaskqml queue status redis://127.0.0.1:6379/0 --stream jobs
    pytaskqml status 127.0.0.1:7100 --watch
    pytaskqml token --url 127.0.0.1:7100
    pytaskqml run pipeline.toml --input items.jsonl

Each command lives in a module of its own (``worker``, ``models``...) with
``register(subparsers)``, which sets ``run`` as the parser's default. Errors a user can cause
(a bad ``module:Class``, a port in use, a malformed address, a wrong key) end the command with
one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..errors import AuthenticationError, ConnectionLost
from ..wire import connection as _connection
from ..wire import control as _control
from .common import EXIT_FAILURE, UserError, add_key_args, address, read_key, unreachable
from .models import register as _register_models
from .queue import register as _register_queue
from .run import register as _register_run
from .serve import register as _register_serve
from .status import register as _register_status
from .token import register as _register_token
from .worker import register as _register_worker

# Commands that import the user's code (MODULE:CLASS, a pipeline file's workers): they find
# modules in the current directory, as `python -m pytaskqml` does.
IMPORTING = ("run", "serve", "worker")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C

# Each command's register(subparsers), in the order --help lists them.
REGISTER: list[Callable[[Any], None]] = [
    _register_worker,
    _register_models,
    _register_queue,
    _register_run,
    _register_serve,
    _register_status,
    _register_token,
]


def make_parser() -> argparse.ArgumentParser:
    """The parser of every command (``pytaskqml --help``)."""
    parser = argparse.ArgumentParser(
        prog="pytaskqml",
        description="Run pytaskqml workers and control running processes.",
        epilog="Keys: set PYTASKQML_AUTHKEY or pass --authkey-file; "
        "the coordinator must use the same key. run, serve and worker import MODULE names "
        "from the current directory first (as `python -m pytaskqml` does), then from "
        "PYTHONPATH and the installed packages. Exit codes: 0 done, 1 failed, 2 usage "
        "error, 130 stopped by Ctrl-C.",
    )
    parser.add_argument("--version", action="version", version=f"pytaskqml {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in REGISTER:
        register(sub)

    s = sub.add_parser(
        "shutdown",
        help="ask a process to stop gracefully via its control endpoint",
        description="POST /shutdown to a control endpoint (sending the token when a key is "
        "set): a worker finishes what it holds and exits, a coordinator or service drains. "
        "Exits 1 if the endpoint refuses or cannot be reached.",
    )
    s.add_argument("address", metavar="HOST:PORT", help="the control endpoint")
    add_key_args(s)
    s.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the endpoint's answer (default 5)",
    )
    s.set_defaults(run=_cmd_shutdown)

    h = sub.add_parser(
        "health",
        help="print a process's /health as JSON",
        description="Print GET /health of a control endpoint as JSON (no key needed); exits "
        "1 unless it answers 200.",
    )
    h.add_argument("address", metavar="HOST:PORT", help="the control endpoint")
    h.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the endpoint's answer (default 5)",
    )
    h.set_defaults(run=_cmd_health)
    return parser


def _cmd_shutdown(args: argparse.Namespace) -> int:
    where = address(args.address, "address")
    key = read_key(args.authkey_file)
    try:
        status, body = _control.request_shutdown(where, authkey=key, timeout=args.timeout)
    except OSError as exc:
        raise unreachable(where, exc) from None
    if status >= 400:
        raise UserError(
            f"{_connection.format_address(where)} refused: {status} "
            f"{body.get('error', '')}".rstrip(),
            EXIT_FAILURE,
        )
    print(f"{_connection.format_address(where)}: {body.get('status', status)}")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    where = address(args.address, "address")
    try:
        status, body = _control.get_health(where, timeout=args.timeout)
    except OSError as exc:
        raise unreachable(where, exc) from None
    print(json.dumps(body, indent=2, sort_keys=True))
    return 0 if status == 200 else EXIT_FAILURE


def cwd_on_path() -> None:
    """Put the current directory first on ``sys.path``, where ``python -m`` puts it (the
    ``pytaskqml`` script's own directory is there instead). Spawned workers inherit it."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0, 1 for a failure, 2 for a usage error, 130
    when stopped by Ctrl-C). What a user can cause ends in one line on stderr; ``--verbose``
    (where a command has it) adds the traceback."""
    args = make_parser().parse_args(argv)
    if args.command in IMPORTING:
        cwd_on_path()
    verbose = getattr(args, "verbose", 0) > 0
    try:
        return int(args.run(args))
    except UserError as exc:
        if verbose and exc.__context__ is not None:
            traceback.print_exception(exc.__context__)
        print(f"pytaskqml: error: {exc}", file=sys.stderr)
        return exc.code
    except (ConnectionLost, AuthenticationError) as exc:
        if verbose:
            traceback.print_exc()
        print(f"pytaskqml: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        print("pytaskqml: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
