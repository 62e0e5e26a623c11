"""``map(progress=...)``: a progress bar on stderr - count, rate and, when the length is
known, percentage and ETA.

``tqdm`` draws it when it is importable; otherwise a one-line bar of our own does. Either is
off when the stream is not a terminal, unless asked for with ``Progress(always=True)`` (then,
off a terminal, the built-in bar writes a plain line every few seconds instead of redrawing
one). The bar is advanced once per batch of results handed to the caller, not per item, so it
costs a fast map nothing measurable.
"""

from __future__ import annotations

import os
import time
from typing import IO, Any, Protocol


class Progress:
    """How ``map()`` shows its progress: ``label`` in front of the bar; ``total`` items when
    the input has no ``len()`` (a generator); ``always`` to show it also when the stream is
    not a terminal; ``file`` to write to instead of ``sys.stderr``. ``map(progress=True)``
    is ``map(progress=Progress())``."""

    def __init__(
        self,
        label: str = "",
        *,
        total: int | None = None,
        always: bool = False,
        file: IO[str] | None = None,
    ) -> None:
        if total is not None and (not isinstance(total, int) or total < 0):
            raise ValueError("total must be a non-negative integer or None")
        self.label = label
        self.total = total
        self.always = always
        self.file = file

    def __repr__(self) -> str:
        return f"Progress({self.label!r}, total={self.total!r}, always={self.always!r})"


class Bar(Protocol):
    def update_to(self, done: int) -> None: ...

    def close(self) -> None: ...


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _columns(stream: Any) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def open_bar(spec: bool | Progress | None, total: int | None) -> Bar | None:
    """The bar *spec* asks for (``None`` when it is off); *total* is the input's length when
    it has one."""
    if spec is None or spec is False:
        return None
    options = spec if isinstance(spec, Progress) else Progress()
    if options.file is None:
        import sys

        stream: IO[str] = sys.stderr
    else:
        stream = options.file
    tty = _isatty(stream)
    if not (tty or options.always):
        return None
    if options.total is not None:
        total = options.total
    try:
        import tqdm  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return LineBar(stream, options.label, total, tty=tty)
    return _TqdmBar(tqdm.tqdm, stream, options.label, total, tty=tty)


class _TqdmBar:
    def __init__(
        self, factory: Any, stream: IO[str], label: str, total: int | None, *, tty: bool
    ) -> None:
        # A terminal that reports no width (a bare pseudo-terminal) would get an empty bar.
        width = _columns(stream) if tty else 0
        self._bar = factory(
            total=total,
            desc=label or None,
            unit="item",
            unit_scale=False,
            file=stream,
            disable=False,
            dynamic_ncols=width > 0,
            ncols=None if width > 0 or not tty else 80,
            nrows=None if width > 0 or not tty else 24,
            mininterval=0.1 if tty else 2.0,
            leave=True,
        )
        self._done = 0

    def update_to(self, done: int) -> None:
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done

    def close(self) -> None:
        self._bar.close()


def _clock(seconds: float) -> str:
    s = int(seconds)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class LineBar:
    """The bar without tqdm: ``label: 4,096/10,000  41% [#####.......]  12,345/s  ETA 0:01``,
    redrawn in place at most every 0.1 s on a terminal, a plain line every 2 s elsewhere."""

    WIDTH = 24

    def __init__(self, stream: IO[str], label: str, total: int | None, *, tty: bool) -> None:
        self._stream = stream
        self._label = label
        self._total = total
        self._tty = tty
        self._interval = 0.1 if tty else 2.0
        self._start = self._last = time.monotonic()
        self._done = 0
        self._closed = False
        self._draw(self._start)

    def text(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = self._done / elapsed
        head = f"{self._label}: " if self._label else ""
        total = self._total
        if total:
            frac = min(1.0, self._done / total)
            filled = int(frac * self.WIDTH)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            eta = _clock((total - self._done) / rate) if rate > 0 else "?"
            return (
                f"{head}{self._done:,}/{total:,} {frac:4.0%} [{bar}]  {rate:,.0f}/s  "
                f"{'ETA ' + eta if self._done < total else _clock(elapsed)}"
            )
        return f"{head}{self._done:,}  {rate:,.0f}/s  {_clock(elapsed)}"

    def _draw(self, now: float, final: bool = False) -> None:
        self._last = now
        text = self.text(now)
        try:
            if self._tty:
                self._stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
            else:
                self._stream.write(text + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            self._closed = True  # the stream went away: the work goes on without a bar

    def update_to(self, done: int) -> None:
        self._done = done
        now = time.monotonic()
        if not self._closed and now - self._last >= self._interval:
            self._draw(now)

    def close(self) -> None:
        if not self._closed:
            self._draw(time.monotonic(), final=True)
            self._closed = True
