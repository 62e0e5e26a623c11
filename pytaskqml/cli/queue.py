"""``pytaskqml queue``: run a coordinator fed from a shared Redis queue, or show the queue.

::

    pytaskqml queue serve redis://127.0.0.1:6379/0 --stream jobs --worker myapp:Model -n 2
    pytaskqml queue status redis://127.0.0.1:6379/0 --stream jobs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from ..errors import WorkerStartError
from ..worker.bootstrap import load_worker_class, tune_malloc
from .common import EXIT_FAILURE, UserError, address, log_verbosity, read_key


def register(sub: Any) -> None:
    q = sub.add_parser(
        "queue",
        help="serve or inspect a shared Redis queue (needs pytaskqml[redis])",
        description="A coordinator fed from a Redis Streams queue that coordinators on any "
        "number of hosts share, or the state of such a queue.",
    )
    actions = q.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = actions.add_parser(
        "serve",
        help="run a coordinator fed from the queue",
        description="Run a coordinator that takes tasks from the queue's stream, runs them on "
        "its workers (--worker spawned -n times, and workers dialling in to --listen) and "
        "writes each result back to its producer. On SIGTERM or Ctrl-C it stops reading, "
        "finishes the entries it holds and exits.",
    )
    _queue_args(s)
    s.add_argument("--worker", metavar="MODULE:CLASS", help="spawn workers of this class")
    s.add_argument("-n", "--processes", type=int, default=1, help="how many (default 1)")
    s.add_argument(
        "--kwargs",
        metavar="JSON",
        default="{}",
        help="constructor arguments as a JSON object (default {}: none)",
    )
    s.add_argument(
        "--listen", metavar="HOST:PORT", help="also accept workers that dial in (needs a key)"
    )
    s.add_argument("--control", metavar="HOST:PORT", help="serve /health and /shutdown here")
    s.add_argument(
        "--keyless-actions",
        action="store_true",
        help="without a key, let loopback clients (every local user) POST /shutdown to "
        "--control; without this it needs a key's act token",
    )
    s.add_argument(
        "--authkey-file", metavar="PATH", help="key for workers (else $PYTASKQML_AUTHKEY)"
    )
    s.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    s.set_defaults(run=serve)
    st = actions.add_parser(
        "status",
        help="print the queue's state as JSON",
        description="Print the queue's state as JSON: the stream's length, the group's "
        "pending entries and lag, the consumers and the dead letters.",
    )
    _queue_args(st)
    st.set_defaults(run=status)


def _queue_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="redis://[:password@]host:port/db or rediss://... (TLS)")
    p.add_argument("--stream", default="pytaskqml", help="the queue's stream (default pytaskqml)")
    p.add_argument(
        "--group", default="coordinators", help="the consumer group (default coordinators)"
    )
    p.add_argument(
        "--claim-idle",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long a dead coordinator's entries wait before another one runs them "
        "(default 5; see RedisQueue)",
    )
    p.add_argument("--tls-ca", metavar="PEM", help="CA that signed the Redis server's certificate")


def _queue(args: argparse.Namespace) -> Any:
    from ..redis.queue import RedisQueue

    try:
        return RedisQueue(
            args.url,
            stream=args.stream,
            group=args.group,
            claim_idle=args.claim_idle,
            ssl_ca_certs=args.tls_ca,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


def status(args: argparse.Namespace) -> int:
    q = _queue(args)
    try:
        info = q.status()
    except ImportError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # redis.RedisError, without importing redis here
        raise UserError(f"cannot read {q!r}: {exc}", EXIT_FAILURE) from None
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def serve(args: argparse.Namespace) -> int:
    from ..coordinator import Coordinator

    log_verbosity(args.verbose)
    q = _queue(args)
    try:
        kwargs = json.loads(args.kwargs)
    except ValueError as exc:
        raise UserError(f"--kwargs is not valid JSON: {exc}") from None
    cls = None
    if args.worker:
        try:
            cls = load_worker_class(args.worker)
        except WorkerStartError as exc:
            raise UserError(str(exc)) from None
    if cls is None and not args.listen:
        raise UserError("give --worker MODULE:CLASS, or --listen for workers that dial in")
    tune_malloc()  # this process moves every task's data: keep freed buffers for the next
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        coord = Coordinator(queue=q, authkey=read_key(args.authkey_file))
    except ImportError as exc:
        raise UserError(str(exc)) from None
    with coord:
        try:
            if cls is not None:
                coord.spawn(cls, processes=args.processes, kwargs=kwargs)
            if args.listen:
                coord.listen(address(args.listen, "--listen"))
            if args.control:
                where = coord.serve_control(
                    address(args.control, "--control"), keyless_actions=args.keyless_actions
                )
                print(f"control at http://{where[0]}:{where[1]}", file=sys.stderr, flush=True)
        except (WorkerStartError, ValueError, OSError) as exc:
            raise UserError(str(exc), EXIT_FAILURE) from None
        feed = coord.statistics().queue
        consumer = feed.consumer if feed is not None else "?"
        print(
            f"pytaskqml coordinator (pid {os.getpid()}) serving {q!r} as {consumer}",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5) and not coord.wait_closed(0):
            pass
    return 0
