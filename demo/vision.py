"""The detectors' settings, OpenCV's Haar-cascade face detector (the fallback where
onnxruntime is missing; the neural network is in :mod:`demo.centerface`), and drawing what
either found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from demo.source import Box

CASCADE_FILE = "haarcascade_frontalface_default.xml"
BOX_COLOUR = (0, 255, 0)  # BGR green
TEXT_COLOUR = (255, 255, 255)


MODELS = ("centerface", "haar")
POINT_COLOUR = (0, 200, 255)  # BGR amber: the network's landmarks


@dataclass(frozen=True)
class DetectParams:
    """Detection settings; travel with each task so workers need no configuration. The
    network uses ``threshold``, the Haar cascade the other three."""

    scale_factor: float = 1.1
    min_neighbors: int = 6  # 5 boxes the shuttle on the astronaut photo now and then
    min_size: int = 80  # smallest face looked for, in pixels
    threshold: float = 0.5  # the network's face score from which a face counts

    def to_json(self) -> dict[str, float | int]:
        return {
            "scale_factor": self.scale_factor,
            "min_neighbors": self.min_neighbors,
            "min_size": self.min_size,
            "threshold": self.threshold,
        }

    @classmethod
    def from_json(cls, data: dict[str, float | int]) -> DetectParams:
        return cls(
            float(data["scale_factor"]),
            int(data["min_neighbors"]),
            int(data["min_size"]),
            float(data.get("threshold", 0.5)),
        )


def load_cascade() -> cv2.CascadeClassifier:
    """The frontal-face Haar cascade that opencv-python 4.x ships in cv2.data."""
    path = cv2.data.haarcascades + CASCADE_FILE
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"could not load the Haar cascade {path} (opencv-python 4.x needed)")
    return cascade


def detect_faces(
    cascade: cv2.CascadeClassifier, frame: np.ndarray, params: DetectParams
) -> list[list[int]]:
    """Face boxes [x, y, w, h] in *frame* (BGR or already grayscale)."""
    gray = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    found = cascade.detectMultiScale(
        gray,
        scaleFactor=params.scale_factor,
        minNeighbors=params.min_neighbors,
        minSize=(params.min_size, params.min_size),
    )
    return [[int(v) for v in box] for box in found]


def draw_boxes(
    frame: np.ndarray,
    boxes: Sequence[Sequence[int]],
    index: int,
    *,
    scores: Sequence[float] | None = None,
    points: Sequence[Sequence[Sequence[int]]] | None = None,
    source: str = "",
) -> np.ndarray:
    """Draw the face boxes (with the network's scores and landmarks, when given) and a frame
    caption onto *frame* in place, and return it."""
    h = frame.shape[0]
    thick = max(2, h // 240)
    for k, (x, y, w, bh) in enumerate(boxes):
        cv2.rectangle(frame, (x, y), (x + w, y + bh), BOX_COLOUR, thick)
        text = f"face {scores[k]:.2f}" if scores is not None and k < len(scores) else "face"
        cv2.putText(
            frame, text, (x, max(y - 6, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, BOX_COLOUR, 1,
            cv2.LINE_AA,
        )  # fmt: skip
        for px, py in points[k] if points is not None and k < len(points) else ():
            cv2.circle(frame, (int(px), int(py)), thick + 1, POINT_COLOUR, -1, cv2.LINE_AA)
    caption = f"{source + '  ' if source else ''}frame {index}  faces: {len(boxes)}"
    (tw, th), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 0.55, 1)
    cv2.rectangle(frame, (4, 4), (16 + tw, 12 + th), (0, 0, 0), -1)
    cv2.putText(
        frame, caption, (10, 8 + th), cv2.FONT_HERSHEY_SIMPLEX, 0.55, TEXT_COLOUR, 1, cv2.LINE_AA
    )
    return frame


def matches(box: Sequence[int], truth: Box) -> bool:
    """A detection counts as the face when its centre lies inside the true face box."""
    x, y, w, h = box
    tx, ty, tw, th = truth
    cx, cy = x + w / 2, y + h / 2
    return tx <= cx <= tx + tw and ty <= cy <= ty + th


def annotate(frame: np.ndarray, result: dict[str, Any], source: str = "") -> np.ndarray:
    """Draw a detector result (see :mod:`demo.detector`) onto *frame* in place."""
    return draw_boxes(
        frame,
        result["boxes"],
        int(result["index"]),
        scores=result.get("scores"),
        points=result.get("points"),
        source=source,
    )
