"""Autoscaling: how fast a self-sizing pool grows under a burst, what it then delivers, and how
it shrinks back when the work stops.

::

    python -m benchmark.autoscale                    # sleep-bound 20 ms tasks, processes=(1, 6)
    python -m benchmark.autoscale --max 4 --task-ms 50

Three runs of the same sleep-bound tasks (the task waits; it does not compete for the CPU, so
the pool size, not the machine's cores, bounds the rate): a fixed pool of 1 (the rate at the
minimum), then ``processes=(1, MAX)`` under a burst - the time until it has MAX workers and the
rate once it has them - then the time until, with nothing to do, it is back to 1. Progress goes
to stderr, the table to stdout; exit status 0 when the rate at MAX is at least ``--want`` times
the rate at 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from benchmark.pt_workers import SleepWorker
from pytaskqml import Coordinator


def rate(coord: Coordinator, n: int) -> float:
    t0 = time.perf_counter()
    for _ in coord.map(range(n)):
        pass
    return n / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    delay = args.task_ms / 1000
    per_worker = 1 / delay
    with Coordinator() as coord:
        coord.spawn(SleepWorker, processes=1, kwargs={"delay": delay})
        rate(coord, int(per_worker))  # warm-up
        at_min = rate(coord, int(3 * per_worker))
    print(f"[autoscale] 1 worker: {at_min:,.0f} tasks/s", file=sys.stderr, flush=True)
    with Coordinator() as coord:
        coord.spawn(
            SleepWorker,
            processes=(1, args.max),
            kwargs={"delay": delay},
            scale_up_wait=args.scale_up_wait,
            scale_down_idle=args.scale_down_idle,
        )
        t0 = time.perf_counter()
        futures = [coord.submit(i) for i in range(int(args.max * per_worker * 4))]
        grown = coord.wait_until(lambda s: len(s.workers) == args.max, 60)
        grew_in = time.perf_counter() - t0
        for f in futures:
            f.result(60)
        print(f"[autoscale] {args.max} workers after {grew_in:.2f}s", file=sys.stderr, flush=True)
        at_max = rate(coord, int(args.max * per_worker * 3))
        print(f"[autoscale] {args.max} workers: {at_max:,.0f} tasks/s", file=sys.stderr)
        t1 = time.perf_counter()
        shrunk = coord.wait_until(lambda s: len(s.workers) == 1, 60 + args.scale_down_idle * 10)
        shrank_in = time.perf_counter() - t1
        stats = coord.statistics()
    return {
        "task_ms": args.task_ms,
        "max": args.max,
        "rate_at_1": at_min,
        "rate_at_max": at_max,
        "ratio": at_max / at_min,
        "grew_to_max_s": grew_in if grown else None,
        "back_to_1_s": shrank_in if shrunk else None,
        "scale_ups": stats.scale_ups,
        "scale_downs": stats.scale_downs,
        "lost": stats.workers_lost,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmark.autoscale", description=(__doc__ or "").split("::")[0]
    )
    p.add_argument("--max", type=int, default=6, help="the pool's maximum (default 6)")
    p.add_argument("--task-ms", type=float, default=20.0, help="each task sleeps this long")
    p.add_argument("--scale-up-wait", type=float, default=0.25, metavar="SECONDS")
    p.add_argument("--scale-down-idle", type=float, default=2.0, metavar="SECONDS")
    p.add_argument("--want", type=float, default=5.0, help="the ratio that counts as a pass")
    args = p.parse_args(argv)
    r = run(args)
    print("| measure | value |\n|---|---:|")
    print(f"| tasks/s with 1 worker (fixed pool) | {r['rate_at_1']:,.0f} |")
    print(f"| tasks/s once grown to {r['max']} | {r['rate_at_max']:,.0f} |")
    print(f"| ratio | {r['ratio']:.2f}x (want >= {args.want:g}x) |")
    print(f"| burst to {r['max']} workers | {r['grew_to_max_s']:.2f} s |")
    back = r["back_to_1_s"]
    print(f"| idle back to 1 worker (scale_down_idle={args.scale_down_idle:g} s) | "
          f"{'not within the limit' if back is None else f'{back:.2f} s'} |")  # fmt: skip
    print(f"| scale-ups / scale-downs / workers lost | {r['scale_ups']} / {r['scale_downs']} / "
          f"{r['lost']} |")  # fmt: skip
    return 0 if r["ratio"] >= args.want and r["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
