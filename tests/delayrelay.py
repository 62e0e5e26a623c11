"""A TCP relay that delays every byte by a fixed time in each direction, for the tests: a link
with latency where the kernel has no ``tc netem``.

    python delayrelay.py LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT ONE_WAY_SECONDS

Bytes are forwarded as they come, each chunk ONE_WAY_SECONDS after it was read, so the round
trip grows by twice that and the bandwidth is not limited (as a long cable, not a slow one).
Says ``relaying`` on stderr once it listens; runs until killed.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import sys
import threading
import time


def pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    line: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def read() -> None:
        data = b"x"
        while data:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            line.put((time.monotonic() + delay, data))

    threading.Thread(target=read, daemon=True).start()
    try:
        while True:
            due, data = line.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:
                dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def main() -> None:
    host, port, up_host, up_port, delay = sys.argv[1:6]
    server = socket.create_server((host, int(port)))
    print("relaying", file=sys.stderr, flush=True)
    while True:
        conn, _ = server.accept()
        try:
            upstream = socket.create_connection((up_host, int(up_port)), timeout=10)
        except OSError:
            conn.close()
            continue
        upstream.settimeout(None)
        for s in (conn, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(conn, upstream, float(delay)), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, conn, float(delay)), daemon=True).start()


if __name__ == "__main__":
    main()
