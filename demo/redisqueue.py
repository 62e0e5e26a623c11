"""``python -m demo.redisqueue``: two coordinators share a Redis queue; one is killed mid-run.

Starts two coordinator processes (``pytaskqml queue serve``, two WordCount workers each), a
producer in this process maps 20,000 words through the queue, and after a quarter of the
results one coordinator is killed with SIGKILL. The producer still gets every result, in order,
once; the survivor claims what the dead one held. Needs a Redis (``--url``, default
``redis://127.0.0.1:6379/14``); every key it creates is deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from pytaskqml.redis import RedisQueue
from pytaskqml.wire import get_health


def start_coordinator(url: str, stream: str, claim_idle: float) -> tuple[Any, tuple[str, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytaskqml", "queue", "serve", url, "--stream", stream,
         "--worker", "pytaskqml.examples:WordCount", "-n", "2", "--claim-idle", str(claim_idle),
         "--control", "127.0.0.1:0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        found = re.search(r"control at http://([\d.]+):(\d+)", line)
        if found:  # from here on its log is only drained, so the pipe never fills
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, (found.group(1), int(found.group(2)))
    raise SystemExit(f"the coordinator did not start (exit code {proc.wait()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.redisqueue", description=__doc__)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--n", type=int, default=20_000, help="words (default 20,000)")
    parser.add_argument("--claim-idle", type=float, default=2.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    stream = f"demo-{uuid.uuid4().hex[:8]}"
    q = RedisQueue(args.url, stream=stream, claim_idle=args.claim_idle)
    try:
        q.status()
    except Exception as exc:
        print(f"no Redis at {args.url} ({exc}); start one with:\n  redis-server --daemonize "
              'yes --save "" --appendonly no', file=sys.stderr)  # fmt: skip
        return 1
    coordinators = []
    try:
        coordinators = [start_coordinator(args.url, stream, args.claim_idle) for _ in range(2)]
        (victim, _), (survivor, control) = coordinators
        print(f"2 coordinators (pids {victim.pid}, {survivor.pid}), 2 WordCount workers each, "
              f"sharing stream {stream!r} on {args.url}")  # fmt: skip
        words = [random.choice(["apple", "pear", "fig", "plum"]) for _ in range(args.n)]
        results = []
        t0 = time.perf_counter()
        with q.client("demo-producer") as producer:
            for i, counted in enumerate(producer.map(words, chunksize=1)):
                results.append(counted)
                if i == args.n // 4:
                    os.kill(victim.pid, signal.SIGKILL)
                    print(f"after {i + 1:,} results: killed coordinator {victim.pid} (SIGKILL)")
            stats = producer.statistics()
        elapsed = time.perf_counter() - t0
        in_order = results == [{w: 1} for w in words]
        claimed = get_health(control)[1]["queue"]["claimed"]
        print(f"{len(results):,} results in {elapsed:.1f} s: "
              f"{'in submission order, each once' if in_order else 'WRONG'} "
              f"({stats.duplicates} second results dropped by task number)")  # fmt: skip
        print(f"coordinator {survivor.pid} claimed {claimed} entries the dead one held "
              f"(idle for {args.claim_idle:g} s)")  # fmt: skip
        return 0 if in_order and claimed > 0 else 1
    finally:
        for proc, _ in coordinators:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in coordinators:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stderr is not None:
                proc.stderr.close()
        q.destroy()


if __name__ == "__main__":
    raise SystemExit(main())
