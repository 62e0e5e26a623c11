"""CPU accounting from /proc: per-process CPU seconds and the descendants of a process."""

from __future__ import annotations

import os
from collections.abc import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_stat(pid: int) -> tuple[int, float] | None:
    """Return (parent pid, user+system CPU seconds) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    rest = raw[raw.rfind(")") + 2 :].split()
    ppid = int(rest[1])
    utime, stime = int(rest[11]), int(rest[12])
    return ppid, (utime + stime) / CLK_TCK


def descendants(root: int) -> set[int]:
    """Every live process whose chain of parents leads to ``root`` (``root`` excluded)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = read_stat(int(entry))
        if stat is not None:
            children.setdefault(stat[0], []).append(int(entry))
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds (user+system) of each pid that is still alive."""
    out: dict[int, float] = {}
    for pid in pids:
        stat = read_stat(pid)
        if stat is not None:
            out[pid] = stat[1]
    return out


def self_cpu_seconds() -> float:
    """CPU seconds (user+system, all threads) of this process."""
    times = os.times()
    return times.user + times.system


def cmdline(pid: int) -> str:
    """The command line of ``pid`` (empty if it is gone or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
