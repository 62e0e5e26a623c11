"""Run one case (system x workload x worker count): start, warm up, measure, check, clean up.

Start-up is timed separately and excluded from the rate.  Each repeat times only the batch (or
the echo loop), and reads the CPU time of this process, of every process it started (found by
walking /proc) and, for Celery, of the Redis server, before and after.  Every number in the
returned dict was measured in this call; nothing is estimated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from benchmark import machine, procstat, workloads
from benchmark.systems import DEFAULT_REDIS_URL, SYSTEMS, Options, RunFailed, RunTimeout, Session

log = logging.getLogger(__name__)
T = TypeVar("T")

QUICK_SIZES = {"wordcount": 200, "frames": 6, "latency": 30}
# Celery runs ~100x slower than the others here, so it gets fewer tasks per repeat to keep
# `--all` within ~15 minutes on 2 cores (every result records its n; rates are per second).
SIZE_CAPS = {
    "celery": {"wordcount": 5_000, "frames": 100, "latency": 500},
    "celery-seq": {"wordcount": 2_000, "frames": 60, "latency": 500, "sleep": 80},
}
RESULT_KEYS = (
    "system",
    "label",
    "workload",
    "workers",
    "n",
    "repeats",
    "seed",
    "status",
    "error",
    "skip_reason",
    "startup_s",
    "rate_per_s",
    "rate_runs",
    "rate_spread_pct",
    "wall_s_runs",
    "cpu_us_per_task",
    "check",
    "latency_us",
    "ideal_rate_per_s",
    "efficiency",
    "params",
    "machine",
)


@dataclass
class HarnessOptions(Options):
    repeats: int = 3
    time_limit: float = 300.0
    seed: int = 20240601
    n: int | None = None
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def case_size(system: str, workload: str, workers: int, opts: HarnessOptions) -> int:
    if opts.n is not None:
        n = opts.n
    elif workload == "sleep":
        n = workloads.sleep_tasks(workers) // (10 if opts.quick else 1)
    elif opts.quick:
        n = QUICK_SIZES[workload]
    else:
        n = workloads.WORKLOADS[workload].default_n
    if opts.n is None and workload in SIZE_CAPS.get(system, {}):
        n = min(n, SIZE_CAPS[system][workload])
    return max(1, n)


class Runner:
    """One worker thread that runs every phase of a case (start-up, warm-up, repeats, clean-up)
    while the calling thread waits with the run's deadline.

    One thread for the whole case, not one per phase: some systems tie their helper processes
    to the thread that started them (Ray's raylet/GCS die with it via PR_SET_PDEATHSIG).
    """

    def __init__(self, name: str) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], dict[str, Any]] | None]
        self.jobs = queue.SimpleQueue()
        self.stuck = False
        self.thread = threading.Thread(target=self._loop, name=f"bench-{name}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            fn, box = job
            try:
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc
            box["done"].set()

    def call(self, fn: Callable[[], T], deadline: float, what: str) -> T:
        """Run ``fn`` on the runner thread; raise RunTimeout if it is not done by ``deadline``."""
        if self.stuck:
            return call_with_deadline(fn, deadline, what)
        box: dict[str, Any] = {"done": threading.Event()}
        self.jobs.put((fn, box))
        if not box["done"].wait(max(0.0, deadline - time.monotonic())):
            self.stuck = True
            raise RunTimeout(f"time limit reached during {what}")
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.jobs.put(None)


def call_with_deadline(fn: Callable[[], T], deadline: float, what: str) -> T:
    """Run ``fn`` in a fresh daemon thread; raise RunTimeout if it is not done by ``deadline``."""
    runner = Runner(what)
    try:
        return runner.call(fn, deadline, what)
    finally:
        runner.stop()


@dataclass
class CpuSnapshot:
    caller: float
    workers: dict[int, float]
    redis: float | None


def cpu_snapshot(session: Session, preexisting: set[int], after: bool) -> CpuSnapshot:
    """Read CPU times. The caller's own time is read last before and first after the timed
    section, so that the /proc walk itself is not charged to the caller."""
    caller_after = procstat.self_cpu_seconds() if after else 0.0
    pids = (procstat.descendants(os.getpid()) - preexisting) | session.worker_pids()
    workers = procstat.cpu_seconds(pids)
    redis = None
    if session.redis_pid is not None:
        redis = procstat.cpu_seconds([session.redis_pid]).get(session.redis_pid)
    caller = caller_after if after else procstat.self_cpu_seconds()
    return CpuSnapshot(caller, workers, redis)


def cpu_delta(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float | None]:
    workers = sum(cpu - before.workers.get(pid, 0.0) for pid, cpu in after.workers.items())
    redis = None
    if before.redis is not None and after.redis is not None:
        redis = after.redis - before.redis
    return {"caller": after.caller - before.caller, "workers": workers, "redis": redis}


def kill_leftovers(preexisting: set[int]) -> None:
    """SIGTERM, then SIGKILL, any process this run started that is still alive after close()."""
    # multiprocessing's resource tracker (started by spawn-based pools, e.g. Dask's) serves the
    # whole process for its lifetime; killing it would only make the next user warn.
    left = {
        pid
        for pid in procstat.descendants(os.getpid()) - preexisting
        if "resource_tracker" not in procstat.cmdline(pid)
    }
    if not left:
        return
    names = ", ".join(f"{pid} ({procstat.cmdline(pid)[:60]})" for pid in sorted(left))
    log.warning("killing %d leftover process(es): %s", len(left), names)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        until = time.monotonic() + 3
        while time.monotonic() < until:
            for pid in list(left):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            left = {p for p in left if procstat.read_stat(p) is not None and not _zombie(p)}
            if not left:
                return
            time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def base_result(system: str, workload: str, workers: int, opts: HarnessOptions) -> dict[str, Any]:
    spec = SYSTEMS.get(system)
    result: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    result.update(
        system=system,
        label=spec.label if spec else system,
        workload=workload,
        workers=workers,
        n=case_size(system, workload, workers, opts),
        repeats=opts.repeats,
        seed=opts.seed,
        params={},
    )
    return result


def run_case(system: str, workload: str, workers: int, opts: HarnessOptions) -> dict[str, Any]:
    """Run one case and return its JSON-ready result (status ok, failed or skipped)."""
    result = base_result(system, workload, workers, opts)
    result["machine"] = machine.describe(opts.redis_url)
    spec = SYSTEMS[system]
    wl = workloads.WORKLOADS[workload]
    reason = spec.unsupported(workload) or spec.missing()
    for module in wl.requires:
        if reason is None:
            try:
                __import__(module)
            except ImportError as exc:
                reason = f"{module} is not importable for the {workload} workload ({exc})"
    if reason is not None:
        result.update(status="skipped", skip_reason=reason)
        log.info("skip %s/%s: %s", system, workload, reason)
        return result
    try:
        _measure_case(result, spec.start, wl, workers, opts)
        result["status"] = "ok"
    except RunFailed as exc:
        result.update(status="failed", error=str(exc))
    except Exception as exc:
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    if result["status"] == "failed":
        log.error("FAILED %s/%s workers=%d: %s", system, workload, workers, result["error"])
    return result


def _measure_case(
    result: dict[str, Any],
    start: Callable[[str, int, float, Options], Session],
    wl: workloads.Workload,
    workers: int,
    opts: HarnessOptions,
) -> None:
    system, n = result["system"], result["n"]
    tag = f"{system}/{wl.name} workers={workers} n={n}"
    inputs = wl.make_inputs(n, opts.seed)
    warm_n = min(n, max(2 * workers, n // 10)) if wl.name != "latency" else min(n, 50)
    warm_inputs = wl.make_inputs(warm_n, opts.seed + 1)
    preexisting = procstat.descendants(os.getpid())
    deadline = time.monotonic() + opts.time_limit
    session: Session | None = None
    runner = Runner(f"{system}-{wl.name}")
    try:
        log.info("%s: starting", tag)
        t0 = time.perf_counter()
        session = runner.call(lambda: start(wl.kind, workers, deadline, opts), deadline, "start-up")
        result["startup_s"] = round(time.perf_counter() - t0, 4)
        result["params"] = session.params
        active = session
        checks: list[workloads.Check] = []
        # Some systems' producers put the inputs somewhere of their own (untimed, as making them
        # is); the originals are let go.
        inputs = runner.call(lambda: active.prepare(inputs), deadline, "preparing the inputs")
        warm_inputs = runner.call(
            lambda: active.prepare(warm_inputs), deadline, "preparing the warm-up inputs"
        )

        def run(items: list[Any]) -> tuple[float, list[Any], list[float]]:
            latencies: list[float] = []
            if wl.name == "latency":
                out = []
                t_start = time.perf_counter()
                for item in items:
                    t = time.perf_counter_ns()
                    out.append(active.run_one(item, deadline))
                    latencies.append((time.perf_counter_ns() - t) / 1000)
                return time.perf_counter() - t_start, out, latencies
            t_start = time.perf_counter()
            out = active.run_batch(items, deadline)
            return time.perf_counter() - t_start, out, latencies

        _, warm_out, _ = runner.call(lambda: run(warm_inputs), deadline, "warm-up")
        check = wl.check(warm_inputs, warm_out)
        if not check.passed:
            raise RunFailed(f"correctness check failed in warm-up: {check.detail}")
        walls: list[float] = []
        cpus: list[dict[str, float | None]] = []
        all_latencies: list[float] = []
        for rep in range(opts.repeats):
            before = cpu_snapshot(session, preexisting, after=False)
            wall, out, latencies = runner.call(lambda: run(inputs), deadline, f"repeat {rep + 1}")
            after = cpu_snapshot(session, preexisting, after=True)
            check = wl.check(inputs, out)
            checks.append(check)
            if not check.passed:
                raise RunFailed(f"correctness check failed in repeat {rep + 1}: {check.detail}")
            walls.append(wall)
            cpus.append(cpu_delta(before, after))
            all_latencies.extend(latencies)
            log.info("%s: repeat %d/%d %.0f tasks/s", tag, rep + 1, opts.repeats, n / wall)
            del out
        _summarise(result, wl, workers, walls, cpus, all_latencies, checks)
        if hasattr(session, "statistics"):
            result["params"]["library_statistics"] = session.statistics()
    finally:
        if session is not None:
            closing = session
            try:
                runner.call(closing.close, time.monotonic() + 30, "clean-up")
            except Exception as exc:
                log.warning("%s: clean-up failed: %s", tag, exc)
        runner.stop()
        kill_leftovers(preexisting)


def _summarise(
    result: dict[str, Any],
    wl: workloads.Workload,
    workers: int,
    walls: list[float],
    cpus: list[dict[str, float | None]],
    latencies: list[float],
    checks: list[workloads.Check],
) -> None:
    n = result["n"]
    rates = [n / w for w in walls]
    median_rate = statistics.median(rates)
    result["rate_per_s"] = round(median_rate, 2)
    result["rate_runs"] = [round(r, 2) for r in rates]
    result["rate_spread_pct"] = round((max(rates) - min(rates)) / median_rate * 100, 1)
    result["wall_s_runs"] = [round(w, 4) for w in walls]
    per_task: dict[str, float | None] = {}
    for part in ("caller", "workers", "redis"):
        values = [c[part] for c in cpus]
        nums = [v for v in values if v is not None]
        per_task[part] = round(statistics.median(nums) / n * 1e6, 1) if nums else None
    totals = [sum(v for v in c.values() if v is not None) for c in cpus]
    per_task["total"] = round(statistics.median(totals) / n * 1e6, 1)
    result["cpu_us_per_task"] = per_task
    result["check"] = {
        "passed": all(c.passed for c in checks),
        "checked": sum(c.checked for c in checks),
        "detail": checks[-1].detail,
    }
    if latencies:
        latencies.sort()
        result["latency_us"] = {
            "p50": round(percentile(latencies, 50), 1),
            "p99": round(percentile(latencies, 99), 1),
            "max": round(latencies[-1], 1),
            "samples": len(latencies),
        }
    if wl.name == "sleep":
        ideal = workers / workloads.SLEEP_S
        result["ideal_rate_per_s"] = ideal
        result["efficiency"] = round(median_rate / ideal, 3)


__all__ = ["DEFAULT_REDIS_URL", "HarnessOptions", "run_case"]
