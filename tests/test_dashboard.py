"""The status page's history: rates and latency per interval from snapshots taken a second
apart (given, here, on a made-up clock)."""

from __future__ import annotations

import dataclasses

import pytest
from sample_workers import Echo

from pytaskqml import Coordinator, Statistics
from pytaskqml.core.histogram import Histogram
from pytaskqml.observe.dashboard import History, status_document


def snapshots() -> tuple[Statistics, Statistics, Statistics]:
    with Coordinator() as coord:
        coord.add_local(Echo())
        base = coord.statistics()
    (w,) = base.workers
    lat = Histogram()

    def at(completed: int, latency: float, n: int) -> Statistics:
        lat.observe(latency, n)
        worker = dataclasses.replace(w, completed=completed)
        return dataclasses.replace(
            base, completed=completed, workers=(worker,), latency=lat.snapshot(), queued=7
        )

    return at(0, 0.001, 0), at(100, 0.003, 100), at(400, 0.2, 300)


def test_history_gives_rates_and_latency_per_interval() -> None:
    s0, s1, s2 = snapshots()
    h = History(seconds=60, interval=1.0)
    h.add(s0, 10.0)
    h.add(s1, 11.0)
    h.add(s2, 13.0)
    series = h.series(now=13.5)
    assert series["t"] == [-2.5, -0.5]
    assert series["throughput"] == [100.0, 150.0]  # 100 items in 1 s, 300 in 2 s
    p50 = series["latency_p50"]
    assert 0.0025 < p50[0] <= 0.005 and 0.1 < p50[1] <= 0.25  # each interval its own results
    assert series["queued"] == [7, 7]
    total, per = h.rate(s2, now=13.0)
    assert total == pytest.approx(400 / 3) and per[s2.workers[0].name] == pytest.approx(400 / 3)


def test_rates_wait_for_half_a_second_of_history_and_old_samples_leave() -> None:
    s0, s1, s2 = snapshots()
    h = History(seconds=2, interval=1.0)  # keeps 3 samples
    h.add(s0, 0.0)
    assert h.rate(s0, now=0.2) == (None, {})
    for t in (1.0, 2.0, 3.0):
        h.add(s1, t)
    assert len(h.series(now=3.0)["t"]) == 2  # the oldest sample is gone
    doc = status_document(s2, h, name="c", with_history=False)
    assert (
        "history" not in doc
        and doc["queued"] == 7
        and doc["workers"][0]["host"] == ("this process")
        and doc["sources"] == []
    )
    assert doc["throughput"] is None  # its samples are long past on the real clock
