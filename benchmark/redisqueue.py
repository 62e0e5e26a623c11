"""pytaskqml's Redis Streams queue as a benchmark system (``pytaskqml-redis``).

The shape of a deployment with a shared queue: the benchmark process is the producer (a
``RedisClient``: ``map()`` with its automatic chunking), a coordinator in a process of its own
(``python -m benchmark.redisqueue``) reads the stream through the consumer group and runs the
tasks on its spawned workers, results come back through the producer's result stream. Every
task and result passes through Redis, on the same Redis (and DB) as Celery's runs; each run
uses a stream of its own and deletes its keys at the end.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Any

from benchmark.systems import ROOT, Options, RunFailed, Session, remaining, stop_process_group


class RedisQueueSession(Session):
    READY_TIMEOUT = 60.0

    def __init__(self, kind: str, workers: int, deadline: float, opts: Options) -> None:
        super().__init__()
        import redis

        from pytaskqml.redis import RedisQueue

        self.queue = RedisQueue(opts.redis_url, stream=f"pytaskqml-bench-{os.getpid()}")
        probe = redis.Redis.from_url(opts.redis_url, socket_connect_timeout=1, socket_timeout=5)
        try:
            self.redis_pid = int(probe.info("server")["process_id"])
        except redis.RedisError as exc:
            raise RunFailed(f"Redis at {opts.redis_url} does not answer: {exc}") from exc
        finally:
            probe.close()
        self.queue.destroy()
        pythonpath = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        self.proc: subprocess.Popen[str] | None = subprocess.Popen(
            [sys.executable, "-m", "benchmark.redisqueue", opts.redis_url, self.queue.stream,
             kind, str(workers)],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        self.producer: Any = None
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()  # the coordinator says "ready" once it is up
            remaining(deadline)
            if line.strip() != "ready":
                raise RunFailed(f"the coordinator process did not start (said {line!r})")
            self.producer = self.queue.client()
        except BaseException:
            self.close()
            raise
        self.params = {
            "producer": "RedisClient.map(), automatic chunks",
            "coordinator": f"a separate process, {workers} spawned workers",
            "stream": self.queue.stream,
            "redis_db": opts.redis_url.rsplit("/", 1)[-1],
        }

    def run_batch(self, items: list[Any], deadline: float) -> list[Any]:
        return list(self.producer.map(items))

    def run_one(self, item: Any, deadline: float) -> Any:
        return self.producer.submit(item).result(timeout=remaining(deadline))

    def worker_pids(self) -> set[int]:
        return {self.proc.pid} if self.proc is not None else set()

    def statistics(self) -> dict[str, Any]:
        s = self.producer.statistics()
        return {"taken": s.taken, "duplicates": s.duplicates}

    def close(self) -> None:
        try:
            if self.producer is not None:
                self.producer.close()
            if self.proc is not None:
                with contextlib.suppress(OSError):
                    assert self.proc.stdin is not None
                    self.proc.stdin.close()  # the coordinator shuts down
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    stop_process_group(self.proc)  # type: ignore[arg-type]
                if self.proc.stdout is not None:
                    self.proc.stdout.close()
                self.proc = None
        finally:
            self.queue.destroy()


def serve(url: str, stream: str, kind: str, workers: int) -> None:
    """The coordinator process: feed from the stream until stdin closes."""
    import logging

    from benchmark.pt_workers import WORKERS
    from pytaskqml import Coordinator
    from pytaskqml.redis import RedisQueue
    from pytaskqml.worker.bootstrap import tune_malloc

    logging.basicConfig(level=logging.WARNING)
    tune_malloc()  # as `pytaskqml queue serve` does: a process that moves frames all day
    cls, kwargs = WORKERS[kind]
    with Coordinator(queue=RedisQueue(url, stream=stream)) as coord:
        coord.spawn(cls, processes=workers, kwargs=kwargs)
        print("ready", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
