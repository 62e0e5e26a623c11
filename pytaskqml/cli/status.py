"""``pytaskqml status HOST:PORT``: a coordinator's, a served pipeline's (its stages as rows) or
a worker's ``GET /status`` as a table;
``--watch`` refreshes it, ``--json`` prints the document for scripts."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from ..wire import connection as _connection
from ..wire import control as _control
from .common import EXIT_FAILURE, UserError, add_key_args, address, read_key, unreachable

DEFAULT_WATCH_INTERVAL = 2.0
CLEAR = "\x1b[H\x1b[2J"


def register(sub: Any) -> None:
    s = sub.add_parser(
        "status",
        help="show what a coordinator or worker is doing (from its control endpoint)",
        description="Print a coordinator's workers, queue, throughput and latency (a served "
        "pipeline's stages, or a worker process's counters) from GET /status of its control "
        "endpoint. With a key set "
        "(PYTASKQML_AUTHKEY or --authkey-file) its token is sent.",
    )
    s.add_argument("address", metavar="HOST:PORT", help="the control endpoint")
    s.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=DEFAULT_WATCH_INTERVAL,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_INTERVAL:g}) until Ctrl-C",
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="print the JSON document instead (with --watch: one document per line)",
    )
    add_key_args(s)
    s.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the endpoint (default 5)",
    )
    s.set_defaults(run=run)


def fetch(where: tuple[str, int], key: bytes | None, timeout: float) -> dict[str, Any]:
    """GET /status (without its history); raises :class:`UserError` with the reason."""
    try:
        status, body = _control.request(
            where, "GET", "/status?history=0", authkey=key, timeout=timeout
        )
    except OSError as exc:
        raise unreachable(where, exc) from None
    shown = _connection.format_address(where)
    if status == 401:
        raise UserError(
            f"{shown} needs the control token: set PYTASKQML_AUTHKEY or pass --authkey-file "
            "with the key it was started with",
            EXIT_FAILURE,
        )
    if status != 200 or not isinstance(body, dict):
        raise UserError(f"{shown} answered GET /status with {status}", EXIT_FAILURE)
    return body


def run(args: argparse.Namespace) -> int:
    where = address(args.address, "address")
    key = read_key(args.authkey_file)
    if args.watch is not None and args.watch <= 0:
        raise UserError("--watch takes a positive number of seconds")
    out = sys.stdout
    if args.watch is None:
        doc = fetch(where, key, args.timeout)
        out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n" if args.json else render(doc))
        return 0
    clear = out.isatty() and not args.json
    try:
        while True:
            started = time.monotonic()
            _watch_once(out, where, key, args, clear)
            time.sleep(max(0.0, args.watch - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the interpreter's final
        # flush from failing on the same pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _watch_once(
    out: TextIO, where: tuple[str, int], key: bytes | None, args: argparse.Namespace, clear: bool
) -> None:
    try:
        doc = fetch(where, key, args.timeout)
    except UserError as exc:
        # The process may be restarting: say so and keep watching.
        text = f"pytaskqml: {exc}\n"
        if args.json:
            text = json.dumps({"error": str(exc)}) + "\n"
    else:
        text = json.dumps(doc, sort_keys=True) + "\n" if args.json else render(doc)
    if clear:
        text = CLEAR + text
    elif not args.json:
        text += "\n"
    out.write(text)
    out.flush()


# ------------------------------------------------------------------------------ rendering


def _n(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value < 100:
        return f"{value:,.1f}"
    return f"{round(value):,}"


def _s(seconds: Any) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _age(seconds: float) -> str:
    s = int(seconds)
    h, m = s // 3600, s % 3600 // 60
    return (f"{h}h " if h else "") + (f"{m}m " if h or m else "") + f"{s % 60}s"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Columns padded to their widest cell; the columns in *right* aligned right."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i])
            for i, c in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def render(doc: dict[str, Any]) -> str:
    """The terminal view of a ``GET /status`` document."""
    if doc.get("role") == "worker":
        return _render_worker(doc)
    if doc.get("role") == "pipeline":
        return _render_pipeline(doc)
    c = doc.get("counts", {})
    lat = doc.get("latency", {})
    workers = doc.get("workers", [])
    head = (
        f"coordinator {doc.get('name', '?')} (pid {doc.get('pid', '?')}), "
        f"up {_age(doc.get('uptime') or 0)}\n"
        f"{len(workers)} workers   queued {_n(doc.get('queued'))}   "
        f"in flight {_n(doc.get('in_flight'))}   {_n(doc.get('throughput'))} tasks/s   "
        f"latency p50 {_s(lat.get('p50'))}  p99 {_s(lat.get('p99'))}\n"
        + "   ".join(
            f"{label} {_n(c.get(k))}"
            for label, k in (
                ("submitted", "submitted"),
                ("completed", "completed"),
                ("failed", "failed"),
                ("retried", "retried"),
                ("timed out", "timed_out"),
                ("dropped", "dropped"),
                ("restarts", "restarts"),
            )
        )
        + "\n"
    )
    if doc.get("start_error"):
        head += f"last start failure: {doc['start_error']}\n"
    if not workers:
        return head + "\nno worker attached\n"
    rows = [
        [
            w.get("name", "?"),
            w.get("kind", "?"),
            str(w.get("host", "?")) + (f" (pid {w['pid']})" if w.get("pid") else ""),
            w.get("state", "?"),
            _n(w.get("in_flight")),
            _n(w.get("tasks_per_s")),
            _n(w.get("completed")),
            _n(w.get("failed")),
            _n(w.get("restarts")),
        ]
        for w in workers
    ]
    header = [
        "WORKER",
        "KIND",
        "HOST",
        "STATE",
        "IN FLIGHT",
        "TASKS/S",
        "COMPLETED",
        "FAILED",
        "RESTARTS",
    ]
    return head + "\n" + table(header, rows, right={4, 5, 6, 7, 8})


def _render_pipeline(doc: dict[str, Any]) -> str:
    c = doc.get("counts", {})
    stages = doc.get("stages", [])
    head = (
        f"pipeline {doc.get('name', '?')} (pid {doc.get('pid', '?')}), "
        f"up {_age(doc.get('uptime') or 0)}\n"
        f"{len(stages)} stages   items in {_n(c.get('submitted'))}   "
        f"out {_n(c.get('completed'))}   in the pipeline {_n(doc.get('in_flight'))}   "
        f"{_n(doc.get('throughput'))} items/s   failed {_n(c.get('failed'))}   "
        f"restarts {_n(c.get('restarts'))}\n"
    )
    if doc.get("start_error"):
        head += f"last start failure: {doc['start_error']}\n"
    rows = [
        [
            st.get("name", "?"),
            str(st.get("host", "?")),
            st.get("state", "?"),
            _n(st.get("queued")),
            _n(st.get("in_flight")),
            _n(st.get("tasks_per_s")),
            _n(st.get("completed")),
            _n(st.get("failed")),
            _s(st.get("latency", {}).get("p50")),
            _s(st.get("latency", {}).get("p99")),
            _n(st.get("restarts")),
        ]
        for st in stages
    ]
    header = [
        "STAGE",
        "WORKERS",
        "STATE",
        "QUEUED",
        "IN FLIGHT",
        "ITEMS/S",
        "COMPLETED",
        "FAILED",
        "P50",
        "P99",
        "RESTARTS",
    ]
    return head + "\n" + table(header, rows, right={3, 4, 5, 6, 7, 8, 9, 10})


def _render_worker(doc: dict[str, Any]) -> str:
    state = "stopping" if doc.get("stopping") else "connected" if doc.get("connected") else "idle"
    return (
        f"worker {doc.get('name', '?')} ({doc.get('class', '?')}, pid {doc.get('pid', '?')}), "
        f"up {_age(doc.get('uptime') or 0)}\n"
        f"{state}   tasks {_n(doc.get('tasks_done'))}   errors {_n(doc.get('errors'))}   "
        f"busy {_s(doc.get('busy_seconds'))}   connections {_n(doc.get('connections'))}   "
        f"bytes in {_n(doc.get('bytes_received'))}  out {_n(doc.get('bytes_sent'))}\n"
    )
