"""A worker's finished results on their way out: a frame's results, sent as they become ready
by the thread running the frame (:mod:`._serve`) - or, while a slow task runs behind them in the
same frame, by a :class:`Flusher` thread, so that a quick result never waits for a slow one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ..wire.connection import Connection

log = logging.getLogger(__name__)

# A finished result still unsent this long after it finished - a slow task is running behind
# it in the same frame - is sent by the flusher thread.
RESULT_SEND_LATE = 0.005


class Ready:
    """The finished results of one frame: appended by the thread running the frame, without
    a lock, and sent - under the server's send lock, from ``sent`` on - by that thread or by
    the :class:`Flusher` while a slow task runs behind them.

    Why no lock is needed on the hot path: the running thread only appends (a row's version
    first, then its end time, the row itself, each append atomic), and a
    sender takes ``rows[sent:len(rows)]`` - rows complete by then, since the row is appended
    last - and moves ``sent``, which only senders write, one at a time.
    """

    __slots__ = ("ends", "error", "rows", "sent", "start", "versions")

    def __init__(self) -> None:
        self.rows: list[Any] = []  # result rows; None once sent
        self.ends: list[float] = []  # when each finished
        self.start = 0.0  # when the first started
        self.versions: dict[int, str] = {}  # task id: model version
        self.sent = 0  # rows before this one were sent
        self.error: BaseException | None = None  # the flusher's send failed


class Flusher:
    """Sends a frame's finished results that would otherwise wait for a slow task after them
    in the same frame (the thread running the frame sends the rest itself).

    It looks every :data:`RESULT_SEND_LATE` seconds while frames of several tasks keep
    running, and sleeps once an interval went by without one - so a stream of quick frames
    costs it a few wake-ups per second and the thread running them nothing but two attribute
    writes per frame. Waking it is race-free without a lock on that path: it says it sleeps
    (``_sleeping``) before it checks for a frame one last time, and the frame's thread
    publishes the frame before it reads ``_sleeping``.
    """

    def __init__(self, flush: Callable[[Connection, Ready, float | None], None], conn: Connection):
        self._flush = flush  # (connection, results, older than): sends what is due
        self._conn = conn
        self._cv = threading.Condition(threading.Lock())
        self._ready: Ready | None = None
        self._frames = 0  # frames watched so far
        self._sleeping = False
        self._closed = False
        self._thread = threading.Thread(
            target=self._loop, name=f"pytaskqml-flusher-{conn.peer}", daemon=True
        )
        self._thread.start()

    def watch(self, ready: Ready | None) -> None:
        """The frame whose results to watch (None: the frame is over)."""
        self._ready = ready
        if ready is not None:
            self._frames += 1
            if self._sleeping:
                with self._cv:
                    self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _loop(self) -> None:
        try:
            seen = -1
            while True:
                with self._cv:
                    if self._ready is None and self._frames == seen:
                        self._sleeping = True
                        while self._ready is None and not self._closed:
                            self._cv.wait()
                        self._sleeping = False
                    if self._closed:
                        return
                    seen = self._frames
                    self._cv.wait(RESULT_SEND_LATE)
                    ready = self._ready
                if ready is None:
                    continue
                try:
                    self._flush(self._conn, ready, RESULT_SEND_LATE)
                except BaseException as exc:
                    # The thread running the frame raises it at its next send.
                    ready.error = exc
        except BaseException:
            log.exception("result flusher crashed")
