"""The :class:`Worker` base class and the serve loop of a worker process.

A worker process has three threads while it is connected:

* the **main** thread runs ``setup()``, then ``process()`` for one task at a time, sends results,
  and finally runs ``teardown()``;
* a **reader** thread receives frames and hands task frames to the main thread; it is what
  notices at once that the coordinator went away (EOF), even while a task is running;
* a **heartbeat** thread pings an idle connection and closes one that stayed silent too long.

Graceful stop (``/shutdown``, a ``stop`` message, or :meth:`WorkerServer.request_stop`): the
task in hand finishes, its result and every earlier one is sent, then a ``bye`` frame. The
coordinator re-queues anything still in flight for this worker - those tasks never started, so
that costs them no retry - and the process runs ``teardown()`` and exits 0.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import platform
import queue
import select
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

from . import _codec, _connection, _protocol, _shm
from ._errors import AuthenticationError, ConnectionLost, ProtocolError, WorkerStartError

log = logging.getLogger(__name__)

# Results of quick tasks are sent together; once the oldest unsent result is this old it goes
# out on its own, so a slow model's first result never waits for its neighbour.
_RESULT_FLUSH_AFTER = 0.0005


class Worker:
    """Subclass this and override :meth:`process` (and optionally the rest).

    The same subclass runs as a local thread worker, as a process the coordinator spawns, or as
    a standalone process started by ``pytaskqml worker module:Class``.

    Class attributes:

    ``max_batch_size``
        When above 1 the coordinator groups up to this many queued tasks into one call of
        :meth:`process_batch` (dynamic batching, for models that prefer a batch, e.g. on a GPU).
    ``max_batch_delay``
        Seconds the coordinator may hold a partial batch back waiting for it to fill.
    """

    max_batch_size: int = 1
    max_batch_delay: float = 0.0

    def setup(self) -> None:
        """Called once per worker, before its first task (load the model here)."""

    def process(self, payload: Any) -> Any:
        """Compute the result of one task. An exception fails this task only.

        NumPy arrays in *payload* are yours: writable, and in a spawned worker often a view of
        memory shared with the coordinator, which is not reused while you still refer to it.
        """
        raise NotImplementedError(f"{type(self).__name__} must override process()")

    def process_batch(self, payloads: list[Any]) -> list[Any]:
        """Compute a batch of results, one per payload and in the same order.

        To fail one item without failing the batch, put an ``Exception`` instance in its place.
        """
        return [self.process(p) for p in payloads]

    def teardown(self) -> None:
        """Called once when the worker stops, also after ``/shutdown``."""


def error_info(exc: BaseException) -> list[str]:
    """``[qualified type, message, traceback text]``: how an exception travels."""
    t = type(exc)
    name = (
        t.__qualname__
        if t.__module__ in ("builtins", "__main__")
        else f"{t.__module__}.{t.__qualname__}"
    )
    return [name, str(exc), "".join(traceback.format_exception(t, exc, exc.__traceback__))]


def run_tasks(worker: Worker, payloads: Sequence[Any], batch: bool) -> list[tuple[bool, Any]]:
    """Run payloads through the worker: ``(True, result)`` or ``(False, exception)`` each."""
    if batch:
        try:
            results = worker.process_batch(list(payloads))
            if not isinstance(results, list) or len(results) != len(payloads):
                got = len(results) if isinstance(results, list) else type(results).__name__
                raise ValueError(
                    f"process_batch returned {got} results for {len(payloads)} payloads"
                )
        except Exception as exc:
            return [(False, exc)] * len(payloads)
        return [(False, r) if isinstance(r, Exception) else (True, r) for r in results]
    out: list[tuple[bool, Any]] = []
    for p in payloads:
        try:
            out.append((True, worker.process(p)))
        except Exception as exc:
            out.append((False, exc))
    return out


def run_entries(worker: Worker, entries: Sequence[Any], batch: bool) -> list[tuple[int, int, Any]]:
    """Run task rows ``[id, payload]`` and chunk rows ``[id, [items...], 1]``.

    Returns ``(id, 0, result)``, ``(id, 1, exception)`` or, for a chunk, ``(id, 6, [result,
    ...])`` when every item succeeded and ``(id, 2, [(0 or 1, result or exception), ...])``
    otherwise. With *batch* every item of every row goes through ``process_batch`` in slices of
    ``max_batch_size``.
    """
    if not batch:
        process = worker.process
        out: list[tuple[int, int, Any]] = []
        for row in entries:
            if len(row) == 3:
                out.append(run_chunk(process, row[0], row[1]))
                continue
            try:
                out.append((row[0], 0, process(row[1])))
            except Exception as exc:
                out.append((row[0], 1, exc))
        return out
    items: list[Any] = []
    for row in entries:
        if len(row) == 3:
            items.extend(row[1])
        else:
            items.append(row[1])
    size = max(1, int(getattr(worker, "max_batch_size", 1) or 1))
    outcomes: list[tuple[bool, Any]] = []
    for i in range(0, len(items), size):
        outcomes.extend(run_tasks(worker, items[i : i + size], batch=True))
    out = []
    pos = 0
    for row in entries:
        if len(row) == 3:
            n = len(row[1])
            part = outcomes[pos : pos + n]
            if all(ok for ok, _ in part):
                out.append((row[0], 6, [v for _, v in part]))
            else:
                out.append((row[0], 2, [(0 if ok else 1, v) for ok, v in part]))
            pos += n
        else:
            ok, v = outcomes[pos]
            out.append((row[0], 0 if ok else 1, v))
            pos += 1
    return out


def run_chunk(process: Any, tid: int, items: list[Any]) -> tuple[int, int, Any]:
    """One chunk, item by item. The loop is as plain as it can be - a chunk of tiny items costs
    about one call of ``process`` per item - until an item fails; from there on each outcome is
    recorded on its own. No item runs twice."""
    results: list[Any] = []
    append = results.append
    try:
        for item in items:
            append(process(item))
    except Exception as exc:
        mixed: list[tuple[int, Any]] = [(0, r) for r in results]
        mixed.append((1, exc))
        for item in items[len(mixed) :]:
            try:
                mixed.append((0, process(item)))
            except Exception as exc2:
                mixed.append((1, exc2))
        return tid, 2, mixed
    return tid, 6, results


def worker_info(worker: Worker) -> dict[str, Any]:
    batch = int(getattr(worker, "max_batch_size", 1) or 1)
    delay = float(getattr(worker, "max_batch_delay", 0.0) or 0.0)
    overridden = type(worker).process_batch is not Worker.process_batch
    return {
        "cls": f"{type(worker).__module__}.{type(worker).__qualname__}",
        "batch": batch if (batch > 1 or overridden) else 1,
        "batch_delay": delay,
    }


# --------------------------------------------------------------------------- class loading


def load_worker_class(target: str, *, main_path: str | None = None) -> type[Worker]:
    """Import ``module:Class`` (or ``module:Outer.Inner``); raise WorkerStartError clearly."""
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name or not qualname:
        raise WorkerStartError(
            f"bad worker {target!r}: expected MODULE:CLASS, e.g. myapp:WordCount"
        )
    try:
        if module_name in ("__main__", "__mp_main__") and main_path:
            module = _load_main(main_path)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except WorkerStartError:
        raise
    except Exception as exc:
        raise WorkerStartError(
            f"cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise WorkerStartError(
                f"module {module_name!r} has no attribute {qualname!r}"
            ) from None
    if not (isinstance(obj, type) and issubclass(obj, Worker)):
        raise WorkerStartError(f"{target!r} is not a subclass of pytaskqml.Worker")
    return obj


def _load_main(path: str) -> Any:
    # The parent's main script is imported under another name, as multiprocessing does, so its
    # `if __name__ == "__main__":` block does not run again in the child.
    existing = sys.modules.get("__mp_main__")
    if existing is not None:
        return existing
    spec = importlib.util.spec_from_file_location("__mp_main__", path)
    if spec is None or spec.loader is None:
        raise WorkerStartError(f"cannot load the main script {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["__mp_main__"] = module
    spec.loader.exec_module(module)
    return module


def class_target(cls: type) -> tuple[str, str | None]:
    """``("module:Qualname", main_path)`` naming *cls* so a child process can import it."""
    if "<locals>" in cls.__qualname__:
        raise ValueError(
            f"{cls.__qualname__} is defined inside a function; define worker classes at module "
            "level so a child process can import them"
        )
    module = cls.__module__
    main_path = None
    if module in ("__main__", "__mp_main__"):
        main = sys.modules.get("__main__")
        main_path = getattr(main, "__file__", None)
        if not main_path:
            raise ValueError(
                f"{cls.__qualname__} lives in an interactive __main__; put it in an importable "
                "module to spawn it"
            )
        main_path = os.path.abspath(main_path)
    return f"{module}:{cls.__qualname__}", main_path


# --------------------------------------------------------------------------- serving


def _peer_hung_up(conn: _connection.Connection) -> bool:
    """Has the peer closed its end, even with unread data still queued? (Linux: POLLRDHUP.)"""
    try:
        poller = select.poll()
        mask = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR
        poller.register(conn.sock.fileno(), mask)
        return any(ev & mask for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


class WorkerServer:
    """Serves one :class:`Worker` instance to coordinators over TCP (in a worker process)."""

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
        shared: tuple[int, str] | None = None,
    ) -> None:
        self.worker = worker
        self.authkey = authkey
        self.name = name or f"{type(worker).__name__}-{os.getpid()}"
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_frame_size = max_frame_size
        self.handshake_timeout = handshake_timeout
        self.exit_grace = exit_grace
        self.control_address = control_address
        self.spawn_id = spawn_id
        self.ssl_context = ssl_context
        # Shared memory with the coordinator that spawned us (see _shm): large task buffers
        # arrive as views of it instead of through the socket.
        self._shared = _shm.SharedView(*shared) if shared is not None else None
        self.tasks_done = 0
        self._stop = threading.Event()
        self._conn: _connection.Connection | None = None
        self._busy = False  # the main thread is running tasks, not reading
        self._listener: Any = None
        self._ready: queue.SimpleQueue[_connection.Connection | None] | None = None
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- control

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Finish the task in hand, send its result, say goodbye, and stop serving."""
        with self._lock:
            self._stop.set()
            conn = self._conn
            if conn is not None and not self._busy:
                conn.interrupt_recv()  # the main thread wakes, sees the flag, says goodbye
            if self._ready is not None:
                self._ready.put(None)  # wakes run_listen() waiting for a coordinator

    # --------------------------------------------------------------- endpoints

    def run_dial(self, address: _connection.Address, *, reconnect: bool) -> str:
        """Dial the coordinator and serve; with *reconnect*, dial again (with backoff) after a
        lost connection. Returns ``"stopped"`` or ``"lost"``."""
        delay = 0.1
        while not self._stop.is_set():
            try:
                sock = _connection.dial(
                    address, timeout=self.handshake_timeout, ssl_context=self.ssl_context
                )
            except OSError as exc:
                if not reconnect:
                    raise ConnectionLost(
                        f"cannot reach coordinator at {_connection.format_address(address)}: {exc}"
                    ) from None
                log.info(
                    "coordinator %s unreachable (%s); retrying in %.1fs",
                    _connection.format_address(address),
                    exc,
                    delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            conn = _connection.Connection(sock, name=self.name, max_frame_size=self.max_frame_size)
            try:
                _connection.client_handshake(conn, self.authkey, timeout=self.handshake_timeout)
            except (AuthenticationError, ConnectionLost) as exc:
                conn.abort()
                if not reconnect:
                    raise
                log.warning("handshake with %s failed: %s", conn.peer, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            outcome = self.serve_connection(conn)
            if outcome == "stopped" or not reconnect:
                return outcome
            log.warning("lost the coordinator; reconnecting")
        return "stopped"

    def run_listen(self, listener: Any) -> str:
        """Serve coordinators that connect to *listener*, one session at a time, until stopped.

        Connections are accepted and authenticated by their own threads (at most
        ``max_pending_handshakes`` at once), so a peer that stalls in the handshake holds up
        nobody; authenticated connections wait their turn in a queue.
        """
        ready: queue.SimpleQueue[_connection.Connection | None] = queue.SimpleQueue()
        with self._lock:
            self._listener = listener
            self._ready = ready
            if self._stop.is_set():
                ready.put(None)
        acceptor = threading.Thread(
            target=self._accept_loop, args=(listener, ready), name="pytaskqml-accept", daemon=True
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
            with contextlib.suppress(OSError):
                listener.shutdown(2)
            with contextlib.suppress(OSError):
                listener.close()
            acceptor.join(timeout=5)
            while True:  # connections authenticated meanwhile are closed, not leaked
                try:
                    extra = ready.get_nowait()
                except queue.Empty:
                    break
                if extra is not None:
                    extra.abort()
        return "stopped"

    max_pending_handshakes = 16

    def _accept_loop(
        self, listener: Any, ready: queue.SimpleQueue[_connection.Connection | None]
    ) -> None:
        pending = threading.BoundedSemaphore(self.max_pending_handshakes)
        try:
            while not self._stop.is_set():
                try:
                    sock, peer = listener.accept()
                except OSError:
                    if self._stop.is_set():
                        return
                    time.sleep(0.05)  # e.g. out of file descriptors: do not spin
                    continue
                if not pending.acquire(blocking=False):
                    log.warning(
                        "rejected connection from %s: too many connections in the handshake",
                        _connection.format_address(peer[:2]),
                    )
                    with contextlib.suppress(OSError):
                        sock.close()
                    continue
                threading.Thread(
                    target=self._admit,
                    args=(sock, _connection.format_address(peer[:2]), ready, pending),
                    name="pytaskqml-handshake",
                    daemon=True,
                ).start()
        except BaseException:
            log.exception("worker accept thread crashed")
            ready.put(None)

    def _admit(
        self,
        sock: Any,
        peer: str,
        ready: queue.SimpleQueue[_connection.Connection | None],
        pending: threading.BoundedSemaphore,
    ) -> None:
        try:
            if self.ssl_context is not None:
                sock = _connection.tls_accept(
                    sock, self.ssl_context, timeout=self.handshake_timeout
                )
            conn = _connection.Connection(sock, name=self.name, max_frame_size=self.max_frame_size)
            _connection.server_handshake(conn, self.authkey, timeout=self.handshake_timeout)
        except (AuthenticationError, ConnectionLost, OSError) as exc:
            log.warning("rejected connection from %s: %s", peer, exc)
            with contextlib.suppress(OSError):
                sock.close()
            return
        except BaseException:
            log.exception("worker handshake thread crashed")
            with contextlib.suppress(OSError):
                sock.close()
            return
        finally:
            pending.release()
        ready.put(conn)

    # ------------------------------------------------------------ one session

    def serve_connection(self, conn: _connection.Connection) -> str:
        """Serve one authenticated connection; ``"stopped"`` or ``"lost"``.

        The calling (main) thread reads frames and runs their tasks itself, so a task reaches
        ``process()`` without a thread hand-off. While a task runs nobody reads the socket, so
        the heartbeat thread watches for the coordinator hanging up (poll for RDHUP) instead.
        """
        done = threading.Event()
        with self._lock:
            self._conn = conn
        info = worker_info(self.worker)
        try:
            conn.send(
                "hello",
                {
                    "name": self.name,
                    "pid": os.getpid(),
                    "spawn_id": self.spawn_id,
                    "control": self.control_address,
                    "shm": self._shared.token if self._shared is not None else None,
                    **info,
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
        try:
            while True:
                if self._stop.is_set():
                    with contextlib.suppress(ConnectionLost):
                        conn.send("bye", {"done": self.tasks_done})
                    return "stopped"
                self._busy = False
                try:
                    msg = conn.recv()
                except ConnectionLost as exc:
                    if self._stop.is_set():
                        continue  # woken by request_stop(): say goodbye above
                    log.info("connection to %s ended: %s", conn.peer, exc)
                    return "lost"
                except ProtocolError as exc:
                    log.error("protocol error from %s: %s", conn.peer, exc)
                    return "lost"
                op = msg.op
                if op == "run":
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
                elif op == "stop":
                    self._stop.set()
                elif op == "ping":
                    self._report_freed(conn)
                elif op != "config":
                    log.error("unexpected message %r from %s", op, conn.peer)
                    return "lost"
        finally:
            self._busy = False
            done.set()
            with self._lock:
                self._conn = None
            conn.abort()
            beat.join(timeout=5)

    def _heartbeat_loop(self, conn: _connection.Connection, done: threading.Event) -> None:
        interval = self.heartbeat_interval
        try:
            while not done.wait(interval / 2):
                now = time.monotonic()
                if self._busy:
                    # A task is running: the socket is not being read, so silence means nothing;
                    # a hang-up does (the coordinator died). A spawned worker then leaves.
                    if _peer_hung_up(conn) and self.exit_grace is not None:
                        self._exit_if_stuck(done)
                        return
                elif now - conn.last_recv > self.heartbeat_timeout:
                    log.warning(
                        "coordinator %s silent for %.1fs; dropping the connection",
                        conn.peer,
                        now - conn.last_recv,
                    )
                    conn.abort()
                    return
                if now - conn.last_send >= interval:
                    conn.ping()
        except ConnectionLost:
            return
        except BaseException:
            log.exception("worker heartbeat thread crashed")
            conn.abort()

    def _exit_if_stuck(self, done: threading.Event) -> None:
        # A spawned worker must not outlive its coordinator, even inside a task that never
        # returns: give the task a grace period, then leave.
        if not done.wait(self.exit_grace):
            log.error(
                "coordinator gone and the task still running after %.1fs; exiting", self.exit_grace
            )
            os._exit(3)

    def _run_frame(self, conn: _connection.Connection, msg: _protocol.Message) -> None:
        entries = msg.header.get("t")
        if type(entries) is not list or not all(_valid_row(e) for e in entries):
            raise ProtocolError("malformed run frame")
        clock = time.perf_counter
        if msg.header.get("b"):
            t0 = clock()
            rows = run_entries(self.worker, entries, batch=True)
            self.tasks_done += len(entries)
            for row in entries:
                row[1] = None  # drop our reference to the payload: its memory may be freed
            self._send_results(conn, rows, clock() - t0)
            return
        process = self.worker.process
        pending: list[tuple[int, int, Any]] = []
        start = clock()
        for row in entries:
            if self._stop.is_set():
                break  # the rest never started: the coordinator re-queues them after "bye"
            if len(row) == 2:
                try:
                    pending.append((row[0], 0, process(row[1])))
                except Exception as exc:
                    pending.append((row[0], 1, exc))
            else:
                pending.append(run_chunk(process, row[0], row[1]))
            row[1] = None
            self.tasks_done += 1
            now = clock()
            if now - start > _RESULT_FLUSH_AFTER:
                self._send_results(conn, pending, now - start)
                pending = []
                start = clock()
        if pending:
            self._send_results(conn, pending, clock() - start)

    def _send_results(
        self, conn: _connection.Connection, results: list[tuple[int, int, Any]], busy: float
    ) -> None:
        text, buffers = encode_results(results)
        freed = self._shared.collect() if self._shared is not None else None
        conn.send_json(
            '{"op":"done","bt":'
            + repr(round(busy, 7))
            + (',"f":' + repr(freed) if freed else "")
            + ',"r":'
            + text
            + "}",
            buffers,
        )

    def _report_freed(self, conn: _connection.Connection) -> None:
        """Tell the coordinator about shared-memory slots freed since the last results (e.g. a
        result that was the input array itself, now sent; an array ``process()`` kept, now
        dropped)."""
        if self._shared is not None and self._shared.held:
            freed = self._shared.collect()
            if freed:
                conn.send("free", {"f": freed})


def _valid_row(e: Any) -> bool:
    if type(e) is not list or not e or type(e[0]) is not int:
        return False
    return len(e) == 2 or (len(e) == 3 and e[2] == 1 and type(e[1]) is list)


def _wire_value(flag: int, value: Any) -> Any:
    """Exceptions travel as ``[type, message, traceback]`` text, never as objects."""
    if flag == 1:
        return error_info(value)
    if flag == 2:
        return [[k, error_info(v) if k else v] for k, v in value]
    return value  # a result, or (flag 6) a list of results


def encode_results(results: Sequence[tuple[int, int, Any]]) -> tuple[str, list[memoryview]]:
    """Encode result rows ``(task id, flag, value)`` (see :func:`run_entries`) as one JSON array
    plus buffers.

    One encoder call does the whole list; only if that fails is each row (and each item of a
    chunk) encoded alone, so a result that cannot be encoded fails its own task and no other.
    """
    rows = [[tid, flag, _wire_value(flag, v)] for tid, flag, v in results]
    try:
        return _codec.encode(rows)
    except (TypeError, ValueError):
        pass
    parts: list[str] = []
    buffers: list[memoryview] = []
    for row in rows:
        if row[1] == 6:
            row = [row[0], 2, [[0, v] for v in row[2]]]
        if row[1] == 2:
            items = []
            for item in row[2]:
                try:
                    _codec.encode(item)
                    items.append(item)
                except (TypeError, ValueError) as exc:
                    items.append([1, error_info(exc)])
            row = [row[0], 2, items]
        try:
            text, bufs = _codec.encode(row)
        except (TypeError, ValueError) as exc:
            text, bufs = _codec.encode([row[0], 1, error_info(exc)])
        parts.append(text)
        buffers.extend(bufs)
    return "[" + ",".join(parts) + "]", buffers


def make_worker(cls: type[Worker], kwargs: dict[str, Any] | None) -> Worker:
    try:
        return cls(**(kwargs or {}))
    except Exception as exc:
        raise WorkerStartError(
            f"{cls.__qualname__}(**{kwargs!r}) raised {type(exc).__name__}: {exc}"
        ) from exc


# glibc's mallopt() parameters: blocks from this size up get their own mmap(); bytes kept at
# the top of the heap when it shrinks.
_M_MMAP_THRESHOLD = -3
_M_TOP_PAD = -2
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
MALLOC_TOP_PAD = 16 * 1024 * 1024


def tune_malloc() -> bool:
    """Keep a worker process from returning heap memory to the OS after every task.

    A model over video frames allocates and frees the same few buffers of hundreds of KiB to
    MiBs per frame. With glibc's defaults those pages go back to the OS when freed (munmap,
    or a heap trim) and are faulted in again on the next frame: on a 640x480 blur that was
    ~120 page faults and ~45% of the worker's CPU per frame (`python -m benchmark --system
    pytaskqml-map --workload frames`, with and without a ``MALLOC_*`` variable set), on 1080p
    ~1,000 faults and over half. Serving blocks below 32 MiB from the heap and keeping
    16 MiB at its top removes them, for ~15 MB more resident memory. Only in worker processes
    (never in the caller's), only with glibc, and not when the environment already tunes
    malloc (any ``MALLOC_*`` variable). Returns whether it was applied.
    """
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is None or platform.libc_ver()[0] != "glibc":
            return False
        return all(
            mallopt(ctypes.c_int(param), ctypes.c_int(value))
            for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TOP_PAD, MALLOC_TOP_PAD))
        )
    except (OSError, AttributeError, ValueError):
        return False


def call_setup(worker: Worker) -> None:
    try:
        worker.setup()
    except Exception as exc:
        raise WorkerStartError(
            f"{type(worker).__qualname__}.setup() raised {type(exc).__name__}: {exc}"
        ) from exc


def call_teardown(worker: Worker) -> None:
    try:
        worker.teardown()
    except Exception:
        log.exception("%s.teardown() raised", type(worker).__qualname__)
