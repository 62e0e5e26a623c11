"""``submit()`` throughput with a window of futures in flight.

    python -m benchmark.window --workers 2 --window 256 --n 50000

Spawns *workers* echo workers, keeps *window* futures outstanding (one ``submit()`` per task,
the oldest awaited before the next is submitted) and prints tasks per second for each repeat
and their median. A compare of two trees: run it with each tree's interpreter, interleaved.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from concurrent.futures import Future
from typing import Any

import pytaskqml
from benchmark.pt_workers import EchoWorker


def run_once(coord: pytaskqml.Coordinator, n: int, window: int) -> float:
    """Tasks per second for *n* submits with at most *window* futures outstanding."""
    pending: collections.deque[Future[Any]] = collections.deque()
    submit = coord.submit
    t0 = time.perf_counter()
    for i in range(n):
        if len(pending) >= window:
            pending.popleft().result(timeout=60)
        pending.append(submit(i))
    while pending:
        pending.popleft().result(timeout=60)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.window", description=__doc__)
    parser.add_argument("--workers", type=int, default=2, help="spawned workers (default 2)")
    parser.add_argument("--window", type=int, default=256, help="futures in flight (default 256)")
    parser.add_argument("--n", type=int, default=50_000, help="tasks per repeat (default 50000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    args = parser.parse_args(argv)
    with pytaskqml.Coordinator() as coord:
        coord.spawn(EchoWorker, args.workers)
        run_once(coord, min(args.n, 5_000), args.window)  # warm-up: workers up, estimates made
        rates = []
        for _ in range(args.repeats):
            rates.append(run_once(coord, args.n, args.window))
            print(f"{rates[-1]:,.0f} tasks/s", file=sys.stderr)
    print(
        f"submit() window={args.window} workers={args.workers}: median "
        f"{statistics.median(rates):,.0f} tasks/s (min {min(rates):,.0f}, max {max(rates):,.0f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
