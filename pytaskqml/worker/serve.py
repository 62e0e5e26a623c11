"""A worker process's serve loop: :class:`WorkerServer`.

A worker process has three threads while it is connected:

* the **main** thread receives frames and runs their tasks itself (no thread hand-off between a
  frame's arrival and ``process()``), sends results, and finally runs ``teardown()``;
* a **heartbeat** thread pings an idle connection and closes one that stayed silent too long;
  while a task runs nobody reads the socket, so it watches for the coordinator hanging up
  instead;
* with ``--listen``, an **acceptor** (:mod:`._endpoints`) that authenticates connecting
  coordinators, which are then served one at a time.

Graceful stop (``/shutdown``, a ``stop`` message, SIGTERM): the task in hand finishes, its
result and every earlier one is sent, then a ``bye`` frame. Whatever else the coordinator had
sent never started, so it re-queues those tasks at no cost. The worker then waits (briefly) for
the coordinator to close the connection, so its ``bye`` is read before the connection ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import ssl
import threading
import time
from typing import Any

from ..buffers import shm as _shm
from ..core.stats import ServeStats
from ..errors import AuthenticationError, ConnectionLost, ProtocolError
from ..wire import codec as _codec
from ..wire import connection as _connection
from ..wire import protocol as _protocol
from ..wire.connection import Address, Connection
from ..wire.endpoints import Acceptor, Backoff, describe, dial_once, is_fatal
from ..wire.protocol import RESULT_CHUNK, RESULT_ERROR, RESULT_OK
from .base import TASK_ERRORS, Worker, interrupt_grace, run_chunk, worker_info
from .models import ModelTable, run_option_row, run_rows
from .readysend import Flusher, Ready
from .results import count_errors, encode_results, valid_row

log = logging.getLogger(__name__)

# Results of quick tasks are sent together; once the oldest unsent result is this old it goes
# out on its own, so a slow model's first result never waits for its neighbour.
RESULT_FLUSH_AFTER = 0.0005
# After its goodbye a worker waits this long for the coordinator to close the connection.
GOODBYE_TIMEOUT = 2.0


class WorkerServer:
    """Serves one :class:`Worker` instance to coordinators (in a worker process)."""

    max_pending_handshakes = 16

    def __init__(
        self,
        worker: Worker,
        *,
        authkey: bytes = b"",
        name: str = "",
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 5.0,
        max_frame_size: int = _protocol.DEFAULT_MAX_FRAME_SIZE,
        handshake_timeout: float = _connection.DEFAULT_HANDSHAKE_TIMEOUT,
        exit_grace: float | None = None,
        control_address: str | None = None,
        spawn_id: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        shared: tuple[int, str] | _shm.SharedView | None = None,
        models: ModelTable | None = None,
    ) -> None:
        self.worker = worker
        # Named models this worker hosts (see _models); their status changes are reported on
        # the current connection.
        self.models = models
        self.authkey = authkey
        self.name = name or f"{type(worker).__name__}-{os.getpid()}"
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_frame_size = max_frame_size
        self.handshake_timeout = handshake_timeout
        # A spawned worker must not outlive its coordinator: this many seconds after it hung up
        # (even inside a task that never returns) the process exits. None: never.
        self.exit_grace = exit_grace
        self.control_address = control_address
        self.spawn_id = spawn_id
        self.ssl_context = ssl_context
        # Shared memory with the coordinator that spawned us (see _shm): large task buffers
        # arrive as views of it instead of through the socket.
        # (A SharedView, made by the caller, may also map the coordinator's buffer pool.)
        self._shared = shared if not isinstance(shared, tuple) else _shm.SharedView(*shared)
        self.tasks_done = 0
        self.errors = 0
        self.busy_seconds = 0.0
        self.connections = 0
        self._bytes = [0, 0]  # sent, received over connections that have ended
        self._stop = threading.Event()
        self._conn: Connection | None = None
        self._busy = False  # the main thread is running tasks, not reading
        self._said_bye = False  # on the current connection
        self._ready: queue.SimpleQueue[Connection | None] | None = None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # results: one sender at a time, in order
        self._flushers: dict[Connection, Flusher] = {}
        # Interrupting stale work (Worker.interrupt_grace): a reader thread reads the
        # connection while tasks run, so a "cancel" for the running task reaches it at once
        # (the worker's cancelled() flag); every other message goes to the serve loop through
        # the inbox. Without it the main thread reads the socket itself, between frames.
        self._grace = interrupt_grace(worker)
        self._inbox: queue.SimpleQueue[Any] | None = None
        self._cancel = threading.Event()
        self._running: int | None = None  # the id of the task being run, in that mode
        self._cancelled_ids: dict[int, None] = {}  # recent ones, for a task not started yet
        if self._grace is not None:
            worker._pytaskqml_cancel = self._cancel

    # ----------------------------------------------------------------- control

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def statistics(self) -> ServeStats:
        with self._lock:
            conn = self._conn
            sent, received = self._bytes
        if conn is not None:
            sent, received = sent + conn.bytes_out, received + conn.bytes_in
        return ServeStats(
            self.name,
            self.tasks_done,
            self.errors,
            self.busy_seconds,
            conn is not None,
            self.connections,
            sent,
            received,
            self.stopping,
        )

    def request_stop(self) -> None:
        """Finish the task in hand, send its result, say goodbye, and stop serving.

        When no task is running the goodbye is sent from here: the main thread, blocked
        receiving, sees the coordinator close the connection in answer. The decision is taken
        under the lock the main thread also takes when it starts on a frame, so a frame is
        either run to the end before the goodbye or not run at all.
        """
        with self._lock:
            self._stop.set()
            conn = self._conn
            if conn is not None and not self._busy:
                self._say_bye(conn)
            if self._ready is not None:
                self._ready.put(None)  # wakes run_listen() waiting for a coordinator

    def report_model(self, status: dict[str, Any]) -> None:
        """Tell the coordinator about a model that loaded, failed or went (from any thread)."""
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(ConnectionLost, TypeError, ValueError):
                conn.send("models", status)

    def _say_bye(self, conn: Connection) -> None:
        """Lock held (or the main thread, between frames)."""
        if self._said_bye:
            return
        self._said_bye = True
        with contextlib.suppress(ConnectionLost):
            conn.send("bye", {"done": self.tasks_done})

    # --------------------------------------------------------------- endpoints

    def run_dial(self, address: Address, *, reconnect: bool) -> str:
        """Dial the coordinator and serve; with *reconnect*, dial again (with backoff) after a
        lost connection. Returns ``"stopped"`` or ``"lost"``.

        A first attempt refused for the key or a certificate raises at once (retrying cannot
        help); so does any failure without *reconnect*.
        """
        backoff = Backoff(first=0.1, cap=5.0)
        served = False
        where = _connection.format_address(address)
        while not self._stop.is_set():
            try:
                conn = dial_once(
                    address,
                    self.authkey,
                    ssl_context=self.ssl_context,
                    name=self.name,
                    max_frame_size=self.max_frame_size,
                    timeout=self.handshake_timeout,
                )
            except (OSError, ConnectionLost, AuthenticationError) as exc:
                why = describe(exc, address)
                if not reconnect or (not served and is_fatal(exc)):
                    if isinstance(exc, AuthenticationError):
                        raise AuthenticationError(f"coordinator at {where}: {why}") from None
                    raise ConnectionLost(f"cannot reach coordinator at {where}: {why}") from None
                delay = backoff.next()
                log.info("coordinator %s unavailable (%s); retrying in %.1fs", where, why, delay)
                self._stop.wait(delay)
                continue
            backoff.reset()
            served = True
            outcome = self.serve_connection(conn)
            if outcome == "stopped" or not reconnect:
                return outcome
            log.warning("lost the coordinator; reconnecting")
        return "stopped"

    def run_listen(self, listener: _connection.Listener) -> str:
        """Serve coordinators that connect to *listener*, one session at a time, until stopped.

        Connections are authenticated by their own threads (at most
        ``max_pending_handshakes`` at once); authenticated ones wait their turn in a queue.
        """
        ready: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        with self._lock:
            self._ready = ready
            if self._stop.is_set():
                ready.put(None)
        acceptor = Acceptor(
            listener,
            self.authkey,
            on_connection=ready.put,
            on_refused=lambda peer, why: log.warning("rejected connection from %s: %s", peer, why),
            ssl_context=self.ssl_context,
            max_pending=self.max_pending_handshakes,
            max_frame_size=self.max_frame_size,
            name=self.name,
            handshake_timeout=self.handshake_timeout,
        )
        acceptor.start()
        try:
            while not self._stop.is_set():
                conn = ready.get()
                if conn is None:
                    break
                if self._stop.is_set():
                    conn.abort()
                    break
                log.info("coordinator %s connected", conn.peer)
                if self.serve_connection(conn) == "stopped":
                    break
        finally:
            with self._lock:
                self._ready = None
            acceptor.stop()
            while True:  # connections authenticated meanwhile are closed, not leaked
                try:
                    extra = ready.get_nowait()
                except queue.Empty:
                    break
                if extra is not None:
                    extra.abort()
        return "stopped"

    # ------------------------------------------------------------ one session

    def serve_connection(self, conn: Connection) -> str:
        """Serve one authenticated connection; ``"stopped"`` or ``"lost"``."""
        done = threading.Event()
        with self._lock:
            self._conn = conn
            self._said_bye = False
            self.connections += 1
        try:
            conn.send(
                "hello",
                {
                    "name": self.name,
                    "pid": os.getpid(),
                    "spawn_id": self.spawn_id,
                    "control": self.control_address,
                    "shm": self._shared.token if self._shared is not None else None,
                    "pool": self._shared.pool_token if self._shared is not None else None,
                    "models": self.models.loaded() if self.models is not None else {},
                    **worker_info(self.worker),
                },
            )
        except ConnectionLost:
            return "lost"
        if self._shared is not None:
            conn.set_shared(self._shared)
        beat = threading.Thread(
            target=self._heartbeat_loop,
            args=(conn, done),
            name=f"pytaskqml-heartbeat-{conn.peer}",
            daemon=True,
        )
        beat.start()
        if self._grace is not None:
            self._inbox = queue.SimpleQueue()
            threading.Thread(
                target=self._read_ahead,
                args=(conn, self._inbox),
                name=f"pytaskqml-worker-reader-{conn.peer}",
                daemon=True,
            ).start()
        try:
            return self._serve(conn)
        finally:
            self._busy = False
            done.set()
            flusher = self._flushers.pop(conn, None)
            if flusher is not None:
                flusher.close()
            with self._lock:
                self._conn = None
                self._bytes[0] += conn.bytes_out
                self._bytes[1] += conn.bytes_in
            conn.abort()
            beat.join(timeout=5)

    def _serve(self, conn: Connection) -> str:
        while True:
            if self._stop.is_set():
                with self._lock:
                    self._say_bye(conn)
                self._await_close(conn)
                return "stopped"
            try:
                msg = conn.recv() if self._inbox is None else self._next()
            except ConnectionLost as exc:
                if self._stop.is_set():
                    return "stopped"  # the coordinator closed after our goodbye
                log.info("connection to %s ended: %s", conn.peer, exc)
                return "lost"
            except ProtocolError as exc:
                log.error("protocol error from %s: %s", conn.peer, exc)
                return "lost"
            op = msg.op
            if op == "run":
                with self._lock:
                    if self._said_bye:
                        continue  # sent before our goodbye reached it: never started
                    self._busy = True
                try:
                    self._run_frame(conn, msg)
                    del msg  # its rows may still refer to shared memory
                    self._report_freed(conn)
                except ConnectionLost as exc:
                    log.info("connection to %s lost while sending results: %s", conn.peer, exc)
                    return "lost"
                except ProtocolError as exc:
                    log.error("protocol error from %s: %s", conn.peer, exc)
                    return "lost"
                finally:
                    self._busy = False
            elif op == "stop":
                self._stop.set()
            elif op == "models":
                if self.models is None:
                    self.report_model({"name": msg.header.get("name"), "state": "failed",
                                       "error": "this worker hosts no models"})  # fmt: skip
                else:
                    self.models.command(msg.header)
            elif op == "ping":
                self._report_freed(conn)
            elif op != "config":
                log.error("unexpected message %r from %s", op, conn.peer)
                return "lost"

    def _next(self) -> _protocol.Message:
        """The next message the reader thread passed on (raises what ended its reading)."""
        assert self._inbox is not None
        item = self._inbox.get()
        if isinstance(item, BaseException):
            self._inbox.put(item)  # the connection stays ended for every later call
            raise item
        return item  # type: ignore[no-any-return]

    def _read_ahead(self, conn: Connection, inbox: queue.SimpleQueue[Any]) -> None:
        """The reader thread (interruptible workers): "cancel" is acted on here, at once;
        everything else goes to the serve loop in order."""
        try:
            while True:
                msg = conn.recv()
                if msg.op == "cancel":
                    self._on_cancel(msg.header.get("ids"))
                else:
                    inbox.put(msg)
        except (ConnectionLost, ProtocolError) as exc:
            inbox.put(exc)
        except BaseException:
            log.exception("worker reader thread crashed")
            inbox.put(ConnectionLost("the worker's reader thread crashed"))
            conn.abort()

    def _on_cancel(self, ids: Any) -> None:
        if type(ids) is not list:
            return
        for tid in ids:
            if type(tid) is not int:
                continue
            # Remembered first, then compared with the running task: _run_frame sets the
            # running id first, then looks here, so either side sees the other.
            self._cancelled_ids[tid] = None
            if len(self._cancelled_ids) > 4096:
                del self._cancelled_ids[next(iter(self._cancelled_ids))]
            if self._running == tid:
                self._cancel.set()
                log.info("task %d is no longer wanted: cancelled() is now true", tid)

    def _await_close(self, conn: Connection) -> None:
        """After our goodbye: read (and drop) until the coordinator closes, at most
        GOODBYE_TIMEOUT, so the goodbye is read before the connection goes."""
        deadline = time.monotonic() + GOODBYE_TIMEOUT
        inbox = self._inbox
        if inbox is not None:  # the reader thread reads; wait for it to see the close
            while time.monotonic() < deadline:
                try:
                    item = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return
                if isinstance(item, BaseException):
                    inbox.put(item)
                    return
            return
        with contextlib.suppress(ConnectionLost, ProtocolError):
            while time.monotonic() < deadline:
                conn.recv_within(max(0.0, deadline - time.monotonic()))

    def _heartbeat_loop(self, conn: Connection, done: threading.Event) -> None:
        interval = self.heartbeat_interval
        try:
            while not done.wait(interval / 2):
                now = time.monotonic()
                if self._busy:
                    # A task is running: the socket is not being read, so silence means nothing;
                    # a hang-up does (the coordinator died). A spawned worker then leaves.
                    if self.exit_grace is not None and conn.peer_hung_up():
                        self._exit_if_stuck(done)
                        return
                elif now - conn.last_recv > self.heartbeat_timeout and not self._said_bye:
                    log.warning(
                        "coordinator %s silent for %.1fs; dropping the connection",
                        conn.peer,
                        now - conn.last_recv,
                    )
                    conn.abort()
                    return
                if now - conn.last_send >= interval and not self._said_bye:
                    conn.ping()
        except ConnectionLost:
            return
        except BaseException:
            log.exception("worker heartbeat thread crashed")
            conn.abort()

    def _exit_if_stuck(self, done: threading.Event) -> None:
        assert self.exit_grace is not None
        if not done.wait(self.exit_grace):
            log.error(
                "coordinator gone and the task still running after %.1fs; exiting", self.exit_grace
            )
            os._exit(3)

    # ------------------------------------------------------------ running tasks

    def _run_frame(self, conn: Connection, msg: _protocol.Message) -> None:
        header = msg.header
        entries = header.get("t")
        if type(entries) is not list or not all(valid_row(e) for e in entries):
            raise ProtocolError("malformed run frame")
        if len(entries) == 1 and len(entries[0]) == 2 and self._inbox is None and "b" not in header:
            self._run_one(conn, entries[0])
            return
        clock = time.perf_counter
        if header.get("b"):
            t0 = clock()
            rows, versions = run_rows(self.worker, self.models, entries, batch=True)
            self.tasks_done += len(entries)
            self.errors += count_errors(rows)
            for row in entries:
                row[1] = None  # drop our reference to the payload: its memory may be freed
            self._send_results(conn, rows, clock() - t0, versions)
            return
        process = self.worker.process
        # A frame of one task needs no flusher: its result goes as soon as it is done.
        ready = Ready() if len(entries) > 1 else None
        flusher = self._flusher(conn) if ready is not None else None
        if flusher is not None:
            flusher.watch(ready)
        done: list[Any] = ready.rows if ready is not None else []
        ends: list[float] = ready.ends if ready is not None else []
        done_versions: dict[int, str] = ready.versions if ready is not None else {}
        last = clock()
        if ready is not None:
            ready.start = last
        batch = last  # when the first task whose result this thread has not sent started
        try:
            for row in entries:
                if self._stop.is_set():
                    break  # the rest never start: the coordinator re-queues them after "bye"
                if self._inbox is not None:
                    self._running = row[0]
                    self._cancel.clear()
                    if row[0] in self._cancelled_ids:
                        self._cancel.set()
                if len(row) == 2:
                    try:
                        result = (row[0], RESULT_OK, process(row[1]))
                    except TASK_ERRORS as exc:
                        result = (row[0], RESULT_ERROR, exc)
                        self.errors += 1
                else:
                    if type(row[2]) is dict:  # a model, a key
                        result, version = run_option_row(self.worker, self.models, row)
                        self.errors += count_errors([result])
                        if version is not None:
                            done_versions[row[0]] = version  # (before the row: see Ready)
                    else:
                        result = run_chunk(process, row[0], row[1])
                        if result[1] == RESULT_CHUNK:
                            self.errors += count_errors([result])
                row[1] = None
                self.tasks_done += 1
                now = clock()
                ends.append(now)
                done.append(result)
                if ready is None:
                    self._send_results(conn, done, now - last, done_versions)
                    return
                # Results of quick tasks go together: once RESULT_FLUSH_AFTER went by since
                # the first of them started, they go - and the flusher sends them if the
                # task after them runs long.
                if now - batch > RESULT_FLUSH_AFTER:
                    self._flush(conn, ready)
                    batch = now
        finally:
            self._running = None
            if flusher is not None:
                flusher.watch(None)
        if ready is not None:
            self._flush(conn, ready)

    def _run_one(self, conn: Connection, row: list[Any]) -> None:
        """A frame of one plain task (a round trip's): what :meth:`_run_frame` does for it,
        without the bookkeeping of a frame of several (flusher, finish times, versions)."""
        if self._stop.is_set():
            return  # never started: the coordinator re-queues it after "bye"
        clock = time.perf_counter
        t0 = clock()
        try:
            result = (row[0], RESULT_OK, self.worker.process(row[1]))
        except TASK_ERRORS as exc:
            result = (row[0], RESULT_ERROR, exc)
            self.errors += 1
        busy = clock() - t0
        row[1] = None  # drop our reference to the payload: its memory may be freed
        self.tasks_done += 1
        self._send_results(conn, [result], busy)

    def _flusher(self, conn: Connection) -> Flusher:
        flusher = self._flushers.get(conn)
        if flusher is None:
            flusher = self._flushers[conn] = Flusher(self._flush, conn)
        return flusher

    def _flush(self, conn: Connection, ready: Ready, older_than: float | None = None) -> None:
        """Send the results *ready* holds that were not sent yet (only if the oldest of them
        finished more than *older_than* seconds ago), in the order they finished: one sender
        at a time."""
        with self._send_lock:
            if ready.error is not None:
                raise ready.error
            start, end = ready.sent, len(ready.rows)
            if start >= end or (
                older_than is not None and time.perf_counter() - ready.ends[start] < older_than
            ):
                return
            rows = ready.rows[start:end]
            # Compute time: from the end of the last task sent (or the frame's start) to the
            # end of this one - the tasks ran back to back.
            busy = ready.ends[end - 1] - (ready.ends[start - 1] if start else ready.start)
            versions = ready.versions
            mine = {r[0]: versions[r[0]] for r in rows if r[0] in versions} if versions else None
            ready.sent = end
            for i in range(start, end):
                ready.rows[i] = None  # sent: its memory may go
            self._send_results(conn, rows, busy, mine)

    def _send_results(
        self,
        conn: Connection,
        results: list[tuple[int, int, Any]],
        busy: float,
        versions: dict[int, str] | None = None,
    ) -> None:
        self.busy_seconds += busy
        freed = self._shared.freed() if self._shared is not None else None
        try:
            frame = self._done_frame(results, busy, freed, versions)
        except ValueError:  # over max_frame_size: the coordinator would drop the connection
            self._send_apart(conn, results, busy, freed, versions)
            return
        conn.send_frame(frame)

    def _done_frame(
        self,
        results: list[tuple[int, int, Any]],
        busy: float,
        freed: dict[str, Any] | None,
        versions: dict[int, str] | None,
    ) -> list[bytes | memoryview]:
        """The ``done`` frame of *results*; ValueError if it would exceed max_frame_size."""
        # One plain result (the round-trip case) is written without the encoder.
        value = None
        buffers: list[memoryview] = []
        if len(results) == 1 and results[0][1] == RESULT_OK:
            value = _codec.scalar_json(results[0][2])
        if value is not None:
            text = f"[[{results[0][0]},{RESULT_OK},{value}]]"
        else:
            text, buffers = encode_results(results)
        return _protocol.encode_frame(
            '{"op":"done","bt":'
            + repr(round(busy, 7))
            + ("".join(f',"{k}":{v!r}' for k, v in freed.items()) if freed else "")
            + (',"mv":' + _codec.encode_str({str(k): v for k, v in versions.items()})
               if versions else "")
            + ',"r":'
            + text
            + "}",
            buffers,
            max_frame_size=self.max_frame_size,
        )  # fmt: skip

    def _send_apart(
        self,
        conn: Connection,
        results: list[tuple[int, int, Any]],
        busy: float,
        freed: dict[str, Any] | None,
        versions: dict[int, str] | None,
    ) -> None:
        """Results too large for one frame together: each in a frame of its own, and one too
        large alone fails its task (the coordinator refuses a frame over its limit, and the
        task would kill each worker it is retried on)."""
        for row in results:
            mine = {row[0]: versions[row[0]]} if versions and row[0] in versions else None
            try:
                frame = self._done_frame([row], busy, freed, mine)
            except ValueError as exc:
                log.warning("result of task %d not sent: %s", row[0], exc)
                error = ValueError(
                    f"the result is too large to send: {exc}. Return less, or write it to a "
                    "file and return its path (pytaskqml.spill() for arrays and bytes)"
                )
                frame = self._done_frame([(row[0], RESULT_ERROR, error)], busy, freed, mine)
                self.errors += 1
            conn.send_frame(frame)
            busy, freed = 0.0, None

    def _report_freed(self, conn: Connection) -> None:
        """Tell the coordinator about shared-memory slots freed since the last results (e.g. a
        result that was the input array itself, now sent; an array ``process()`` kept, now
        dropped)."""
        if self._shared is not None and self._shared.held:
            freed = self._shared.freed()
            if freed:
                conn.send("free", freed)
