"""pytaskqml Worker classes for the benchmark (module-level so spawned processes import them)."""

from __future__ import annotations

from typing import Any

from benchmark import workloads
from pytaskqml import Model, Worker


class WordCountWorker(Worker):
    def process(self, word: str) -> dict[str, int]:
        return workloads.task_wordcount(word)


class FrameWorker(Worker):
    def setup(self) -> None:
        workloads.cv2_module()

    def process(self, frame: Any) -> float:
        return workloads.task_frame(frame)


class GrayWorker(FrameWorker):
    """Stage 1 of ``pytaskqml-pipeline``: the frame to gray."""

    def process(self, frame: Any) -> Any:
        return workloads.task_frame_gray(frame)


class BlurMeanWorker(FrameWorker):
    """Stage 2 of ``pytaskqml-pipeline``: blur the gray frame and take its mean."""

    def process(self, gray: Any) -> float:
        return workloads.task_frame_blur_mean(gray)


class PoolFrameWorker(FrameWorker):
    """FrameWorker that also reads every page of a list of frames sent as ``{"touch": [...]}``
    (`pytaskqml-map-buffer` has each worker read each pool buffer once before timing)."""

    def process(self, frame: Any) -> Any:
        if isinstance(frame, dict):
            return sum(int(f.reshape(-1)[::4096].sum()) for f in frame["touch"])
        return workloads.task_frame(frame)


class EchoWorker(Worker):
    def process(self, payload: Any) -> Any:
        return workloads.task_echo(payload)


class SleepWorker(Worker):
    def __init__(self, delay: float = workloads.SLEEP_S) -> None:
        super().__init__()
        self.delay = delay

    def process(self, index: int) -> int:
        return workloads.task_sleep(index, self.delay)


class TouchWorker(Worker):
    """Reads one byte of the buffer it is given: ``python -m benchmark.frames --sizes`` times
    the transport of a buffer, not any work done with it."""

    def process(self, buf: Any) -> int:
        return int(buf[0])


class TaskModel(Model):
    """The workload's task as a named model: `pytaskqml-map-model` routes every item to it,
    to measure what routing by model costs next to a plain map()."""

    def load(self, config: dict[str, Any]) -> None:
        self.kind = config["kind"]
        if self.kind == "frame":
            workloads.cv2_module()

    def predict(self, item: Any) -> Any:
        if self.kind == "wordcount":
            return workloads.task_wordcount(item)
        if self.kind == "frame":
            return workloads.task_frame(item)
        if self.kind == "sleep":
            return workloads.task_sleep(item, workloads.SLEEP_S)
        return workloads.task_echo(item)


WORKERS: dict[str, tuple[type[Worker], dict[str, Any]]] = {
    "wordcount": (WordCountWorker, {}),
    "frame": (FrameWorker, {}),
    "echo": (EchoWorker, {}),
    "sleep": (SleepWorker, {"delay": workloads.SLEEP_S}),
}
