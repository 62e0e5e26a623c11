"""Chaos run: an ordered ``map()`` over N tasks while a thread ``kill -9``s a random worker.

::

    python -m benchmark.chaos                      # 100000 tasks, 3 workers, a kill every 2 s
    python -m benchmark.chaos --tasks 20000 --workers 2 --kill-every 1 --seed 7

The coordinator spawns ``--workers`` processes running :class:`ChaosWorker` (each task sleeps
``--task-ms``) and restarts them when they die; the killer thread picks a random attached
spawned worker from ``coord.statistics().workers`` every ``--kill-every`` seconds. Progress goes
to stderr; the table at the end goes to stdout. It counts results that never came (lost), came
twice (duplicated) or came after a later one (out of order), the kills and restarts, the
throughput per 1-second bucket, how long each killed worker took to come back, and how long the
throughput took to get back to 80% of its pre-kill median. The exit status is 0 only when
nothing was lost, duplicated or out of order.
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import signal
import statistics
import sys
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytaskqml import Coordinator, Worker

# Throughput windows for the recovery measurement (finer than the 1-second report buckets).
RECOVERY_WINDOW = 0.25
RECOVERY_STEP = 0.02
RECOVERY_FRACTION = 0.8


class ChaosWorker(Worker):
    """Returns its task's index after ``task_ms`` milliseconds of sleep."""

    def __init__(self, task_ms: float = 1.0) -> None:
        self.delay = max(0.0, float(task_ms)) / 1000.0

    def process(self, index: int) -> int:
        if self.delay:
            time.sleep(self.delay)
        return index


@dataclass
class ChaosResult:
    tasks: int
    workers: int
    kill_every: float
    task_ms: float
    seed: int
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    failed: int = 0  # results that were an error (also counted as lost)
    kills: int = 0
    workers_lost: int = 0
    restarts: int = 0
    retried: int = 0
    poisoned: int = 0
    elapsed: float = 0.0
    rate_per_bucket: list[int] = field(default_factory=list)
    kill_times: list[float] = field(default_factory=list)
    back_after: list[float | None] = field(default_factory=list)  # kill -> a new process
    recovered_after: list[float | None] = field(default_factory=list)  # kill -> 80% throughput
    baseline_rate: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.out_of_order == 0


def _spawned_pids(coord: Coordinator) -> list[int]:
    return sorted(w.pid for w in coord.workers if w.kind == "spawned" and w.pid is not None)


class _Killer(threading.Thread):
    """Kills a random spawned worker every ``every`` seconds; times how long the slot is down."""

    def __init__(
        self,
        coord: Coordinator,
        workers: int,
        every: float,
        seed: int,
        t0: float,
        max_kills: int | None,
    ) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.coord = coord
        self.workers = workers
        self.every = every
        self.rng = random.Random(seed)
        self.t0 = t0
        self.max_kills = max_kills
        self.stop = threading.Event()
        self.kills: list[tuple[float, int]] = []  # (seconds since t0, pid)
        self.back_after: list[float | None] = []

    def run(self) -> None:
        next_kill = time.perf_counter() + self.every
        known = set(_spawned_pids(self.coord))
        waiting: list[tuple[int, float]] = []  # (kill number, when): not yet replaced
        while not self.stop.wait(0.01):
            now = time.perf_counter()
            if waiting:
                # Each process that attaches for the first time replaces the oldest kill.
                fresh = set(_spawned_pids(self.coord)) - known
                known |= fresh
                for _ in range(min(len(fresh), len(waiting))):
                    n, at = waiting.pop(0)
                    self.back_after[n] = now - at
            if now < next_kill:
                continue
            next_kill += self.every
            if self.max_kills is not None and len(self.kills) >= self.max_kills:
                if not waiting:
                    return
                continue
            pids = _spawned_pids(self.coord)
            known.update(pids)
            if not pids:
                continue
            pid = self.rng.choice(pids)
            at = time.perf_counter()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            waiting.append((len(self.kills), at))
            self.kills.append((at - self.t0, pid))
            self.back_after.append(None)


def _rate(stamps: array[float], start: float, width: float) -> float:
    lo = bisect.bisect_left(stamps, start)
    hi = bisect.bisect_left(stamps, start + width)
    return (hi - lo) / width


def _recovery(stamps: array[float], kills: list[float], end: float) -> tuple[float, list[Any]]:
    """The pre-kill median rate, and per kill the seconds until the rate (over RECOVERY_WINDOW)
    is back to RECOVERY_FRACTION of it after dipping below (0.0: it never dipped; None: it was
    not back before the next kill or the end of the run)."""
    w = RECOVERY_WINDOW
    first_kill = kills[0] if kills else end
    # Skip the first window (start-up), use whole windows before the first kill.
    starts = [w * k for k in range(1, int(first_kill / w))]
    if len(starts) < 2:
        starts = [w * k for k in range(1, int(end / w))]
    rates = [_rate(stamps, s, w) for s in starts if s + w <= end]
    baseline = statistics.median(rates) if rates else 0.0
    target = RECOVERY_FRACTION * baseline
    out: list[float | None] = []
    for k, tk in enumerate(kills):
        until = min(end, kills[k + 1] if k + 1 < len(kills) else end)
        d = 0.0
        dipped = False
        # Look for a dip within one second of the kill...
        while d <= 1.0 and tk + d + w <= until:
            if _rate(stamps, tk + d, w) < target:
                dipped = True
                break
            d += RECOVERY_STEP
        if not dipped:
            out.append(0.0)
            continue
        # ...then for the first window back at the target.
        recovered = None
        while tk + d + w <= until:
            if _rate(stamps, tk + d, w) >= target:
                recovered = d
                break
            d += RECOVERY_STEP
        out.append(recovered)
    return baseline, out


def run_chaos(
    tasks: int = 100_000,
    workers: int = 3,
    kill_every: float = 2.0,
    task_ms: float = 1.0,
    seed: int = 1,
    *,
    max_kills: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ChaosResult:
    """Run the chaos map and return what it measured (see the module docstring)."""
    res = ChaosResult(tasks, workers, kill_every, task_ms, seed)
    say = progress or (lambda _line: None)
    seen = bytearray(tasks)
    stamps: array[float] = array("d")
    with Coordinator(name="chaos") as coord:
        coord.spawn(ChaosWorker, processes=workers, kwargs={"task_ms": task_ms})
        say(f"chaos: {workers} workers up; mapping {tasks} tasks, a kill every {kill_every}s")
        t0 = time.perf_counter()
        killer = _Killer(coord, workers, kill_every, seed, t0, max_kills)
        killer.start()
        prev = -1
        next_report = t0 + 1.0
        try:
            for r in coord.map(range(tasks), on_error="return"):
                now = time.perf_counter()
                stamps.append(now - t0)
                res.received += 1
                if type(r) is int and 0 <= r < tasks:
                    if seen[r]:
                        res.duplicated += 1
                    seen[r] = 1
                    if r < prev:
                        res.out_of_order += 1
                    prev = r
                else:
                    res.failed += 1
                    if len(res.errors) < 5:
                        res.errors.append(f"result #{res.received - 1}: {r!r}")
                if now >= next_report:
                    next_report = now + 1.0
                    s = coord.statistics()
                    say(
                        f"chaos: {now - t0:5.1f}s {res.received:>8} done, "
                        f"{len(s.workers)}/{workers} workers, kills {len(killer.kills)}, "
                        f"restarts {s.restarts}"
                    )
        finally:
            killer.stop.set()
            killer.join(10.0)
        res.elapsed = time.perf_counter() - t0
        stats = coord.statistics()
    res.lost = tasks - sum(seen)
    res.kills = len(killer.kills)
    res.kill_times = [t for t, _ in killer.kills]
    res.back_after = list(killer.back_after)
    res.workers_lost = stats.workers_lost
    res.restarts = stats.restarts
    res.retried = stats.retried
    res.poisoned = stats.poisoned
    buckets = [0] * (int(res.elapsed) + 1)
    for t in stamps:
        buckets[int(t)] += 1
    res.rate_per_bucket = buckets
    res.baseline_rate, res.recovered_after = _recovery(stamps, res.kill_times, res.elapsed)
    return res


def _fmt(values: list[float | None]) -> str:
    return "[" + ", ".join("-" if v is None else f"{v:.2f}" for v in values) + "]"


def format_table(res: ChaosResult) -> str:
    rows = [
        ("tasks", str(res.tasks)),
        ("received", str(res.received)),
        ("lost", str(res.lost)),
        ("duplicated", str(res.duplicated)),
        ("out of order", str(res.out_of_order)),
        ("failed (in lost)", str(res.failed)),
        ("kills", str(res.kills)),
        ("workers lost", str(res.workers_lost)),
        ("restarts", str(res.restarts)),
        ("retried / poisoned", f"{res.retried} / {res.poisoned}"),
        ("elapsed", f"{res.elapsed:.1f} s"),
        ("mean throughput", f"{res.received / max(res.elapsed, 1e-9):.0f} /s"),
        ("throughput per 1 s", "[" + ", ".join(map(str, res.rate_per_bucket)) + "]"),
        ("kill times (s)", _fmt(list(res.kill_times))),
        ("replacement attached after (s)", _fmt(res.back_after)),
        (
            f"recovered to {RECOVERY_FRACTION:.0%} of {res.baseline_rate:.0f}/s within (s)",
            _fmt(res.recovered_after),
        ),
        ("verdict", "OK" if res.ok else "FAILED"),
    ]
    head = (
        f"chaos: {res.tasks} tasks, {res.workers} workers, kill -9 every {res.kill_every} s, "
        f"{res.task_ms} ms per task, seed {res.seed}"
    )
    width = max(len(k) for k, _ in rows)
    lines = [head, "-" * len(head)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"error: {e}" for e in res.errors]
    return "\n".join(lines)


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmark.chaos",
        description="Ordered map() over N tasks while a random worker process is kill -9'd "
        "every few seconds; checks that nothing is lost, duplicated or reordered.",
    )
    p.add_argument("--tasks", type=_positive(int), default=100_000, help="default 100000")
    p.add_argument("--workers", type=_positive(int), default=3, help="processes (default 3)")
    p.add_argument(
        "--kill-every", type=_positive(float), default=2.0, metavar="SECONDS", help="default 2.0"
    )
    p.add_argument(
        "--task-ms",
        type=float,
        default=1.0,
        metavar="MS",
        help="milliseconds each task sleeps (default 1.0)",
    )
    p.add_argument("--seed", type=int, default=1, help="which worker gets killed (default 1)")
    p.add_argument("--max-kills", type=_positive(int), default=None, help="stop killing after N")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.task_ms < 0:
        print("chaos: --task-ms must not be negative", file=sys.stderr)
        return 2

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    res = run_chaos(
        args.tasks,
        args.workers,
        args.kill_every,
        args.task_ms,
        args.seed,
        max_kills=args.max_kills,
        progress=say,
    )
    print(format_table(res), flush=True)
    return 0 if res.ok else 1


if __name__ == "__main__":
    # Run the importable copy, so the children import benchmark.chaos:ChaosWorker rather than
    # a second copy of this file loaded as __mp_main__.
    from benchmark.chaos import main as _main

    sys.exit(_main())
