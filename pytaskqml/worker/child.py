"""Entry point of a worker process spawned by :meth:`Coordinator.spawn`.

The parent writes one JSON line of configuration to our stdin. On POSIX it names a file
descriptor we inherited: our end of a socketpair with the coordinator, a channel nobody else
holds. Elsewhere it holds a connection key - so the key never shows on a command line, in
``ps`` or in the environment - and we dial back to the coordinator's loopback listener. When
that connection is lost we exit: a spawned worker never outlives its coordinator.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Any

from ..buffers import poolview as _poolview
from ..buffers import shm as _shm
from ..errors import AuthenticationError, ConnectionLost, WorkerStartError
from ..wire import connection as _connection
from ..wire.endpoints import dial_once
from .bootstrap import call_teardown, setup_logging, start_worker, tune_malloc
from .models import ModelTable
from .serve import WorkerServer

log = logging.getLogger("pytaskqml")

# A spawned worker whose coordinator is gone leaves this many seconds later, even mid-task.
EXIT_GRACE = 1.0


def _report_failure(
    cfg: dict[str, Any], channel: _connection.Connection | bytes, error: WorkerStartError
) -> None:
    """Tell the coordinator why we could not start, so it can say so where it matters."""
    fields = {
        "spawn_id": cfg.get("spawn_id"),
        "error": str(error),
        "traceback": error.remote_traceback,
        "pid": os.getpid(),
    }
    try:
        if isinstance(channel, _connection.Connection):
            channel.send("failed", fields)
            return
        address = (str(cfg["address"][0]), int(cfg["address"][1]))
        conn = dial_once(address, channel, max_frame_size=64 * 1024, timeout=5.0)
        conn.send("failed", fields)
        conn.abort()
    except (OSError, ConnectionLost, AuthenticationError, KeyError, ValueError, TypeError):
        pass


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    # Either a socket the coordinator handed us (one end of a socketpair: private, no
    # handshake needed), or an address to dial back to with the key.
    conn: _connection.Connection | None = None
    key = b""
    address: tuple[str, int] | None = None
    try:
        cfg = json.loads(sys.stdin.readline())
        if cfg.get("sock") is not None:
            sock = _connection.from_fd(int(cfg["sock"]))
        else:
            key = bytes.fromhex(cfg["authkey"])
            address = (str(cfg["address"][0]), int(cfg["address"][1]))
    except (ValueError, KeyError, TypeError, IndexError, OSError) as exc:
        print(f"pytaskqml worker: bad spawn configuration: {exc}", file=sys.stderr)
        return 2
    sys.stdin.close()
    max_frame_size = int(cfg.get("max_frame_size") or 64 * 1024 * 1024)
    if address is None:
        conn = _connection.Connection(sock, max_frame_size=max_frame_size)
        conn.set_authenticated()
    setup_logging("pytaskqml-worker", int(cfg.get("log_level") or logging.WARNING))
    for entry in reversed(cfg.get("sys_path") or []):
        if isinstance(entry, str) and entry not in sys.path:
            sys.path.insert(0, entry)
    tune_malloc()
    try:
        worker = start_worker(str(cfg["target"]), cfg.get("kwargs"), main_path=cfg.get("main_path"))
    except WorkerStartError as exc:
        print(f"pytaskqml worker: {exc}", file=sys.stderr)
        _report_failure(cfg, conn if conn is not None else key, exc)
        return 3
    shm, pool = cfg.get("shm"), cfg.get("pool")
    own = (int(shm[0]), str(shm[1])) if isinstance(shm, list) and len(shm) == 2 else None
    view = (
        _poolview.PoolView(int(pool[0]), str(pool[1]))
        if isinstance(pool, list) and len(pool) == 2
        else None
    )
    fd, token = own if own is not None else (None, "")
    shared = _shm.SharedView(fd, token, pool=view) if own is not None or view is not None else None
    server = WorkerServer(
        worker,
        authkey=key,
        spawn_id=cfg.get("spawn_id"),
        heartbeat_interval=float(cfg.get("heartbeat_interval") or 0.5),
        heartbeat_timeout=float(cfg.get("heartbeat_timeout") or 5.0),
        max_frame_size=max_frame_size,
        exit_grace=EXIT_GRACE,
        shared=shared,
    )
    # A spawned worker trusts its coordinator with the classes of models, as with the class
    # of the worker itself: the channel between them is private.
    server.models = ModelTable(None, server.report_model)
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop())
    try:
        if conn is not None:
            server.serve_connection(conn)
        else:
            assert address is not None
            server.run_dial(address, reconnect=False)
    except (ConnectionLost, AuthenticationError) as exc:
        log.warning("cannot reach the coordinator: %s", exc)
    finally:
        server.models.close()
        call_teardown(worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
