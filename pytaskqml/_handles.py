"""Coordinator-side drivers for workers: remote (a socket) and local (threads).

This is the only code that knows *where* a worker runs. Both kinds offer the coordinator the
same small interface:

* ``inflight`` - ``{task id: Task}`` assigned and not yet answered, in dispatch order; its
  length against ``window`` is the worker's credit;
* ``assign(tasks)`` - called under the coordinator's lock; must not block or do I/O;
* ``close()`` - stop; results still arriving are ignored.

and report back through two coordinator callbacks: ``_on_results(handle, entries)`` and
``_on_worker_lost(handle, error, graceful)``.

Lock order: coordinator lock, then a handle's own condition. A handle never calls into the
coordinator while holding its own lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from . import _connection, _protocol
from ._errors import ConnectionLost, ProtocolError, RemoteTraceback, TaskFailed
from ._ordered import ERROR, OK
from ._worker import Worker, error_info, run_tasks

if TYPE_CHECKING:
    from ._coordinator import Coordinator, _Slot

log = logging.getLogger(__name__)

# A frame carries at most this many tasks, and stops growing once its buffers pass this size.
MAX_TASKS_PER_FRAME = 512
MAX_FRAME_BUFFER_BYTES = 8 * 1024 * 1024


class Task:
    """One unit of work. Lives from submit until its outcome is delivered."""

    __slots__ = (
        "attempts",
        "bufs",
        "deadline",
        "finished",
        "id",
        "payload",
        "seq",
        "sink",
        "started",
        "t_submit",
        "text",
    )

    def __init__(
        self, tid: int, payload: Any, text: str, bufs: list[memoryview], sink: Any, seq: int
    ) -> None:
        self.id = tid
        self.payload = payload
        self.text = text
        self.bufs = bufs
        self.sink = sink  # a concurrent.futures.Future, or a results collector with .deliver()
        self.seq = seq
        self.attempts = 0  # how many workers died while running it
        self.deadline: float | None = None
        self.finished = False  # its outcome was delivered (result, error, timeout, drop...)
        self.started = False  # dispatched at least once
        self.t_submit = time.perf_counter()

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.bufs) if self.bufs else 0


_handle_ids = itertools.count(1)


class WorkerHandle:
    kind = "?"

    def __init__(self, coord: Coordinator, *, name: str, window: int, batch: int, batch_delay: float) -> None:
        self.coord = coord
        self.id = next(_handle_ids)
        self.name = name
        self.batch = max(1, batch)
        self.batch_delay = max(0.0, batch_delay)
        # A batching worker needs room for a batch in hand and one filling behind it.
        self.window = max(window, 2 * self.batch) if self.batch > 1 else window
        self.inflight: dict[int, Task] = {}
        self.accepting = True
        self.completed = 0
        self.failed = 0
        self.last_progress = time.monotonic()
        self.pid: int | None = None
        self.address: str | None = None
        self.slot: _Slot | None = None
        self._cv = threading.Condition(threading.Lock())
        self._outbox: deque[Task] = deque()
        self._closing = False

    def free(self) -> int:
        return self.window - len(self.inflight) if self.accepting else 0

    def assign(self, tasks: list[Task]) -> None:
        if not self.inflight:
            self.last_progress = time.monotonic()
        for t in tasks:
            self.inflight[t.id] = t
        with self._cv:
            self._outbox.extend(tasks)
            self._cv.notify()

    def _take(self, limit: int) -> list[Task] | None:
        """Wait for tasks in the outbox; ``None`` once closing. Holds back a partial batch for up
        to ``batch_delay`` so it can fill."""
        with self._cv:
            while not self._outbox and not self._closing:
                self._cv.wait()
            if self._closing:
                return None
            if self.batch > 1 and self.batch_delay > 0 and len(self._outbox) < self.batch:
                self._cv.wait_for(
                    lambda: len(self._outbox) >= self.batch or self._closing, self.batch_delay
                )
                if self._closing:
                    return None
            out = self._outbox
            n = min(len(out), limit)
            taken = [out.popleft() for _ in range(n)]
        return taken

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._outbox.clear()
            self._cv.notify_all()

    def describe(self) -> str:
        return self.name


class RemoteHandle(WorkerHandle):
    """A worker in another process, reached over a :class:`~._connection.Connection`."""

    def __init__(
        self, coord: Coordinator, conn: _connection.Connection, hello: dict[str, Any], *, window: int, kind: str
    ) -> None:
        batch = hello.get("batch", 1)
        delay = hello.get("batch_delay", 0.0)
        super().__init__(
            coord,
            name=str(hello.get("name") or conn.peer),
            window=window,
            batch=batch if isinstance(batch, int) and 0 < batch <= MAX_TASKS_PER_FRAME else 1,
            batch_delay=float(delay) if isinstance(delay, int | float) and 0 <= delay <= 10 else 0.0,
        )
        self.kind = kind
        self.conn = conn
        pid = hello.get("pid")
        self.pid = pid if isinstance(pid, int) else None
        self.address = conn.peer
        control = hello.get("control")
        self.control = control if isinstance(control, str) else None
        self.lost = threading.Event()
        self._reader = threading.Thread(
            target=self._read_loop, name=f"pytaskqml-reader-{conn.peer}", daemon=True
        )
        self._writer = threading.Thread(
            target=self._write_loop, name=f"pytaskqml-writer-{conn.peer}", daemon=True
        )

    def start(self) -> None:
        self._reader.start()
        self._writer.start()

    def close(self) -> None:
        super().close()
        self.conn.abort()

    def join(self, timeout: float) -> None:
        for t in (self._reader, self._writer):
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout)

    # ------------------------------------------------------------------ writer

    def _write_loop(self) -> None:
        limit = self.batch if self.batch > 1 else MAX_TASKS_PER_FRAME
        try:
            while True:
                tasks = self._take(limit)
                if tasks is None:
                    return
                live = [t for t in tasks if not t.finished]
                if len(live) != len(tasks):
                    self.coord._on_skipped(self, [t for t in tasks if t.finished])
                # Split by size so one frame does not carry an unbounded amount of pixels.
                start = 0
                while start < len(live):
                    end, size = start, 0
                    while end < len(live) and (end == start or size < MAX_FRAME_BUFFER_BYTES):
                        size += live[end].nbytes
                        end += 1
                    self._send(live[start:end])
                    start = end
        except ConnectionLost:
            return  # the reader reports the loss
        except BaseException:
            log.exception("writer thread for %s crashed; dropping the worker", self.name)
            self.conn.abort()

    def _send(self, tasks: list[Task]) -> None:
        parts = [f"[{t.id},{t.text}]" for t in tasks]
        buffers: list[memoryview] = []
        for t in tasks:
            if t.bufs:
                buffers.extend(t.bufs)
        flag = ',"b":1' if self.batch > 1 else ""
        header = '{"op":"run"' + flag + ',"t":[' + ",".join(parts) + "]}"
        self.conn.send_frame(_protocol.encode_frame(header, buffers))

    # ------------------------------------------------------------------ reader

    def _read_loop(self) -> None:
        error: BaseException | None = None
        graceful = False
        try:
            while True:
                msg = self.conn.recv()
                op = msg.op
                if op == "done":
                    self.coord._on_results(self, parse_results(msg.header.get("r")))
                elif op == "ping":
                    continue
                elif op == "bye":
                    graceful = True
                    return
                else:
                    raise ProtocolError(f"unexpected message {op!r} from worker")
        except ConnectionLost as exc:
            error = exc
        except ProtocolError as exc:
            log.error("worker %s sent an invalid frame, dropping it: %s", self.name, exc)
            error = exc
        except BaseException as exc:
            log.exception("reader thread for %s crashed; dropping the worker", self.name)
            error = exc
        finally:
            self.conn.abort()
            self.lost.set()
            self.coord._on_worker_lost(self, error, graceful)


def parse_results(entries: Any) -> list[tuple[int, int, Any]]:
    """Validate a ``done`` frame's entries: ``[id, 0, value]`` or ``[id, 1, [type, msg, tb]]``."""
    if not isinstance(entries, list):
        raise ProtocolError("malformed results frame")
    out: list[tuple[int, int, Any]] = []
    for e in entries:
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], int) and e[1] in (0, 1)):
            raise ProtocolError("malformed result entry")
        if e[1] == 0:
            out.append((e[0], OK, e[2]))
            continue
        info = e[2]
        if not (isinstance(info, list) and len(info) == 3 and all(isinstance(s, str) for s in info)):
            raise ProtocolError("malformed error entry")
        err = TaskFailed(info[0], info[1], info[2])
        err.__cause__ = RemoteTraceback(info[2])
        out.append((e[0], ERROR, err))
    return out


class LocalHandle(WorkerHandle):
    """Thread workers inside the coordinator's process, sharing one :class:`Worker` instance.

    Payloads are handed over as the very objects submitted (no JSON round trip), so a
    GIL-releasing model (OpenCV, NumPy, PyTorch) runs at full speed.
    """

    kind = "local"

    def __init__(self, coord: Coordinator, worker: Worker, *, threads: int, window: int) -> None:
        super().__init__(
            coord,
            name=f"local-{type(worker).__name__}",
            window=window,
            batch=int(getattr(worker, "max_batch_size", 1) or 1),
            batch_delay=float(getattr(worker, "max_batch_delay", 0.0) or 0.0),
        )
        self.worker = worker
        self.threads = [
            threading.Thread(target=self._run, name=f"pytaskqml-local-{self.id}-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        try:
            while True:
                tasks = self._take(self.batch)
                if tasks is None:
                    return
                live = [t for t in tasks if not t.finished]
                if len(live) != len(tasks):
                    self.coord._on_skipped(self, [t for t in tasks if t.finished])
                if not live:
                    continue
                outcomes = run_tasks(self.worker, [t.payload for t in live], self.batch > 1)
                entries: list[tuple[int, int, Any]] = []
                for t, (ok, value) in zip(live, outcomes, strict=True):
                    if ok:
                        entries.append((t.id, OK, value))
                    else:
                        kind, message, tb = error_info(value)
                        err = TaskFailed(kind, message, tb)
                        err.__cause__ = value
                        entries.append((t.id, ERROR, err))
                self.coord._on_results(self, entries)
        except BaseException as exc:
            log.exception("local worker thread %s crashed", threading.current_thread().name)
            self.coord._on_worker_lost(self, exc, False)


def new_future() -> Future[Any]:
    return Future()
