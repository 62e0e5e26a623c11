"""Scheduling: does the pool use every worker for the work people bring first?

::

    python -m benchmark.scheduling                        # everything, 3 repeats
    python -m benchmark.scheduling --case primes --repeats 5
    python -m benchmark.scheduling --case makespan --workers 2,4 --seconds 1

Cases (one JSON line per measurement on stdout, a summary table on stderr):

* ``primes``: the ``concurrent.futures`` documentation's example (``is_prime`` of six large
  numbers) with a fresh ``pytaskqml.Executor`` and a fresh ``ProcessPoolExecutor`` (default
  ``max_workers``) in turn, in the same run: the wall time of the whole ``with`` block, of
  ``map()`` alone, and how many calls each worker process ran; then ``map()`` alone on
  fresh executors whose processes are already up (``primes-warm``: the scheduling without
  the start-up, where spawned interpreters lose to forked ones).
* ``makespan``: N calls of ``time.sleep(SECONDS)`` (``--task spin`` keeps a CPU busy
  instead) submitted at once to N idle workers - an ``Executor(max_workers=N)`` whose workers
  are up, the function never called before, then again once it has been measured; and
  ``Coordinator.spawn(fn, processes=N)`` after one quick call. Ideal: SECONDS, every call on
  a different pid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytaskqml
from benchmark.cpu_tasks import PRIMES, is_prime, prime_and_pid, quick, sleep_for, spin_for


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def primes_once(kind: str) -> dict[str, Any]:
    """The example as written: a fresh executor, its start-up and shut-down included."""
    t0 = time.perf_counter()
    ex: Any = pytaskqml.Executor() if kind == "pytaskqml" else ProcessPoolExecutor()
    with ex:
        t1 = time.perf_counter()
        results = list(ex.map(is_prime, PRIMES))
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    assert results == [True, True, True, True, True, False]
    return {"case": "primes", "system": kind, "block_s": t3 - t0, "map_s": t2 - t1}


def primes_warm(kind: str) -> dict[str, Any]:
    """The example's map() alone, on a fresh executor whose worker processes are up: the
    scheduling without the start-up."""
    workers = os.cpu_count() or 1
    ex: Any = pytaskqml.Executor() if kind == "pytaskqml" else ProcessPoolExecutor()
    with ex:
        if kind == "pytaskqml":
            ex.coordinator.wait_workers(workers, timeout=60)
        list(ex.map(quick, range(4 * workers)))  # every process started
        t1 = time.perf_counter()
        results = list(ex.map(is_prime, PRIMES))
        t2 = time.perf_counter()
    assert results == [True, True, True, True, True, False]
    return {"case": "primes-warm", "system": kind, "map_s": t2 - t1}


def primes_per_worker(kind: str) -> list[int]:
    """Calls per worker process of the example's map() on a fresh executor."""
    ex: Any = pytaskqml.Executor() if kind == "pytaskqml" else ProcessPoolExecutor()
    with ex:
        pids = [pid for _, pid in ex.map(prime_and_pid, PRIMES)]
    return sorted(Counter(pids).values())


def makespan_executor(n: int, seconds: float, task: Any) -> list[dict[str, Any]]:
    rows = []
    with pytaskqml.Executor(max_workers=n) as ex:
        ex.coordinator.wait_workers(n, timeout=60)
        for phase in ("never called", "measured"):
            t0 = time.perf_counter()
            futures = [ex.submit(task, seconds) for _ in range(n)]
            pids = [f.result(timeout=120) for f in futures]
            rows.append(
                {
                    "case": "makespan",
                    "system": f"Executor ({phase})",
                    "workers": n,
                    "makespan_s": time.perf_counter() - t0,
                    "pids": len(set(pids)),
                }
            )
    return rows


def makespan_spawn(n: int, seconds: float, task: Any) -> dict[str, Any]:
    with pytaskqml.Coordinator() as coord:
        coord.spawn(task, processes=n)
        coord.submit(0.0).result(timeout=60)  # one quick call: the function is measured quick
        coord.wait_workers(n, timeout=60)
        t0 = time.perf_counter()
        futures = [coord.submit(seconds) for _ in range(n)]
        pids = [f.result(timeout=120) for f in futures]
        took = time.perf_counter() - t0
    return {
        "case": "makespan",
        "system": "spawn (after a quick call)",
        "workers": n,
        "makespan_s": took,
        "pids": len(set(pids)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmark.scheduling",
        description=__doc__.split("::")[0].strip() if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--case", default="primes,makespan", help="primes, makespan (comma-separated)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each measurement")
    p.add_argument("--workers", default="2,4", help="makespan: worker counts (comma-separated)")
    p.add_argument("--seconds", type=float, default=1.0, help="makespan: seconds per call")
    p.add_argument("--task", choices=("sleep", "spin"), default="sleep", help="makespan: the call")
    args = p.parse_args(argv)
    cases = set(args.case.split(","))
    summary: list[str] = []
    if "primes" in cases:
        times: dict[str, list[float]] = {"pytaskqml": [], "ProcessPoolExecutor": []}
        maps: dict[str, list[float]] = {"pytaskqml": [], "ProcessPoolExecutor": []}
        warm: dict[str, list[float]] = {"pytaskqml": [], "ProcessPoolExecutor": []}
        for r in range(args.repeats):
            # Alternate which goes first, so neither always finds a quieter machine.
            order = ["pytaskqml", "ProcessPoolExecutor"]
            for kind in order if r % 2 == 0 else order[::-1]:
                row = primes_once(kind)
                emit(row)
                times[kind].append(row["block_s"])
                maps[kind].append(row["map_s"])
                row = primes_warm(kind)
                emit(row)
                warm[kind].append(row["map_s"])
        spread = {kind: primes_per_worker(kind) for kind in times}
        emit({"case": "primes", "calls_per_worker": spread})
        ours, theirs = (
            statistics.median(times["pytaskqml"]),
            statistics.median(times["ProcessPoolExecutor"]),
        )
        summary.append(
            f"primes: Executor {ours:.2f}s (map {statistics.median(maps['pytaskqml']):.2f}s), "
            f"ProcessPoolExecutor {theirs:.2f}s (map "
            f"{statistics.median(maps['ProcessPoolExecutor']):.2f}s): {ours / theirs:.2f}x; "
            f"calls per worker {spread}; with the workers up, map() alone: Executor "
            f"{statistics.median(warm['pytaskqml']):.2f}s, ProcessPoolExecutor "
            f"{statistics.median(warm['ProcessPoolExecutor']):.2f}s"
        )
    if "makespan" in cases:
        task = sleep_for if args.task == "sleep" else spin_for
        for n in (int(w) for w in args.workers.split(",")):
            spans: dict[str, list[float]] = {}
            pids: dict[str, list[int]] = {}
            for _ in range(args.repeats):
                for row in [
                    *makespan_executor(n, args.seconds, task),
                    makespan_spawn(n, args.seconds, task),
                ]:
                    emit(row)
                    spans.setdefault(row["system"], []).append(row["makespan_s"])
                    pids.setdefault(row["system"], []).append(row["pids"])
            for system, values in spans.items():
                summary.append(
                    f"makespan N={n} x {args.seconds:g}s {args.task}, {system}: median "
                    f"{statistics.median(values):.2f}s, max {max(values):.2f}s, pids "
                    f"{min(pids[system])}..{max(pids[system])}"
                )
    for line in summary:
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
