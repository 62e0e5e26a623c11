"""``python -m demo --pipeline``: the same detection as three stages of a pytaskqml
:class:`~pytaskqml.Pipeline` - decode (threads: the frame the detector needs, colour for the
network, gray for the Haar cascade) -> detect (spawned processes) -> annotate (threads: boxes
drawn on a copy of the colour frame).

The decode and annotate stages run in this process and hold the clip, so only the detector's
input travels to the detector processes and only the boxes come back."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import cv2

from demo.detector import FaceDetector
from demo.source import Clip
from demo.vision import DetectParams, annotate
from pytaskqml import Pipeline, Stage, Worker


class Decode(Worker):
    """Frame index -> the detector's payload (the colour or the gray frame)."""

    def __init__(self, clip: Clip, params: DetectParams, colour: bool = False) -> None:
        self.clip, self.params, self.colour = clip, params.to_json(), colour

    def process(self, index: int) -> dict[str, Any]:
        frame = self.clip.frames[index]
        if not self.colour:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        return {"index": index, "frame": frame, "params": self.params}


class Annotate(Worker):
    """The detector's result -> the colour frame with its boxes drawn on a copy."""

    def __init__(self, clip: Clip) -> None:
        self.clip = clip

    def process(self, result: dict[str, Any]) -> dict[str, Any]:
        index = int(result["index"])
        frame = annotate(self.clip.frames[index].copy(), result)
        return {"index": index, "stamp": result["stamp"], "boxes": result["boxes"], "frame": frame}


@dataclass(frozen=True)
class PipelineReport:
    frames: int
    in_order: bool
    stamps_ok: bool
    with_faces: int
    seconds: float

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def pipeline_steps(
    clip: Clip, params: DetectParams, workers: int, model: str = "haar"
) -> list[Stage]:
    detector = {"model": model, "frame_size": list(clip.size)}
    return [
        Stage(Decode(clip, params, colour=model != "haar"), threads=2, name="decode",
              buffersize=16),
        Stage(FaceDetector, processes=max(1, workers), name="detect", buffersize=16,
              kwargs=detector),
        Stage(Annotate(clip), threads=2, name="annotate", buffersize=16),
    ]  # fmt: skip


def run_pipeline(
    clip: Clip, params: DetectParams, workers: int, *, model: str = "haar"
) -> PipelineReport:
    """Every frame of *clip* through decode -> detect -> annotate, in order."""
    with Pipeline(pipeline_steps(clip, params, workers, model), name="demo") as p:
        start = time.perf_counter()
        out = list(p.map(range(len(clip.frames)), buffersize=32))
        seconds = time.perf_counter() - start
    indexes = [r["index"] for r in out]
    return PipelineReport(
        frames=len(out),
        in_order=indexes == list(range(len(clip.frames))),
        stamps_ok=all(r["stamp"] == r["index"] for r in out),
        with_faces=sum(1 for r in out if r["boxes"]),
        seconds=seconds,
    )


def describe(rep: PipelineReport, workers: int) -> str:
    return (
        f"pipeline decode(2 threads) -> detect({workers} processes) -> annotate(2 threads): "
        f"{rep.frames} frames in {rep.seconds:.2f}s = {rep.fps:.1f} frames/s, "
        f"{'in order' if rep.in_order and rep.stamps_ok else 'OUT OF ORDER'}, "
        f"faces in {rep.with_faces}"
    )


__all__ = ["Annotate", "Decode", "PipelineReport", "describe", "run_pipeline"]
