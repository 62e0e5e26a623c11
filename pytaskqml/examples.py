"""Small workers to try pytaskqml with before writing one's own, e.g.
``pytaskqml worker pytaskqml.examples:WordCount --listen 127.0.0.1:7001``."""

from __future__ import annotations

from typing import Any

from ._worker import Worker


class Echo(Worker):
    """Returns its payload."""

    def process(self, payload: Any) -> Any:
        return payload


class WordCount(Worker):
    """``"apple"`` -> ``{"apple": 1}``."""

    def process(self, word: str) -> dict[str, int]:
        return {word: 1}
