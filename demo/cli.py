"""Command line: ``python -m demo [--input FILE|CAMERA] [--live] [--workers N] ...``."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from demo.output import ContactSheet, VideoOut, Window, count_frames, display_available
from demo.pipeline import describe, run_pipeline
from demo.runner import LiveSource, RunReport, RunSpec, run_batch, run_live
from demo.source import (
    Clip,
    SourceError,
    camera_frames,
    capture_fps,
    generate_clip,
    open_capture,
    paced,
    parse_input,
    read_clip,
    stamp_index,
)
from demo.vision import DetectParams
from pytaskqml import PyTaskQMLError, TaskFailed

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "output"

DESCRIPTION = """\
Face detection on a video with pytaskqml: the same clip runs through 1 worker process and
through N, results come back in frame order, and the annotated video, a contact sheet and a
table of frames/s, speedup, latency, drops and ordering errors are produced.

Without --input the demo renders its own clip from the public-domain astronaut photo that
scikit-image ships, so nothing is downloaded and no camera is needed."""

EPILOG = """\
examples:
  python -m demo                       generated clip, 1 worker vs os.cpu_count() workers
  python -m demo --live                paced at the clip's fps; slow workers drop old frames
  python -m demo --input talk.mp4 --frames 300
  python -m demo --input 0 --live --show   webcam, live, in a window

exit status: 0 ok, 1 a frame came back out of order or a run failed, 2 bad arguments or an
unreadable --input."""


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        msg = f"expected WIDTHxHEIGHT, e.g. 640x480, not {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if w < 64 or h < 48:
        raise argparse.ArgumentTypeError("the clip must be at least 64x48")
    return w, h


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m demo",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("input")
    src.add_argument(
        "--input",
        metavar="FILE|INDEX",
        help="a video file, or a camera index such as 0 (default: a generated clip)",
    )
    src.add_argument(
        "--frames",
        type=_positive,
        default=240,
        help="frames to process: length of the generated clip, or the most read from --input "
        "(default: %(default)s)",
    )
    src.add_argument(
        "--size",
        type=_size,
        default=(640, 480),
        metavar="WxH",
        help="size of the generated clip (default: 640x480)",
    )
    src.add_argument(
        "--fps",
        type=float,
        default=30.0,
        help="frame rate of the generated clip, and of a file that does not say "
        "(default: %(default)s)",
    )
    run = p.add_argument_group("workers")
    run.add_argument(
        "--workers",
        type=_non_negative,
        default=os.cpu_count() or 1,
        help="worker processes for the N-worker run (default: os.cpu_count() = %(default)s)",
    )
    run.add_argument(
        "--threads",
        type=_non_negative,
        default=0,
        help="also run this many local thread workers in the N-worker run (default: 0)",
    )
    run.add_argument(
        "--window",
        type=_positive,
        default=2,
        help="tasks in flight per worker (default: %(default)s)",
    )
    run.add_argument(
        "--draw",
        choices=("coordinator", "worker"),
        default="coordinator",
        help="who draws the boxes: the coordinator (workers get a gray frame and return boxes) "
        "or the worker (it gets the colour frame and returns it annotated). "
        "Default: %(default)s, the faster one here",
    )
    run.add_argument(
        "--pipeline",
        action="store_true",
        help="run the frames through a 3-stage pytaskqml Pipeline instead: decode (threads) "
        "-> detect (--workers processes) -> annotate (threads), and report frames/s",
    )
    run.add_argument(
        "--live",
        action="store_true",
        help="feed frames at the source fps (a camera's own pace) with the drop-oldest "
        "overflow policy, and report the frames dropped",
    )
    run.add_argument(
        "--max-queue",
        type=_positive,
        default=None,
        help="frames waiting in the coordinator; in --live mode the oldest is dropped when "
        "full (default: 2 with --live, else 8)",
    )
    det = p.add_argument_group("detector")
    det.add_argument(
        "--scale-factor",
        type=float,
        default=1.1,
        help="Haar cascade scaleFactor (default: %(default)s)",
    )
    det.add_argument(
        "--min-neighbors",
        type=_positive,
        default=6,
        help="Haar cascade minNeighbors (default: %(default)s)",
    )
    det.add_argument(
        "--min-face",
        type=_positive,
        default=None,
        metavar="PX",
        help="smallest face looked for, in pixels (default: a sixth of the frame height)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help="where annotated video and contact sheet go (default: demo/output)",
    )
    out.add_argument(
        "--show", action="store_true", help="show the annotated frames in a window if possible"
    )
    out.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


@dataclass
class Outputs:
    """The N-worker run's sink: video file, contact sheet and optional window."""

    video: VideoOut
    sheet: ContactSheet
    window: Window | None

    def __call__(self, index: int, frame: np.ndarray) -> None:
        self.video.write(frame)
        self.sheet.add(frame)
        if self.window is not None:
            self.window.show(frame)


def _fmt_ms(a: float, b: float) -> str:
    return f"{a * 1000:.0f} / {b * 1000:.0f}"


def format_table(reports: Sequence[RunReport]) -> str:
    """The results table, one row per run; speedup is relative to the first row."""
    head = (
        f"{'workers':<24}{'frames':>7}{'frames/s':>10}{'speedup':>9}"
        f"{'p50 / p99 ms':>15}{'coord p50/p99':>15}{'detect ms':>11}"
        f"{'dropped':>9}{'out of order':>14}{'face found':>12}"
    )
    lines = [head, "-" * len(head)]
    base = reports[0].fps if reports else 0.0
    for r in reports:
        rate = r.detection_rate
        found = (
            f"{r.found}/{r.visible}" if rate is not None else f"{r.frames_with_face}/{r.delivered}"
        )
        detect = sum(r.detect_ms) / len(r.detect_ms) if r.detect_ms else 0.0
        speed = f"{r.fps / base:.2f}x" if base > 0 else "-"
        lines.append(
            f"{r.spec.label:<24}{r.delivered:>7}{r.fps:>10.1f}{speed:>9}"
            f"{_fmt_ms(r.e2e(0.5), r.e2e(0.99)):>15}{_fmt_ms(r.coord_p50, r.coord_p99):>15}"
            f"{detect:>11.1f}{r.dropped:>9}{r.out_of_order:>14}{found:>12}"
        )
    return "\n".join(lines)


def _load(args: argparse.Namespace) -> tuple[Clip | None, int | str | None]:
    """The clip to run (None for a live camera), and the parsed --input."""
    if args.input is None:
        return generate_clip(args.frames, args.size, args.fps), None
    source = parse_input(args.input)
    if isinstance(source, int) and args.live:
        open_capture(source).release()  # fail early, with one line, if it is not there
        return None, source
    return read_clip(source, args.frames, args.fps), source


@dataclass
class Outcome:
    """Everything one invocation produced, for printing (and for the tests)."""

    name: str
    fps: float
    mode: str
    params: DetectParams
    draw_in_worker: bool
    window: int
    reports: list[RunReport]
    video: Path
    fourcc: str
    written: int
    read_back: int
    sheet: Path

    @property
    def ok(self) -> bool:
        clean = all(r.out_of_order == 0 and r.skipped == r.dropped for r in self.reports)
        return clean and self.read_back == self.written


def run(argv: Sequence[str] | None = None) -> tuple[int, Outcome | None]:
    """Parse *argv*, run the demo; (exit status, outcome or None if it could not start)."""
    args = build_parser().parse_args(argv)
    if args.workers + args.threads == 0:
        print("demo: need at least one worker (--workers or --threads)", file=sys.stderr)
        return 2, None
    cv2.setNumThreads(1)  # the coordinator process leaves the cores to the workers

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    t0 = time.perf_counter()
    try:
        clip, source = _load(args)
    except SourceError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2, None
    if clip is not None:
        for i, frame in enumerate(clip.frames):
            stamp_index(frame, i)
        fps, height, name = clip.fps, clip.size[1], clip.name
        log(f"demo: {name} ready in {time.perf_counter() - t0:.1f}s")
    else:
        assert isinstance(source, int)
        cap = open_capture(source)
        fps, height = capture_fps(cap, args.fps), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        cap.release()
        name = f"camera {source} (live, up to {args.frames} frames)"

    params = DetectParams(
        scale_factor=args.scale_factor,
        min_neighbors=args.min_neighbors,
        min_size=args.min_face or max(24, height // 6),
    )
    if args.pipeline:
        if clip is None:
            print("demo: --pipeline needs a clip or a file, not a live camera", file=sys.stderr)
            return 2, None
        rep = run_pipeline(clip, params, args.workers)
        print(describe(rep, max(1, args.workers)))
        return (0 if rep.in_order and rep.stamps_ok else 1), None
    window: Window | None = None
    if args.show:
        ok, why = display_available()
        if ok:
            window = Window()
        else:
            print(f"demo: --show: {why}; carrying on without a window", file=sys.stderr)

    draw_in_worker = args.draw == "worker"
    max_queue = args.max_queue or (2 if args.live else 8)
    specs = [RunSpec(1, 0, args.window, draw_in_worker, max_queue)]
    if (args.workers, args.threads) != (1, 0):
        specs.append(RunSpec(args.workers, args.threads, args.window, draw_in_worker, max_queue))

    args.output.mkdir(parents=True, exist_ok=True)
    outputs = Outputs(VideoOut(args.output, "annotated", fps), ContactSheet(), window)
    reports: list[RunReport] = []
    mode = f"live at {fps:g} fps, drop-oldest, max_queue={max_queue}" if args.live else "batch"
    log(f"demo: {mode}; runs: " + ", then ".join(s.label for s in specs))
    truth = clip.truth if clip is not None else None
    try:
        for k, spec in enumerate(specs):
            sink = outputs if k == len(specs) - 1 else None
            if not args.live:
                assert clip is not None
                rep = run_batch(clip.frames, spec, params, truth=truth, sink=sink,
                                progress=not args.quiet)  # fmt: skip
            else:
                frames: LiveSource
                if clip is not None:
                    frames = paced(clip.frames, fps)
                else:
                    assert isinstance(source, int)
                    frames = functools.partial(camera_frames, open_capture(source), args.frames)
                rep = run_live(frames, spec, params, total=args.frames, truth=truth, sink=sink,
                               progress=not args.quiet)  # fmt: skip
            reports.append(rep)
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130, None
    except TaskFailed as exc:
        print(f"demo: a frame failed in the detector: {exc}", file=sys.stderr)
        print(exc.remote_traceback.rstrip(), file=sys.stderr)
        return 1, None
    except PyTaskQMLError as exc:
        print(f"demo: pytaskqml: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1, None
    finally:
        outputs.video.close()
        if window is not None:
            window.close()

    sheet_path = args.output / "contact_sheet.png"
    last = reports[-1]
    shown = min(last.delivered, outputs.sheet.columns * outputs.sheet.rows)
    title = (
        f"pytaskqml demo - {last.spec.label} - {shown} of {last.delivered} frames, evenly spaced"
    )
    outputs.sheet.save(sheet_path, title)
    outcome = Outcome(
        name=name,
        fps=fps,
        mode=mode,
        params=params,
        draw_in_worker=draw_in_worker,
        window=args.window,
        reports=reports,
        video=outputs.video.path,
        fourcc=outputs.video.fourcc,
        written=outputs.video.written,
        read_back=count_frames(outputs.video.path),
        sheet=sheet_path,
    )
    print_summary(outcome)
    return (0 if outcome.ok else 1), outcome


def _show_path(path: Path) -> str:
    """*path* relative to the current directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_summary(o: Outcome) -> None:
    """The table and the lines under it (stdout); ordering errors also go to stderr."""
    p = o.params
    draw_by = "the worker" if o.draw_in_worker else "the coordinator"
    print(
        f"pytaskqml face-detection demo: {o.name} at {o.fps:g} fps, {o.mode}\n"
        f"Haar cascade scaleFactor={p.scale_factor} minNeighbors={p.min_neighbors} "
        f"min face {p.min_size}px; boxes drawn by {draw_by}; window={o.window} per worker\n"
    )
    print(format_table(o.reports))
    print()
    last = o.reports[-1]
    if last.detection_rate is not None:
        boxes = "box" if last.extra_boxes == 1 else "boxes"
        print(
            f"faces: boxed in {last.found} of {last.visible} frames where the face is visible "
            f"({last.detection_rate:.1%}); {last.extra_boxes} {boxes} elsewhere"
        )
    else:
        print(f"faces: found in {last.frames_with_face} of {last.delivered} frames")
    check = "" if o.read_back == o.written else " - MISMATCH"
    print(
        f"video: {_show_path(o.video)} ({o.written} frames, {o.fourcc}; "
        f"read back {o.read_back} frames{check})"
    )
    print(f"contact sheet: {_show_path(o.sheet)}")
    print(
        "p50 / p99: end to end, frame handed to the coordinator -> its result out in order; "
        "coord p50/p99: Coordinator.statistics()"
    )
    busy = [r for r in o.reports if r.other_load is not None and r.other_load >= 0.1]
    if busy:
        used = ", ".join(f"{r.other_load:.1f} during {r.spec.label}" for r in busy)
        cores = os.cpu_count() or 1
        print(
            f"note: other programs kept CPU cores busy ({used}; this machine has {cores}): "
            "frames/s and speedup are lower than on an idle machine"
        )
    for r in o.reports:
        if r.out_of_order or r.skipped != r.dropped:
            print(
                f"ERROR [{r.spec.label}]: {r.out_of_order} frames out of order; "
                f"{r.skipped} missing from the output but {r.dropped} reported dropped",
                file=sys.stderr,
            )


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv)[0]
