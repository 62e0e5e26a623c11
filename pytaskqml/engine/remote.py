"""Workers in other processes, reached over a :class:`~._connection.Connection`.

A :class:`RemoteHandle` has a writer thread (tasks from its queue, framed, many per frame) and
a reader thread (results, heartbeats, goodbye). :class:`Heartbeats`, one thread per
coordinator, pings idle connections and drops those that fell silent or hung; it never runs
user code and never waits on a process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ..buffers import shm as _shm
from ..buffers.pool import BufferPool
from ..core.tasks import CHUNK, ERROR, OK, RUN, Task
from ..errors import ConnectionLost, ProtocolError, RemoteTraceback, TaskFailed
from ..wire import codec as _codec
from ..wire import protocol as _protocol
from ..wire.connection import Connection
from ..wire.protocol import CHUNK_ROW
from .handles import WorkerEvents, WorkerHandle

log = logging.getLogger(__name__)

# A frame carries at most this many tasks, and stops growing once its buffers (and the JSON of
# chunks encoded at admission) pass this size.
MAX_TASKS_PER_FRAME = 512
MAX_FRAME_BUFFER_BYTES = 8 * 1024 * 1024


class RemoteHandle(WorkerHandle):
    """A worker in another process: spawned by us, dialled by us, or dialled in."""

    def __init__(
        self,
        events: WorkerEvents,
        conn: Connection,
        hello: dict[str, Any],
        *,
        kind: str,
        window: int | None,
        heartbeats: Heartbeats,
        arena: _shm.Arena | None = None,
        pool: BufferPool | None = None,
    ) -> None:
        batch = hello.get("batch", 1)
        delay = hello.get("batch_delay", 0.0)
        batch_size = batch if isinstance(batch, int) and 0 < batch <= MAX_TASKS_PER_FRAME else 1
        super().__init__(
            events,
            name=str(hello.get("name") or conn.peer),
            window=window,
            batch_size=batch_size,
            batch_delay=float(delay)
            if isinstance(delay, int | float) and 0 <= delay <= 10
            else 0.0,
            concurrency=batch_size,
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
        # The coordinator's buffer pool, if this worker mapped it (see _bufpool).
        self.pool = pool if pool is not None and hello.get("pool") == pool.token else None
        self.loss_reason: str | None = None  # why we dropped it, if we did
        models = hello.get("models")
        self.initial_models = (
            {str(k): str(v) for k, v in models.items()} if isinstance(models, dict) else {}
        )
        self._heartbeats = heartbeats
        grace = hello.get("interrupt")
        if isinstance(grace, int | float) and not isinstance(grace, bool) and 0 <= grace <= 3600:
            self.interrupt_grace = float(grace)
        self._limit = self.batch_size if self.batch_size > 1 else MAX_TASKS_PER_FRAME
        self._sending = threading.Lock()  # one sender at a time: the writer or an inline flush
        self._reader = threading.Thread(
            target=self._read_loop, name=f"pytaskqml-reader-{conn.peer}", daemon=True
        )
        self._writer = threading.Thread(
            target=self._write_loop, name=f"pytaskqml-writer-{conn.peer}", daemon=True
        )

    def start(self) -> None:
        self._heartbeats.add(self)
        self._reader.start()
        self._writer.start()

    def shared_memory(self) -> tuple[int, int, int] | None:
        a = self.arena
        return None if a is None else (a.placed, a.fallbacks, a.in_use)

    def traffic(self) -> tuple[int, int, int | None] | None:
        a = self.arena
        return self.conn.bytes_out, self.conn.bytes_in, None if a is None else a.placed_bytes

    def request_stop(self) -> None:
        with contextlib.suppress(ConnectionLost):
            self.conn.send("stop")

    def model_command(self, cmd: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionLost):
            self.conn.send("models", cmd)

    def interrupt(self, task_ids: list[int]) -> None:
        grace = self.interrupt_grace
        if grace is None or not task_ids:
            return
        try:
            self.conn.send("cancel", {"ids": task_ids})
        except ConnectionLost:
            return
        self._arm_interrupt(task_ids, grace)

    def _arm_interrupt(self, task_ids: list[int], grace: float) -> None:
        timer = threading.Timer(grace, self._interrupt_due, (task_ids, grace))
        timer.name = f"pytaskqml-interrupt-{self.name}"
        timer.daemon = True
        timer.start()

    def _interrupt_due(self, task_ids: list[int], grace: float) -> None:
        """*grace* after the worker was told: if it still runs one of *task_ids*, replace
        it. Only the task it runs counts (the first it holds): one it has not started yet
        is looked at again a grace later, so an innocent task running before it is never
        the one that loses its worker."""
        try:
            state = self.state
            if state is None or self.lost.is_set():
                return
            held = list(state.inflight)  # (a copy: the dict changes on other threads)
            pending = [i for i in task_ids if i in held]
            if not pending:
                return
            if held[0] not in pending:
                self._arm_interrupt(pending, grace)
                return
            log.warning(
                "worker %s still runs task %d %.1fs after it was told it is no longer wanted; "
                "replacing it",
                self.name,
                held[0],
                grace,
            )
            if self.kind == "spawned" and self.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(self.pid, getattr(signal, "SIGKILL", signal.SIGTERM))
            self.abort(f"interrupted: a task no longer wanted ran {grace:.1f}s past its cancel")
        except BaseException:
            log.exception("interrupt timer of worker %s crashed", self.name)

    def abort(self, reason: str) -> None:
        if self.loss_reason is None:
            self.loss_reason = reason
        self.conn.abort()

    def close(self) -> None:
        super().close()
        self.conn.abort()

    def join(self, timeout: float) -> None:
        for t in (self._reader, self._writer):
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout)

    # ------------------------------------------------------------------ liveness

    def check(self, now: float, progress_now: float, hb: Heartbeats) -> None:
        """Called by :class:`Heartbeats`: drop a silent or hung worker, ping an idle one.
        *now* is on the connection's clock, *progress_now* on the scheduler's."""
        conn = self.conn
        silent = now - conn.last_recv
        if silent > hb.timeout:
            log.warning("worker %s silent for %.1fs; declaring it lost", self.name, silent)
            self.abort(f"silent for {silent:.1f}s")
            return
        state = self.state
        if hb.hang_timeout is not None and state is not None and state.inflight:
            quiet = progress_now - state.last_progress
            if quiet > hb.hang_timeout:
                log.warning(
                    "worker %s returned nothing for %.1fs with %d tasks in hand; declaring it hung",
                    self.name,
                    quiet,
                    len(state.inflight),
                )
                self.abort(f"hung: no result for {quiet:.1f}s")
                return
        if now - conn.last_send >= hb.interval:
            with contextlib.suppress(ConnectionLost):
                conn.ping()

    # ------------------------------------------------------------------ writer

    def wake(self, inline: bool = False) -> None:
        """With *inline*, send from the calling thread if the writer is idle and the worker
        holds nothing else: saves a thread hand-off on an idle connection (the latency case).
        Otherwise the writer thread gathers what piles up into one frame."""
        state = self.state
        assert state is not None
        out = self.queue
        if not out or not self._idle:
            return  # the writer is awake and will take them
        if not inline or len(state.inflight) > len(out):
            with self._cv:
                self._cv.notify()
            return
        if not self._sending.acquire(blocking=False):
            return
        try:
            with self._cv:
                if len(out) == 1:  # (a round trip's task)
                    tasks = [out.popleft()]
                else:
                    pop = out.popleft
                    tasks = [pop() for _ in range(min(len(out), self._limit))]
            if len(tasks) == 1 and not tasks[0].finished:
                self._send(tasks)  # one task: nothing to split by size
            else:
                live = [t for t in tasks if not t.finished]
                if len(live) != len(tasks):
                    self.events.skipped(self, [t for t in tasks if t.finished])
                if live:
                    self._send_sized(live)
        except ConnectionLost:
            pass  # the reader reports the loss
        finally:
            self._sending.release()
        if out:  # more arrived meanwhile: let the writer have them
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
        """Encode *rows* in one encoder call (see :meth:`_placing`)."""
        return self._placing(_codec.encode, rows)  # type: ignore[no-any-return]

    def _placing(self, encode: Callable[..., Any], rows: Any) -> Any:
        """*encode* *rows* (:func:`~._codec.encode`, or a function taking the same keywords),
        their buffers placed in shared memory where this worker maps it."""
        arena, pool = self.arena, self.pool
        if arena is None and pool is None:
            return encode(rows)
        placed: list[int] = []
        lent: list[int] = []

        def place(data: memoryview) -> int | None:
            assert arena is not None
            offset = arena.place(data)
            if offset is not None:
                placed.append(offset)
            return offset

        def lend(arr: Any) -> int | None:
            assert pool is not None
            offset = pool.lend(arr, self)
            if offset is not None:
                lent.append(offset)
            return offset

        try:
            return encode(
                rows,
                place=place if arena is not None else None,
                min_shared=_shm.MIN_BYTES,
                lend=lend if pool is not None else None,
            )
        except BaseException:
            # Nothing will be sent: the slots are free again.
            if arena is not None:
                arena.release(placed)
            if pool is not None:
                pool.returned(self, lent)
            raise

    def _send(self, tasks: list[Task]) -> None:
        """Frame *tasks* and send them. Each payload was encoded once already, at admission,
        when its task carries the JSON (``text``); only the others are encoded here."""
        flag = ',"b":1' if self.batch_size > 1 else ""
        first = tasks[0]
        if len(tasks) == 1 and first.text is not None and first.buffers is None:
            # (a round trip's frame)
            header = '{"op":"run"' + flag + ',"t":[' + _text_row(first, first.text) + "]}"
            self.conn.send_frame(_protocol.encode_frame(header))
            return
        plain = [t for t in tasks if t.text is None]
        if not plain and all(t.buffers is None for t in tasks):
            # Encoded at admission (tiny items, chunks of them): only the rows are put around.
            rows = ",".join([_text_row(t, t.text) for t in tasks])  # type: ignore[arg-type]
            header = '{"op":"run"' + flag + ',"t":[' + rows + "]}"
            self.conn.send_frame(_protocol.encode_frame(header))
            return
        try:
            if len(plain) == len(tasks):
                # One encoder call for the whole frame: the C encoder does the per-task work.
                text, buffers = self._encode([_row(t) for t in tasks])
            else:
                text, buffers = self._encode_mixed(tasks, plain)
        except (TypeError, ValueError):
            # A payload was mutated into something unencodable after submit: fail just those.
            good, failed = [], []
            for t in tasks:
                if t.text is not None:
                    good.append(t)
                    continue
                try:
                    _codec.encode(t.payload)
                    good.append(t)
                except (TypeError, ValueError) as exc:
                    failed.append((t.id, ERROR, TaskFailed(type(exc).__name__, str(exc))))
            self.events.results(self, failed, None)
            if good:
                self._send(good)
            return
        self.conn.send_frame(
            _protocol.encode_frame('{"op":"run"' + flag + ',"t":' + text + "}", buffers)
        )

    def _encode_mixed(self, tasks: list[Task], plain: list[Task]) -> tuple[str, list[memoryview]]:
        """A frame of tasks encoded at admission and others (*plain*): only the others' rows
        go through the encoder, each to a text of its own; of the admitted ones holding
        buffers, only the markers of the buffers placed in shared memory are rewritten
        (:func:`~._codec.placed`). The rows are joined in order and their buffers in the same
        order, which is the order the worker's decoder claims them in."""

        def build(
            _: list[Task],
            place: _codec.Placer | None = None,
            min_shared: int = 0,
            lend: _codec.Lender | None = None,
        ) -> tuple[str, list[memoryview]]:
            texts, bufs = (
                _codec.encode_each(
                    [_row(t) for t in plain], place=place, min_shared=min_shared, lend=lend
                )
                if plain
                else ([], [])
            )
            encoded = iter(zip(texts, bufs, strict=True))
            rows: list[str] = []
            out: list[memoryview] = []
            for t in tasks:
                if t.text is None:
                    row, mine = next(encoded)
                elif t.buffers is None:
                    rows.append(_text_row(t, t.text))
                    continue
                else:
                    text, mine = _codec.placed(
                        t.text, t.buffers, place=place, min_shared=min_shared, lend=lend
                    )
                    row = _text_row(t, text)
                rows.append(row)
                out.extend(mine)
            return "[" + ",".join(rows) + "]", out

        return self._placing(build, tasks)  # type: ignore[no-any-return]

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
                    if "fp" in header:
                        self._free_slots(header["fp"], pool=True)
                    busy = header.get("bt")
                    self.events.results(
                        self,
                        parse_results(header.get("r")),
                        busy if type(busy) is float or type(busy) is int else None,
                        _versions(header["mv"]) if "mv" in header else None,
                    )
                    # Not kept while waiting for the next frame: the results are the caller's
                    # now, freed as soon as it drops them.
                    del msg, header
                elif op == "ping":
                    continue
                elif op == "free":
                    if "f" in msg.header:
                        self._free_slots(msg.header["f"])
                    if "fp" in msg.header:
                        self._free_slots(msg.header["fp"], pool=True)
                elif op == "models":
                    self.events.model_status(self, msg.header)
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
            self._heartbeats.remove(self)
            self.lost.set()
            if self.loss_reason:
                error = ConnectionLost(self.loss_reason)
            elif error is not None:
                # Its traceback would pin this thread's frames - and this handle - to wherever
                # the error ends up (a log record, a task's exception).
                error = error.with_traceback(None)
            self.events.lost(self, error, graceful)
            super().close()
            if self.arena is not None:
                self.arena.close()  # its process is gone or going; a new one gets a new segment
            if self.pool is not None:
                self.pool.forget(self)  # and what it held of the pool with it

    def _free_slots(self, offsets: Any, *, pool: bool = False) -> None:
        if type(offsets) is not list or not all(type(o) is int for o in offsets):
            raise ProtocolError("malformed list of freed slots")
        if pool:
            if self.pool is not None:
                self.pool.returned(self, offsets)
        elif self.arena is not None:
            self.arena.release(offsets)


def _text_row(t: Task, text: str) -> str:
    """The row of a task whose payload (or chunk) was encoded at admission to *text*."""
    if t.route is not None:
        return f"[{t.id},{text},{_codec.encode_str(t.route.options(t.count > 1))}]"
    return f"[{t.id},{text},{CHUNK_ROW}]" if t.count > 1 else f"[{t.id},{text}]"


def _row(t: Task) -> list[Any]:
    if t.route is not None:
        return [t.id, t.payload, t.route.options(t.count > 1)]
    return [t.id, t.payload] if t.count == 1 else [t.id, t.payload, CHUNK_ROW]


def _versions(raw: Any) -> dict[int, str]:
    """The ``mv`` field of a done frame: the model version of each task that ran on one."""
    if type(raw) is not dict or not all(type(v) is str for v in raw.values()):
        raise ProtocolError("malformed model versions")
    try:
        return {int(k): v for k, v in raw.items()}
    except ValueError:
        raise ProtocolError("malformed model versions") from None


def _remote_error(info: Any) -> TaskFailed:
    if not (type(info) is list and len(info) == 3 and all(type(x) is str for x in info)):
        raise ProtocolError("malformed error entry")
    err = TaskFailed(info[0], info[1], info[2])
    err.__cause__ = RemoteTraceback(info[2])
    return err


def parse_results(entries: Any) -> list[Any]:
    """Validate a ``done`` frame's rows in place: ``[id, OK, value]`` stays as it is, an error
    ``[id, ERROR, [type, message, traceback]]`` gets a :class:`TaskFailed` as its value, a
    chunk ``[id, CHUNK, [[OK, value] or [ERROR, error], ...]]`` the same per item, and a chunk
    whose items all succeeded ``[id, RUN, [value, ...]]`` stays as it is (no per-item work)."""
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
                if type(item) is not list or len(item) != 2 or item[0] not in (OK, ERROR):
                    raise ProtocolError("malformed chunk entry")
                if item[0] == ERROR:
                    items[i] = (ERROR, _remote_error(item[1]))
                else:
                    items[i] = (OK, item[1])
        else:
            raise ProtocolError("malformed result entry")
    return entries


class Heartbeats:
    """One thread that keeps every remote connection of a coordinator honest: it pings the idle
    ones and drops those silent past ``heartbeat_timeout`` or hung (work in hand, no result)
    past ``hang_timeout``. Started with the first connection, stopped by :meth:`stop`."""

    def __init__(
        self,
        name: str,
        *,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        hang_timeout: float | None,
        clock: Callable[[], float],
    ) -> None:
        self.interval = heartbeat_interval
        self._clock = clock  # the scheduler's clock, for WorkerState.last_progress
        self.timeout = heartbeat_timeout
        self.hang_timeout = hang_timeout
        self._name = name
        self._handles: set[RemoteHandle] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, handle: RemoteHandle) -> None:
        with self._lock:
            self._handles.add(handle)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._loop, name=f"pytaskqml-heartbeat-{self._name}", daemon=True
                )
                self._thread.start()

    def remove(self, handle: RemoteHandle) -> None:
        with self._lock:
            self._handles.discard(handle)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def _loop(self) -> None:
        tick = min(0.25, self.interval / 2)
        try:
            while not self._stop.wait(tick):
                self._check_all()
        except BaseException:
            log.exception("heartbeat thread crashed; connections are no longer watched")

    def _check_all(self) -> None:
        # A call per round, so no handle stays referenced from the loop while it sleeps.
        with self._lock:
            handles = list(self._handles)
        now, progress_now = time.monotonic(), self._clock()
        for h in handles:
            h.check(now, progress_now, self)
