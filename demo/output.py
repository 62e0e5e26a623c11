"""What the demo leaves behind: the annotated video, a contact sheet, a live window."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

# Tried in order; the first whose output OpenCV can read back is used.
CODECS = (("mp4v", ".mp4"), ("MJPG", ".avi"))


def count_frames(path: Path) -> int:
    """Decode *path* to the end and count its frames (0 if it cannot be opened)."""
    cap = cv2.VideoCapture(str(path))
    n = 0
    try:
        while cap.isOpened():
            ok, _ = cap.read()
            if not ok:
                break
            n += 1
    finally:
        cap.release()
    return n


def pick_codec() -> tuple[str, str]:
    """(fourcc, extension) of the first codec that writes a file this OpenCV can read back."""
    frame = np.zeros((64, 64, 3), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        for fourcc, ext in CODECS:
            path = Path(tmp) / f"probe{ext}"
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, (64, 64))
            if not writer.isOpened():
                continue
            for i in range(3):
                frame[:] = i * 60
                writer.write(frame)
            writer.release()
            if count_frames(path) == 3:
                return fourcc, ext
    raise RuntimeError("no video codec available: OpenCV can write neither mp4v nor MJPG")


class VideoOut:
    """Writes BGR frames to ``<stem>.mp4`` (or ``.avi``), opening on the first frame."""

    def __init__(self, directory: Path, stem: str, fps: float) -> None:
        self.fourcc, ext = pick_codec()
        self.path = directory / f"{stem}{ext}"
        self.fps = fps
        self.written = 0
        self._writer: cv2.VideoWriter | None = None

    def write(self, frame: np.ndarray) -> None:
        if self._writer is None:
            h, w = frame.shape[:2]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fourcc = cv2.VideoWriter_fourcc(*self.fourcc)
            self._writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (w, h))
            if not self._writer.isOpened():
                raise RuntimeError(f"cannot write video {self.path}")
        self._writer.write(frame)
        self.written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


class ContactSheet:
    """Keeps a thumbnail of every delivered frame, per source; saves a PNG of evenly spaced
    ones: a grid for one source, a row per source for several."""

    def __init__(self, thumb_width: int = 320, columns: int = 4, rows: int = 3) -> None:
        self.thumb_width = thumb_width
        self.columns = columns
        self.rows = rows
        self.thumbs: dict[str, list[np.ndarray]] = {}

    def add(self, frame: np.ndarray, source: str = "") -> None:
        h, w = frame.shape[:2]
        th = max(1, round(h * self.thumb_width / w))
        thumb = cv2.resize(frame, (self.thumb_width, th), interpolation=cv2.INTER_AREA)
        self.thumbs.setdefault(source, []).append(thumb)

    @property
    def shown(self) -> int:
        """How many thumbnails the sheet shows."""
        if len(self.thumbs) == 1:
            (only,) = self.thumbs.values()
            return min(len(only), self.columns * self.rows)
        return sum(min(len(t), self.columns) for t in self.thumbs.values())

    def _cells(self) -> list[list[np.ndarray]]:
        """The thumbnails to show, row by row."""

        def pick(thumbs: list[np.ndarray], n: int) -> list[np.ndarray]:
            n = min(len(thumbs), n)
            return [thumbs[i] for i in np.linspace(0, len(thumbs) - 1, n).round().astype(int)]

        if len(self.thumbs) == 1:
            (only,) = self.thumbs.values()
            chosen = pick(only, self.columns * self.rows)
            return [chosen[i : i + self.columns] for i in range(0, len(chosen), self.columns)]
        return [pick(t, self.columns) for t in self.thumbs.values() if t]

    def save(self, path: Path, title: str) -> None:
        rows = self._cells()
        if not rows:
            return
        th, tw = rows[0][0].shape[:2]
        gap, header = 6, 34
        sheet = np.full(
            (header + len(rows) * (th + gap) + gap, self.columns * (tw + gap) + gap, 3),
            32,
            np.uint8,
        )
        cv2.putText(
            sheet, title, (gap, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA
        )
        for r, row in enumerate(rows):
            for c, thumb in enumerate(row):
                y, x = header + gap + r * (th + gap), gap + c * (tw + gap)
                sheet[y : y + min(th, thumb.shape[0]), x : x + tw] = thumb[:th, :tw]
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), sheet):
            raise RuntimeError(f"cannot write {path}")


def display_available() -> tuple[bool, str]:
    """Whether a window can be opened here, and if not, why."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return False, "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    return True, ""


class Window:
    """A live preview; closes itself (and the demo carries on) if the GUI fails or on q/Esc."""

    title = "pytaskqml demo - q or Esc closes the window"

    def __init__(self) -> None:
        self.open = True

    def show(self, frame: np.ndarray) -> None:
        if not self.open:
            return
        try:
            cv2.imshow(self.title, frame)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error as exc:
            print(f"demo: --show: cannot open a window ({exc.err}); carrying on", file=sys.stderr)
            self.open = False
            return
        if key in (ord("q"), 27):
            self.close()

    def close(self) -> None:
        if self.open:
            self.open = False
            try:
                cv2.destroyWindow(self.title)
                cv2.waitKey(1)
            except cv2.error:
                pass
