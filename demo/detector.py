"""The pytaskqml worker: one face detector per worker process or thread - the CenterFace
neural network (:mod:`demo.centerface`, onnxruntime) or OpenCV's Haar cascade.

Defined at module level in an importable module so spawned worker processes can import it as
``demo.detector:FaceDetector``; which model it runs is a constructor argument
(``spawn(FaceDetector, kwargs={"model": "centerface", "frame_size": [640, 480]})``), so the
model is loaded once, in ``setup()``, before the worker takes any frame.

Task payload (sent by :mod:`demo.runner`)::

    {"index": 17, "frame": <uint8 array, HxWx3 BGR, or HxW gray for the Haar cascade>,
     "draw": false, "params": {"threshold": 0.5, "scale_factor": 1.1, ...}}

Result::

    {"index": 17, "stamp": 17, "boxes": [[x, y, w, h], ...], "detect_ms": 41.2, "device": "cpu",
     "scores": [0.87, ...], "points": [[[x, y] * 5], ...],   (the network only)
     "frame": <annotated BGR array, only when "draw" was true>}

``stamp`` is the index read back from the pixels the worker actually received.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import cv2
import numpy as np

from demo.source import read_stamp
from demo.vision import MODELS, DetectParams, annotate, detect_faces, load_cascade
from pytaskqml import Worker


class FaceDetector(Worker):
    """Finds frontal faces; optionally returns the frame with the boxes drawn on it.

    One instance serves all the threads of ``coord.add_local(FaceDetector(), threads=k)``:
    an onnxruntime session may be run from several threads at once, a CascadeClassifier may
    not, so each thread gets its own cascade.
    """

    def __init__(self, model: str = "haar", frame_size: list[int] | None = None) -> None:
        if model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, not {model!r}")
        self.model = model
        self.frame_size = (int(frame_size[0]), int(frame_size[1])) if frame_size else (640, 480)

    def setup(self) -> None:
        # One OpenCV thread per worker: parallelism comes from the workers, and a single worker
        # must not quietly use every core (that would make the 1-worker baseline meaningless).
        cv2.setNumThreads(1)
        self._local = threading.local()
        if self.model == "centerface":
            from demo.centerface import CenterFace

            self.net = CenterFace(self.frame_size)  # one thread; a missing model fails here
            self.device = self.net.device
            # The first run of a session sets up its buffers (tens of ms): done here, so no
            # frame pays for it and the timings compare like with like.
            w, h = self.frame_size
            self.net(np.zeros((h, w, 3), np.uint8))
        else:
            self._local.cascade = load_cascade()  # load now: a missing cascade fails at start-up
            self.device = "cpu"
        # The device of a spawn(devices=[...]) seat: CUDA_VISIBLE_DEVICES shows it as 0 here.
        seat = os.environ.get("PYTASKQML_DEVICE")
        if seat is not None:
            self.device += f" (seat device {seat})"

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
        result: dict[str, Any] = {"index": index}
        if self.model == "centerface":
            faces = self.net(frame, params.threshold)
            result["boxes"] = [list(f.box) for f in faces]
            result["scores"] = [round(f.score, 3) for f in faces]
            result["points"] = [[list(p) for p in f.points] for f in faces]
        else:
            result["boxes"] = detect_faces(self._cascade(), frame, params)
        result["detect_ms"] = (time.perf_counter() - start) * 1000.0
        result["device"] = self.device
        result["stamp"] = read_stamp(frame)
        if payload.get("draw"):
            # A local thread worker gets the caller's own array: never draw on the input.
            out = frame.copy() if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
            result["frame"] = annotate(out, result)
        return result
