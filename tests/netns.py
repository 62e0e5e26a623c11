"""Network hosts for tests: Linux network namespaces on a bridge, in a /24 of their own.

Each host is a namespace with one end of a veth pair as its ``eth0``; the other end is a port
of a bridge in the root namespace, where the test (the coordinator) has the subnet's ``.1``.
Names carry a random tag, the subnet is one of 10.231.0.0/16 not in use here, and
:meth:`Hosts.close` deletes every namespace and link, also when a test fails. Traffic goes
only to these addresses.

:meth:`Host.cut` takes the host's link down (its bridge port), :meth:`Host.rejoin` brings it
back; :meth:`Host.add_latency` delays its traffic with ``tc netem`` when the kernel has it.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"pqprobe{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Host:
    """A network host of a test: a namespace with its address."""

    def __init__(self, hosts: Hosts, index: int) -> None:
        self.ns = f"pq{hosts.tag}h{index}"
        self.port = f"pq{hosts.tag}p{index}"  # its link's end in the root namespace
        self.address = f"{hosts.prefix}.{index + 1}"
        _ip("netns", "add", self.ns)
        hosts.namespaces.append(self.ns)
        _ip("link", "add", self.port, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        _ip("link", "set", self.port, "master", hosts.bridge, "up")
        _ip("addr", "add", f"{self.address}/24", "dev", "eth0", ns=self.ns)
        _ip("link", "set", "eth0", "up", ns=self.ns)
        _ip("link", "set", "lo", "up", ns=self.ns)

    def command(self, *argv: str) -> list[str]:
        """*argv* run inside this host."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def cut(self) -> None:
        """Take the link down: from now on nothing reaches the host or leaves it."""
        _ip("link", "set", self.port, "down")

    def rejoin(self) -> None:
        _ip("link", "set", self.port, "up")

    def add_latency(self, delay_ms: float) -> str | None:
        """Delay what leaves the host by *delay_ms* with netem; None, or why it cannot."""
        cmd = ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", f"{delay_ms}ms"]
        if shutil.which("tc") is None:
            return "the tc command is not installed"
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns, *cmd], capture_output=True, text=True, timeout=20
        )
        if done.returncode != 0:
            return f"tc netem is not available: {done.stderr.strip()}"
        return None


class Hosts:
    """A bridge and the hosts on it (see the module's docstring)."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.bridge = f"pq{self.tag}br"
        self.namespaces: list[str] = []
        used = _ip("-o", "addr").stdout
        third = [n for n in range(256) if f"10.231.{n}." not in used]
        self.prefix = f"10.231.{random.choice(third)}"
        self.address = f"{self.prefix}.254"  # the test's own, on the bridge
        self.hosts: list[Host] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self) -> Host:
        host = Host(self, len(self.hosts) + 1)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        # Deleting a veth end deletes its pair at once; a deleted namespace takes its pairs
        # with it only when the kernel gets round to it, so the ports go first.
        for host in self.hosts:
            _ip("link", "del", host.port, check=False)
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    why = unavailable()
    if why is not None:
        pytest.skip(f"needs network namespaces: {why}")
    h = Hosts()
    try:
        yield h
    finally:
        h.close()


def leftovers(tag: str) -> list[str]:
    """Namespaces and links of a tag still present (for the cleanup check)."""
    names = _ip("netns", "list").stdout + _ip("-o", "link").stdout
    return [line for line in names.splitlines() if f"pq{tag}" in line]


@contextlib.contextmanager
def processes() -> Iterator[list[Any]]:
    """Processes started in hosts, killed and reaped at the end whatever happens."""
    started: list[Any] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
        for p in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=10)
