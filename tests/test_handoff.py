"""The file hand-off for items too big for a frame."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sample_workers import SpillSummer

from pytaskqml import Coordinator, load, spill

np = pytest.importorskip("numpy")


def test_array_round_trip_memory_mapped(tmp_path: Path) -> None:
    arr = np.arange(3 * 4 * 5, dtype=">f8").reshape(3, 4, 5)
    ref = spill(arr, directory=str(tmp_path))
    assert ref["shape"] == [3, 4, 5] and ref["nbytes"] == arr.nbytes
    got = load(ref)
    assert got.dtype == arr.dtype and np.array_equal(got, arr)
    assert os.path.exists(ref["path"])
    del got
    owned = load(ref, delete=True)
    assert np.array_equal(owned, arr) and not os.path.exists(ref["path"])


def test_bytes_round_trip(tmp_path: Path) -> None:
    ref = spill(b"\x00big\xff", directory=str(tmp_path))
    assert load(ref, delete=True) == b"\x00big\xff"


def test_reference_travels_as_json_and_the_worker_loads_it(tmp_path: Path) -> None:
    arr = np.ones((256, 256), dtype=np.uint8)
    ref = spill(arr, directory=str(tmp_path))
    with Coordinator() as coord:
        coord.spawn(SpillSummer, processes=1)
        assert coord.submit({"ref": ref}).result(20) == 65536.0
    assert not os.path.exists(ref["path"])  # the worker deleted it after loading


def test_truncated_file_is_an_error(tmp_path: Path) -> None:
    ref = spill(b"0123456789", directory=str(tmp_path))
    with open(ref["path"], "r+b") as f:
        f.truncate(4)
    with pytest.raises(ValueError, match="holds 4 bytes"):
        load(ref)


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        spill({"not": "bytes"})
    with pytest.raises(ValueError):
        load({"path": "/etc/passwd"})
