"""Where the frames come from: a generated clip, a video file or a camera.

The generated clips are the default so the demo needs no download and no camera: the
public-domain astronaut photo that scikit-image ships (NASA, Eileen Collins) is printed on a
card that pans, zooms and tilts over a drifting star field, with sensor noise on top, so every
frame differs. Several "cameras" (:func:`generate_cameras`) film it differently: mirrored or
not, nearer or farther, with another colour cast, backdrop, motion and light. Because the demo
moves the photo itself, it knows where the face is in every frame (the ground truth used to
score the detector).

Every frame handed to the coordinator carries its index twice: in the task payload, and stamped
into its pixels (:func:`stamp_index`, 32 black/white pixels in the top-left row). The worker
reads the stamp back from the pixels it received, so a result whose stamp or index does not
match its position in the output proves a frame went out of order or got mixed up in transit.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

Box = tuple[int, int, int, int]

STAMP_BITS = 32
# Where the face is in skimage.data.astronaut() (x, y, w, h in the 512x512 photo), as the
# Haar cascade finds it on the untouched photo.
ASTRONAUT_FACE: Box = (177, 66, 95, 95)
_BORDER = 8  # white card border around the photo, in photo pixels


class SourceError(Exception):
    """The --input cannot be opened or read; the message is one line for the user."""


def stamp_index(frame: np.ndarray, index: int) -> None:
    """Write *index* as 32 black/white pixels into the top-left of *frame* (in place)."""
    bits = (index >> np.arange(STAMP_BITS, dtype=np.int64)) & 1
    row = (bits * 255).astype(np.uint8)
    if frame.ndim == 3:
        frame[0, :STAMP_BITS, :] = row[:, None]
    else:
        frame[0, :STAMP_BITS] = row


def read_stamp(frame: np.ndarray) -> int:
    """Read back the index written by :func:`stamp_index`."""
    row = frame[0, :STAMP_BITS, 0] if frame.ndim == 3 else frame[0, :STAMP_BITS]
    bits = (np.asarray(row) > 127).astype(np.int64)
    return int((bits << np.arange(STAMP_BITS, dtype=np.int64)).sum())


@dataclass
class Clip:
    """Frames held in memory, so every run sees exactly the same input."""

    frames: list[np.ndarray]
    fps: float
    name: str
    # Ground-truth face box per frame (generated clip only); None where the face is not fully
    # in the picture, or for a file/camera where nothing is known.
    truth: list[Box | None] = field(default_factory=list)
    label: str = "clip"  # short: a column of the results table, a file name

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.frames[0].shape[:2]
        return w, h


def _astronaut_card() -> np.ndarray:
    from skimage import data  # imported here: only the generated clip needs it

    rgb = data.astronaut()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    return cv2.copyMakeBorder(
        bgr, _BORDER, _BORDER, _BORDER, _BORDER, cv2.BORDER_CONSTANT, value=(235, 235, 235)
    )


@dataclass(frozen=True)
class CameraStyle:
    """How one generated camera films the card."""

    mirror: bool = False
    scale: float = 1.15  # card size (at 480 lines), around which it zooms by +-15 %
    pan: float = 0.22  # sideways sweep, a fraction of the width either way
    pan_period: float = 5.0  # seconds
    tilt: float = 7.0  # degrees either way
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # gain per BGR channel
    top: tuple[int, int, int] = (70, 30, 20)  # backdrop BGR, dark blue at the top
    bottom: tuple[int, int, int] = (10, 5, 5)
    noise: int = 6  # sensor noise, +- levels


CAMERAS = (
    CameraStyle(),
    CameraStyle(mirror=True, scale=1.0, pan=0.18, pan_period=7.0, tint=(0.9, 1.05, 0.95),
                top=(40, 60, 25), bottom=(5, 15, 5)),
    CameraStyle(scale=1.35, pan=0.12, pan_period=4.0, tilt=10.0, tint=(0.75, 0.95, 1.15),
                top=(25, 35, 70), bottom=(5, 5, 15)),
    CameraStyle(mirror=True, scale=1.1, pan=0.25, pan_period=6.0, tilt=5.0,
                tint=(0.7, 0.7, 0.7), top=(30, 30, 30), bottom=(0, 0, 0), noise=10),
)  # fmt: skip


def _backdrop(
    width: int, height: int, top_bgr: tuple[int, int, int], bottom_bgr: tuple[int, int, int]
) -> np.ndarray:
    top = np.array(top_bgr, np.float32)
    bottom = np.array(bottom_bgr, np.float32)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    grad = top * (1 - ramp) + bottom * ramp
    return np.ascontiguousarray(np.broadcast_to(grad, (height, width, 3)), dtype=np.uint8)


def generate_clip(
    frames: int = 240,
    size: tuple[int, int] = (640, 480),
    fps: float = 30.0,
    seed: int = 7,
    camera: int = 0,
) -> Clip:
    """Render *frames* frames of the astronaut card moving over a star field, as filmed by
    generated camera number *camera* (see :data:`CAMERAS`)."""
    width, height = size
    if width < 64 or height < 48:
        raise ValueError("clip size must be at least 64x48")
    style = CAMERAS[camera % len(CAMERAS)]
    seed += camera
    phase = 1.3 * camera  # the cameras do not move in step
    card = _astronaut_card()
    fx0, fy0, fw, fh = ASTRONAUT_FACE
    if style.mirror:
        card = np.ascontiguousarray(card[:, ::-1])
        fx0 = card.shape[1] - 2 * _BORDER - fx0 - fw
    if style.tint != (1.0, 1.0, 1.0):
        card = cv2.multiply(card.astype(np.float32), (*style.tint, 0.0))
        card = np.clip(card, 0, 255).astype(np.uint8)
    fx0, fy0 = fx0 + _BORDER, fy0 + _BORDER
    face_centre = (fx0 + fw / 2, fy0 + fh / 2)
    corners = np.array(
        [[fx0, fy0, 1], [fx0 + fw, fy0, 1], [fx0, fy0 + fh, 1], [fx0 + fw, fy0 + fh, 1]],
        np.float64,
    )
    base = _backdrop(width, height, style.top, style.bottom)
    rng = np.random.default_rng(seed)
    stars = rng.random((160, 3))  # x, y, depth
    unit = height / 480.0  # everything scales with the frame height
    out: list[np.ndarray] = []
    truth: list[Box | None] = []
    for i in range(frames):
        t = i / fps
        scale = unit * style.scale * (1.0 + 0.15 * math.sin(2 * math.pi * t / 4.0 + phase))
        angle = style.tilt * math.sin(2 * math.pi * t / 3.0 + phase)
        cx = width / 2 + style.pan * width * math.sin(2 * math.pi * t / style.pan_period + phase)
        cy = height / 2 + 0.10 * height * math.sin(2 * math.pi * t / 3.5 + 1.0 + phase)
        m = cv2.getRotationMatrix2D(face_centre, angle, scale)
        m[0, 2] += cx - face_centre[0]
        m[1, 2] += cy - face_centre[1]

        frame = base.copy()
        # Stars drift left, near ones faster (parallax), and wrap around.
        sx = ((stars[:, 0] - t * (0.02 + 0.08 * stars[:, 2])) % 1.0) * (width - 1)
        sy = stars[:, 1] * (height - 1)
        for x, y, d in zip(sx, sy, stars[:, 2], strict=True):
            level = int(120 + 135 * d)
            cv2.circle(frame, (int(x), int(y)), 1 + int(d * 1.5), (level, level, level), -1)
        # The card is drawn over the stars: pixels outside it are left as they are.
        cv2.warpAffine(
            card, m, (width, height), dst=frame, flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_TRANSPARENT,
        )  # fmt: skip
        # Sensor noise: no two frames are identical even where nothing moves.
        noise = rng.integers(0, 2 * style.noise + 1, size=frame.shape, dtype=np.uint8)
        cv2.add(frame, noise, dst=frame)
        cv2.subtract(frame, (style.noise, style.noise, style.noise, 0), dst=frame)
        label = f"pytaskqml demo  cam {camera}  #{i:04d}  {t:5.2f}s"
        cv2.putText(
            frame, label, (10, height - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45 * max(unit, 0.6),
            (200, 200, 200), 1, cv2.LINE_AA,
        )  # fmt: skip
        out.append(frame)

        pts = corners @ m.T
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
        inside = x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height
        truth.append((int(x0), int(y0), int(x1 - x0), int(y1 - y0)) if inside else None)
    name = f"generated camera {camera} ({frames} frames, {width}x{height})"
    return Clip(out, fps, name, truth, label=f"cam{camera}")


def generate_cameras(
    count: int, frames: int, size: tuple[int, int] = (640, 480), fps: float = 30.0
) -> list[Clip]:
    """*count* generated cameras filming the card at once, each its own way."""
    return [generate_clip(frames, size, fps, camera=k) for k in range(count)]


def parse_input(text: str) -> int | str:
    """A camera index ("0", "1") or a file path."""
    return int(text) if text.isdigit() else text


def open_capture(source: int | str) -> cv2.VideoCapture:
    """Open a file or camera, reading one frame to prove it works; raise SourceError if not."""
    if isinstance(source, str):
        if not os.path.exists(source):
            raise SourceError(f"cannot read --input {source!r}: no such file")
        if os.path.isdir(source):
            raise SourceError(f"cannot read --input {source!r}: it is a directory")
        if not os.access(source, os.R_OK):
            raise SourceError(f"cannot read --input {source!r}: permission denied")
    cap = cv2.VideoCapture(source)
    what = f"camera {source}" if isinstance(source, int) else repr(source)
    if not cap.isOpened():
        cap.release()
        kind = "no such camera or it is busy" if isinstance(source, int) else "not a video"
        raise SourceError(f"cannot read --input {what}: {kind}")
    ok, frame = cap.read()
    if not ok or frame is None or frame.size == 0:
        cap.release()
        raise SourceError(f"cannot read --input {what}: no frame could be decoded")
    if isinstance(source, str):
        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)  # rewind: the probe frame is part of the video
    return cap


def capture_fps(cap: cv2.VideoCapture, default: float) -> float:
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    return fps if 1.0 <= fps <= 240.0 else default


def read_clip(source: int | str, frames: int, default_fps: float) -> Clip:
    """Read up to *frames* frames of a file (or record them from a camera) into memory."""
    cap = open_capture(source)
    fps = capture_fps(cap, default_fps)
    out: list[np.ndarray] = []
    try:
        while len(out) < frames:
            ok, frame = cap.read()
            if not ok:
                break
            out.append(frame)
    finally:
        cap.release()
    if not out:
        raise SourceError(f"cannot read --input {source!r}: no frame could be decoded")
    h, w = out[0].shape[:2]
    kind = f"camera {source}" if isinstance(source, int) else os.path.basename(str(source))
    return Clip(out, fps, f"{kind} ({len(out)} frames, {w}x{h})")


def camera_frames(
    cap: cv2.VideoCapture,
    limit: int,
    alloc: Callable[[tuple[int, ...], Any], np.ndarray] | None = None,
) -> Iterator[np.ndarray]:
    """Frames straight from a live camera, at the camera's own pace; with *alloc* (such as
    ``coord.buffer``) each is decoded into an array it makes, once the frame size is known."""
    n = 0
    shape: tuple[int, ...] | None = None
    while n < limit:
        if alloc is not None and shape is not None:
            # In place when the size still matches; otherwise OpenCV returns a new array.
            ok, frame = cap.read(image=alloc(shape, np.uint8))
        else:
            ok, frame = cap.read()
        if not ok:
            print("demo: camera stopped delivering frames", file=sys.stderr)
            return
        shape = frame.shape
        n += 1
        yield frame


def paced(frames: list[np.ndarray], fps: float) -> Iterator[np.ndarray]:
    """Yield *frames* in real time, one every 1/fps seconds, like a camera would."""
    start = time.perf_counter()
    for i, frame in enumerate(frames):
        delay = start + i / fps - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield frame
