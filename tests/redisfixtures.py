"""A real Redis for the tests: the one at 127.0.0.1:6379 (started here if it is installed and
not running), a DB of the tests' own, and a stream per test that is deleted afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 13
URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    str(REDIS_PORT),
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def _answers() -> str | None:
    """None if Redis answers, else why not."""
    try:
        import redis
    except ImportError:
        return "redis-py is not installed"
    try:
        redis.Redis(REDIS_HOST, REDIS_PORT, db=REDIS_DB, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        return f"no Redis at {REDIS_HOST}:{REDIS_PORT} ({exc})"
    return None


def _start() -> None:
    if shutil.which("redis-server") is None:
        return
    for d in ("/var/lib/redis", "/var/log/redis"):
        with contextlib.suppress(OSError):
            os.makedirs(d, exist_ok=True)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(START, timeout=10, capture_output=True, check=False)


_why: list[str | None] = []


def redis_missing() -> str | None:
    """Why the tests cannot use Redis (checked once; one attempt to start it), or None."""
    if not _why:
        why = _answers()
        if why is not None and "not installed" not in why:
            _start()
            for _ in range(20):
                why = _answers()
                if why is None:
                    break
                time.sleep(0.1)
        _why.append(why)
    return _why[0]


@pytest.fixture
def redis_url() -> str:
    why = redis_missing()
    if why is not None:
        pytest.skip(f"needs a Redis: {why}")
    return URL


@pytest.fixture
def stream(redis_url: str) -> Iterator[str]:
    """A stream name of this test's own; every key of its queue is deleted afterwards."""
    from pytaskqml.redis import RedisQueue

    name = f"t-{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        RedisQueue(redis_url, stream=name).destroy()
