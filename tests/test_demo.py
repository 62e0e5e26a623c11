"""The video demo, run for real on a few small frames (skipped without OpenCV/scikit-image)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "cv2", reason="the demo needs opencv-python: pip install -r demo/requirements.txt"
)
pytest.importorskip(
    "skimage", reason="the demo needs scikit-image: pip install -r demo/requirements.txt"
)

# The spawned workers import demo.detector; they inherit this process's sys.path.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from demo import cli  # noqa: E402
from demo.output import count_frames  # noqa: E402
from demo.runner import RunSpec, run_batch, run_live  # noqa: E402
from demo.source import (  # noqa: E402
    camera_frames,
    generate_clip,
    open_capture,
    paced,
    read_stamp,
    stamp_index,
)
from demo.vision import DetectParams  # noqa: E402

SMALL = ["--frames", "10", "--size", "320x240", "--quiet"]


def test_generated_clip_moves_and_knows_where_the_face_is() -> None:
    clip = generate_clip(6, (160, 120), fps=30.0)
    assert len(clip.frames) == 6 and clip.size == (160, 120)
    for a, b in zip(clip.frames, clip.frames[1:], strict=False):
        assert (a != b).any()
    assert all(box is not None for box in clip.truth)
    for i, frame in enumerate(clip.frames):
        stamp_index(frame, i * 1_000_003)
        assert read_stamp(frame) == i * 1_000_003
        assert read_stamp(frame[:, :, 0].copy()) == i * 1_000_003  # the gray payload too


def test_demo_end_to_end_in_order_with_faces(tmp_path: Path) -> None:
    status, outcome = cli.run([*SMALL, "--workers", "2", "--output", str(tmp_path)])
    assert status == 0
    assert outcome is not None
    one, two = outcome.reports
    assert (one.spec.processes, two.spec.processes) == (1, 2)
    for rep in outcome.reports:
        assert rep.submitted == rep.delivered == 10
        assert rep.out_of_order == 0 and rep.skipped == 0 and rep.dropped == 0
        assert rep.visible == 10
        assert rep.found >= 9, f"face boxed in only {rep.found}/10 frames"
        assert rep.stats.completed == 10
        # The gray frames were converted straight into shared memory and sent without a copy.
        assert rep.stats.buffers.pooled == 10 and rep.stats.buffers.lent >= 10
    assert outcome.video.exists() and outcome.written == 10
    assert count_frames(outcome.video) == 10
    assert outcome.sheet.exists() and outcome.sheet.stat().st_size > 10_000


def test_live_mode_drops_oldest_and_stays_in_order() -> None:
    clip = generate_clip(24, (320, 240), fps=200.0)
    # 200 fps into one worker that needs tens of ms per frame: most frames must be dropped.
    rep = run_live(
        paced(clip.frames, 200.0),
        RunSpec(processes=0, threads=1, max_queue=2, buffersize=4),
        DetectParams(min_size=40),
        total=24,
        truth=clip.truth,
        progress=False,
    )
    assert rep.submitted == 24
    assert rep.dropped > 0
    assert rep.delivered + rep.dropped == 24
    assert rep.skipped == rep.dropped
    assert rep.out_of_order == 0
    assert rep.found == rep.delivered


def test_live_camera_frames_are_read_into_shared_memory(tmp_path: Path) -> None:
    """A capture device whose colour frames go to worker processes is read straight into
    coord.buffer() arrays (a video file stands in for the camera)."""
    import cv2

    clip = generate_clip(8, (320, 240))
    path = tmp_path / "camera.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (320, 240))
    for frame in clip.frames:
        writer.write(frame)
    writer.release()
    rep = run_live(
        functools.partial(camera_frames, open_capture(str(path)), 8),
        RunSpec(processes=1, draw_in_worker=True, max_queue=8, buffersize=8),
        DetectParams(min_size=40),
        total=8,
        progress=False,
    )
    assert rep.delivered == 8 and rep.out_of_order == 0
    # The first frame tells the size; every one after it is decoded into a pool buffer.
    assert rep.stats.buffers.pooled == 7 and rep.stats.buffers.lent >= 7


def test_worker_draws_on_a_copy_in_a_local_thread() -> None:
    clip = generate_clip(4, (320, 240))
    for i, frame in enumerate(clip.frames):
        stamp_index(frame, i)
    before = [f.copy() for f in clip.frames]
    got: list[tuple[int, object]] = []
    rep = run_batch(
        clip.frames,
        RunSpec(processes=0, threads=1, draw_in_worker=True),
        DetectParams(min_size=40),
        truth=clip.truth,
        sink=lambda i, frame: got.append((i, frame)),
        progress=False,
    )
    assert [i for i, _ in got] == [0, 1, 2, 3]
    assert rep.out_of_order == 0 and rep.found == 4
    assert all((a == b).all() for a, b in zip(before, clip.frames, strict=True))
    assert all((f != b).any() for (_, f), b in zip(got, before, strict=True))  # boxes drawn


@pytest.mark.parametrize("bad", ["missing.mp4", "junk.mp4", "folder"])
def test_unreadable_input_is_one_line_and_exit_2(
    bad: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video\n" * 50)
    (tmp_path / "folder").mkdir()
    status = cli.main(["--input", str(tmp_path / bad), "--output", str(tmp_path / "out")])
    out, err = capfd.readouterr()
    assert status == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and bad in err, err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "--live" in capsys.readouterr().out


def test_pipeline_mode_runs_three_stages_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    from demo.pipeline import run_pipeline

    clip = generate_clip(8, (320, 240), fps=30.0)
    for i, frame in enumerate(clip.frames):
        stamp_index(frame, i)
    rep = run_pipeline(clip, DetectParams(min_size=40), workers=2)
    assert rep.frames == 8 and rep.in_order and rep.stamps_ok
    assert rep.with_faces >= 6
    status, _ = cli.run([*SMALL, "--workers", "1", "--pipeline"])
    assert status == 0
    assert "in order" in capsys.readouterr().out
