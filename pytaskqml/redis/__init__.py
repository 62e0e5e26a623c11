"""A durable queue in Redis shared by coordinators on any number of hosts.

``RedisQueue`` (``queue``: where it lives, its keys and bounds), what it stores (``format``),
its settings as its parts see them (``settings``), a coordinator's feed (``bridge``) and the
results it writes back (``writer``), a producer's ``RedisClient`` (``client``) and its results
(``results``). redis-py is imported when a queue is first used, never by ``import pytaskqml``.

May import: the front (``pytaskqml.coordinator``, ``pytaskqml.errors``), ``engine``, ``core``
and ``wire``.
"""

from .client import ProducerStats, RedisClient
from .queue import RedisQueue

__all__ = ["ProducerStats", "RedisClient", "RedisQueue"]
