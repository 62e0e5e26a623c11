"""Pools that size themselves: grow while work waits, shrink after idling, lose nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sample_workers import Pid, Sleepy

from pytaskqml import Coordinator

T = 60.0


def phases() -> Iterator[list[Any]]:
    """Busy, quiet (the producer has nothing for a while), busy, quiet, a fast tail."""
    i = 0
    for count, delay, pause in ((1500, 0.005, 1.5), (1500, 0.005, 1.5), (7000, 0.0, 0.0)):
        for _ in range(count):
            yield [i, delay]
            i += 1
        time.sleep(pause)  # the source pauses: workers go idle


@pytest.mark.slow
def test_an_ordered_map_across_scale_ups_and_downs_loses_and_repeats_nothing() -> None:
    with Coordinator() as coord:
        coord.spawn(Pid, processes=(1, 6), scale_up_wait=0.1, scale_down_idle=0.5)
        out = list(coord.map(phases()))
        stats = coord.statistics()
    assert [o[0] for o in out] == list(range(10_000))  # each once, in order
    assert stats.scale_ups >= 2 and stats.scale_downs >= 1, stats
    assert len({o[1] for o in out}) > 1  # more than one process did the work
    assert stats.failed == 0 and stats.retried == 0  # nobody let go held work


@pytest.mark.slow
def test_a_burst_grows_a_process_pool_and_idleness_shrinks_it_back() -> None:
    with Coordinator() as coord:
        coord.spawn(Sleepy, processes=(1, 3), scale_up_wait=0.1, scale_down_idle=0.3)
        assert len(coord.workers) == 1
        futures = [coord.submit(0.02) for _ in range(300)]
        assert coord.wait_until(lambda s: len(s.workers) == 3, T)
        assert [f.result(T) for f in futures] == [0.02] * 300
        assert coord.wait_until(lambda s: len(s.workers) == 1 and s.scale_downs == 2, T)
        stats = coord.statistics()
    assert stats.scale_ups == 2 and stats.workers_lost == 0 and stats.restarts == 0


def test_a_thread_pool_grows_and_shrinks() -> None:
    with Coordinator() as coord:
        handle = coord.add_local(Sleepy(), threads=(1, 4), scale_up_wait=0.05, scale_down_idle=0.2)
        futures = [coord.submit(0.01) for _ in range(400)]
        assert coord.wait_until(lambda s: s.scale_ups >= 1, T)
        assert [f.result(T) for f in futures] == [0.01] * 400
        assert coord.wait_until(lambda s: s.scale_downs >= 1, T)
        assert coord.wait_until(lambda s: s.scale_downs >= s.scale_ups, T)
        assert handle.size == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", [(0, 2), (3, 2), (1.5, 2), "two"])
def test_pool_bounds_are_checked(bad: Any) -> None:
    with Coordinator() as coord, pytest.raises(ValueError, match="min"):
        coord.spawn(Sleepy, processes=bad)
