"""The systems under test.  Each one starts its workers, runs a batch of tasks and returns the
results in submission order, runs a single task (for the latency workload), and cleans up.

Every blocking call takes a deadline (``time.monotonic()`` seconds); the harness additionally
runs each phase in a watchdog thread, so a system that ignores its deadline still cannot hang
the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark import workloads

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"


class RunFailed(RuntimeError):
    """The run cannot go on (a worker or Redis died, a task failed, a check failed)."""


class RunTimeout(RunFailed):
    """The run's time limit was reached."""


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RunTimeout("time limit reached")
    return left


@dataclass
class Options:
    """Settings shared by the systems (and by the harness)."""

    redis_url: str = DEFAULT_REDIS_URL
    celery_queue: str = field(default_factory=lambda: f"pytaskqml-bench-{os.getpid()}")
    # pytaskqml: serve the control endpoint and read /metrics and /status once a second while
    # the case runs (what being watched by Prometheus and a status page costs).
    scrape: bool = False


class Session:
    """A started system, ready to run tasks of one kind."""

    redis_pid: int | None = None

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        raise NotImplementedError

    def run_one(self, item: Any, deadline: float) -> Any:
        raise NotImplementedError

    def worker_pids(self) -> set[int]:
        """Worker processes known to the system (the harness also counts all descendants)."""
        return set()

    def prepare(self, items: list[Any]) -> list[Any]:
        """The inputs as this system's producer would have made them (untimed, like making
        the inputs at all); most systems take them as they are."""
        return items

    def close(self) -> None:
        raise NotImplementedError


# --- pytaskqml ----------------------------------------------------------------------------------


class PytaskqmlSession(Session):
    """pytaskqml with spawned worker processes (``map``/``submit``) or local thread workers.

    ``shared_memory`` is the Coordinator's switch for spawned workers: buffers of 64 KiB or more
    go through a shared segment (the default) or all travel over the socket (False).  The summed
    shared-memory counters are copied into ``params`` after the repeats and at close, so that a
    result shows whether the frames really went through shared memory.
    """

    # map()'s own default: a buffer sized from the measured time per item (what a user gets).
    BUFFERSIZE: int | None = None

    def __init__(
        self,
        mode: str,
        kind: str,
        workers: int,
        deadline: float,
        shared_memory: bool = True,
        scrape: bool = False,
        buffer_frames: int = 0,
    ) -> None:
        super().__init__()
        from benchmark.pt_workers import WORKERS
        from pytaskqml import Coordinator
        from pytaskqml.engine import Progress

        cls, kwargs = WORKERS[kind]
        self.mode = mode
        # map()'s progress bar on a terminal (not with --quiet): a repeat can take a while.
        self.progress = (
            Progress(f"pytaskqml-{mode} {kind}") if log.isEnabledFor(logging.INFO) else False
        )
        self.produce_into_buffers = buffer_frames > 0
        if self.produce_into_buffers and kind == "frame":
            from benchmark.pt_workers import PoolFrameWorker

            cls = PoolFrameWorker
        pool = {"max_buffer_bytes": buffer_frames * 2**20} if buffer_frames else {}
        self.coord = Coordinator(shared_memory=shared_memory, **pool)
        try:
            if mode == "threads":
                self.coord.add_local(cls(**kwargs), threads=workers)
            else:
                timeout = min(60.0, remaining(deadline))
                self.coord.spawn(cls, processes=workers, kwargs=kwargs, timeout=timeout)
        except BaseException:
            self.close()
            raise
        self.params = {
            "mode": mode,
            "worker_class": cls.__name__,
            "shared_memory": shared_memory,
        }
        if mode in ("map", "model"):
            self.params["buffersize"] = self.BUFFERSIZE or "auto (map() default)"
        if self.produce_into_buffers:
            self.params["inputs"] = "produced into coord.buffer() arrays (untimed)"
        if mode == "model":
            from benchmark.pt_workers import TaskModel

            self.coord.models.load("task", TaskModel, config={"kind": kind})
        self._scraper: Scraper | None = None
        if scrape:
            self._scraper = Scraper(self.coord.serve_control())
            self.params["scraped"] = True

    def prepare(self, items: list[Any]) -> list[Any]:
        """With ``buffer_frames``: each frame written once into a ``coord.buffer()`` array, as
        a decoder or ``cv2.VideoCapture.read(image=buf)`` would have made it. Making the frames
        is untimed for every system; here it also puts them where the workers can read them.

        Then every worker reads every page of every buffer once. A worker's first read of a
        pool slot sets up its page tables for it (~225 page faults for a 640x480 frame, a
        one-time cost per slot and worker); a producer that takes a new buffer per frame
        recycles a few dozen slots and pays it once, but here every frame of the run is alive
        at once, in slots of its own, and it would fall into the timed repeats."""
        if not self.produce_into_buffers:
            return items
        import numpy as np

        out = []
        for item in items:
            buf = self.coord.buffer(item.shape, item.dtype)
            np.copyto(buf, item)
            out.append(buf)
        for i in range(0, len(out), 32):  # 32 frames per task stay well inside a frame's size
            touched = self.coord.broadcast({"touch": out[i : i + 32]}, timeout=60)
            if touched.errors:
                raise RunFailed(f"touching the pool buffers failed: {touched.errors}")
        self.params["pool_pages_touched_before_timing"] = True
        return out

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        if self.mode == "submit":
            futures = [self.coord.submit(item) for item in items]
            return [f.result(timeout=remaining(deadline)) for f in futures]
        # map (processes or threads): the harness watchdog bounds the iteration.
        model = "task" if self.mode == "model" else None
        return list(
            self.coord.map(items, buffersize=self.BUFFERSIZE, model=model, progress=self.progress)
        )

    def run_one(self, item: Any, deadline: float) -> Any:
        if self.mode == "submit":
            return self.coord.submit(item).result(timeout=remaining(deadline))
        (result,) = self.coord.map([item], model="task" if self.mode == "model" else None)
        return result

    def worker_pids(self) -> set[int]:
        pids = {w.pid for w in self.coord.statistics().workers if w.pid is not None}
        pids.discard(os.getpid())
        return pids

    def statistics(self) -> dict[str, Any]:
        s = self.coord.statistics()
        self.record_shared(s.workers)
        return {
            "submitted": s.submitted,
            "completed": s.completed,
            "failed": s.failed,
            "in_flight": s.in_flight,
            "latency_p50_us": None if s.latency_p50 is None else round(s.latency_p50 * 1e6, 1),
            "latency_p99_us": None if s.latency_p99 is None else round(s.latency_p99 * 1e6, 1),
            "shared_buffers": self.params.get("shared_buffers"),
            "shared_fallbacks": self.params.get("shared_fallbacks"),
            "buffers": None if s.buffers is None else dataclasses.asdict(s.buffers),
        }

    def record_shared(self, workers: Any) -> None:
        """Sum the workers' shared-memory counters into params (None: no worker has shared
        memory, e.g. thread workers or ``shared_memory=False``).  They count since start-up,
        warm-up included, over the workers alive now."""
        shared = [w for w in workers if w.shared_buffers is not None]
        self.params["shared_buffers"] = sum(w.shared_buffers for w in shared) if shared else None
        self.params["shared_fallbacks"] = (
            sum(w.shared_fallbacks or 0 for w in shared) if shared else None
        )

    def close(self) -> None:
        # Read the counters before shutdown drops the workers (not in run_batch: that is timed).
        with contextlib.suppress(Exception):
            self.record_shared(self.coord.statistics().workers)
        if self._scraper is not None:
            self.params["scrapes"] = self._scraper.stop()
        self.coord.shutdown(wait=True, cancel_futures=True, timeout=10.0)


class PipelineSession(Session):
    """A 2-stage :class:`pytaskqml.Pipeline` over the frames workload: gray (spawned) ->
    blur and mean (spawned), the two halves of the one-stage ``frame`` task, each stage with
    half of the workers (at least one), to compare with one stage doing both."""

    def __init__(self, workers: int, deadline: float) -> None:
        super().__init__()
        from benchmark.pt_workers import BlurMeanWorker, GrayWorker
        from pytaskqml import Pipeline, Stage

        first = max(1, workers // 2)
        second = max(1, workers - first)
        self.pipeline = Pipeline(
            [
                Stage(GrayWorker, processes=first, name="gray", buffersize=64),
                Stage(BlurMeanWorker, processes=second, name="blur", buffersize=64),
            ],
            buffersize=128,
        )
        self.params = {"mode": "pipeline", "stages": f"gray x{first} -> blur+mean x{second}"}

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        return list(self.pipeline.map(items))

    def run_one(self, item: Any, deadline: float) -> Any:
        return self.pipeline.submit(item).result(timeout=remaining(deadline))

    def worker_pids(self) -> set[int]:
        stats = self.pipeline.statistics().stages.values()
        pids = {w.pid for s in stats for w in s.workers if w.pid is not None}
        pids.discard(os.getpid())
        return pids

    def close(self) -> None:
        self.pipeline.shutdown(wait=True, cancel_futures=True)


class Scraper:
    """GET /metrics and /status of a control endpoint once a second, on a thread of its own."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-scraper", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import http.client

        while not self._stop.wait(1.0):
            for path in ("/metrics", "/status"):
                try:
                    conn = http.client.HTTPConnection(*self.address, timeout=5)
                    conn.request("GET", path)
                    conn.getresponse().read()
                    conn.close()
                    self.count += 1
                except OSError as exc:
                    log.warning("scraping %s failed: %s", path, exc)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.count


# --- multiprocessing ----------------------------------------------------------------------------


class MultiprocessingSession(Session):
    def __init__(self, kind: str, workers: int, chunksize: int | None) -> None:
        super().__init__()
        self.fn = workloads.TASKS[kind]
        self.workers = workers
        self.fixed_chunksize = chunksize
        self.pool = multiprocessing.get_context().Pool(workers)
        self.params = {
            "start_method": multiprocessing.get_start_method(),
            "chunksize": chunksize if chunksize else "auto (as Pool.map)",
        }

    def chunksize(self, n: int) -> int:
        if self.fixed_chunksize:
            return self.fixed_chunksize
        chunksize, extra = divmod(n, self.workers * 4)  # exactly what Pool.map computes
        return max(1, chunksize + (1 if extra else 0))

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        # With chunksize > 1 imap returns a plain generator (no next(timeout=...)): the
        # harness watchdog bounds the iteration, as it does for pytaskqml's map().
        return list(self.pool.imap(self.fn, items, self.chunksize(len(items))))

    def run_one(self, item: Any, deadline: float) -> Any:
        try:
            return self.pool.imap(self.fn, [item], 1).next(timeout=remaining(deadline))
        except multiprocessing.TimeoutError:
            raise RunTimeout("multiprocessing result did not arrive in time") from None

    def worker_pids(self) -> set[int]:
        return {p.pid for p in self.pool._pool if p.pid is not None}  # type: ignore[attr-defined]

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


# --- the two drop-in executors -------------------------------------------------------------


class ExecutorSession(Session):
    """``executor.map(task, items, chunksize=...)`` on ``pytaskqml.Executor`` or on
    ``concurrent.futures.ProcessPoolExecutor``, with the same module-level task function.

    ``chunksize``: ``"pool"`` computes it as ``Pool.map`` does (items / (4 x workers)), an int
    fixes it, ``None`` leaves each executor's default (pytaskqml: automatic, from the measured
    time per call; ProcessPoolExecutor: 1).
    """

    def __init__(
        self, which: str, kind: str, workers: int, chunksize: str | int | None, deadline: float
    ) -> None:
        super().__init__()
        import concurrent.futures

        self.fn = workloads.TASKS[kind]
        self.workers = workers
        self.fixed_chunksize = chunksize
        self.ex: Any
        if which == "pytaskqml":
            from pytaskqml import Executor

            self.ex = Executor(max_workers=workers)
            if not self.ex.coordinator.wait_workers(workers, timeout=remaining(deadline)):
                self.close()
                raise RunFailed("the executor's workers did not start")
        else:
            self.ex = concurrent.futures.ProcessPoolExecutor(max_workers=workers)
        self.which = which
        self.params = {
            "executor": which,
            "chunksize": chunksize if chunksize is not None else "the executor's default",
        }
        if which != "pytaskqml":
            self.params["start_method"] = multiprocessing.get_start_method()

    def chunksize(self, n: int) -> int | None:
        if self.fixed_chunksize == "pool":
            chunksize, extra = divmod(n, self.workers * 4)
            return max(1, chunksize + (1 if extra else 0))
        return self.fixed_chunksize if isinstance(self.fixed_chunksize, int) else None

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        chunksize = self.chunksize(len(items))
        timeout = remaining(deadline)
        if chunksize is None:
            return list(self.ex.map(self.fn, items, timeout=timeout))
        return list(self.ex.map(self.fn, items, timeout=timeout, chunksize=chunksize))

    def run_one(self, item: Any, deadline: float) -> Any:
        return self.ex.submit(self.fn, item).result(timeout=remaining(deadline))

    def worker_pids(self) -> set[int]:
        if self.which == "pytaskqml":
            return {w.pid for w in self.ex.coordinator.workers if w.pid is not None}
        return set(getattr(self.ex, "_processes", None) or {})

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


# --- baselines without a task queue: the ceilings the frames numbers are read against ---------


def stop_processes(procs: list[Any], grace: float = 5.0) -> None:
    """Join multiprocessing children; SIGTERM, then SIGKILL, those that do not exit in time."""
    until = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, until - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(1.0)
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
    for proc in procs:
        with contextlib.suppress(ValueError):
            proc.close()


def _compute_share(fn: Callable[[Any], Any], items: list[Any], w: int, n: int, conn: Any) -> None:
    """Child of ComputeOnlySession: the items it inherited by fork, i % n == w; sends back the
    results and how long computing them took."""
    t0 = time.perf_counter()
    results = [fn(item) for item in items[w::n]]
    conn.send((results, time.perf_counter() - t0))
    conn.close()


class ComputeOnlySession(Session):
    """The task function alone in N processes, with no transport for the inputs.

    Each batch forks N processes that inherit the items (nothing is copied to them); process w
    computes items w, w + N, w + 2N, ... and sends back only its list of results through a
    Pipe, which the caller interleaves back into submission order.  The fork is inside the
    timed batch: ``params["fork_s"]`` says how long it took and ``params["compute_s"]`` how long
    the slowest child spent in the task function (last batch).  The exited children are reaped
    at the next batch or at close, so the harness still reads their CPU time from /proc.
    """

    def __init__(self, kind: str, workers: int) -> None:
        super().__init__()
        self.fn = workloads.TASKS[kind]
        self.workers = workers
        self.ctx = multiprocessing.get_context("fork")
        self.procs: list[Any] = []
        self.params = {
            "start_method": "fork, N processes per batch (inputs inherited, not sent)",
            "split": "item i to process i % N",
            "results": "one pickled list per process over a Pipe",
            "fork_s": None,
            "compute_s": None,
        }

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        self.reap()
        n = self.workers
        t0 = time.perf_counter()
        conns = []
        try:
            for w in range(n):
                receiver, sender = self.ctx.Pipe(duplex=False)
                conns.append(receiver)
                proc = self.ctx.Process(
                    target=_compute_share,
                    args=(self.fn, items, w, n, sender),
                    name=f"compute-only-{w}",
                    daemon=True,
                )
                proc.start()
                sender.close()
                self.procs.append(proc)
            self.params["fork_s"] = round(time.perf_counter() - t0, 4)
            out: list[Any] = [None] * len(items)
            compute_s = 0.0
            for w, conn in enumerate(conns):
                if not conn.poll(remaining(deadline)):
                    raise RunTimeout(f"compute-only process {w} did not finish in time")
                try:
                    out[w::n], seconds = conn.recv()
                    compute_s = max(compute_s, seconds)
                except EOFError:
                    self.procs[w].join(1.0)
                    code = self.procs[w].exitcode
                    raise RunFailed(f"compute-only process {w} exited with code {code}") from None
            self.params["compute_s"] = round(compute_s, 4)
            return out
        finally:
            for conn in conns:
                conn.close()

    def run_one(self, item: Any, deadline: float) -> Any:
        return self.fn(item)

    def worker_pids(self) -> set[int]:
        return {p.pid for p in self.procs if p.pid is not None}

    def reap(self) -> None:
        # A child still computing after its batch ended (a time limit) is not waited for.
        stop_processes(self.procs, grace=1.0)
        self.procs = []

    def close(self) -> None:
        self.reap()


RESULT = struct.Struct("!d")


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; False if the peer closed first."""
    got = 0
    while got < len(view):
        k = sock.recv_into(view[got:])
        if k == 0:
            return False
        got += k
    return True


def _raw_socket_worker(sock: socket.socket, inherited: list[socket.socket], nbytes: int) -> None:
    """Child of RawSocketSession: frame bytes in, the task's float out as 8 bytes, until EOF."""
    import numpy as np

    for other in inherited:  # the caller's ends, copied by fork: keep only our own socket
        other.close()
    workloads.cv2_module()
    buf = bytearray(nbytes)
    view = memoryview(buf)
    try:
        sock.sendall(b"R")
        while _recv_exactly(sock, view):
            frame = np.frombuffer(buf, dtype=np.uint8).reshape(workloads.FRAME_SHAPE)
            sock.sendall(RESULT.pack(workloads.task_frame(frame)))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the caller closed mid-batch (a time limit, a failure): exit as on EOF
    finally:
        sock.close()


_LEN = struct.Struct("!I")


def _echo_worker(sock: socket.socket, inherited: list[socket.socket]) -> None:
    """Child of EchoSession: length-prefixed bytes in, the same bytes back, until EOF."""
    for other in inherited:
        other.close()
    head = bytearray(_LEN.size)
    try:
        sock.sendall(b"R")
        while _recv_exactly(sock, memoryview(head)):
            (n,) = _LEN.unpack(head)
            body = bytearray(n)
            if not _recv_exactly(sock, memoryview(body)):
                break
            sock.sendall(bytes(head) + body)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()


class EchoSession(Session):
    """The round-trip limit: one forked process echoing raw length-prefixed bytes, over a
    socketpair (what pytaskqml uses with the workers it spawns) or TCP loopback (what it uses
    with workers elsewhere). No protocol, no queue, no JSON: the item's UTF-8 bytes go out
    and come back."""

    def __init__(self, kind: str, transport: str) -> None:
        super().__init__()
        if kind != "echo":
            raise RunFailed(f"echo baselines run the latency workload only, not {kind!r}")
        if transport == "socketpair":
            mine, theirs = socket.socketpair()
        else:
            listener = socket.create_server(("127.0.0.1", 0))
            mine = socket.create_connection(listener.getsockname()[:2])
            theirs, _ = listener.accept()
            listener.close()
            for s in (mine, theirs):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = multiprocessing.get_context("fork")
        self.proc = ctx.Process(target=_echo_worker, args=(theirs, [mine]), daemon=True)
        self.proc.start()
        theirs.close()
        self.sock = mine
        ready = bytearray(1)
        if not _recv_exactly(self.sock, memoryview(ready)):
            raise RunFailed("the echo process closed its socket")
        self.params = {"transport": transport, "start_method": "fork", "framing": "4-byte length"}

    def run_one(self, item: Any, deadline: float) -> Any:
        data = str(item).encode()
        self.sock.sendall(_LEN.pack(len(data)) + data)
        back = bytearray(_LEN.size + len(data))
        if not _recv_exactly(self.sock, memoryview(back)):
            raise RunFailed("the echo process closed its socket")
        return back[_LEN.size :].decode()

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        return [self.run_one(i, deadline) for i in items]

    def worker_pids(self) -> set[int]:
        return {self.proc.pid} if self.proc.pid else set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self.proc.join(5.0)
        if self.proc.is_alive():
            self.proc.kill()


class RawSocketSession(Session):
    """The bare socket loop the issue quotes as the baseline: no protocol, no queue.

    N forked workers, each on its own socketpair with the caller.  One thread per worker sends
    the raw bytes of items w, w + N, ... (``sendall`` of the array's memoryview; the size is
    fixed by the frame shape); the worker ``recv_into``s a preallocated bytearray, runs
    ``task_frame`` on it and sends the float back as 8 bytes.  The calling thread reads result
    i from worker i % N, so results come back in order.  Frames only.
    """

    READY_TIMEOUT = 60.0

    def __init__(self, kind: str, workers: int, deadline: float) -> None:
        super().__init__()
        if kind != "frame":
            raise RunFailed(f"raw-socket runs the frames workload only, not {kind!r}")
        self.nbytes = math.prod(workloads.FRAME_SHAPE)
        self.socks: list[socket.socket] = []
        self.procs: list[Any] = []
        ctx = multiprocessing.get_context("fork")
        try:
            for w in range(workers):
                mine, theirs = socket.socketpair()
                proc = ctx.Process(
                    target=_raw_socket_worker,
                    args=(theirs, [*self.socks, mine], self.nbytes),
                    name=f"raw-socket-{w}",
                    daemon=True,
                )
                self.socks.append(mine)
                proc.start()
                theirs.close()
                self.procs.append(proc)
            ready_by = min(deadline, time.monotonic() + self.READY_TIMEOUT)
            for w, sock in enumerate(self.socks):
                sock.settimeout(remaining(ready_by))
                hello = bytearray(1)
                self.recv_into(sock, memoryview(hello), w)
                if hello != b"R":
                    raise RunFailed(f"raw-socket worker {w} said {bytes(hello)!r}, not b'R'")
        except BaseException:
            self.close()
            raise
        self.params = {
            "start_method": "fork",
            "transport": "one socketpair per worker, raw frame bytes, result as 8 bytes",
            "frame_bytes": self.nbytes,
            "senders": "one thread per worker (items i % N == w), results read in order",
        }

    def recv_into(self, sock: socket.socket, view: memoryview, w: int) -> None:
        try:
            if _recv_exactly(sock, view):
                return
        except TimeoutError:
            raise RunTimeout(f"raw-socket worker {w} did not answer in time") from None
        except OSError as exc:
            raise RunFailed(f"raw-socket worker {w}: {exc}") from exc
        self.procs[w].join(1.0)
        code = self.procs[w].exitcode
        raise RunFailed(f"raw-socket worker {w} closed its socket (exit code {code})")

    def payload(self, item: Any) -> memoryview:
        view = memoryview(item)
        if view.nbytes != self.nbytes or not view.c_contiguous:
            raise RunFailed(f"raw-socket needs C-contiguous {self.nbytes}-byte frames")
        return view

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        n_workers = len(self.socks)
        for sock in self.socks:  # bounds every sendall and recv_into below
            sock.settimeout(remaining(deadline))
        errors: list[BaseException] = []

        def feed(w: int) -> None:
            sock = self.socks[w]
            try:
                for i in range(w, len(items), n_workers):
                    sock.sendall(self.payload(items[i]))
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=feed, args=(w,), name=f"raw-socket-feed-{w}", daemon=True)
            for w in range(n_workers)
        ]
        for thread in threads:
            thread.start()
        out: list[Any] = []
        buf = bytearray(RESULT.size)
        view = memoryview(buf)
        try:
            for i in range(len(items)):
                self.recv_into(self.socks[i % n_workers], view, i % n_workers)
                out.append(RESULT.unpack(buf)[0])
        except RunFailed as exc:
            if errors:
                raise RunFailed(f"{exc}; sending failed first: {errors[0]!r}") from exc
            raise
        for thread in threads:
            thread.join(remaining(deadline))
        if errors:
            raise RunFailed(f"raw-socket sender failed: {errors[0]!r}")
        return out

    def run_one(self, item: Any, deadline: float) -> Any:
        sock = self.socks[0]
        sock.settimeout(remaining(deadline))
        sock.sendall(self.payload(item))
        buf = bytearray(RESULT.size)
        self.recv_into(sock, memoryview(buf), 0)
        return RESULT.unpack(buf)[0]

    def worker_pids(self) -> set[int]:
        return {p.pid for p in self.procs if p.pid is not None}

    def close(self) -> None:
        for sock in self.socks:  # EOF: each worker leaves its loop and exits
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.socks = []
        stop_processes(self.procs)
        self.procs = []


# --- Celery -------------------------------------------------------------------------------------


class CelerySession(Session):
    """A real ``celery worker`` subprocess (prefork) on Redis as broker and result backend."""

    READY_TIMEOUT = 60.0

    def __init__(self, kind: str, workers: int, deadline: float, opts: Options, seq: bool) -> None:
        super().__init__()
        import redis

        self.sequential = seq
        self.task_ids: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.queue = opts.celery_queue
        self.redis = redis.Redis.from_url(
            opts.redis_url, socket_timeout=5, socket_connect_timeout=1
        )
        try:
            info = self.redis.info("server")
        except redis.RedisError as exc:
            raise RunFailed(f"Redis at {opts.redis_url} does not answer: {exc}") from exc
        self.redis_pid = int(info["process_id"])
        os.environ["BENCH_REDIS_URL"] = opts.redis_url
        os.environ["BENCH_CELERY_QUEUE"] = self.queue
        from benchmark import celery_app

        if (opts.redis_url, self.queue) != (celery_app.REDIS_URL, celery_app.QUEUE):
            raise RunFailed("benchmark.celery_app was imported earlier with another URL/queue")
        self.app = celery_app.app
        self.task = celery_app.TASKS[kind]
        self.encode: Callable[[Any], Any] = (
            celery_app.encode_frame if kind == "frame" else workloads.task_echo
        )
        self.log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in close()
            prefix="bench-celery-", suffix=".log", delete=False
        )
        cmd = [
            *(sys.executable, "-m", "celery", "-A", "benchmark.celery_app", "worker"),
            *("--pool=prefork", f"--concurrency={workers}", "-Q", self.queue),
            *("-n", f"{self.queue}@%h", "--loglevel=WARNING"),
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
        ]
        pythonpath = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath))
        self.params = {
            "pool": "prefork",
            "concurrency": workers,
            "serializer": "json",
            "method": "sequential delay().get()"
            if seq
            else "pipelined delay() all, get() in order",
            "redis_db": opts.redis_url.rsplit("/", 1)[-1],
            "worker_flags": "--without-gossip --without-mingle --without-heartbeat",
        }
        try:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self.log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            ready_by = min(deadline, time.monotonic() + self.READY_TIMEOUT)
            ready = celery_app.echo.delay("ready")
            self.task_ids.append(ready.id)
            if self.get(ready, ready_by) != "ready":
                raise RunFailed("celery worker answered the readiness echo wrongly")
        except BaseException:
            self.close()
            raise

    def worker_log_tail(self, lines: int = 8) -> str:
        try:
            text = Path(self.log_file.name).read_text(errors="replace")
        except OSError:
            return ""
        banner = ("---", "***", "[config]", "[queues]", ".>")
        kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
        kept = [ln for ln in kept if not any(mark in ln for mark in banner)]
        return " | ".join(kept[-lines:]) or "(no output)"

    def check_alive(self) -> None:
        import redis

        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise RunFailed(f"celery worker exited with code {code}: {self.worker_log_tail()}")
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise RunFailed(f"Redis stopped answering: {exc}") from exc

    def get(self, result: Any, deadline: float) -> Any:
        from celery.exceptions import TimeoutError as CeleryTimeout

        while True:
            try:
                return result.get(timeout=min(1.0, remaining(deadline)))
            except CeleryTimeout:
                self.check_alive()

    def send(self, item: Any) -> Any:
        result = self.task.delay(self.encode(item))
        self.task_ids.append(result.id)
        return result

    def explain(self, exc: Exception) -> RunFailed:
        """Turn a Celery/kombu/redis error into a clear failure (naming a dead worker or Redis)."""
        if isinstance(exc, RunFailed):
            return exc
        try:
            self.check_alive()
        except RunFailed as dead:
            return dead
        return RunFailed(f"Celery raised {type(exc).__name__}: {exc}")

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        try:
            return self._run_batch(items, deadline)
        except Exception as exc:
            raise self.explain(exc) from exc

    def run_one(self, item: Any, deadline: float) -> Any:
        try:
            return self.get(self.send(item), deadline)
        except Exception as exc:
            raise self.explain(exc) from exc

    def _run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        if self.sequential:
            return [self.get(self.send(item), deadline) for item in items]
        pending = []
        for i, item in enumerate(items):
            if i % 512 == 0:
                remaining(deadline)
            pending.append(self.send(item))
        return [self.get(result, deadline) for result in pending]

    def close(self) -> None:
        try:
            if self.proc is not None:
                stop_process_group(self.proc)
        finally:
            self.log_file.close()
            with contextlib.suppress(OSError):
                os.unlink(self.log_file.name)
            self.delete_keys()

    def delete_keys(self) -> None:
        """Delete exactly the keys this run created: its results, its queue and its binding."""
        import redis

        keys = [f"celery-task-meta-{task_id}" for task_id in self.task_ids]
        keys += [self.queue, f"_kombu.binding.{self.queue}"]
        try:
            for start in range(0, len(keys), 1000):
                self.redis.delete(*keys[start : start + 1000])
        except redis.RedisError as exc:
            log.warning("could not delete this run's Redis keys: %s", exc)
        finally:
            self.redis.close()


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group (the worker and its pool children), then SIGKILL what is left."""
    pgid = proc.pid  # start_new_session=True made it the group leader
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


# --- Ray and Dask (only when importable) --------------------------------------------------------


class RaySession(Session):
    def __init__(self, kind: str, workers: int) -> None:
        super().__init__()
        import ray

        self.ray = ray
        ray.init(
            num_cpus=workers,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            _node_ip_address="127.0.0.1",  # stay on loopback
        )
        self.fn = ray.remote(num_cpus=1)(workloads.TASKS[kind])
        self.params = {"num_cpus": workers, "submission": "f.remote() all, ray.get(list)"}

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        refs = [self.fn.remote(item) for item in items]
        return list(self.ray.get(refs, timeout=remaining(deadline)))

    def run_one(self, item: Any, deadline: float) -> Any:
        return self.ray.get(self.fn.remote(item), timeout=remaining(deadline))

    def close(self) -> None:
        self.ray.shutdown()


class DaskSession(Session):
    def __init__(self, kind: str, workers: int) -> None:
        super().__init__()
        from dask.distributed import Client, LocalCluster

        # distributed sets its own loggers to INFO on import: keep the progress output readable.
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("distributed"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self.fn = workloads.TASKS[kind]
        self.cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        self.client = Client(self.cluster)
        self.params = {"n_workers": workers, "threads_per_worker": 1, "submission": "client.map"}

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        from dask.distributed import wait

        futures = self.client.map(self.fn, items, pure=False)
        wait(futures, timeout=remaining(deadline))
        return list(self.client.gather(futures))

    def run_one(self, item: Any, deadline: float) -> Any:
        return self.client.submit(self.fn, item, pure=False).result(timeout=remaining(deadline))

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.cluster.close()


# --- the registry -------------------------------------------------------------------------------


def buffer_pool_frames(opts: Options) -> int:
    """Room in the pool for every frame of a case at once (1 MiB per 640x480 frame): its
    repeats' frames and its warm-up's, with some to spare."""
    n = getattr(opts, "n", None) or workloads.WORKLOADS["frames"].default_n
    return n + n // 5 + 64


Factory = Callable[[str, int, float, Options], Session]


@dataclass(frozen=True)
class SystemSpec:
    name: str
    label: str
    requires: tuple[str, ...]
    start: Factory
    uses_redis: bool = False
    workloads: tuple[str, ...] = ()  # the only workloads it runs (empty: all of them)

    def unsupported(self, workload: str) -> str | None:
        """Why this system does not run ``workload`` (a skip, not a failure), or None."""
        if not self.workloads or workload in self.workloads:
            return None
        return f"{self.name} runs only the {'/'.join(self.workloads)} workload(s)"

    def missing(self) -> str | None:
        """Why this system cannot run here, or None."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except Exception as exc:  # ImportError, or a broken install
                return f"{module} is not importable ({type(exc).__name__}: {exc})"
        return None


SYSTEMS: dict[str, SystemSpec] = {
    s.name: s
    for s in (
        SystemSpec(
            "pytaskqml-map",
            "pytaskqml, spawned processes, ordered map()",
            ("pytaskqml",),
            lambda kind, n, deadline, opts: PytaskqmlSession(
                "map", kind, n, deadline, scrape=opts.scrape
            ),
        ),
        SystemSpec(
            "pytaskqml-map-socket",
            "pytaskqml, spawned processes, ordered map(), shared memory off (all over the socket)",
            ("pytaskqml",),
            lambda kind, n, deadline, opts: PytaskqmlSession(
                "map", kind, n, deadline, shared_memory=False, scrape=opts.scrape
            ),
        ),
        SystemSpec(
            "pytaskqml-map-buffer",
            "pytaskqml, spawned processes, ordered map() of frames produced into coord.buffer()",
            ("pytaskqml", "numpy"),
            lambda kind, n, deadline, opts: PytaskqmlSession(
                "map", kind, n, deadline, buffer_frames=buffer_pool_frames(opts)
            ),
            workloads=("frames",),
        ),
        SystemSpec(
            "pytaskqml-map-model",
            "pytaskqml, spawned processes, ordered map() routed to a named model",
            ("pytaskqml",),
            lambda kind, n, deadline, opts: PytaskqmlSession("model", kind, n, deadline),
        ),
        SystemSpec(
            "pytaskqml-pipeline",
            "pytaskqml Pipeline, 2 spawned stages (gray -> blur+mean), half the workers each",
            ("pytaskqml",),
            lambda kind, n, deadline, opts: PipelineSession(n, deadline),
            workloads=("frames",),
        ),
        SystemSpec(
            "pytaskqml-submit",
            "pytaskqml, spawned processes, one submit() Future per task",
            ("pytaskqml",),
            lambda kind, n, deadline, opts: PytaskqmlSession(
                "submit", kind, n, deadline, scrape=opts.scrape
            ),
        ),
        SystemSpec(
            "pytaskqml-map-1",
            "pytaskqml, spawned processes, a one-item map() per round trip",
            ("pytaskqml",),
            lambda kind, n, deadline, opts: PytaskqmlSession("map", kind, n, deadline),
            workloads=("latency",),
        ),
        SystemSpec(
            "executor-submit",
            "pytaskqml.Executor, submit(fn, x).result() per round trip",
            ("pytaskqml",),
            lambda kind, n, deadline, opts: ExecutorSession("pytaskqml", kind, n, None, deadline),
            workloads=("latency",),
        ),
        SystemSpec(
            "ppe-submit",
            "concurrent.futures.ProcessPoolExecutor, submit(fn, x).result() per round trip",
            (),
            lambda kind, n, deadline, opts: ExecutorSession("ppe", kind, n, None, deadline),
            workloads=("latency",),
        ),
        SystemSpec(
            "pytaskqml-threads",
            "pytaskqml, local thread workers, ordered map()",
            ("pytaskqml",),
            lambda kind, n, deadline, opts: PytaskqmlSession(
                "threads", kind, n, deadline, scrape=opts.scrape
            ),
        ),
        SystemSpec(
            "mp-imap",
            "multiprocessing.Pool.imap, chunksize computed like Pool.map",
            (),
            lambda kind, n, deadline, opts: MultiprocessingSession(kind, n, None),
        ),
        SystemSpec(
            "mp-imap-1",
            "multiprocessing.Pool.imap, chunksize=1",
            (),
            lambda kind, n, deadline, opts: MultiprocessingSession(kind, n, 1),
        ),
        SystemSpec(
            "executor-map",
            "pytaskqml.Executor.map, automatic chunks (its default)",
            ("pytaskqml",),
            lambda kind, n, deadline, opts: ExecutorSession("pytaskqml", kind, n, None, deadline),
        ),
        SystemSpec(
            "executor-map-pool-chunks",
            "pytaskqml.Executor.map, chunksize computed like Pool.map",
            ("pytaskqml",),
            lambda kind, n, deadline, opts: ExecutorSession("pytaskqml", kind, n, "pool", deadline),
        ),
        SystemSpec(
            "ppe-map",
            "concurrent.futures.ProcessPoolExecutor.map, chunksize computed like Pool.map",
            (),
            lambda kind, n, deadline, opts: ExecutorSession("ppe", kind, n, "pool", deadline),
        ),
        SystemSpec(
            "ppe-map-1",
            "concurrent.futures.ProcessPoolExecutor.map, chunksize=1 (its default)",
            (),
            lambda kind, n, deadline, opts: ExecutorSession("ppe", kind, n, None, deadline),
        ),
        SystemSpec(
            "compute-only",
            "ceiling: the task function alone in N forked processes, no transport",
            (),
            lambda kind, n, deadline, opts: ComputeOnlySession(kind, n),
            workloads=("frames", "wordcount"),
        ),
        SystemSpec(
            "raw-socket",
            "baseline: bare socket loop, raw frame bytes to N forked workers, 8-byte results",
            ("numpy", "cv2"),
            lambda kind, n, deadline, opts: RawSocketSession(kind, n, deadline),
            workloads=("frames",),
        ),
        SystemSpec(
            "echo-socketpair",
            "limit: raw bytes echoed by one forked process over a socketpair",
            (),
            lambda kind, n, deadline, opts: EchoSession(kind, "socketpair"),
            workloads=("latency",),
        ),
        SystemSpec(
            "echo-tcp",
            "limit: raw bytes echoed by one forked process over TCP loopback",
            (),
            lambda kind, n, deadline, opts: EchoSession(kind, "tcp"),
            workloads=("latency",),
        ),
        SystemSpec(
            "celery",
            "Celery+Redis, pipelined (delay() all, then get() in order)",
            ("celery", "redis"),
            lambda kind, n, deadline, opts: CelerySession(kind, n, deadline, opts, seq=False),
            uses_redis=True,
        ),
        SystemSpec(
            "celery-seq",
            "Celery+Redis, sequential delay().get() one at a time (the old method)",
            ("celery", "redis"),
            lambda kind, n, deadline, opts: CelerySession(kind, n, deadline, opts, seq=True),
            uses_redis=True,
        ),
        SystemSpec(
            "ray",
            "Ray, f.remote() for all then ray.get() in order",
            ("ray",),
            lambda kind, n, deadline, opts: RaySession(kind, n),
        ),
        SystemSpec(
            "dask",
            "Dask distributed LocalCluster (processes), client.map then gather",
            ("dask.distributed",),
            lambda kind, n, deadline, opts: DaskSession(kind, n),
        ),
    )
}

# The Redis-backed queue lives in a module of its own (it builds on Session, defined above).
from benchmark.redisqueue import RedisQueueSession  # noqa: E402

SYSTEMS["pytaskqml-redis"] = SystemSpec(
    "pytaskqml-redis",
    "pytaskqml Redis Streams queue: RedisClient.map() -> Redis -> a coordinator process",
    ("pytaskqml", "redis"),
    lambda kind, n, deadline, opts: RedisQueueSession(kind, n, deadline, opts),
    uses_redis=True,
)
