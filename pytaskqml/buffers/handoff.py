"""Hand big items over through a file instead of a frame.

Frames are capped (``max_frame_size``, 64 MiB by default) and every byte of a frame is copied
through the socket. For an item bigger than that - a long clip, a model's weights, a point
cloud - on a file system both sides can see (the same machine, or a shared mount), write it
once with :func:`spill` and send the small reference it returns; the worker reads it with
:func:`load`, memory-mapped when NumPy is available, so the pages are read only as touched.

::

    ref = spill(huge_array)                       # in the producer: {"path": ..., ...}
    coord.submit({"clip": ref, "fps": 30})

    class Model(Worker):
        def process(self, task):
            clip = load(task["clip"], delete=True)    # the worker owns it from here

The reference is plain JSON. ``load`` checks the file's size against the reference, so a
truncated or swapped file is an error, not silently wrong data.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ..wire.codec import import_numpy, loaded_numpy

_KIND = "pytaskqml-file"


def spill(data: Any, *, directory: str | None = None) -> dict[str, Any]:
    """Write *data* (``bytes``, ``bytearray``, ``memoryview`` or a NumPy array) to a new file
    in *directory* (default: the system's temporary directory) and return its reference.
    ``TypeError`` for any other type; ``OSError`` if the file cannot be written."""
    ref: dict[str, Any] = {"kind": _KIND}
    np = loaded_numpy()
    if np is not None and isinstance(data, np.ndarray):
        if data.dtype.hasobject or data.dtype.fields is not None:
            raise TypeError(f"arrays of dtype {data.dtype} cannot be handed over")
        arr = np.ascontiguousarray(data)
        view = memoryview(arr.reshape(-1).view(np.uint8))
        ref.update(dtype=arr.dtype.str, shape=list(arr.shape))
    elif isinstance(data, bytes | bytearray | memoryview):
        view = (
            memoryview(data).cast("B") if memoryview(data).c_contiguous else memoryview(bytes(data))
        )
    else:
        raise TypeError(f"spill() takes bytes or a NumPy array, not {type(data).__name__}")
    fd, path = tempfile.mkstemp(prefix="pytaskqml-", suffix=".bin", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(view)
    except BaseException:
        os.unlink(path)
        raise
    ref.update(path=path, nbytes=view.nbytes)
    return ref


def load(ref: dict[str, Any], *, delete: bool = False) -> Any:
    """Read what :func:`spill` wrote: a NumPy array (memory-mapped, read-only unless
    *delete*, in which case it is read into memory first) or ``bytes``. With *delete* the file is
    removed once read. *ref* is the dict :func:`spill` returned. ``ValueError`` for something
    that is not such a reference (or a file of another size), ``RuntimeError`` for an array
    without NumPy, ``OSError`` if the file cannot be read."""
    if (
        not isinstance(ref, dict)
        or ref.get("kind") != _KIND
        or not isinstance(ref.get("path"), str)
    ):
        raise ValueError("not a reference returned by spill()")
    path, nbytes = ref["path"], ref.get("nbytes")
    size = os.path.getsize(path)
    if size != nbytes:
        raise ValueError(f"{path} holds {size} bytes but the reference says {nbytes}")
    try:
        if "dtype" in ref:
            np = import_numpy()
            if np is None:
                raise RuntimeError("loading an array needs NumPy")
            dtype, shape = np.dtype(ref["dtype"]), tuple(ref["shape"])
            if delete:
                return np.fromfile(path, dtype=dtype).reshape(shape)
            return np.memmap(path, dtype=dtype, mode="r", shape=shape)
        with open(path, "rb") as f:
            return f.read()
    finally:
        if delete:
            os.unlink(path)
