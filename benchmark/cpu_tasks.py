"""Functions the scheduling benchmark (:mod:`benchmark.scheduling`) runs in worker processes:
in a module of their own, so that workers import them by name."""

from __future__ import annotations

import math
import os
import time

# The primes example of the Python documentation's concurrent.futures page.
PRIMES = [
    112272535095293,
    112582705942171,
    112272535095293,
    115280095190773,
    115797848077099,
    1099726899285419,
]


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n == 2:
        return True
    if n % 2 == 0:
        return False
    sqrt_n = int(math.floor(math.sqrt(n)))  # noqa: RUF046 - the example as the docs write it
    for i in range(3, sqrt_n + 1, 2):  # noqa: SIM110
        if n % i == 0:
            return False
    return True


def prime_and_pid(n: int) -> tuple[bool, int]:
    return is_prime(n), os.getpid()


def sleep_for(seconds: float) -> int:
    """Wait *seconds*; returns the pid that ran it."""
    time.sleep(seconds)
    return os.getpid()


def spin_for(seconds: float) -> int:
    """Keep a CPU busy for *seconds*; returns the pid that ran it."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return os.getpid()


def quick(x: int) -> int:
    return x


def frame(item: list[float]) -> float:
    """*item* is ``[put_time, seconds]``: a frame of *seconds* of CPU work; returns *put_time*
    (``time.monotonic()`` when the producer put it, one clock for every process here), so the
    consumer knows its lag."""
    spin_for(item[1])
    return item[0]
