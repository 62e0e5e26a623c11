"""The frames workload against its ceilings: ``python -m benchmark.frames``.

The issue asks whether pytaskqml moves 640x480 BGR frames fast enough (target: >= 2,000
frames/s with 2 workers) and how far it is from what the hardware allows.  So next to
pytaskqml's ordered ``map()`` (shared memory on, and off) and the multiprocessing pools this
runs the two reference points the issue quotes, through the same harness (start-up excluded,
warm-up, repeats, results checked against a local reference, CPU read from /proc):

* ``compute-only``: the task function alone in 2 forked processes that inherit the frames, with
  no transport at all - the ceiling (its fork is inside the timed batch; the table's note gives
  the children's compute time alone as well);
* ``raw-socket``: a bare loop sending each frame's raw bytes over a socketpair and reading an
  8-byte float back - what any socket-based queue has to beat.

Each case runs in its own child process (as ``python -m benchmark`` does with several cases);
one JSON line per run goes to stdout, progress and, at the end, a readable table to stderr.

``--sizes`` instead measures pytaskqml's ordered ``map()`` on buffers of 16 KiB to 4 MiB whose
``process()`` reads one byte, with shared memory and over the socket: the data behind the
64 KiB threshold above which the library sends buffers through shared memory
(``pytaskqml.buffers.shm.MIN_BYTES``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

from benchmark import __main__ as bench
from benchmark import procstat
from benchmark.harness import call_with_deadline, kill_leftovers
from benchmark.systems import SYSTEMS, PytaskqmlSession, RunFailed

log = logging.getLogger("benchmark")

FRAME_SYSTEMS = (
    "compute-only",
    "raw-socket",
    "pytaskqml-map",
    "pytaskqml-map-buffer",
    "pytaskqml-map-socket",
    "pytaskqml-threads",
    "mp-imap",
    "mp-imap-1",
)
TARGET_FPS = 2_000.0
DEFAULT_N = 2_000

KIB = 1024
MIB = 1024 * KIB
SIZES = (16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, MIB, 4 * MIB)
SIZE_TARGET_S = 0.5  # wall time aimed at per timed --sizes batch (between ~0.3 and ~1 s)
SIZE_MAX_TASKS = 50_000
DISTINCT_BUFFERS = 16  # cycled through, so that the larger sizes do not all sit in the cache


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.frames",
        allow_abbrev=False,  # unknown options go on to `python -m benchmark`: no prefix guessing
        description=(
            "Frames workload (640x480x3 uint8, grayscale + 5x5 Gaussian blur) on the systems\n"
            "below (and celery with --celery), 2 workers each. One JSON line per run on stdout;\n"
            "progress and a summary table on stderr. With --sizes: pytaskqml map() throughput\n"
            "per buffer size, shared memory vs socket (the data behind the 64 KiB threshold)."
        ),
        epilog="systems:\n"
        + "".join(f"  {name:<22}{SYSTEMS[name].label}\n" for name in FRAME_SYSTEMS)
        + "\nOther options (--seed, --in-process, --redis-url, --write-report, --out) go to\n"
        "python -m benchmark; see its --help.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--celery", action="store_true", help="also run celery (needs Redis)")
    parser.add_argument(
        "--sizes",
        action="store_true",
        help="instead: pytaskqml map() throughput per buffer size, shared memory vs socket",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    bench.add_run_options(parser, n_help=f"frames per repeat (default {DEFAULT_N})")
    parser.add_argument("-q", "--quiet", action="store_true", help="less progress output")
    return parser.parse_known_args(argv)


def benchmark_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The equivalent ``python -m benchmark`` command line."""
    systems = [*FRAME_SYSTEMS, *(["celery"] if args.celery else [])]
    argv = ["--system", ",".join(systems), "--workload", "frames"]
    argv += ["--workers", str(args.workers), "--repeats", str(args.repeats)]
    argv += ["--time-limit", str(args.time_limit)]
    if args.n is not None or not args.quick:
        argv += ["--n", str(args.n if args.n is not None else DEFAULT_N)]
    if args.quick:
        argv.append("--quick")
    if args.quiet:
        argv.append("--quiet")
    return [*argv, *extra]


def run(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    for option in ("--system", "--workload", "--all", "--report-from"):
        if any(e == option or e.startswith(option + "=") for e in extra):
            bench.fail(f"{option} is not for benchmark.frames (it picks the frames systems)")
    if args.sizes:
        if extra:
            bench.fail(f"--sizes does not take {' '.join(extra)}")
        return run_sizes(args)
    full = benchmark_argv(args, extra)
    bargs = bench.parse_args(full)
    bench.setup_logging(bargs.quiet)
    bench.check_counts(bargs)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    results = bench.run_cases(bargs, bench.cases(bargs))
    if bargs.write_report:
        bench.write_report(bargs, full, started, time.monotonic() - t0, results)
    print(frames_table(results), file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in results) else 0


# --- the frames table ---------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _note(r: dict[str, Any]) -> str:
    params = r.get("params") or {}
    if r["system"] == "compute-only" and params.get("fork_s") is not None:
        note = f"fork {params['fork_s'] * 1000:.0f} ms per batch (timed)"
        if params.get("compute_s"):
            rate = r["n"] / params["compute_s"]
            note += f"; task alone {params['compute_s'] * 1000:.0f} ms = {rate:,.0f} frames/s"
        return note
    buffers = (params.get("library_statistics") or {}).get("buffers") or {}
    if params.get("inputs") and buffers:
        return f"frames in coord.buffer() arrays: {buffers['lent']:,} sent without a copy"
    if "shared_memory" in params and r["system"] != "pytaskqml-threads":
        if not params["shared_memory"]:
            return "shared memory off"
        buffers, fallbacks = params.get("shared_buffers"), params.get("shared_fallbacks")
        if buffers is None:
            return "shared memory on, but no worker has a segment"
        return f"shared memory: {buffers:,} buffers, {fallbacks:,} over the socket"
    return ""


def frames_table(results: list[dict[str, Any]]) -> str:
    first = results[0] if results else {}
    lines = [
        "",
        f"frames: 640x480x3 uint8, grayscale + 5x5 Gaussian blur + mean; "
        f"{first.get('workers')} workers, {first.get('n')} frames per repeat, "
        f"{first.get('repeats')} repeats (median; spread = (max - min) / median)",
        f"{'system':<22}{'frames/s':>10}{'spread':>8}  {'CPU us/frame caller/workers/total':<36}"
        f"{'check':<7}notes",
    ]
    for r in results:
        if r["status"] != "ok":
            why = r.get("skip_reason") or r.get("error") or "?"
            lines.append(f"{r['system']:<22}{r['status'].upper():>10}  {why}")
            continue
        cpu = r["cpu_us_per_task"]
        cpu_text = f"{_num(cpu['caller'])} / {_num(cpu['workers'])} / {_num(cpu['total'])}"
        check = "pass" if r["check"]["passed"] else "FAIL"
        lines.append(
            f"{r['system']:<22}{_num(r['rate_per_s']):>10}{r['rate_spread_pct']:>7.1f}%  "
            f"{cpu_text:<36}{check:<7}{_note(r)}"
        )
    lines.append(verdict(results))
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> str:
    rate = {r["system"]: r["rate_per_s"] for r in results if r["status"] == "ok"}
    mine = rate.get("pytaskqml-map")
    if mine is None:
        return "pytaskqml-map did not complete: no verdict on the 2,000 frames/s target."
    reached = "reached" if mine >= TARGET_FPS else "did NOT reach"
    text = f"pytaskqml-map: {mine:,.0f} frames/s, {reached} the target of >= {TARGET_FPS:,.0f}"
    text += " frames/s"
    for name in ("raw-socket", "compute-only", "pytaskqml-map-socket"):
        if name in rate:
            text += f"; {mine / rate[name]:.0%} of {name} ({rate[name]:,.0f} frames/s)"
    if not any(r["n"] >= 500 for r in results if r["system"] == "pytaskqml-map"):
        text += " (tiny n: rates are not meaningful)"
    zero = rate.get("pytaskqml-map-buffer")
    if zero is not None and "compute-only" in rate:
        text += (
            f" Frames produced into coord.buffer(): {zero:,.0f} frames/s, "
            f"{zero / rate['compute-only']:.0%} of compute-only"
        )
    return text + "."


# --- --sizes: the shared-memory threshold -------------------------------------------------------


@contextlib.contextmanager
def shared_threshold(nbytes: int | None) -> Iterator[None]:
    """Temporarily set the library's shared-memory threshold (None: leave it), so that the
    shared-memory path can be timed below the 64 KiB it normally starts at."""
    from pytaskqml.buffers import shm as _shm

    if nbytes is None or not hasattr(_shm, "MIN_BYTES"):
        yield
        return
    saved = _shm.MIN_BYTES
    _shm.MIN_BYTES = nbytes
    try:
        yield
    finally:
        _shm.MIN_BYTES = saved


def measure_size(
    size: int,
    shared: bool,
    workers: int,
    repeats: int,
    time_limit: float,
    target_s: float = SIZE_TARGET_S,
) -> dict[str, Any]:
    """Time ordered ``map()`` over ``size``-byte uint8 arrays with spawned TouchWorkers.

    The task count is calibrated so that one timed batch takes about ``target_s``.  With
    ``shared`` every buffer goes through shared memory, whatever its size (the threshold is
    lowered for the run); without it the Coordinator sends everything over the socket.
    """
    import numpy as np

    from benchmark.pt_workers import TouchWorker
    from pytaskqml import Coordinator

    result: dict[str, Any] = {
        "mode": "sizes",
        "size_bytes": size,
        "transport": "shared memory" if shared else "socket",
        "workers": workers,
        "repeats": repeats,
        "status": "ok",
        "error": None,
    }
    deadline = time.monotonic() + time_limit
    bufs = [np.full(size, i, dtype=np.uint8) for i in range(DISTINCT_BUFFERS)]
    coord = Coordinator(shared_memory=shared)

    def batch(k: int) -> float:
        items = [bufs[i % DISTINCT_BUFFERS] for i in range(k)]
        t0 = time.perf_counter()
        out = list(coord.map(items, buffersize=PytaskqmlSession.BUFFERSIZE))
        wall = time.perf_counter() - t0
        if out != [i % DISTINCT_BUFFERS for i in range(k)]:
            raise RunFailed(f"{size}-byte buffers: wrong or misordered results")
        return wall

    try:
        with shared_threshold(1 if shared else None):
            coord.spawn(TouchWorker, processes=workers, timeout=min(60.0, time_limit))
            pids = {w.pid for w in coord.statistics().workers if w.pid is not None}
            k, wall = 16, 0.0
            while wall < target_s / 5 and k < SIZE_MAX_TASKS:  # warm-up and calibration
                k *= 2
                wall = call_with_deadline(functools.partial(batch, k), deadline, "calibration")
            k = max(64, min(SIZE_MAX_TASKS, round(k / wall * target_s)))
            walls, cpus = [], []
            for rep in range(repeats):
                caller, procs = procstat.self_cpu_seconds(), procstat.cpu_seconds(pids)
                walls.append(
                    call_with_deadline(functools.partial(batch, k), deadline, f"repeat {rep + 1}")
                )
                after = procstat.cpu_seconds(pids)
                cpus.append(
                    (
                        procstat.self_cpu_seconds() - caller,
                        sum(cpu - procs.get(pid, 0.0) for pid, cpu in after.items()),
                    )
                )
            stats = coord.statistics().workers
        rates = [k / w for w in walls]
        rate = statistics.median(rates)
        caller_us = statistics.median(c for c, _ in cpus) / k * 1e6
        workers_us = statistics.median(w for _, w in cpus) / k * 1e6
        with_segment = [w for w in stats if w.shared_buffers is not None]
        result.update(
            tasks=k,
            rate_per_s=round(rate, 1),
            rate_runs=[round(r, 1) for r in rates],
            rate_spread_pct=round((max(rates) - min(rates)) / rate * 100, 1),
            mb_per_s=round(rate * size / 1e6, 1),
            cpu_us_per_task={
                "caller": round(caller_us, 1),
                "workers": round(workers_us, 1),
                "total": round(caller_us + workers_us, 1),
            },
            shared_buffers=sum(w.shared_buffers or 0 for w in with_segment)
            if with_segment
            else None,
            shared_fallbacks=sum(w.shared_fallbacks or 0 for w in with_segment)
            if with_segment
            else None,
        )
    except Exception as exc:
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        coord.shutdown(wait=True, cancel_futures=True, timeout=10.0)
    return result


def _size_name(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def run_sizes(args: argparse.Namespace) -> int:
    bench.setup_logging(args.quiet)
    if args.workers < 1 or args.repeats < 1:
        bench.fail("--workers and --repeats must be at least 1")
    sizes = SIZES[::3] if args.quick else SIZES
    target = SIZE_TARGET_S / 10 if args.quick else SIZE_TARGET_S
    preexisting = procstat.descendants(os.getpid())
    rows: dict[int, dict[bool, dict[str, Any]]] = {}
    try:
        for size in sizes:
            for shared in (True, False):
                log.info("--sizes: %s, %s", _size_name(size), "shared" if shared else "socket")
                r = measure_size(size, shared, args.workers, args.repeats, args.time_limit, target)
                if r["status"] != "ok":
                    log.error("FAILED %s: %s", _size_name(size), r["error"])
                rows.setdefault(size, {})[shared] = r
                print(json.dumps(r), flush=True)
    finally:
        kill_leftovers(preexisting)
    print(sizes_table(rows, args.workers, args.repeats), file=sys.stderr)
    failed = any(r["status"] != "ok" for pair in rows.values() for r in pair.values())
    return 1 if failed else 0


def sizes_table(rows: dict[int, dict[bool, dict[str, Any]]], workers: int, repeats: int) -> str:
    """The --sizes table.  A size counts as a clear win for shared memory only when its slowest
    repeat beats the socket's fastest one: on a busy 2-core machine a 10% median difference can
    be noise, and the spread columns show how much."""
    head = f"{'tasks/s':>9} {'spread':>7} {'MB/s':>7} {'CPU us':>8}"
    lines = [
        "",
        f"pytaskqml ordered map(), {workers} spawned workers whose process() reads one byte; "
        f"median of {repeats} repeats; MB = 10^6 bytes; CPU us = caller + workers per task",
        f"{'size':>8} | {'shared memory':^{len(head)}} | {'socket':^{len(head)}} | shared/socket",
        f"{'':>8} | {head} | {head} | {'rate':>6} {'CPU':>6} {'clear':>6}",
    ]
    clear: list[bool] = []
    for size, pair in rows.items():
        cells = []
        for shared in (True, False):
            r = pair.get(shared)
            if r is None or r["status"] != "ok":
                cells.append(f"{'FAILED':>{len(head)}}")
                continue
            cells.append(
                f"{_num(r['rate_per_s']):>9} {r['rate_spread_pct']:>6.1f}% "
                f"{_num(r['mb_per_s']):>7} {_num(r['cpu_us_per_task']['total'], 1):>8}"
            )
        ratio = cpu_ratio = "-"
        shm, sock = pair.get(True), pair.get(False)
        won = False
        if shm and sock and shm["status"] == sock["status"] == "ok":
            ratio = f"{shm['rate_per_s'] / sock['rate_per_s']:.2f}x"
            shm_cpu, sock_cpu = shm["cpu_us_per_task"]["total"], sock["cpu_us_per_task"]["total"]
            cpu_ratio = f"{shm_cpu / sock_cpu:.2f}x" if sock_cpu else "-"
            won = min(shm["rate_runs"]) > max(sock["rate_runs"])
        clear.append(won)
        lines.append(
            f"{_size_name(size):>8} | {cells[0]} | {cells[1]} | {ratio:>6} {cpu_ratio:>6} "
            f"{'yes' if won else 'no':>6}"
        )
    from pytaskqml.buffers import shm as _shm

    threshold = getattr(_shm, "MIN_BYTES", None)
    now = f"{threshold:,} bytes" if threshold is not None else "not found"
    sizes = list(rows)
    from_here = next((i for i in range(len(clear)) if all(clear[i:])), None)
    if from_here is None:
        lines.append("Shared memory is not clearly faster at the largest size measured.")
    else:
        lines.append(
            f"Shared memory is clearly faster (every repeat beats every socket repeat) at each "
            f"size from {_size_name(sizes[from_here])} up; the library's threshold, "
            f"pytaskqml.buffers.shm.MIN_BYTES, is {now}."
        )
    lines.append(
        "(The shared-memory column lowers the threshold to 1 byte for the run, so that sizes "
        "below it are timed through shared memory too; spread = (max - min) / median.)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
