"""Fixed-bucket histograms of durations: :class:`Histogram` (counted into under the engine's
lock) and :class:`HistogramSnapshot` (what statistics and ``/metrics`` carry).

The scheduler counts every task's queue wait and latency, so counting must cost next to
nothing: one ``bisect`` into a short tuple of bounds and an integer increment, no allocation,
no clock. The hot paths do that inline (``counts[bucket(seconds)] += n``, the sum added once per
call; see :mod:`._scheduler`); :meth:`Histogram.observe` is the same for everyone else.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from functools import partial

# Upper bounds in seconds, 100 us to 10 s in 1-2.5-5 steps; a last bucket takes the rest.
# (Prometheus buckets are "less than or equal": bisect_left finds the first bound >= value.)
DURATION_BOUNDS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# The bucket of a duration under DURATION_BOUNDS: bucket(seconds) -> index into counts.
bucket = partial(bisect_left, DURATION_BOUNDS)


class Histogram:
    """Counts per bucket (``counts[i]``: values in ``(bounds[i-1], bounds[i]]``, the last one
    above every bound) and their sum. Not thread-safe: its owner holds a lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, weight: int = 1) -> None:
        """Count *value* *weight* times (a chunk's items share one duration)."""
        self.counts[bisect_left(self.bounds, value)] += weight
        self.sum += value * weight

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.sum)


@dataclass(frozen=True)
class HistogramSnapshot:
    """A histogram as of a moment: ``bounds`` (seconds), ``counts`` per bucket (one more than
    bounds: the last counts values above every bound), ``sum`` of the values counted."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        """How many durations were counted."""
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        """Counts of values <= each bound, then of all values (Prometheus' ``le`` buckets)."""
        out: list[int] = []
        total = 0
        for c in self.counts:
            total += c
            out.append(total)
        return out

    def minus(self, earlier: HistogramSnapshot) -> HistogramSnapshot:
        """What was counted since *earlier* (a snapshot of the same histogram)."""
        return HistogramSnapshot(
            self.bounds,
            tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True)),
            self.sum - earlier.sum,
        )

    def plus(self, other: HistogramSnapshot) -> HistogramSnapshot:
        """Both counted together (*other* with the same bounds)."""
        return HistogramSnapshot(
            self.bounds,
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            self.sum + other.sum,
        )

    def quantile(self, q: float) -> float | None:
        """An estimate of the *q*-quantile (0..1), interpolated within its bucket; ``None``
        when nothing was counted. Values above the last bound are reported as that bound."""
        total = self.count
        if total <= 0:
            return None
        rank = q * total
        seen = 0
        for i, c in enumerate(self.counts):
            if c and seen + c >= rank:
                if i >= len(self.bounds):
                    return self.bounds[-1]
                low = self.bounds[i - 1] if i else 0.0
                return low + (self.bounds[i] - low) * max(0.0, rank - seen) / c
            seen += c
        return self.bounds[-1]
