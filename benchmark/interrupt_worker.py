"""Workers and the run of the interrupt case of :mod:`benchmark.fairness` (in a module of
their own, so that spawned workers import them by name)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytaskqml

GRACE = float(os.environ.get("PYTASKQML_BENCH_GRACE", "0.5"))


class Cooperative(pytaskqml.Worker):
    """Checks cancelled() every 5 ms of a *payload*-second task."""

    interrupt_grace = GRACE

    def process(self, payload: Any) -> int:
        end = time.monotonic() + float(payload)
        while time.monotonic() < end and not self.cancelled():
            time.sleep(0.005)
        return os.getpid()


class Stubborn(pytaskqml.Worker):
    """Never looks: a *payload*-second task runs to its end unless the process is replaced."""

    interrupt_grace = GRACE

    def process(self, payload: Any) -> int:
        time.sleep(float(payload))
        return os.getpid()


def run_interrupt(grace: float, cooperative: bool) -> list[dict[str, Any]]:
    """A 10 s task on one spawned worker, cancelled (its stream) 0.5 s after it was sent: the
    time until that seat answers a new task, and whether the process was replaced; for a task
    that does not look, also when the old process was declared lost (``lost_s``: the grace
    and noticing it) and the rest (``restart_s``: starting its replacement)."""
    os.environ["PYTASKQML_BENCH_GRACE"] = str(grace)  # inherited by the spawned worker
    cls = Cooperative if cooperative else Stubborn
    rows = []
    with pytaskqml.Coordinator() as coord:
        (pid,) = coord.spawn(cls, processes=1)
        coord.wait_workers(1, timeout=60)
        coord.submit(0.0).result(timeout=60)
        for _ in range(3):
            stream = coord.stream()
            stream.put(10.0)
            time.sleep(0.5)
            lost_at: list[float] = []
            watch = None
            if not cooperative:
                lost = coord.statistics().workers_lost

                def see_lost(lost: int = lost, out: list[float] = lost_at) -> None:
                    if coord.wait_until(lambda s: s.workers_lost > lost, 30):
                        out.append(time.monotonic())

                watch = threading.Thread(target=see_lost)
                watch.start()
            t0 = time.monotonic()
            stream.cancel("benchmark: no longer wanted")
            served_by = coord.submit(0.0).result(timeout=60)
            back = time.monotonic() - t0
            row: dict[str, Any] = {
                "cooperative": cooperative,
                "grace": grace,
                "back_s": round(back, 3),
                "replaced": served_by != pid,
            }
            if watch is not None:
                watch.join(40)
                if lost_at:
                    row["lost_s"] = round(lost_at[0] - t0, 3)
                    row["restart_s"] = round(back - (lost_at[0] - t0), 3)
            rows.append(row)
            pid = served_by
    return rows
