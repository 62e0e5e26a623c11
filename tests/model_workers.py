"""Models the tests load by name (importable by spawned and CLI workers)."""

from __future__ import annotations

import os
import threading
from typing import Any

from pytaskqml import Model


class Scale(Model):
    """item * factor, with the factor from its config; says which process ran it."""

    def load(self, config: dict[str, Any]) -> None:
        self.factor = config.get("factor", 1)
        gate = config.get("gate")  # a file: loading waits until it exists (a slow load)
        if gate:
            while not os.path.exists(gate):
                threading.Event().wait(0.01)

    def predict(self, item: Any) -> Any:
        return [item * self.factor, os.getpid()]


class Upper(Model):
    def predict(self, item: str) -> str:
        return item.upper()


class Broken(Model):
    def load(self, config: dict[str, Any]) -> None:
        raise RuntimeError("weights file is corrupt")


class Tracker(Model):
    """Per-key state: counts items per key; key_moved records the keys it took over."""

    def load(self, config: dict[str, Any]) -> None:
        self.seen: dict[str, int] = {}
        self.moved: list[str] = []

    def key_moved(self, key: str) -> None:
        self.moved.append(key)
        self.seen[key] = 0

    def predict(self, item: Any) -> Any:
        key, n = item
        self.seen[key] = self.seen.get(key, 0) + 1
        return [key, n, os.getpid(), self.seen[key], key in self.moved]
