"""What the numbers were measured on: cores, CPU model, Python, and each system's version."""

from __future__ import annotations

import functools
import os
import platform
from importlib import metadata
from typing import Any

PACKAGES = (
    "pytaskqml",
    "celery",
    "kombu",
    "redis",
    "numpy",
    "opencv-python",
    "matplotlib",
    "ray",
    "dask",
    "distributed",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def redis_server_version(url: str) -> str | None:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()
    except Exception:  # redis-py missing or no server: the version is simply unknown
        return None


@functools.cache
def describe(redis_url: str) -> dict[str, Any]:
    """A JSON-ready description of this machine and the software under test."""
    versions = package_versions()
    versions["redis-server"] = redis_server_version(redis_url)
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "versions": versions,
    }
