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
from typing import TYPE_CHECKING, Any

from . import _codec, _connection, _protocol, _shm
from ._errors import ConnectionLost, ProtocolError, RemoteTraceback, TaskFailed
from ._ordered import CHUNK, ERROR, OK, RUN
from ._worker import Worker, error_info, run_entries

if TYPE_CHECKING:
    from ._coordinator import Coordinator, _Slot

log = logging.getLogger(__name__)

# A frame carries at most this many tasks, and stops growing once its buffers (and the JSON of
# chunks encoded at submit) pass this size.
MAX_TASKS_PER_FRAME = 512
MAX_FRAME_BUFFER_BYTES = 8 * 1024 * 1024
# An adaptive window holds about this many seconds of work per worker.
WINDOW_BUDGET = 0.01


class Task:
    """One unit of work. Lives from submit until its outcome is delivered."""

    __slots__ = (
        "__weakref__",
        "attempts",
        "count",
        "deadline",
        "finished",
        "id",
        "nbytes",
        "payload",
        "seq",
        "sink",
        "started",
        "t_submit",
        "text",
    )

    def __init__(
        self,
        tid: int,
        payload: Any,
        nbytes: int,
        sink: Any,
        seq: int,
        t_submit: float,
        count: int = 1,
        text: str | None = None,
    ) -> None:
        self.id = tid
        # Checked encodable at submit; encoded again when framed unless `text` holds its JSON.
        # For a chunk (count > 1) the list of its items, which are seq, seq + 1, ...
        # seq + count - 1 of their map().
        self.payload = payload
        self.count = count
        self.nbytes = nbytes  # raw buffer bytes inside the payload, to size frames
        self.sink = sink  # a concurrent.futures.Future, or a results collector with .deliver()
        self.seq = seq
        self.attempts = 0  # how many workers died while running it
        self.deadline: float | None = None
        self.finished = False  # its outcome was delivered (result, error, timeout, drop...)
        self.started = False  # dispatched at least once
        self.t_submit = t_submit
        # The payload's JSON, when it was encoded at submit and holds no buffers: framed as it
        # is instead of being encoded a second time.
        self.text = text


_handle_ids = itertools.count(1)


class WorkerHandle:
    kind = "?"

    def __init__(
        self, coord: Coordinator, *, name: str, window: int, batch: int, batch_delay: float
    ) -> None:
        self.coord = coord
        self.id = next(_handle_ids)
        self.name = name
        self.batch = max(1, batch)
        self.batch_delay = max(0.0, batch_delay)
        # A batching worker needs room for a batch in hand and one filling behind it.
        self.max_window = max(window, 2 * self.batch) if self.batch > 1 else window
        self.window = self.max_window
        self.adaptive = False
        self.task_time: float | None = None  # EWMA of seconds of work per task (or chunk)
        self.inflight: dict[int, Task] = {}
        self.accepting = True
        self.completed = 0
        self.failed = 0
        self.last_progress = time.monotonic()
        self.pid: int | None = None
        self.address: str | None = None
        self.slot: _Slot | None = None
        self.loss_reason: str | None = None  # why the coordinator dropped it, if it did
        self._cv = threading.Condition(threading.Lock())
        self._outbox: deque[Task] = deque()
        self._idle = 0  # threads waiting in _take()
        self._closing = False

    def free(self) -> int:
        return self.window - len(self.inflight) if self.accepting else 0

    def observe(self, busy: float, tasks: int) -> None:
        """Learn how long a task takes here; size an adaptive window from it.

        The window aims at about :data:`WINDOW_BUDGET` seconds of work queued at the worker: a
        model taking 30 ms per frame gets a window of 2 (one in hand, one ready), so frames wait
        in the coordinator's queue where drop-oldest and deadlines can act, while tiny tasks get
        a window large enough to hide the round trip. Lock held.
        """
        if tasks <= 0 or busy < 0:
            return
        per = busy / tasks
        self.task_time = per if self.task_time is None else 0.7 * self.task_time + 0.3 * per
        if self.adaptive:
            want = int(WINDOW_BUDGET / max(self.task_time, 1e-7)) + 1
            self.window = max(2, min(self.max_window, want))

    def assign(self, tasks: list[Task], *, wake: bool = True) -> None:
        """Lock held (the coordinator's). Cheap on purpose: the outbox append needs no lock,
        and the condition is only touched when a sender thread is waiting.

        Why no lost wake-up: a sender announces ``_idle`` *before* it looks at the outbox,
        under ``_cv``. So either it sees these tasks, or we see it idle and notify - and our
        notify cannot slip in between its look and its wait, because it holds ``_cv`` for both.
        """
        if not self.inflight:
            self.last_progress = time.monotonic()
        inflight = self.inflight
        for t in tasks:
            inflight[t.id] = t
        self._outbox.extend(tasks)
        if wake and self._idle:
            with self._cv:
                self._cv.notify()

    def flush_inline(self) -> None:
        """Send what is in the outbox from the calling thread, if no sender is busy: saves a
        thread hand-off on an idle connection (the latency case). Lock not held."""
        if self._outbox and self._idle:
            with self._cv:
                self._cv.notify()  # local threads do the work themselves: just wake one

    def _take(self, limit: int) -> list[Task] | None:
        """Wait for tasks in the outbox; ``None`` once closing. Holds back a partial batch for up
        to ``batch_delay`` so it can fill."""
        with self._cv:
            self._idle += 1
            try:
                while not self._outbox and not self._closing:
                    self._cv.wait()
            finally:
                self._idle -= 1
            if self._closing:
                return None
            if self.batch > 1 and self.batch_delay > 0 and len(self._outbox) < self.batch:
                self._cv.wait_for(
                    lambda: len(self._outbox) >= self.batch or self._closing, self.batch_delay
                )
                if self._closing:
                    return None
            out = self._outbox
            # popleft one by one: assign() may append concurrently (without _cv), and each
            # popleft is atomic where a copy-then-clear would not be.
            pop = out.popleft
            taken = [pop() for _ in range(min(len(out), limit))]
            if out and self._idle:
                self._cv.notify()  # more left over: wake another thread of a local worker
        return taken

    def _take_live(self, limit: int) -> list[Task] | None:
        """:meth:`_take`, minus tasks that finished while waiting (timed out, cancelled): their
        credit goes straight back."""
        tasks = self._take(limit)
        if tasks is None:
            return None
        live = [t for t in tasks if not t.finished]
        if len(live) != len(tasks):
            self.coord._on_skipped(self, [t for t in tasks if t.finished])
        return live

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._outbox.clear()
            self._cv.notify_all()


class RemoteHandle(WorkerHandle):
    """A worker in another process, reached over a :class:`~._connection.Connection`."""

    def __init__(
        self,
        coord: Coordinator,
        conn: _connection.Connection,
        hello: dict[str, Any],
        *,
        window: int,
        kind: str,
        arena: _shm.Arena | None = None,
    ) -> None:
        batch = hello.get("batch", 1)
        delay = hello.get("batch_delay", 0.0)
        super().__init__(
            coord,
            name=str(hello.get("name") or conn.peer),
            window=window,
            batch=batch if isinstance(batch, int) and 0 < batch <= MAX_TASKS_PER_FRAME else 1,
            batch_delay=float(delay)
            if isinstance(delay, int | float) and 0 <= delay <= 10
            else 0.0,
        )
        self.kind = kind
        self.conn = conn
        pid = hello.get("pid")
        self.pid = pid if isinstance(pid, int) else None
        self.address = conn.peer
        control = hello.get("control")
        self.control = control if isinstance(control, str) else None
        self.lost = threading.Event()
        # Shared memory with a worker we spawned, if it maps it too (see _shm).
        # (The token tells that it is this process's segment, not a predecessor's.)
        self.arena = arena if arena is not None and hello.get("shm") == arena.token else None
        self._limit = self.batch if self.batch > 1 else MAX_TASKS_PER_FRAME
        self._sending = threading.Lock()  # one sender at a time: the writer or an inline flush
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

    def flush_inline(self) -> None:
        if not self._outbox or not self._idle:
            return  # the writer is awake and will take them
        if len(self.inflight) > len(self._outbox):
            # The worker still has work in hand: no hurry. Let the writer thread gather what
            # piles up meanwhile into one frame instead of sending a frame per task from here.
            with self._cv:
                self._cv.notify()
            return
        if not self._sending.acquire(blocking=False):
            return
        try:
            with self._cv:
                pop = self._outbox.popleft
                tasks = [pop() for _ in range(min(len(self._outbox), self._limit))]
            live = [t for t in tasks if not t.finished]
            if len(live) != len(tasks):
                self.coord._on_skipped(self, [t for t in tasks if t.finished])
            if live:
                self._send_sized(live)
        except ConnectionLost:
            pass  # the reader reports the loss
        finally:
            self._sending.release()
        if self._outbox:  # more arrived meanwhile: let the writer have them
            with self._cv:
                self._cv.notify()

    def _write_loop(self) -> None:
        limit = self._limit
        try:
            while self._write_once(limit):
                pass
        except ConnectionLost:
            return  # the reader reports the loss
        except BaseException:
            log.exception("writer thread for %s crashed; dropping the worker", self.name)
            self.conn.abort()

    def _write_once(self, limit: int) -> bool:
        # One call per batch, so no task stays referenced from this frame while we wait.
        live = self._take_live(limit)
        if live is None:
            return False
        with self._sending:
            self._send_sized(live)
        return True

    def _send_sized(self, live: list[Task]) -> None:
        # Split by size so one frame does not carry an unbounded amount of pixels.
        start = 0
        while start < len(live):
            end, size = start, 0
            while end < len(live) and (end == start or size < MAX_FRAME_BUFFER_BYTES):
                t = live[end]
                size += t.nbytes + (len(t.text) if t.text is not None else 0)
                end += 1
            self._send(live[start:end])
            start = end

    def _encode(self, rows: list[list[Any]]) -> tuple[str, list[memoryview]]:
        arena = self.arena
        if arena is None:
            return _codec.encode(rows)
        placed: list[int] = []

        def place(data: memoryview) -> int | None:
            offset = arena.place(data)
            if offset is not None:
                placed.append(offset)
            return offset

        try:
            return _codec.encode(rows, place=place, min_shared=_shm.MIN_BYTES)
        except BaseException:
            arena.release(placed)  # nothing will be sent: the slots are free again
            raise

    def _send(self, tasks: list[Task]) -> None:
        flag = ',"b":1' if self.batch > 1 else ""
        if all(t.text is not None for t in tasks):
            # Encoded at submit (tiny items, chunks of them): only the rows are put around.
            rows = ",".join(
                [f"[{t.id},{t.text},1]" if t.count > 1 else f"[{t.id},{t.text}]" for t in tasks]
            )
            header = '{"op":"run"' + flag + ',"t":[' + rows + "]}"
            self.conn.send_frame(_protocol.encode_frame(header))
            return
        # One encoder call for the whole frame: the C encoder does the per-task work.
        try:
            text, buffers = self._encode([_row(t) for t in tasks])
        except (TypeError, ValueError):
            # A payload was mutated into something unencodable after submit: fail just those.
            good, failed = [], []
            for t in tasks:
                try:
                    _codec.encode(t.payload)
                    good.append(t)
                except (TypeError, ValueError) as exc:
                    failed.append((t.id, ERROR, TaskFailed(type(exc).__name__, str(exc))))
            self.coord._on_results(self, failed)
            if not good:
                return
            tasks = good
            text, buffers = self._encode([_row(t) for t in tasks])
        self.conn.send_frame(
            _protocol.encode_frame('{"op":"run"' + flag + ',"t":' + text + "}", buffers)
        )

    # ------------------------------------------------------------------ reader

    def _read_loop(self) -> None:
        error: BaseException | None = None
        graceful = False
        try:
            while True:
                msg = self.conn.recv()
                op = msg.op
                if op == "done":
                    header = msg.header
                    if "f" in header:
                        self._free_slots(header["f"])
                    busy = header.get("bt")
                    self.coord._on_results(
                        self,
                        parse_results(header.get("r")),
                        busy if type(busy) is float or type(busy) is int else None,
                    )
                elif op == "ping":
                    continue
                elif op == "free":
                    self._free_slots(msg.header.get("f"))
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
            if error is not None:
                # Its traceback would pin this thread's frames - and this handle - to wherever
                # the error ends up (a log record, a task's exception).
                error = error.with_traceback(None)
            self.coord._on_worker_lost(self, error, graceful)

    def _free_slots(self, offsets: Any) -> None:
        if type(offsets) is not list or not all(type(o) is int for o in offsets):
            raise ProtocolError("malformed list of freed slots")
        if self.arena is not None:
            self.arena.release(offsets)


def _row(t: Task) -> list[Any]:
    return [t.id, t.payload] if t.count == 1 else [t.id, t.payload, 1]


def _remote_error(info: Any) -> TaskFailed:
    if not (type(info) is list and len(info) == 3 and all(type(x) is str for x in info)):
        raise ProtocolError("malformed error entry")
    err = TaskFailed(info[0], info[1], info[2])
    err.__cause__ = RemoteTraceback(info[2])
    return err


def parse_results(entries: Any) -> list[Any]:
    """Validate a ``done`` frame's rows in place: ``[id, 0, value]`` stays as it is, an error
    ``[id, 1, [type, message, traceback]]`` gets a :class:`TaskFailed` as its value, a chunk
    ``[id, 2, [[0, value] or [1, error], ...]]`` the same per item, and a chunk whose items all
    succeeded ``[id, 6, [value, ...]]`` stays as it is (no per-item work)."""
    if type(entries) is not list:
        raise ProtocolError("malformed results frame")
    for e in entries:
        if type(e) is not list or len(e) != 3 or type(e[0]) is not int or type(e[1]) is not int:
            raise ProtocolError("malformed result entry")
        flag = e[1]
        if flag == OK or (flag == RUN and type(e[2]) is list):
            continue
        if flag == ERROR:
            e[2] = _remote_error(e[2])
        elif flag == CHUNK and type(e[2]) is list:
            items = e[2]
            for i, item in enumerate(items):
                if type(item) is not list or len(item) != 2 or item[0] not in (0, 1):
                    raise ProtocolError("malformed chunk entry")
                if item[0]:
                    items[i] = (ERROR, _remote_error(item[1]))
                else:
                    items[i] = (OK, item[1])
        else:
            raise ProtocolError("malformed result entry")
    return entries


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
            while self._run_once():
                pass
        except BaseException as exc:
            log.exception("local worker thread %s crashed", threading.current_thread().name)
            self.coord._on_worker_lost(self, exc, False)

    def _run_once(self) -> bool:
        live = self._take_live(self.batch)
        if live is None:
            return False
        if not live:
            return True
        t0 = time.perf_counter()
        rows = run_entries(self.worker, [_row(t) for t in live], self.batch > 1)
        busy = time.perf_counter() - t0
        entries: list[Any] = []
        for tid, flag, value in rows:
            if flag == ERROR:
                value = _local_error(value)
            elif flag == CHUNK:
                value = [(k, _local_error(v) if k else v) for k, v in value]
            entries.append((tid, flag, value))
        self.coord._on_results(self, entries, busy)
        return True


def _local_error(exc: BaseException) -> TaskFailed:
    kind, message, tb = error_info(exc)
    err = TaskFailed(kind, message, tb)
    err.__cause__ = exc
    return err
