"""Entry point of a worker process spawned by :meth:`Coordinator.spawn`.

The parent writes one JSON line of configuration to our stdin - including the connection key,
so the key never shows on a command line, in ``ps`` or in the environment - and we dial back to
the coordinator's private loopback listener. When that connection is lost we exit: a spawned
worker never outlives its coordinator.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Any

from . import _connection
from ._errors import AuthenticationError, ConnectionLost, WorkerStartError
from ._worker import (
    WorkerServer,
    call_setup,
    call_teardown,
    load_worker_class,
    make_worker,
    tune_malloc,
)

log = logging.getLogger("pytaskqml")


def _report_failure(cfg: dict[str, Any], key: bytes, error: str) -> None:
    """Tell the coordinator why we could not start, so spawn() can say it in one line."""
    try:
        sock = _connection.dial((str(cfg["address"][0]), int(cfg["address"][1])), timeout=5.0)
        conn = _connection.Connection(sock)
        _connection.client_handshake(conn, key, timeout=5.0)
        conn.send("failed", {"spawn_id": cfg.get("spawn_id"), "error": error, "pid": os.getpid()})
        conn.abort()
    except (OSError, ConnectionLost, AuthenticationError):
        pass


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    try:
        cfg = json.loads(sys.stdin.readline())
        key = bytes.fromhex(cfg["authkey"])
        address = (str(cfg["address"][0]), int(cfg["address"][1]))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        print(f"pytaskqml worker: bad spawn configuration: {exc}", file=sys.stderr)
        return 2
    sys.stdin.close()
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s pytaskqml-worker[{os.getpid()}] %(levelname)s %(message)s")
    )
    log.addHandler(handler)
    log.setLevel(int(cfg.get("log_level") or logging.WARNING))
    for entry in reversed(cfg.get("sys_path") or []):
        if isinstance(entry, str) and entry not in sys.path:
            sys.path.insert(0, entry)
    tune_malloc()
    try:
        cls = load_worker_class(str(cfg["target"]), main_path=cfg.get("main_path"))
        worker = make_worker(cls, cfg.get("kwargs"))
        call_setup(worker)
    except WorkerStartError as exc:
        print(f"pytaskqml worker: {exc}", file=sys.stderr)
        _report_failure(cfg, key, str(exc))
        return 3
    shm = cfg.get("shm")
    shared = (int(shm[0]), str(shm[1])) if isinstance(shm, list) and len(shm) == 2 else None
    server = WorkerServer(
        worker,
        authkey=key,
        spawn_id=cfg.get("spawn_id"),
        heartbeat_interval=float(cfg.get("heartbeat_interval") or 0.5),
        heartbeat_timeout=float(cfg.get("heartbeat_timeout") or 5.0),
        max_frame_size=int(cfg.get("max_frame_size") or 64 * 1024 * 1024),
        exit_grace=5.0,
        shared=shared,
    )
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop())
    try:
        server.run_dial(address, reconnect=False)
    except (ConnectionLost, AuthenticationError) as exc:
        log.warning("cannot reach the coordinator: %s", exc)
    finally:
        call_teardown(worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
