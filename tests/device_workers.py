"""A worker that reports the device environment it was started with (see test_devices.py).

In an importable module so spawned processes can import it; what the environment held when
the module was imported and when ``setup()`` ran is kept, to show the seat's device is set
before any of the user's code runs.
"""

from __future__ import annotations

import os
from typing import Any

from pytaskqml import Worker

AT_IMPORT = os.environ.get("CUDA_VISIBLE_DEVICES")


class DeviceProbe(Worker):
    def setup(self) -> None:
        self.at_setup = os.environ.get("CUDA_VISIBLE_DEVICES")

    def process(self, payload: Any) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "at_import": AT_IMPORT,
            "at_setup": self.at_setup,
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": os.environ.get("PYTASKQML_DEVICE"),
        }
