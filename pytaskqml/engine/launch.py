"""Starting one worker process: its configuration, its channel, its shared memory.

The child is ``python -m pytaskqml.worker.child`` with the coordinator's ``sys.path``. Everything it
needs arrives as one JSON line on its stdin - never on the command line or in the environment,
where other users could read a key - including, on POSIX, the number of the inherited file
descriptor of its end of a socketpair, of its shared-memory segment and of the coordinator's
buffer pool (:mod:`._bufpool`), which every worker of the coordinator maps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from typing import Any

from ..buffers import shm as _shm
from ..wire import connection as _connection

log = logging.getLogger("pytaskqml.engine.supervisor")


class Child:
    """A started process, before it has read its configuration."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        config: dict[str, Any],
        sock: socket.socket | None,
        arena: _shm.Arena | None,
    ) -> None:
        self.proc = proc
        self.sock = sock  # our end of the socketpair, or None (it dials back)
        self.arena = arena
        self._config = config

    def send_config(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(self._config).encode() + b"\n")
            self.proc.stdin.close()
        except OSError:
            pass  # the child died at once; whoever waits for its hello notices


def launch(
    config: dict[str, Any],
    *,
    socketpair: bool,
    dial_back: tuple[tuple[str, int], bytes] | None,
    shared_memory: bool,
    segment_name: str,
    pool: tuple[int, str] | None = None,
    environ: dict[str, str] | None = None,
) -> Child:
    """Start a worker process. With *socketpair* it gets one end of a new pair; otherwise it
    dials back to the address in *dial_back* with that key. With *shared_memory* (and where
    the platform has it) it gets a segment of its own, and the buffer *pool* (its descriptor,
    which stays ours, and token) if there is one. *environ* is set in its environment on top
    of ours (its seat's device). ``OSError`` if it cannot start."""
    env = dict(os.environ)
    env.update(environ or {})
    env.pop("PYTASKQML_AUTHKEY", None)  # the child gets its key on stdin, nothing else
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    config = dict(config)
    pair = _connection.socketpair() if socketpair else None
    if pair is not None:
        config["sock"] = pair[1].fileno()
    else:
        assert dial_back is not None
        config["address"] = list(dial_back[0])
        config["authkey"] = dial_back[1].hex()
    segment = _shm.create_segment(segment_name) if shared_memory else None
    fd, reserve = segment if segment is not None else (None, False)
    token = secrets.token_hex(8)
    if fd is not None:
        config["shm"] = [fd, token]
    if pool is not None and shared_memory:
        config["pool"] = [pool[0], pool[1]]
    else:
        pool = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytaskqml.worker.child"],
            stdin=subprocess.PIPE,
            env=env,
            close_fds=True,
            pass_fds=tuple(
                f
                for f in (fd, pair[1].fileno() if pair else None, pool[0] if pool else None)
                if f is not None
            ),
        )
    except BaseException:
        if fd is not None:
            os.close(fd)
        if pair is not None:
            pair[0].close()
        raise
    finally:
        if pair is not None:
            pair[1].close()  # the child's end: ours is pair[0]
    arena = _shm.Arena(fd, token=token, reserve=reserve) if fd is not None else None
    return Child(proc, config, pair[0] if pair is not None else None, arena)


def kill_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL (if still running) and reap."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        proc.wait(5.0)


def reap(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait up to *timeout* in all for *procs* to exit; kill (with a warning) those that do
    not."""
    end = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.05, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker process %d did not exit; killing it", proc.pid)
            kill_process(proc)
