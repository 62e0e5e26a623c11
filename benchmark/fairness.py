"""Many live sources on one pool: fair share, priorities, interrupting stale work.

::

    python -m benchmark.fairness                     # every case
    python -m benchmark.fairness --case sources --seconds 10
    python -m benchmark.fairness --case priority --case interrupt

Two spawned workers doing ``--task-ms`` (20) ms of CPU per frame, about 100 frames/s together.
One JSON line per measurement on stdout, a summary on stderr.

* ``sources``: one stream flooding at ``--flood`` (200) frames/s and three at ``--light`` (10)
  frames/s, each into its own ``coord.stream()``, for ``--seconds``; with ``stream()``'s
  defaults and with ``overflow="drop_oldest"``. Reports each light source's lag (from
  ``put()`` to the result in the consumer) p50/p99 and the total frames/s, against one
  source alone flooding (``alone``: the pool's throughput).
* ``priority``: a ``map()`` of low-priority frames keeps the queue full; every 50 ms a
  ``submit(..., priority=10)`` frame; reports its latency (submission to result) and its wait
  (latency less its own run) p50/p99.
* ``interrupt``: a 10 s task (``Worker`` checking ``self.cancelled()`` only if
  ``--cooperative``) is cancelled 0.5 s after it starts with ``interrupt=GRACE``; reports the
  time from the cancellation until that worker's seat serves a task again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any

import pytaskqml
from benchmark.cpu_tasks import frame


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def run_sources(
    coord: pytaskqml.Coordinator,
    rates: list[float],
    seconds: float,
    task: float,
    overflow: str | None,
) -> dict[str, Any]:
    """One stream per rate, each fed by a producer thread at that rate for *seconds*; the
    lags each consumer saw and the frames/s processed."""
    streams = []
    for i in range(len(rates)):
        try:
            streams.append(coord.stream(overflow=overflow, name=f"src{i}"))  # type: ignore[arg-type]
        except TypeError:  # a version without stream(name=), for a comparison
            streams.append(coord.stream(overflow=overflow))  # type: ignore[arg-type]
    lags: list[list[float]] = [[] for _ in rates]
    done = [0] * len(rates)
    stop_at = time.monotonic() + seconds
    t_start = time.monotonic()

    def produce(i: int) -> None:
        s, period = streams[i], 1.0 / rates[i]
        nxt = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now >= stop_at:
                    break
                if now < nxt:
                    time.sleep(nxt - now)
                s.put([time.monotonic(), task])
                nxt += period
                if time.monotonic() - nxt > 0.5:
                    nxt = time.monotonic()  # blocked by the stream: no catching up in bursts
        finally:
            s.close()

    def consume(i: int) -> None:
        for put_time in streams[i]:
            lags[i].append(time.monotonic() - put_time)
            done[i] += 1

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(len(rates))]
    threads += [threading.Thread(target=consume, args=(i,)) for i in range(len(rates))]
    busy0, count0 = _worker_time(coord)
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.monotonic() - t_start
    busy1, count1 = _worker_time(coord)
    # What a frame took the workers here (on a loaded machine, more than --task-ms of CPU).
    per_frame = (busy1 - busy0) / (count1 - count0) if count1 > count0 else None
    return {"lags": lags, "done": done, "elapsed": elapsed, "per_frame": per_frame}


def _worker_time(coord: pytaskqml.Coordinator) -> tuple[float, int]:
    """The workers' busy seconds and tasks completed so far, all together."""
    ws = coord.statistics().workers
    return sum(w.busy_seconds for w in ws), sum(w.completed for w in ws)


def case_sources(args: argparse.Namespace) -> None:
    task = args.task_ms / 1000
    with pytaskqml.Coordinator() as coord:
        coord.spawn(frame, processes=args.workers)
        coord.wait_workers(args.workers, timeout=60)
        list(coord.map([[time.monotonic(), task]] * 20))  # warm: the time per item is known
        alone = run_sources(coord, [args.flood], args.seconds, task, None)
        alone_fps = sum(alone["done"]) / alone["elapsed"]
        emit({"case": "sources", "mode": "alone", "frames_per_s": round(alone_fps, 1)})
        print(f"one source alone: {alone_fps:.1f} frames/s", file=sys.stderr)
        for overflow in (None, "drop_oldest"):
            r = run_sources(coord, [args.flood] + [args.light] * 3, args.seconds, task, overflow)
            fps = sum(r["done"]) / r["elapsed"]
            light = [lag for lags in r["lags"][1:] for lag in lags]
            row = {
                "case": "sources",
                "mode": overflow or "defaults",
                "light_lag_p50_ms": round((pct(light, 0.5) or 0) * 1000, 1),
                "light_lag_p99_ms": round((pct(light, 0.99) or 0) * 1000, 1),
                "flood_lag_p50_ms": round((pct(r["lags"][0], 0.5) or 0) * 1000, 1),
                "frames_per_s": round(fps, 1),
                "vs_alone": round(fps / alone_fps, 3),
                "done": r["done"],
                "task_ms": args.task_ms,
                "frame_worker_ms": None
                if r["per_frame"] is None
                else round(r["per_frame"] * 1000, 1),
            }
            emit(row)
            per = r["per_frame"]
            times = "" if per is None else f" ({(pct(light, 0.5) or 0) / per:.1f} frame times"
            times += "" if per is None else f" of {per * 1000:.1f} ms measured at the workers)"
            print(
                f"{row['mode']:>12}: light lag p50 {ms(pct(light, 0.5))}{times} p99 "
                f"{ms(pct(light, 0.99))}, flooder p50 {ms(pct(r['lags'][0], 0.5))}; "
                f"{fps:.1f} frames/s ({fps / alone_fps:.1%} of one source alone)",
                file=sys.stderr,
            )
        for s in getattr(coord.statistics(), "sources", ()):
            emit({"case": "sources", "source": s.name, **_fields(s)})


def _fields(s: Any) -> dict[str, Any]:
    return {
        "items_in": s.items_in,
        "processed": s.processed,
        "dropped": s.dropped,
        "lag_p50": s.lag_p50,
        "lag_p99": s.lag_p99,
    }


def case_priority(args: argparse.Namespace) -> None:
    task = args.task_ms / 1000
    with pytaskqml.Coordinator() as coord:
        coord.spawn(frame, processes=args.workers)
        coord.wait_workers(args.workers, timeout=60)
        list(coord.map([[time.monotonic(), task]] * 20))
        # The round trip of a tiny task on an idle pool, for the target.
        rt = []
        for _ in range(20):
            t0 = time.monotonic()
            coord.submit([t0, 0.0]).result(timeout=30)
            rt.append(time.monotonic() - t0)
        stop = threading.Event()
        low_done = [0]

        def low() -> None:
            def items() -> Any:
                while not stop.is_set():
                    yield [time.monotonic(), task]

            for _ in coord.map(items(), priority=0, buffersize=500, chunksize=1):
                low_done[0] += 1

        th = threading.Thread(target=low)
        th.start()
        time.sleep(1.0)  # the queue fills with low-priority frames
        lat = []
        busy0, count0 = _worker_time(coord)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            coord.submit([t0, task], priority=10).result(timeout=30)
            lat.append(time.monotonic() - t0)
            if len(lat) % 20 == 0:
                held = [(w.in_flight, w.round_trip) for w in coord.statistics().workers]
                print(f"  workers' (in flight, round trip): {held}", file=sys.stderr)
            time.sleep(0.05)
        queued = coord.statistics().queued
        busy1, count1 = _worker_time(coord)
        per = (busy1 - busy0) / (count1 - count0) if count1 > count0 else None
        stop.set()
        th.join(60)
        wait = [x - task for x in lat]
        row = {
            "case": "priority",
            "high_latency_p50_ms": round((pct(lat, 0.5) or 0) * 1000, 1),
            "high_latency_p99_ms": round((pct(lat, 0.99) or 0) * 1000, 1),
            "high_wait_p50_ms": round((pct(wait, 0.5) or 0) * 1000, 1),
            "high_wait_p99_ms": round((pct(wait, 0.99) or 0) * 1000, 1),
            "round_trip_p50_ms": round(statistics.median(rt) * 1000, 2),
            "task_ms": args.task_ms,
            "high_tasks": len(lat),
            "low_done": low_done[0],
            "queued_while_measuring": queued,
            # What a frame took the workers meanwhile (more than --task-ms on a loaded machine).
            "frame_worker_ms": None if per is None else round(per * 1000, 1),
        }
        emit(row)
        print(
            f"high priority under a saturated queue ({queued} low-priority waiting): wait p50 "
            f"{row['high_wait_p50_ms']} ms p99 {row['high_wait_p99_ms']} ms (task "
            f"{args.task_ms} ms, {row['frame_worker_ms']} ms measured at the workers; round "
            f"trip {row['round_trip_p50_ms']} ms)",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmark.fairness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--case", action="append", choices=["sources", "priority", "interrupt"], default=None
    )
    p.add_argument("--seconds", type=float, default=5.0, help="length of each run (5)")
    p.add_argument("--workers", type=int, default=2, help="spawned workers (2)")
    p.add_argument("--task-ms", type=float, default=20.0, help="CPU per frame, ms (20)")
    p.add_argument("--flood", type=float, default=200.0, help="flooding source, frames/s")
    p.add_argument("--light", type=float, default=10.0, help="each light source, frames/s")
    p.add_argument("--grace", type=float, default=0.5, help="interrupt grace, s (0.5)")
    p.add_argument(
        "--cooperative",
        action="store_true",
        help="interrupt case: the task checks self.cancelled() (default: it does not)",
    )
    args = p.parse_args(argv)
    cases = args.case or ["sources", "priority", "interrupt"]
    for case in cases:
        {"sources": case_sources, "priority": case_priority, "interrupt": case_interrupt}[case](
            args
        )
    return 0


def case_interrupt(args: argparse.Namespace) -> None:
    from benchmark.interrupt_worker import run_interrupt

    for row in run_interrupt(args.grace, args.cooperative):
        emit({"case": "interrupt", **row})
        print(
            f"interrupt ({'cooperative' if row['cooperative'] else 'stuck'} task, grace "
            f"{row['grace']} s): the worker serves again {row['back_s'] * 1000:.0f} ms after "
            f"the cancellation"
            + (
                f" (process declared lost at {row['lost_s'] * 1000:.0f} ms, its replacement "
                f"serving {row['restart_s'] * 1000:.0f} ms later)"
                if "lost_s" in row
                else ""
            ),
            file=sys.stderr,
        )


if __name__ == "__main__":
    raise SystemExit(main())
