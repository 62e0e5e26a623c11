"""Workloads: seeded inputs, the task functions every system runs, and the correctness checks.

The task functions are module-level so that multiprocessing, Celery, Ray and Dask can import
them in their worker processes; the pytaskqml Worker classes in ``benchmark.pt_workers`` call
the same functions.  NumPy and OpenCV are imported only by the ``frames`` workload.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WORDS = ("apple", "banana", "cherry", "grape", "kiwi", "orange")
FRAME_SHAPE = (480, 640, 3)
SLEEP_S = 0.010
SCALING_WORKERS = (1, 2, 4, 8, 16)

_cv2: Any = None


def cv2_module() -> Any:
    """Import OpenCV once per process, single-threaded so that N workers use N cores."""
    global _cv2
    if _cv2 is None:
        import cv2

        cv2.setNumThreads(1)
        _cv2 = cv2
    return _cv2


# --- task functions: the work each system's workers do ---------------------------------------


def task_wordcount(word: str) -> dict[str, int]:
    return {word: 1}


def task_frame(frame: Any) -> float:
    return task_frame_blur_mean(task_frame_gray(frame))


def task_frame_gray(frame: Any) -> Any:
    """The first half of ``task_frame`` (the first stage of ``pytaskqml-pipeline``)."""
    return cv2_module().cvtColor(frame, cv2_module().COLOR_BGR2GRAY)


def task_frame_blur_mean(gray: Any) -> float:
    """The second half of ``task_frame``."""
    return float(cv2_module().GaussianBlur(gray, (5, 5), 0).mean())


def task_echo(payload: Any) -> Any:
    return payload


def task_sleep(index: int, delay: float = SLEEP_S) -> int:
    time.sleep(delay)
    return index


TASKS: dict[str, Callable[..., Any]] = {
    "wordcount": task_wordcount,
    "frame": task_frame,
    "echo": task_echo,
    "sleep": task_sleep,
}


# --- inputs and checks --------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    passed: bool
    checked: int
    detail: str


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # which task function runs
    default_n: int
    description: str
    requires: tuple[str, ...] = ()

    def make_inputs(self, n: int, seed: int) -> list[Any]:
        if self.name == "wordcount":
            rng = random.Random(seed)
            return [rng.choice(WORDS) for _ in range(n)]
        if self.name == "frames":
            return make_frames(n, seed)
        if self.name == "latency":
            return [f"ping-{seed}-{i}" for i in range(n)]
        if self.name == "sleep":
            return list(range(n))
        raise ValueError(self.name)

    def check(self, inputs: list[Any], results: list[Any]) -> Check:
        if len(results) != len(inputs):
            return Check(False, len(results), f"{len(results)} results for {len(inputs)} tasks")
        if self.name == "wordcount":
            return check_wordcount(inputs, results)
        if self.name == "frames":
            return check_frames(inputs, results)
        bad = [i for i, (a, b) in enumerate(zip(inputs, results, strict=True)) if a != b]
        if bad:
            i = bad[0]
            return Check(False, len(inputs), f"{len(bad)} wrong; first at {i}: {results[i]!r}")
        return Check(True, len(inputs), "every result equals its input, in order")


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "wordcount",
            "wordcount",
            200_000,
            "one random word per task, result {word: 1}; counts summed and compared",
        ),
        Workload(
            "frames",
            "frame",
            1_000,
            "640x480x3 uint8 frame per task; grayscale + 5x5 Gaussian blur, mean returned",
            ("numpy", "cv2"),
        ),
        Workload("latency", "echo", 1_000, "one small echo at a time; p50/p99/max"),
        Workload("sleep", "sleep", 0, "each task sleeps 10 ms; scaling with the worker count"),
    )
}


def sleep_tasks(workers: int) -> int:
    """Sleep-workload size: 80 tasks per worker, i.e. an ideal 0.8 s per repeat at any count."""
    return 80 * workers


def check_wordcount(words: list[str], results: list[Any]) -> Check:
    total: Counter[str] = Counter()
    misplaced = 0
    for word, result in zip(words, results, strict=True):
        if not isinstance(result, dict):
            return Check(False, len(words), f"result is {type(result).__name__}, not dict")
        total.update(result)
        if result != {word: 1}:
            misplaced += 1
    expected = Counter(words)
    if total != expected:
        return Check(False, len(words), f"summed counts {dict(total)} != input {dict(expected)}")
    if misplaced:
        return Check(False, len(words), f"counts sum right but {misplaced} results out of order")
    return Check(True, len(words), f"summed counts equal the input counts {dict(expected)}")


def make_frames(n: int, seed: int) -> list[Any]:
    """n distinct frames: four random base frames, each copy marked with its index."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bases = [rng.integers(0, 256, FRAME_SHAPE, dtype=np.uint8) for _ in range(4)]
    frames = []
    for i in range(n):
        frame = bases[i % 4].copy()
        frame[:8, :, :] = (i * 37) % 256
        frame[8:16, :, :] = (i // 256) % 256
        frames.append(frame)
    return frames


def check_frames(frames: list[Any], results: list[Any]) -> Check:
    """Compare in order with a locally computed reference for a sample of the frames."""
    n = len(frames)
    step = max(1, n // 50)
    sample = sorted({*range(0, n, step), *range(min(n, 3)), *range(max(0, n - 3), n)})
    for i in sample:
        expected = task_frame(frames[i])
        got = results[i]
        if not isinstance(got, float) or abs(got - expected) > 1e-9:
            return Check(False, len(sample), f"frame {i}: got {got!r}, expected {expected!r}")
    return Check(True, len(sample), f"{len(sample)} sampled frames match the local reference")
