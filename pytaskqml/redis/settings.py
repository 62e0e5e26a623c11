"""A shared queue's settings as the queue's parts read them, and redis-py, imported lazily.

:class:`QueueSettings` is what :class:`~pytaskqml.redis.queue.RedisQueue` is to the feed, the
writer and the client: its keys, bounds and connections. It is a ``Protocol`` so that those
modules need not import the queue, whose ``serve()`` and ``client()`` construct them.
"""

from __future__ import annotations

from typing import Any, Protocol


class QueueSettings(Protocol):
    """A Redis queue's keys, bounds and connections (a :class:`RedisQueue`)."""

    stream: str
    group: str
    dead_stream: str
    claim_idle: float
    max_deliveries: int
    max_length: int
    max_results: int
    max_dead: int
    result_ttl: float

    def results_key(self, producer: str) -> str: ...
    def producer_key(self, producer: str) -> str: ...
    def connect(self) -> Any: ...
    def ensure_group(self, r: Any) -> None: ...


def require_redis() -> Any:
    """The ``redis`` module, or an ImportError that says how to get it."""
    try:
        import redis
    except ImportError:
        raise ImportError(
            "the Redis queue needs redis-py: pip install 'pytaskqml[redis]' (or redis>=5)"
        ) from None
    return redis
