"""What the numbers were measured on: cores, CPU model, Python, and each system's version."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
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


def project_commit() -> dict[str, Any]:
    """The commit of the checkout under test and whether its tree had changes, so that two
    result lines can be told apart ({"commit": None} outside a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


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
        **project_commit(),
    }
