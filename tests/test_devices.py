"""GPU seats: ``spawn(..., devices=[...])`` gives each spawned process its own device through
its environment, and a process that dies is replaced on the same device. Checked by what real
spawned processes see in their environment (no GPU needed)."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from device_workers import DeviceProbe

from pytaskqml import Coordinator
from pytaskqml.engine.seats import assign_devices, check_devices

T = 30.0  # seconds: the bound on every blocking call here


def seen(coord: Coordinator, n: int) -> dict[int, dict[str, Any]]:
    """What each of the *n* attached workers sees, by process id."""
    out = coord.broadcast("env", timeout=T)
    assert not out.errors and len(out.results) == n
    return {r["pid"]: r for r in out.results.values()}


def device_of(report: dict[str, Any]) -> str | None:
    """The device one worker was given - the same whichever way it looked."""
    values = {report["at_import"], report["at_setup"], report["cuda"], report["device"]}
    assert len(values) == 1, f"the environment changed under the worker: {report}"
    return report["cuda"]


def test_each_process_sees_its_device_round_robin() -> None:
    with Coordinator() as coord:
        pids = coord.spawn(DeviceProbe, processes=3, devices=[0, "1"], timeout=T)
        got = seen(coord, 3)
        assert {pid: device_of(got[pid]) for pid in pids} == {
            pids[0]: "0",
            pids[1]: "1",
            pids[2]: "0",
        }


def test_a_replacement_keeps_its_seats_device() -> None:
    """Seats on devices 0, 1, 0. Killing the third worker and then the second: each comes
    back on its own seat's device (a replacement handed "the next device" would get 1 and
    then 0)."""
    with Coordinator() as coord:
        pids = coord.spawn(DeviceProbe, processes=3, devices=["0", "1"], timeout=T)
        assert {p: device_of(r) for p, r in seen(coord, 3).items()} == dict(
            zip(pids, ["0", "1", "0"], strict=True)
        )
        expected = dict(zip(pids, ["0", "1", "0"], strict=True))
        for victim in (pids[2], pids[1]):
            device = expected.pop(victim)
            before = set(expected)
            os.kill(victim, signal.SIGKILL)
            assert coord.wait_until(
                lambda s, v=victim: len(s.workers) == 3 and v not in {w.pid for w in s.workers},
                T,
            ), f"worker {victim} to be replaced"
            got = seen(coord, 3)
            (new,) = set(got) - before
            expected[new] = device
            assert {p: device_of(r) for p, r in got.items()} == expected
        assert coord.statistics().restarts == 2


def test_without_devices_the_environment_is_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    monkeypatch.delenv("PYTASKQML_DEVICE", raising=False)
    with Coordinator() as coord:
        (pid,) = coord.spawn(DeviceProbe, processes=1, timeout=T)
        (report,) = seen(coord, 1).values()
        assert report["pid"] == pid
        assert report["at_setup"] == report["cuda"] == "7" and report["device"] is None


@pytest.mark.parametrize(
    ("devices", "error"),
    [
        ([], ValueError),
        ("0", TypeError),
        (0, TypeError),
        ([-1], ValueError),
        ([True], ValueError),
        ([1.0], ValueError),
        (["a\0b"], ValueError),
    ],
)
def test_bad_devices_are_refused_before_anything_starts(devices: Any, error: type) -> None:
    with Coordinator() as coord:
        with pytest.raises(error):
            coord.spawn(DeviceProbe, processes=2, devices=devices)
        assert coord.statistics().workers == ()


def test_device_ids_accepted() -> None:
    assert check_devices(None) is None
    assert check_devices([0, "1", "0,1", "GPU-5f3c", ""]) == ["0", "1", "0,1", "GPU-5f3c", ""]
    assert check_devices((2,)) == ["2"]


def test_assignment_is_round_robin_and_fills_gaps() -> None:
    assert assign_devices(["0", "1"], [], 5) == ["0", "1", "0", "1", "0"]
    assert assign_devices(["a", "b", "c"], [], 2) == ["a", "b"]
    # A self-sizing pool that let the workers on "1" go grows back onto "1" first.
    assert assign_devices(["0", "1"], ["0", "0"], 3) == ["1", "1", "0"]
    assert assign_devices(["0", "1"], ["1", "0", "x"], 1) == ["0"]  # unknown ids are ignored
