"""A durable task queue shared by coordinators on any number of hosts: :class:`RedisQueue`.

The queue is a Redis stream read through a consumer group. Producers (:class:`RedisClient`)
append tasks; every coordinator constructed with ``Coordinator(queue=RedisQueue(...))`` reads
entries through the group, runs them on its own workers as it runs ``map()`` items, and writes
each result to its producer's result stream before it acknowledges the entry. A coordinator that
dies leaves its entries in the group's pending list; once they have been idle for
``claim_idle`` seconds another coordinator claims them (``XAUTOCLAIM``) and runs them again. So
nothing is lost, a task may run twice, and its producer - which numbers its tasks and drops any
second result for a number it has seen - gets each result once, in submission order.

Keys (``S`` is the stream's name)::

    S                       the task stream (consumer group ``group``)
    S:dead                  the dead-letter stream: entries that cannot be run, with the reason
    S:results:P             producer P's result stream
    S:producer:P            producer P's cursor: its next number and the numbers it has taken

Lengths: an entry leaves the task stream when its result is written (``XACK`` + ``XDEL``), so
the stream holds only work not yet done; producers stop adding while it is longer than
``max_length``. A result entry is deleted once its producer has taken it; result streams are
also capped at ``max_results`` (approximately) and expire ``result_ttl`` seconds after their
last write, so a producer that never comes back leaves nothing behind for long. The dead-letter
stream keeps the last ``max_dead`` entries.

redis-py is needed only here (``pip install 'pytaskqml[redis]'``) and imported when a queue is
used, never by ``import pytaskqml``.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..wire.connection import is_loopback
from .format import check_name
from .settings import require_redis

if TYPE_CHECKING:
    from ..coordinator import Coordinator
    from .bridge import QueueFeed
    from .client import RedisClient

log = logging.getLogger(__name__)

_warned_plain: set[str] = set()


class RedisQueue:
    """Where a Redis-backed queue lives and how it behaves (see the module's docstring).

    ``url`` as redis-py reads it: ``redis://[[user]:password@]host:port/db``, or
    ``rediss://...`` for TLS (then ``ssl_ca_certs`` to verify the server with a CA of your
    own, ``ssl_certfile``/``ssl_keyfile`` for a client certificate). ``password``/``username``
    may be given here instead of in the URL. ``stream`` names the task stream (and prefixes
    every other key of this queue), ``group`` the consumer group coordinators read through.

    ``claim_idle``: seconds an entry held by a coordinator may go without a sign of life before
    another coordinator claims it: how long a producer's items stall after the coordinator
    running them dies (``kill -9``, a lost host; one that shuts down releases its entries at
    once). Each coordinator renews its entries every ``min(1, claim_idle / 4)`` seconds, so
    the default of 5 s survives four missed renewals - a pause (GC, swapping, a slow Redis) of
    up to about 4 s - before a live coordinator's work is also run elsewhere. Raise it where
    coordinators pause longer and a second run is costly; lower it where a stall costs more
    than a second run (a task may run twice either way; its result is delivered once). A
    coordinator gone for ``10 * claim_idle`` with nothing pending is removed from the group's
    consumers. ``max_deliveries``: an entry claimed more often than that is moved to the
    dead-letter stream (it keeps killing coordinators). ``max_length``: producers wait while the
    task stream is longer. ``max_results``/``result_ttl``: bounds of each result stream.
    ``max_dead``: entries the dead-letter stream keeps. ``socket_timeout``: seconds one Redis
    command may take before it counts as Redis not answering (connecting: at most 5 s of it).

    Defaults: ``url`` ``redis://127.0.0.1:6379/0``, ``stream`` ``"pytaskqml"``, ``group``
    ``"coordinators"``, ``claim_idle`` 5 s, ``max_deliveries`` 5, ``max_length`` 100,000
    entries, ``max_results`` 1,000,000 results, ``max_dead`` 10,000 entries, ``result_ttl``
    86,400 s (a day), ``socket_timeout`` 10 s. ``ValueError`` for a bad stream or group name,
    a number that is not positive, a URL that is not ``redis://``, ``rediss://`` or
    ``unix://``, or ``decode_responses``. ``redis_options`` go to ``redis.Redis.from_url`` as
    they are.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        stream: str = "pytaskqml",
        group: str = "coordinators",
        claim_idle: float = 5.0,
        max_deliveries: int = 5,
        max_length: int = 100_000,
        max_results: int = 1_000_000,
        max_dead: int = 10_000,
        result_ttl: float = 86_400.0,
        password: str | None = None,
        username: str | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        socket_timeout: float = 10.0,
        **redis_options: Any,
    ) -> None:
        check_name(stream, "stream")
        check_name(group, "group")
        for label, value in (
            ("claim_idle", claim_idle),
            ("max_deliveries", max_deliveries),
            ("max_length", max_length),
            ("max_results", max_results),
            ("max_dead", max_dead),
            ("result_ttl", result_ttl),
            ("socket_timeout", socket_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{label} must be a positive number, got {value!r}")
        if redis_options.get("decode_responses"):
            raise ValueError("the queue reads raw bytes: decode_responses must stay off")
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, got {url!r}")
        self.url = url
        self.stream = stream
        self.group = group
        self.claim_idle = float(claim_idle)
        self.max_deliveries = int(max_deliveries)
        self.max_length = int(max_length)
        self.max_results = int(max_results)
        self.max_dead = int(max_dead)
        self.result_ttl = float(result_ttl)
        self.dead_stream = f"{stream}:dead"
        self._options: dict[str, Any] = dict(redis_options)
        self._options["socket_timeout"] = socket_timeout
        self._options.setdefault("socket_connect_timeout", min(5.0, socket_timeout))
        self._options.setdefault("health_check_interval", 30)
        extra: tuple[tuple[str, str | None], ...] = (
            ("password", password),
            ("username", username),
            ("ssl_ca_certs", ssl_ca_certs),
            ("ssl_certfile", ssl_certfile),
            ("ssl_keyfile", ssl_keyfile),
        )
        for key, text in extra:
            if text is not None:
                self._options[key] = text
        host = parts.hostname or ""
        if parts.scheme == "redis" and host and not is_loopback(host) and url not in _warned_plain:
            _warned_plain.add(url)
            log.warning(
                "Redis at %s is reached without TLS: tasks and results cross the network in "
                "clear text (use rediss://)",
                host,
            )

    def __repr__(self) -> str:
        parts = urlsplit(self.url)
        where = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
        return f"<RedisQueue {where}{parts.path} stream={self.stream!r}>"

    # ---------------------------------------------------------------- keys

    def results_key(self, producer: str) -> str:
        """The Redis key of *producer*'s result stream."""
        return f"{self.stream}:results:{producer}"

    def producer_key(self, producer: str) -> str:
        """The Redis key of *producer*'s cursor (its next number and the numbers taken)."""
        return f"{self.stream}:producer:{producer}"

    # ---------------------------------------------------------------- connections

    def connect(self) -> Any:
        """A new redis-py client for this queue (raw bytes, the queue's timeouts)."""
        redis = require_redis()
        return redis.Redis.from_url(self.url, **self._options)

    def ensure_group(self, r: Any) -> None:
        """Create the stream and its consumer group if they do not exist yet. The group starts
        at the stream's beginning, so tasks added before any coordinator came are read too."""
        redis = require_redis()
        try:
            r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ---------------------------------------------------------------- the two sides

    def serve(self, coordinator: Coordinator, *, consumer: str | None = None) -> QueueFeed:
        """Feed *coordinator* from this queue (what ``Coordinator(queue=...)`` calls); returns
        the running feed. ``consumer`` names it in the group (default: host, pid and a random
        part, so a restarted coordinator never mistakes a dead one's entries for its own)."""
        from .bridge import QueueFeed

        name = consumer or default_consumer(coordinator.name)
        feed = QueueFeed(self, coordinator, check_name(name, "consumer"))
        feed.start()
        return feed

    def client(self, name: str | None = None, **options: Any) -> RedisClient:
        """A producer on this queue named *name* (default ``None``: a random name); the
        *options* are :class:`RedisClient`'s."""
        from .client import RedisClient

        return RedisClient(self, name, **options)

    # ---------------------------------------------------------------- inspection

    def status(self) -> dict[str, Any]:
        """What Redis holds for this queue now: lengths, the group's pending entries and lag,
        each consumer's pending count and idle time, the result streams."""
        r = self.connect()
        try:
            out: dict[str, Any] = {
                "stream": self.stream,
                "length": r.xlen(self.stream),
                "dead_letters": r.xlen(self.dead_stream),
                "group": None,
                "consumers": [],
            }
            groups = r.xinfo_groups(self.stream) if r.exists(self.stream) else []
            for g in groups:
                if _text(g.get("name")) == self.group:
                    out["group"] = {
                        "name": self.group,
                        "pending": g.get("pending"),
                        "lag": g.get("lag"),
                        "consumers": g.get("consumers"),
                        "last_delivered": _text(g.get("last-delivered-id")),
                    }
                    out["consumers"] = [
                        {
                            "name": _text(c.get("name")),
                            "pending": c.get("pending"),
                            "idle_s": (c.get("idle") or 0) / 1000,
                        }
                        for c in r.xinfo_consumers(self.stream, self.group)
                    ]
            results = {}
            for key in r.scan_iter(match=f"{self.stream}:results:*", count=1000):
                results[_text(key).rsplit(":", 1)[-1]] = r.xlen(key)
            out["result_streams"] = results
            return out
        finally:
            r.close()

    def destroy(self) -> int:
        """Delete every key of this queue (the stream, its group, dead letters, results,
        cursors); returns how many keys were deleted."""
        r = self.connect()
        try:
            keys = [self.stream, self.dead_stream]
            keys += list(r.scan_iter(match=f"{self.stream}:results:*", count=1000))
            keys += list(r.scan_iter(match=f"{self.stream}:producer:*", count=1000))
            return int(r.delete(*keys))
        finally:
            r.close()


def default_consumer(coordinator_name: str) -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40]
    tag = "".join(c if c.isalnum() or c in "-_." else "-" for c in coordinator_name)[:30]
    return f"{host or 'host'}-{os.getpid()}-{tag or 'c'}-{uuid.uuid4().hex[:6]}"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
