"""The systems under test.  Each one starts its workers, runs a batch of tasks and returns the
results in submission order, runs a single task (for the latency workload), and cleans up.

Every blocking call takes a deadline (``time.monotonic()`` seconds); the harness additionally
runs each phase in a watchdog thread, so a system that ignores its deadline still cannot hang
the run.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
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

    def close(self) -> None:
        raise NotImplementedError


# --- pytaskqml ----------------------------------------------------------------------------------


class PytaskqmlSession(Session):
    BUFFERSIZE = 1024

    def __init__(self, mode: str, kind: str, workers: int, deadline: float) -> None:
        super().__init__()
        from benchmark.pt_workers import WORKERS
        from pytaskqml import Coordinator

        cls, kwargs = WORKERS[kind]
        self.mode = mode
        self.coord = Coordinator()
        try:
            if mode == "threads":
                self.coord.add_local(cls(**kwargs), threads=workers)
            else:
                timeout = min(60.0, remaining(deadline))
                self.coord.spawn(cls, processes=workers, kwargs=kwargs, timeout=timeout)
        except BaseException:
            self.close()
            raise
        self.params = {"mode": mode, "worker_class": cls.__name__}
        if mode == "map":
            self.params["buffersize"] = self.BUFFERSIZE

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        if self.mode == "submit":
            futures = [self.coord.submit(item) for item in items]
            return [f.result(timeout=remaining(deadline)) for f in futures]
        # map (processes or threads): the harness watchdog bounds the iteration.
        return list(self.coord.map(items, buffersize=self.BUFFERSIZE))

    def run_one(self, item: Any, deadline: float) -> Any:
        if self.mode == "submit":
            return self.coord.submit(item).result(timeout=remaining(deadline))
        (result,) = self.coord.map([item])
        return result

    def worker_pids(self) -> set[int]:
        pids = {w.pid for w in self.coord.statistics().workers}
        pids.discard(os.getpid())
        return pids

    def statistics(self) -> dict[str, Any]:
        s = self.coord.statistics()
        return {
            "submitted": s.submitted,
            "completed": s.completed,
            "failed": s.failed,
            "in_flight": s.in_flight,
            "latency_p50_us": None if s.latency_p50 is None else round(s.latency_p50 * 1e6, 1),
            "latency_p99_us": None if s.latency_p99 is None else round(s.latency_p99 * 1e6, 1),
        }

    def close(self) -> None:
        self.coord.shutdown(wait=True, cancel_futures=True, timeout=10.0)


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

Factory = Callable[[str, int, float, Options], Session]


@dataclass(frozen=True)
class SystemSpec:
    name: str
    label: str
    requires: tuple[str, ...]
    start: Factory
    uses_redis: bool = False

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
            lambda kind, n, deadline, opts: PytaskqmlSession("map", kind, n, deadline),
        ),
        SystemSpec(
            "pytaskqml-submit",
            "pytaskqml, spawned processes, one submit() Future per task",
            ("pytaskqml",),
            lambda kind, n, deadline, opts: PytaskqmlSession("submit", kind, n, deadline),
        ),
        SystemSpec(
            "pytaskqml-threads",
            "pytaskqml, local thread workers, ordered map()",
            ("pytaskqml",),
            lambda kind, n, deadline, opts: PytaskqmlSession("threads", kind, n, deadline),
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
