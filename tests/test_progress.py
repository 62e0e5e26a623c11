"""``map(progress=...)``: a bar on a terminal (a real pseudo-terminal here), nothing off one
unless forced, tqdm when it is importable and our own line when it is not."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import sys
import termios
import threading
from typing import Any

import pytest
from sample_workers import Echo

from pytaskqml import Coordinator
from pytaskqml.engine import Progress

T = 30.0


def without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError


class Terminal:
    """A pseudo-terminal: what is written to :attr:`file` can be read back as a terminal
    would show it."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        # 30 rows of 120 columns, as a terminal window has (a bare pty says 0 x 0).
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        self.file = os.fdopen(slave, "w", buffering=1)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self._chunks.append(data)

    def close(self) -> str:
        self.file.close()
        self._reader.join(T)
        os.close(self.master)
        return b"".join(self._chunks).decode(errors="replace")


def run_map(coord: Coordinator, items: Any, progress: Any) -> list[Any]:
    return list(coord.map(items, progress=progress))


def test_builtin_bar_on_a_terminal_shows_count_percentage_and_ends_at_the_total(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    without_tqdm(monkeypatch)
    term = Terminal()
    with Coordinator() as coord:
        coord.add_local(Echo(), threads=2)
        assert run_map(coord, list(range(5000)), Progress("words", file=term.file)) == list(
            range(5000)
        )
    shown = term.close()
    final = shown.replace("\r\n", "\n").split("\r")[-1]
    assert final.startswith("words: 5,000/5,000 100% [########################]")
    assert "/s" in final and "\x1b[K" in final  # a rate; each redraw clears the line's rest


def test_off_a_terminal_there_is_no_bar_unless_forced(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    without_tqdm(monkeypatch)
    with Coordinator() as coord:
        coord.add_local(Echo())
        assert run_map(coord, range(50), True) == list(range(50))
        assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal
        log = io.StringIO()
        assert run_map(coord, range(50), Progress(always=True, file=log)) == list(range(50))
        # Off a terminal the bar writes whole lines (no redraws): the last one is the total.
        lines = log.getvalue().splitlines()
        assert lines[-1].startswith("50/50 100%") and "\r" not in log.getvalue()


def test_a_generator_shows_its_count_or_the_total_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    without_tqdm(monkeypatch)
    with Coordinator() as coord:
        coord.add_local(Echo())
        log = io.StringIO()
        run_map(coord, (i for i in range(30)), Progress(always=True, file=log))
        assert log.getvalue().splitlines()[-1].startswith("30  ")  # no length: no percentage
        log = io.StringIO()
        run_map(coord, (i for i in range(30)), Progress(total=30, always=True, file=log))
        assert log.getvalue().splitlines()[-1].startswith("30/30 100%")


def test_tqdm_draws_the_bar_when_it_is_importable() -> None:
    pytest.importorskip("tqdm")
    term = Terminal()
    with Coordinator() as coord:
        coord.add_local(Echo(), threads=2)
        assert len(run_map(coord, list(range(3000)), Progress("tq", file=term.file))) == 3000
    shown = term.close()
    final = [part for part in shown.replace("\r\n", "\n").split("\r") if part.strip()][-1]
    assert final.startswith("tq: 100%|") and "3000/3000" in final  # tqdm's own layout


def test_a_stopped_map_closes_its_bar_and_bad_values_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    without_tqdm(monkeypatch)
    with Coordinator() as coord:
        coord.add_local(Echo())
        log = io.StringIO()
        it = coord.map(range(1000), progress=Progress(always=True, file=log))
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        it.close()  # the caller stopped early: the bar ends where the results did
        assert log.getvalue().splitlines()[-1].startswith("3/1,000   0% [....")
        with pytest.raises(TypeError):
            coord.map(range(3), progress="yes")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            Progress(total=-1)
