"""Small workers and models to try pytaskqml with before writing one's own, e.g.
``pytaskqml worker pytaskqml.examples:WordCount --listen 127.0.0.1:7001``."""

from __future__ import annotations

from typing import Any

from .worker.base import Worker
from .worker.models import Model


class Echo(Worker):
    """Returns its payload."""

    def process(self, payload: Any) -> Any:
        return payload


class WordCount(Worker):
    """``"apple"`` -> ``{"apple": 1}``."""

    def process(self, word: str) -> dict[str, int]:
        return {word: 1}


class Threshold(Model):
    """A stand-in for a classifier: is the item above the ``threshold`` of its config?"""

    def load(self, config: dict[str, Any]) -> None:
        self.threshold = float(config.get("threshold", 0.5))

    def predict(self, item: float) -> bool:
        return item > self.threshold


class Counter(Model):
    """Per-key state, as a tracker keeps per camera: counts the items of each key it serves."""

    def load(self, config: dict[str, Any]) -> None:
        self.counts: dict[str, int] = {}

    def key_moved(self, key: str) -> None:
        self.counts[key] = 0  # a tracker would rebuild its state for that camera here

    def predict(self, item: dict[str, Any]) -> int:
        key = item["camera"]
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]
