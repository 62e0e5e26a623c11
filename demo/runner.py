"""Runs frames through a pytaskqml Coordinator and measures what comes back.

Several sources ("cameras") share one pool of workers: each has its own thread feeding the
coordinator and taking its results, in its own order. Two modes:

* **batch** (:func:`run_sources`): all frames are available at once; each source's
  ``coord.map`` pulls them lazily and yields results in submission order. This measures
  throughput (1 vs N workers).
* **live** (:func:`run_live_sources`): a producer thread per source hands frames over at the
  source frame rate through its own ``coord.stream()``; the coordinator's ``drop_oldest``
  overflow policy discards the oldest waiting frame when the workers fall behind, so latency
  stays bounded.

Either way every result is checked against its expected position (index in the payload and
the index stamped into the pixels, see :mod:`demo.source`).

When frames go to worker processes, what they are sent is produced straight into
``coord.buffer()`` arrays, shared memory every worker process maps: the gray frame the Haar
cascade needs is converted into one (``cv2.cvtColor(..., dst=buf)``), and a live camera whose
colour frames go to the workers is read into them (``cap.read(image=buf)``). Nothing is then
copied on the way. A colour frame already in memory (a generated or read clip) is sent as it
is and copied into shared memory once, by the coordinator.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from demo.detector import FaceDetector
from demo.source import Box, Clip, stamp_index
from demo.vision import DetectParams, annotate, matches
from pytaskqml import Coordinator

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
    """One configuration of workers to run the sources through."""

    processes: int
    threads: int = 0
    window: int = 2
    draw_in_worker: bool = False
    max_queue: int = 8
    buffersize: int = 16
    model: str = "haar"  # or "centerface"
    frame_size: tuple[int, int] = (640, 480)  # what the network is set up for
    devices: tuple[str, ...] | None = None  # spawn(devices=...): a GPU per worker process

    @property
    def workers(self) -> int:
        return self.processes + self.threads

    @property
    def colour(self) -> bool:
        """Do the workers get the colour frame (else gray)?"""
        return self.draw_in_worker or self.model == "centerface"

    def worker_kwargs(self) -> dict[str, Any]:
        return {"model": self.model, "frame_size": list(self.frame_size)}

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
    """What one run measured for one source (or, from :func:`run_batch` and
    :func:`run_live`, for the run's only source, with the coordinator's figures too)."""

    spec: RunSpec
    live: bool
    source: str = ""
    submitted: int = 0
    delivered: int = 0
    elapsed: float = 0.0  # from the run's start to the end of the run
    finished: float = 0.0  # from the run's start to this source's last result
    dropped: int = 0  # the coordinator's count (statistics().dropped), single-source reports
    skipped: int = 0  # indices the consumer never saw: must add up to `dropped`
    out_of_order: int = 0
    coord_p50: float = 0.0  # the coordinator's own latency percentiles, seconds
    coord_p99: float = 0.0
    latencies: list[float] = field(default_factory=list)  # end to end, seconds, per frame
    detect_ms: list[float] = field(default_factory=list)
    frames_with_face: int = 0
    visible: int = 0  # delivered frames where the true face is fully in the picture
    found: int = 0  # ... and a box was on it
    extra_boxes: int = 0  # boxes that are not on the true face
    devices: set[str] = field(default_factory=set)  # what the model ran on, as workers said
    other_load: float | None = None  # CPU cores other programs used meanwhile (Linux only)
    stats: Any = None
    # (index, result) of every delivered frame, when the run was asked to keep them
    kept: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.delivered / self.elapsed if self.elapsed > 0 else 0.0

    def e2e(self, q: float) -> float:
        """End-to-end latency percentile (0..1) in seconds."""
        return _quantile(self.latencies, q)

    @property
    def detection_rate(self) -> float | None:
        return self.found / self.visible if self.visible else None

    @property
    def mean_detect_ms(self) -> float:
        return sum(self.detect_ms) / len(self.detect_ms) if self.detect_ms else 0.0


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


@dataclass
class PoolRun:
    """One run: every source through one coordinator and its workers at once."""

    spec: RunSpec
    live: bool
    sources: list[RunReport]
    elapsed: float = 0.0
    dropped: int = 0
    coord_p50: float = 0.0
    coord_p99: float = 0.0
    other_load: float | None = None
    stats: Any = None

    @property
    def delivered(self) -> int:
        return sum(r.delivered for r in self.sources)

    @property
    def submitted(self) -> int:
        return sum(r.submitted for r in self.sources)

    @property
    def fps(self) -> float:
        """Frames per second, all sources together."""
        return self.delivered / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def fps_per_source(self) -> float:
        """The mean of the sources' frames/s (each over the whole run)."""
        return sum(r.fps for r in self.sources) / len(self.sources) if self.sources else 0.0

    @property
    def detect_ms(self) -> list[float]:
        return [ms for r in self.sources for ms in r.detect_ms]

    @property
    def mean_detect_ms(self) -> float:
        ms = self.detect_ms
        return sum(ms) / len(ms) if ms else 0.0

    def e2e(self, q: float) -> float:
        return _quantile([x for r in self.sources for x in r.latencies], q)

    @property
    def out_of_order(self) -> int:
        return sum(r.out_of_order for r in self.sources)

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.sources)

    @property
    def visible(self) -> int:
        return sum(r.visible for r in self.sources)

    @property
    def found(self) -> int:
        return sum(r.found for r in self.sources)

    @property
    def extra_boxes(self) -> int:
        return sum(r.extra_boxes for r in self.sources)

    @property
    def frames_with_face(self) -> int:
        return sum(r.frames_with_face for r in self.sources)

    @property
    def devices(self) -> set[str]:
        return set().union(*(r.devices for r in self.sources))

    @property
    def detection_rate(self) -> float | None:
        return self.found / self.visible if self.visible else None

    @property
    def clean(self) -> bool:
        """In order, and every frame missing from the output was reported dropped."""
        return self.out_of_order == 0 and self.skipped == self.dropped


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
    """One source's bookkeeping: what was sent when, and checking what came back."""

    def __init__(
        self,
        spec: RunSpec,
        params: DetectParams,
        report: RunReport,
        truth: Sequence[Box | None] | None,
        sink: Sink | None,
        keep: bool,
    ) -> None:
        self.spec = spec
        self.params = params.to_json()
        self.truth = truth
        self.sink = sink
        self.keep = keep
        self.report = report
        self.lock = threading.Lock()
        self.pending: dict[int, tuple[float, np.ndarray]] = {}  # index -> (sent at, frame)
        self.last = -1
        self.alloc: Allocator = _plain

    def payload(self, index: int, frame: np.ndarray) -> dict[str, Any]:
        """The task for one frame (the frame must already carry its stamp)."""
        if self.spec.colour:
            sent = frame
        else:  # the cascade needs only gray: converted straight into the array that is sent
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

    def finish(self) -> None:
        """The source has ended: frames sent after the last one delivered were dropped too
        (with several sources sharing the queue, a source's newest frame may be the oldest
        waiting when another's arrives)."""
        with self.lock:
            sent = self.report.submitted
            self.pending.clear()
        self.report.skipped += max(0, sent - 1 - self.last)

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
        rep.devices.add(str(result.get("device", "")))
        boxes = result["boxes"]
        rep.frames_with_face += bool(boxes)
        true_box = self.truth[index] if self.truth and 0 <= index < len(self.truth) else None
        if true_box is not None:
            rep.visible += 1
            rep.found += any(matches(b, true_box) for b in boxes)
            rep.extra_boxes += sum(1 for b in boxes if not matches(b, true_box))
        if self.keep:
            rep.kept.append((index, result))
        if self.sink is not None:
            if self.spec.draw_in_worker:
                annotated = result["frame"]
            elif entry is not None:
                annotated = annotate(entry[1].copy(), result, rep.source)
            else:
                return
            self.sink(index, annotated)


def _start(coord: Coordinator, spec: RunSpec) -> None:
    if spec.processes:
        coord.spawn(
            FaceDetector,
            processes=spec.processes,
            window=spec.window,
            kwargs=spec.worker_kwargs(),
            devices=list(spec.devices) if spec.devices else None,
        )
    if spec.threads:
        worker = FaceDetector(**spec.worker_kwargs())
        coord.add_local(worker, threads=spec.threads)


def _pool_run(
    spec: RunSpec,
    trackers: Sequence[_Tracker],
    live: bool,
    feed: Callable[[Coordinator, int, _Tracker, Callable[[], None]], None],
    meter: Progress,
) -> PoolRun:
    """Start the workers, run ``feed(coord, k, tracker, tick)`` for every source at once, each
    on its own thread (``tick`` after each result), and gather what was measured."""
    run = PoolRun(spec, live, [t.report for t in trackers])
    failures: list[BaseException] = []
    lock = threading.Lock()
    load = OtherLoad()
    overflow = "drop_oldest" if live else "block"
    with Coordinator(max_queue=spec.max_queue, overflow=overflow) as coord:

        def tick() -> None:
            with lock:
                if meter.due():
                    meter.update(run.delivered, coord.statistics().dropped if live else 0)

        def source_thread(k: int, tracker: _Tracker) -> None:
            try:
                feed(coord, k, tracker, tick)
            except BaseException as exc:  # reported by the calling thread
                failures.append(exc)
            finally:
                tracker.report.finished = time.perf_counter() - start

        _start(coord, spec)
        for t in trackers:
            t.alloc = allocator(coord, spec)
        threads = [
            threading.Thread(
                target=source_thread, args=(k, t), name=f"demo-source-{k}", daemon=True
            )
            for k, t in enumerate(trackers)
        ]
        meter.start = start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():  # in steps, so Ctrl-C reaches this thread
                thread.join(0.2)
        run.elapsed = time.perf_counter() - start
        for t in trackers:
            # A source's frames/s is over the whole run: the sources share the pool, and one
            # that happened to be served first finishing early says nothing of its rate.
            t.report.elapsed = run.elapsed
        stats = coord.statistics()
        run.stats = stats
        run.dropped = int(stats.dropped)
        run.coord_p50 = float(stats.latency_p50 or 0.0)
        run.coord_p99 = float(stats.latency_p99 or 0.0)
        meter.update(run.delivered, run.dropped, final=True)
    run.other_load = load.stop()  # after shutdown: the workers are reaped and counted
    if failures:
        raise failures[0]
    return run


def _trackers(
    spec: RunSpec,
    params: DetectParams,
    live: bool,
    labels: Sequence[str],
    truths: Sequence[Sequence[Box | None] | None] | None,
    sinks: Sequence[Sink | None] | None,
    keep: bool,
) -> list[_Tracker]:
    return [
        _Tracker(
            spec,
            params,
            RunReport(spec, live, source=label),
            truths[k] if truths else None,
            sinks[k] if sinks else None,
            keep,
        )
        for k, label in enumerate(labels)
    ]


def run_sources(
    clips: Sequence[Clip],
    spec: RunSpec,
    params: DetectParams,
    *,
    sinks: Sequence[Sink | None] | None = None,
    keep: bool = False,
    progress: bool = True,
) -> PoolRun:
    """Every frame of every clip through one pool at once, each clip through its own
    ``coord.map``; frames must already be stamped with their index. With *keep* each
    source's results are kept (``RunReport.kept``) to draw after the run, off the clock."""
    labels = [c.label for c in clips]
    trackers = _trackers(spec, params, False, labels, [c.truth for c in clips], sinks, keep)
    total = sum(len(c.frames) for c in clips)
    meter = Progress(spec.label, total, progress)

    def feed(coord: Coordinator, k: int, tracker: _Tracker, tick: Callable[[], None]) -> None:
        frames = clips[k].frames

        def tasks() -> Iterator[dict[str, Any]]:
            for i, frame in enumerate(frames):
                yield tracker.payload(i, frame)

        for result in coord.map(tasks(), buffersize=spec.buffersize):
            tracker.receive(result)
            tick()

    return _pool_run(spec, trackers, False, feed, meter)


def run_live_sources(
    sources: Sequence[LiveSource],
    spec: RunSpec,
    params: DetectParams,
    *,
    labels: Sequence[str] | None = None,
    total: int | None = None,
    truths: Sequence[Sequence[Box | None] | None] | None = None,
    sinks: Sequence[Sink | None] | None = None,
    keep: bool = False,
    progress: bool = True,
) -> PoolRun:
    """Frames from each of *sources* (already paced like a camera) through its own
    ``coord.stream``, all at once. A source that is a function gets where to read the frames
    into: shared memory when the colour frames themselves go to worker processes. *total*:
    the frames expected from all sources together (for the progress line)."""
    labels = list(labels or (f"source{k}" for k in range(len(sources))))
    trackers = _trackers(spec, params, True, labels, truths, sinks, keep)
    meter = Progress(f"{spec.label}, live", total, progress)

    def feed(coord: Coordinator, k: int, tracker: _Tracker, tick: Callable[[], None]) -> None:
        stream = coord.stream(buffersize=spec.buffersize, on_error="raise")
        source = sources[k]
        frames = source(tracker.alloc if spec.colour else _plain) if callable(source) else source
        stop = threading.Event()
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                for i, frame in enumerate(frames):
                    if stop.is_set():
                        break
                    stamp_index(frame, i)
                    stream.put(tracker.payload(i, frame))
            except BaseException as exc:  # reported by the consumer
                if not stop.is_set():
                    failure.append(exc)
            finally:
                stream.close()

        producer = threading.Thread(target=produce, name=f"demo-producer-{k}", daemon=True)
        producer.start()
        try:
            for result in stream:
                tracker.receive(result)
                tick()
        finally:
            stop.set()
            producer.join(timeout=10)
        if failure:
            raise failure[0]
        tracker.finish()

    return _pool_run(spec, trackers, True, feed, meter)


def _single(run: PoolRun) -> RunReport:
    """The only source's report, with the run's figures."""
    (report,) = run.sources
    report.elapsed = run.elapsed
    report.dropped = run.dropped
    report.coord_p50, report.coord_p99 = run.coord_p50, run.coord_p99
    report.other_load = run.other_load
    report.stats = run.stats
    return report


def run_batch(
    frames: Sequence[np.ndarray],
    spec: RunSpec,
    params: DetectParams,
    *,
    truth: Sequence[Box | None] | None = None,
    sink: Sink | None = None,
    progress: bool = True,
) -> RunReport:
    """One clip's frames (already stamped) through ``coord.map`` (see :func:`run_sources`)."""
    clip = Clip(list(frames), 30.0, "frames", list(truth or []))
    run = run_sources([clip], spec, params, sinks=[sink], progress=progress)
    return _single(run)


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
    """One live source through ``coord.stream`` (see :func:`run_live_sources`)."""
    run = run_live_sources(
        [source],
        spec,
        params,
        total=total,
        truths=[truth],
        sinks=[sink],
        progress=progress,
    )
    return _single(run)
