"""Pools that size themselves: ``spawn(Cls, processes=(min, max))``, ``add_local(w,
threads=(min, max))``.

An :class:`Autoscaler` looks at its pool every ``TICK`` seconds (a controller samples: what
it watches - how long work waits, how long workers sit idle - is a matter of time, not of an
event) and decides:

* **grow** when the oldest task waiting for a worker has waited longer than ``scale_up_wait``
  (the pool is starved): by as many workers as it takes to drain what waits within that time,
  from the measured time per item (one, until a result has shown it), never above ``max``;
  no second growth while the workers of the first are still starting;
* **shrink** when nothing waits and one of its workers has had nothing to do for
  ``scale_down_idle`` seconds: that worker stops taking tasks, finishes what it holds, and
  leaves (nothing it held is lost or run twice), never below ``min``.

Every decision is logged (INFO) and counted in ``statistics()`` (``scale_ups``,
``scale_downs``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from ..core.stats import PoolStats
from .engine import Engine
from .handles import WorkerHandle

log = logging.getLogger(__name__)

TICK = 0.2


def bounds(value: Any, what: str) -> tuple[int, int]:
    """``n`` or ``(min, max)`` as a pair; ValueError for anything else."""
    if isinstance(value, tuple | list) and len(value) == 2:
        lo, hi = value
    else:
        lo = hi = value
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{what} must be a positive integer or a (min, max) pair")
    if lo < 1 or lo > hi:
        raise ValueError(f"{what}: need 1 <= min <= max, got {value!r}")
    return lo, hi


class Autoscaler:
    """Keeps one pool between *lo* and *hi* workers (see the module's docstring).

    *members()* are the pool's workers attached now, *starting()* how many are on their way,
    *grow(n)* starts n more, *shrink(handle)* lets one go.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        name: str,
        lo: int,
        hi: int,
        members: Callable[[], list[WorkerHandle]],
        starting: Callable[[], int],
        grow: Callable[[int], None],
        shrink: Callable[[WorkerHandle], None],
        scale_up_wait: float,
        scale_down_idle: float,
        kind: str = "processes",
    ) -> None:
        self.engine = engine
        self.kind = kind
        self.name = name
        self.lo, self.hi = lo, hi
        self._members = members
        self._starting = starting
        self._grow = grow
        self._shrink = shrink
        self.scale_up_wait = scale_up_wait
        self.scale_down_idle = scale_down_idle
        self.ups = 0
        self.downs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"pytaskqml-autoscale-{name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def statistics(self, name: str) -> PoolStats:
        """This pool's numbers now, under *name* (unique among the coordinator's pools)."""
        return PoolStats(
            name=name,
            kind=self.kind,
            workers=len(self._members()),
            starting=self._starting(),
            min=self.lo,
            max=self.hi,
            scale_ups=self.ups,
            scale_downs=self.downs,
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _loop(self) -> None:
        try:
            while not self._stop.wait(TICK):
                self.step(time.perf_counter())
        except BaseException:
            log.exception("autoscaler of %s crashed; the pool keeps its size", self.name)

    def step(self, now: float) -> None:
        """One look at the pool and at most one decision."""
        members = self._members()
        starting = self._starting()
        size = len(members) + starting
        waited, queued, per_item = self.engine.starvation(now)
        if size < self.hi and waited > self.scale_up_wait and starting == 0:
            if per_item is None:
                want = 1
            else:
                want = math.ceil(queued * per_item / self.scale_up_wait) - len(members)
            n = max(1, min(self.hi - size, want))
            log.info(
                "%s: work waited %.2fs (%d queued): adding %d worker(s), %d -> %d",
                self.name, waited, queued, n, size, size + n,
            )  # fmt: skip
            self.ups += n
            self._grow(n)
            self.engine.signal()
            return
        if queued or size <= self.lo:
            return
        idle = [(self.engine.idle_for(h, now), h) for h in members]
        idle = [(t, h) for t, h in idle if t >= self.scale_down_idle]
        if idle:
            quiet, handle = max(idle, key=lambda p: p[0])
            log.info(
                "%s: worker %s idle for %.1fs: letting it go, %d -> %d",
                self.name, handle.name, quiet, size, size - 1,
            )  # fmt: skip
            self.downs += 1
            self._shrink(handle)
            self.engine.signal()


def pool_statistics(scalers: list[Autoscaler]) -> tuple[PoolStats, ...]:
    """Each pool's :class:`PoolStats`; pools of the same worker are told apart by a number
    (``myapp:Model``, ``myapp:Model#2``), so that every pool has a name of its own."""
    seen: dict[str, int] = {}
    out = []
    for a in scalers:
        seen[a.name] = seen.get(a.name, 0) + 1
        n = seen[a.name]
        out.append(a.statistics(a.name if n == 1 else f"{a.name}#{n}"))
    return tuple(out)
