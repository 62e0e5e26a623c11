"""Worker classes for ``test_reliability.py`` that a spawned child process must import.

They live in their own module (not the test file) so the child does not import pytest.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pytaskqml import Worker


class FileGate(Worker):
    """``[path, value]``: waits until *path* exists (at most 30 s), then returns *value*.

    A gate that works across processes: the test holds a task in a worker until it creates the
    file, so "this task is in flight" is a fact, not a timing guess.
    """

    def process(self, payload: Any) -> Any:
        path, value = payload
        deadline = time.monotonic() + 30.0
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.005)
        return value


class Crash(Worker):
    """Every task kills the process, as a model that segfaults on any input would."""

    def process(self, payload: Any) -> Any:
        os._exit(13)
