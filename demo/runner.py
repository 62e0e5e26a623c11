"""Runs frames through a pytaskqml Coordinator and measures what comes back.

Two modes:

* **batch** (:func:`run_batch`): all frames are available at once; ``coord.map`` pulls them
  lazily and yields results in submission order. This measures throughput (1 vs N workers).
* **live** (:func:`run_live`): a producer thread hands frames over at the source frame rate
  through ``coord.stream()``; the coordinator's ``drop_oldest`` overflow policy discards the
  oldest waiting frame when the workers fall behind, so latency stays bounded.

Either way every result is checked against its expected position (index in the payload and
the index stamped into the pixels, see :mod:`demo.source`).

When frames go to worker processes, what they are sent is produced straight into
``coord.buffer()`` arrays, shared memory every worker process maps: the gray frame is
converted into one (``cv2.cvtColor(..., dst=buf)``), and a live camera whose colour frames go
to the workers is read into them (``cap.read(image=buf)``). Nothing is then copied on the way.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from demo.detector import FaceDetector
from demo.source import Box, stamp_index
from demo.vision import DetectParams, draw_boxes, matches
from pytaskqml import Coordinator
from pytaskqml import Progress as MapProgress

Sink = Callable[[int, np.ndarray], None]
# Makes an array of (shape, dtype) to produce a frame into: coord.buffer, or numpy.empty.
Allocator = Callable[[tuple[int, ...], Any], np.ndarray]
# A live source: frames, or a function that makes them given where to read them into.
LiveSource = Iterable[np.ndarray] | Callable[[Allocator], Iterable[np.ndarray]]


def _plain(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return np.empty(shape, dtype)


def allocator(coord: Coordinator, spec: RunSpec) -> Allocator:
    """Where to produce what is sent: shared memory when worker processes get it (a thread
    worker gets its own copy of whatever it is sent anyway)."""
    return coord.buffer if spec.processes else _plain


@dataclass(frozen=True)
class RunSpec:
    """One configuration of workers to run the clip through."""

    processes: int
    threads: int = 0
    window: int = 2
    draw_in_worker: bool = False
    max_queue: int = 8
    buffersize: int = 16

    @property
    def workers(self) -> int:
        return self.processes + self.threads

    @property
    def label(self) -> str:
        parts = []
        if self.processes:
            parts.append(f"{self.processes} process{'es' if self.processes != 1 else ''}")
        if self.threads:
            parts.append(f"{self.threads} thread{'s' if self.threads != 1 else ''}")
        return " + ".join(parts)


@dataclass
class RunReport:
    """What one run measured."""

    spec: RunSpec
    live: bool
    submitted: int = 0
    delivered: int = 0
    elapsed: float = 0.0
    dropped: int = 0  # the coordinator's count (statistics().dropped)
    skipped: int = 0  # indices the consumer never saw: must equal `dropped`
    out_of_order: int = 0
    coord_p50: float = 0.0  # the coordinator's own latency percentiles, seconds
    coord_p99: float = 0.0
    latencies: list[float] = field(default_factory=list)  # end to end, seconds, per frame
    detect_ms: list[float] = field(default_factory=list)
    frames_with_face: int = 0
    visible: int = 0  # delivered frames where the true face is fully in the picture
    found: int = 0  # ... and a box was on it
    extra_boxes: int = 0  # boxes that are not on the true face
    other_load: float | None = None  # CPU cores other programs used meanwhile (Linux only)
    stats: Any = None

    @property
    def fps(self) -> float:
        return self.delivered / self.elapsed if self.elapsed > 0 else 0.0

    def e2e(self, q: float) -> float:
        """End-to-end latency percentile (0..1) in seconds."""
        if not self.latencies:
            return 0.0
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[round(q * 100) - 1]

    @property
    def detection_rate(self) -> float | None:
        return self.found / self.visible if self.visible else None


class Progress:
    """Progress of a live run on stderr (frames, fps, drops): a self-updating line on a
    terminal, a line every few s otherwise. (Batch runs use ``map(progress=...)``.)"""

    def __init__(self, label: str, total: int | None, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last = 0.0

    def due(self) -> bool:
        interval = 0.2 if self.tty else 2.0
        return self.enabled and time.perf_counter() - self.last >= interval

    def update(self, done: int, dropped: int = 0, final: bool = False) -> None:
        if not (final and self.enabled) and not self.due():
            return
        now = self.last = time.perf_counter()
        elapsed = now - self.start
        total = f"/{self.total}" if self.total else ""
        text = f"  [{self.label}] {done}{total} frames, {done / max(elapsed, 1e-9):5.1f} fps"
        if dropped:
            text += f", {dropped} dropped"
        if self.tty:
            sys.stderr.write("\r" + text + ("\n" if final else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


class OtherLoad:
    """How many CPU cores *other* programs kept busy during a run (Linux; None elsewhere).

    A speedup measured while something else eats a core means little, so the demo says so.
    All CPU time in use (/proc/stat) minus this process's and its reaped children's.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        own = sum(
            r.ru_utime + r.ru_stime
            for r in (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
        )
        busy = (sum(ticks) - ticks[3] - ticks[4]) / hz
        return busy, own, time.monotonic()

    def stop(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        busy, own = end[0] - self.start[0], end[1] - self.start[1]
        return max(0.0, (busy - own) / (end[2] - self.start[2]))


class _Tracker:
    """Bookkeeping shared by both modes: what was sent when, and checking what came back."""

    def __init__(
        self,
        spec: RunSpec,
        params: DetectParams,
        truth: Sequence[Box | None] | None,
        sink: Sink | None,
        report: RunReport,
    ) -> None:
        self.spec = spec
        self.params = params.to_json()
        self.truth = truth
        self.sink = sink
        self.report = report
        self.lock = threading.Lock()
        self.pending: dict[int, tuple[float, np.ndarray]] = {}  # index -> (sent at, frame)
        self.last = -1
        self.alloc: Allocator = _plain

    def payload(self, index: int, frame: np.ndarray) -> dict[str, Any]:
        """The task for one frame (the frame must already carry its stamp)."""
        # Coordinator draws: the worker only needs gray, the colour frame stays here to draw on.
        if self.spec.draw_in_worker:
            sent = frame
        else:  # converted straight into the array that is sent
            sent = cv2.cvtColor(
                frame, cv2.COLOR_BGR2GRAY, dst=self.alloc(frame.shape[:2], np.uint8)
            )
        with self.lock:
            self.pending[index] = (time.perf_counter(), frame)
            self.report.submitted += 1
        return {
            "index": index,
            "frame": sent,
            "draw": self.spec.draw_in_worker,
            "params": self.params,
        }

    def receive(self, result: dict[str, Any]) -> None:
        now = time.perf_counter()
        rep = self.report
        index = int(result["index"])
        with self.lock:
            entry = self.pending.pop(index, None)
            # Whatever is older than this result will never come: it was dropped.
            for old in [k for k in self.pending if k < index]:
                del self.pending[old]
        if index <= self.last or int(result["stamp"]) != index or entry is None:
            rep.out_of_order += 1
        else:
            rep.skipped += index - self.last - 1
            self.last = index
        rep.delivered += 1
        if entry is not None:
            rep.latencies.append(now - entry[0])
        rep.detect_ms.append(float(result["detect_ms"]))
        boxes = result["boxes"]
        rep.frames_with_face += bool(boxes)
        true_box = self.truth[index] if self.truth and 0 <= index < len(self.truth) else None
        if true_box is not None:
            rep.visible += 1
            rep.found += any(matches(b, true_box) for b in boxes)
            rep.extra_boxes += sum(1 for b in boxes if not matches(b, true_box))
        if self.sink is not None:
            if self.spec.draw_in_worker:
                annotated = result["frame"]
            elif entry is not None:
                annotated = draw_boxes(entry[1].copy(), boxes, index)
            else:
                return
            self.sink(index, annotated)


def _start(coord: Coordinator, spec: RunSpec) -> None:
    if spec.processes:
        coord.spawn(FaceDetector, processes=spec.processes, window=spec.window)
    if spec.threads:
        coord.add_local(FaceDetector(), threads=spec.threads)


def _finish(coord: Coordinator, report: RunReport) -> None:
    stats = coord.statistics()
    report.stats = stats
    report.dropped = int(stats.dropped)
    report.coord_p50 = float(stats.latency_p50 or 0.0)
    report.coord_p99 = float(stats.latency_p99 or 0.0)


def run_batch(
    frames: Sequence[np.ndarray],
    spec: RunSpec,
    params: DetectParams,
    *,
    truth: Sequence[Box | None] | None = None,
    sink: Sink | None = None,
    progress: bool = True,
) -> RunReport:
    """Every frame through ``coord.map``; frames must already be stamped with their index."""
    report = RunReport(spec, live=False)
    tracker = _Tracker(spec, params, truth, sink, report)
    # map()'s own bar (tqdm when installed); lines every few seconds off a terminal.
    bar = MapProgress(f"  [{spec.label}]", total=len(frames), always=True)
    load = OtherLoad()

    def tasks() -> Iterable[dict[str, Any]]:
        for i, frame in enumerate(frames):
            yield tracker.payload(i, frame)

    with Coordinator(max_queue=spec.max_queue) as coord:
        _start(coord, spec)
        tracker.alloc = allocator(coord, spec)
        start = time.perf_counter()
        for result in coord.map(
            tasks(), buffersize=spec.buffersize, progress=bar if progress else False
        ):
            tracker.receive(result)
        report.elapsed = time.perf_counter() - start
        _finish(coord, report)
    report.other_load = load.stop()  # after shutdown: the workers are reaped and counted
    return report


def run_live(
    source: LiveSource,
    spec: RunSpec,
    params: DetectParams,
    *,
    total: int | None = None,
    truth: Sequence[Box | None] | None = None,
    sink: Sink | None = None,
    progress: bool = True,
) -> RunReport:
    """Frames from *source* (already paced like a camera) through ``coord.stream``. A source
    that is a function gets where to read the frames into: shared memory when the colour frames
    themselves go to worker processes."""
    report = RunReport(spec, live=True)
    tracker = _Tracker(spec, params, truth, sink, report)
    meter = Progress(f"{spec.label}, live", total, progress)
    stop = threading.Event()
    failure: list[BaseException] = []
    load = OtherLoad()

    with Coordinator(max_queue=spec.max_queue, overflow="drop_oldest") as coord:
        _start(coord, spec)
        tracker.alloc = allocator(coord, spec)
        stream = coord.stream(buffersize=spec.buffersize, on_error="raise")
        if callable(source):
            source = source(tracker.alloc if spec.draw_in_worker else _plain)

        def produce() -> None:
            try:
                for i, frame in enumerate(source):
                    if stop.is_set():
                        break
                    stamp_index(frame, i)
                    stream.put(tracker.payload(i, frame))
            except BaseException as exc:  # reported by the consumer thread
                if not stop.is_set():
                    failure.append(exc)
            finally:
                stream.close()

        producer = threading.Thread(target=produce, name="demo-producer", daemon=True)
        meter.start = start = time.perf_counter()
        producer.start()
        try:
            for result in stream:
                tracker.receive(result)
                if meter.due():
                    meter.update(report.delivered, coord.statistics().dropped)
        finally:
            stop.set()
            producer.join(timeout=10)
        report.elapsed = time.perf_counter() - start
        _finish(coord, report)
        meter.update(report.delivered, report.dropped, final=True)
    report.other_load = load.stop()
    if failure:
        raise failure[0]
    return report
