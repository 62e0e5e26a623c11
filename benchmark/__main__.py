"""Command line: ``python -m benchmark --system S --workload W`` or ``--all``.

One JSON line per run goes to stdout; progress goes to stderr.  A single case runs in this
process; several cases (and ``--all``) run each case in its own child process, which is killed
(with everything it started) if it overruns its time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmark import machine, report, workloads
from benchmark.harness import HarnessOptions, base_result, run_case
from benchmark.systems import DEFAULT_REDIS_URL, SYSTEMS

log = logging.getLogger("benchmark")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Round trips with nothing but the kernel in between: the floor of the latency workload.
FLOOR_SYSTEMS = ("echo-socketpair", "echo-tcp")
CHILD_GRACE_S = 60.0


def add_run_options(parser: argparse.ArgumentParser, *, n_help: str) -> None:
    """The options every benchmark entry point shares: repeats, size, smoke run, time limit."""
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    parser.add_argument("--n", type=int, default=None, help=n_help)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="limit per run, start-up included (default 300)",
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark",
        description=(
            "Benchmark pytaskqml against multiprocessing and Celery+Redis (and Ray/Dask when "
            "importable). Prints one JSON line per run on stdout, progress on stderr."
        ),
        epilog=(
            f"systems: {', '.join(SYSTEMS)}. workloads: {', '.join(workloads.WORKLOADS)}. "
            "Both options take comma-separated names or 'all'. Example: "
            "python -m benchmark --system mp-imap,celery --workload wordcount"
        ),
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="every system x workload at default sizes; writes results.md and PNG plots to --out",
    )
    parser.add_argument("--system", action="append", metavar="S", help="system(s) to run")
    parser.add_argument("--workload", action="append", metavar="W", help="workload(s) to run")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes per system (default 2; the sleep workload defaults to 1,2,4,8,16)",
    )
    add_run_options(parser, n_help="tasks per repeat (overrides the workload's default size)")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help=f"Redis for Celery, with its own DB number (default {DEFAULT_REDIS_URL})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="where --all (or --write-report) writes results (default %(default)s)",
    )
    parser.add_argument(
        "--write-report",
        action="store_true",
        help="also write results.md and plots for a run without --all",
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        metavar="RAW.json",
        help="only rewrite results.md and plots from a raw JSON file",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run all cases in this process instead of one child per case",
    )
    parser.add_argument(
        "--scrape",
        action="store_true",
        help="pytaskqml systems: serve the control endpoint and read /metrics and /status "
        "once a second during each run",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="less progress output")
    return parser.parse_args(argv)


def pick(values: list[str] | None, valid: list[str], what: str) -> list[str]:
    names: list[str] = []
    unknown: list[str] = []
    for value in values or []:
        for part in (p.strip() for p in value.split(",")):
            if part == "all":
                names.extend(v for v in valid if v not in names)
            elif part in valid:
                if part not in names:
                    names.append(part)
            else:
                unknown.append(part)
    if unknown:
        fail(
            f"unknown {what} {', '.join(map(repr, unknown))}; valid {what}s: "
            f"{', '.join(valid)} (or 'all')"
        )
    return names


def fail(message: str) -> None:
    print(f"python -m benchmark: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def cases(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    if args.all:
        systems, names = list(SYSTEMS), list(workloads.WORKLOADS)
    else:
        systems = pick(args.system, list(SYSTEMS), "system")
        names = pick(args.workload, list(workloads.WORKLOADS), "workload")
        if not systems or not names:
            fail("give --system and --workload (names or 'all'), or --all; see --help")
    out = []
    for name in names:
        counts = [args.workers or 2]
        if name == "sleep" and args.workers is None:
            counts = list(workloads.SCALING_WORKERS)
        if name == "latency":
            # The echo loops are the floor the others are read against: they run first and
            # again last, so a machine that got busier (or quieter) meanwhile shows.
            floors = [s for s in systems if s in FLOOR_SYSTEMS]
            others = [s for s in systems if s not in FLOOR_SYSTEMS]
            if floors and others:
                out += [(s, name, count) for count in counts for s in floors + others + floors]
                continue
        out += [(system, name, count) for count in counts for system in systems]
    return out


def child_command(args: argparse.Namespace, system: str, name: str, workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "benchmark", "--system", system, "--workload", name]
    cmd += ["--workers", str(workers), "--repeats", str(args.repeats)]
    cmd += ["--time-limit", str(args.time_limit), "--seed", str(args.seed)]
    cmd += ["--redis-url", args.redis_url]
    if args.n is not None:
        cmd += ["--n", str(args.n)]
    if args.quick:
        cmd.append("--quick")
    if args.quiet:
        cmd.append("--quiet")
    if args.scrape:
        cmd.append("--scrape")
    return cmd


def run_child(
    args: argparse.Namespace, opts: HarnessOptions, case: tuple[str, str, int]
) -> dict[str, Any]:
    """Run one case in a child process (its own session); kill its group if it overruns."""
    system, name, workers = case
    proc = subprocess.Popen(
        child_command(args, system, name, workers),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    limit = args.time_limit + CHILD_GRACE_S
    try:
        stdout, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        stdout = b""
        failure = f"killed after {limit:.0f} s: the run did not stop at its own time limit"
    else:
        failure = f"child exited with code {proc.returncode} without a result (see stderr)"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything the child left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            result = json.loads(line)
            if isinstance(result, dict) and result.get("system") == system:
                return result
    result = base_result(system, name, workers, opts)
    result.update(status="failed", error=failure, machine=machine.describe(args.redis_url))
    return result


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="[bench %(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # The libraries under test log each worker attach/leave at INFO: keep progress readable.
    for noisy in ("pytaskqml", "distributed", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_counts(args: argparse.Namespace) -> None:
    for flag, value in (("--repeats", args.repeats), ("--workers", args.workers), ("--n", args.n)):
        if value is not None and value < 1:
            fail(f"{flag} must be at least 1")


def harness_options(args: argparse.Namespace) -> HarnessOptions:
    return HarnessOptions(
        redis_url=args.redis_url,
        repeats=args.repeats,
        time_limit=args.time_limit,
        seed=args.seed,
        n=args.n,
        quick=args.quick,
        scrape=args.scrape,
    )


def run_cases(args: argparse.Namespace, todo: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """Run the cases (each in its own child when there are several), printing one JSON line
    per run on stdout as it finishes; return the results."""
    opts = harness_options(args)
    isolate = len(todo) > 1 and not args.in_process
    t0 = time.monotonic()
    results = []
    for i, case in enumerate(todo, 1):
        system, name, workers = case
        log.info(
            "[%d/%d] %s / %s / %d workers (%.0f s elapsed)",
            i,
            len(todo),
            system,
            name,
            workers,
            time.monotonic() - t0,
        )
        result = run_child(args, opts, case) if isolate else run_case(system, name, workers, opts)
        results.append(result)
        print(json.dumps(result, sort_keys=False), flush=True)
    log.info(
        "%d runs: %d ok, %d skipped, %d failed in %.0f s",
        len(results),
        sum(r["status"] == "ok" for r in results),
        sum(r["status"] == "skipped" for r in results),
        sum(r["status"] == "failed" for r in results),
        time.monotonic() - t0,
    )
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.quiet)
    if args.report_from:
        doc = json.loads(args.report_from.read_text())
        report.write(doc, args.out)
        return 0
    check_counts(args)
    todo = cases(args)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    results = run_cases(args, todo)
    elapsed = time.monotonic() - t0
    if args.all or args.write_report:
        write_report(args, argv, started, elapsed, results)
    summary = latency_summary(results)
    if summary:
        print(summary, file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in results) else 0


def latency_summary(results: list[dict[str, Any]]) -> str:
    """The latency runs as a table, each system's p50/p99 also as a multiple of the floor: the
    better (lower p50) of the echo loops' runs in this invocation. Empty without both."""
    lat = [r for r in results if r["workload"] == "latency" and r.get("latency_us")]
    floors = [r for r in lat if r["system"] in FLOOR_SYSTEMS]
    if not floors or len(floors) == len(lat):
        return ""
    best = min(floors, key=lambda r: r["latency_us"]["p50"])
    p50_floor, p99_floor = best["latency_us"]["p50"], best["latency_us"]["p99"]
    lines = [
        f"round trips, µs (floor: {best['system']} p50 {p50_floor:.1f} / p99 {p99_floor:.1f}, "
        "the better of the echo runs before and after)",
        f"{'system':<22} {'p50':>8} {'p99':>8} {'p50/floor':>10} {'p99/floor':>10}",
    ]
    for r in lat:
        p50, p99 = r["latency_us"]["p50"], r["latency_us"]["p99"]
        lines.append(
            f"{r['system']:<22} {p50:>8.1f} {p99:>8.1f} {p50 / p50_floor:>9.1f}x "
            f"{p99 / p99_floor:>9.1f}x"
        )
    return "\n".join(lines)


def write_report(
    args: argparse.Namespace,
    argv: list[str] | None,
    started: datetime.datetime,
    elapsed: float,
    results: list[dict[str, Any]],
) -> None:
    doc = {
        "command": "python -m benchmark " + shlex.join(sys.argv[1:] if argv is None else argv),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": elapsed,
        "default_workers": args.workers or 2,
        "repeats": args.repeats,
        "machine": machine.describe(args.redis_url),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(doc, indent=1)
    (args.out / f"raw-{started.strftime('%Y%m%d-%H%M%S')}.json").write_text(raw)
    (args.out / "latest.json").write_text(raw)
    report.write(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
