"""The pytaskqml worker: one Haar-cascade face detector per worker process or thread.

Defined at module level in an importable module so spawned worker processes can import it as
``demo.detector:FaceDetector``.

Task payload (sent by :mod:`demo.runner`)::

    {"index": 17, "frame": <uint8 array, HxW gray or HxWx3 BGR>, "draw": false,
     "params": {"scale_factor": 1.1, "min_neighbors": 6, "min_size": 80}}

Result::

    {"index": 17, "stamp": 17, "boxes": [[x, y, w, h], ...], "detect_ms": 41.2,
     "frame": <annotated BGR array, only when "draw" was true>}

``stamp`` is the index read back from the pixels the worker actually received.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import cv2

from demo.source import read_stamp
from demo.vision import DetectParams, detect_faces, draw_boxes, load_cascade
from pytaskqml import Worker


class FaceDetector(Worker):
    """Finds frontal faces; optionally returns the frame with the boxes drawn on it.

    One instance serves all the threads of ``coord.add_local(FaceDetector(), threads=k)``, and
    a CascadeClassifier is not safe to share between threads, so each thread gets its own.
    """

    def setup(self) -> None:
        # One OpenCV thread per worker: parallelism comes from the workers, and a single worker
        # must not quietly use every core (that would make the 1-worker baseline meaningless).
        cv2.setNumThreads(1)
        self._local = threading.local()
        self._local.cascade = load_cascade()  # load now: a missing cascade fails at start-up

    def _cascade(self) -> cv2.CascadeClassifier:
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = self._local.cascade = load_cascade()
        return cascade

    def process(self, payload: dict[str, Any]) -> dict[str, Any]:
        frame = payload["frame"]
        index = int(payload["index"])
        params = DetectParams.from_json(payload["params"])
        start = time.perf_counter()
        boxes = detect_faces(self._cascade(), frame, params)
        result: dict[str, Any] = {
            "index": index,
            "stamp": read_stamp(frame),
            "boxes": boxes,
            "detect_ms": (time.perf_counter() - start) * 1000.0,
        }
        if payload.get("draw"):
            # A local thread worker gets the caller's own array: never draw on the input.
            out = frame.copy() if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
            result["frame"] = draw_boxes(out, boxes, index)
        return result
