"""pytaskqml.Executor at its edges, with real worker processes: a script's own functions
loaded at once, long calls, results over the frame limit, a map read after its executor
shut down, cancelled calls, class methods, results freed as a map yields them,
terminate/kill, a script without its main guard, exceptions that subclass builtin ones,
KeyboardInterrupt inside a call."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from concurrent.futures import CancelledError
from pathlib import Path

import executor_funcs as f
import pytest
from conftest import child_env

from pytaskqml import Executor, TaskFailed
from pytaskqml.errors import RemoteTraceback

T = 60.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone too: reaped by its parent, which is this process's coordinator.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pids(ex: Executor) -> list[int]:
    return [w.pid for w in ex.coordinator.statistics().workers if w.pid is not None]


def _run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_two_functions_of_a_script_submitted_back_to_back_both_run(tmp_path: Path) -> None:
    # Both functions' models load at once, on two threads of the one worker: the second must
    # not find the script half run (or cached as broken).
    done = _run_script(
        tmp_path,
        """
        import time
        import pytaskqml

        time.sleep(0.2)  # a script that takes a moment to import widens the window

        def first(x):
            return x + 1

        def second(x):
            return x * 10

        if __name__ == "__main__":
            with pytaskqml.Executor(max_workers=1) as ex:
                a, b = ex.submit(first, 1), ex.submit(second, 2)
                print(a.result(60), b.result(60))
                print(ex.submit(second, 3).result(60))
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "20", "30"]


def test_a_script_that_failed_to_load_in_a_worker_is_loaded_again_by_the_next_call(
    tmp_path: Path,
) -> None:
    done = _run_script(
        tmp_path,
        """
        import pathlib
        import pytaskqml

        # Fails to import in the worker twice (its load, then the first call), then works.
        marker = pathlib.Path(__file__).with_name("failures-left")
        if __name__ != "__main__" and int(marker.read_text()) > 0:
            marker.write_text(str(int(marker.read_text()) - 1))
            raise RuntimeError("not ready yet")

        def inc(x):
            return x + 1

        if __name__ == "__main__":
            marker.write_text("2")
            with pytaskqml.Executor(max_workers=1) as ex:
                try:
                    ex.submit(inc, 1).result(60)
                except RuntimeError as exc:
                    print("first:", exc)
                print(ex.submit(inc, 2).result(60))
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["first: not ready yet", "3"]


def test_a_script_without_the_main_guard_gets_one_error_naming_the_guard(tmp_path: Path) -> None:
    done = _run_script(
        tmp_path,
        """
        import pytaskqml

        def double(x):
            return 2 * x

        ex = pytaskqml.Executor(max_workers=1)
        try:
            ex.submit(double, 21).result(60)
        except RuntimeError as exc:
            print("caught:", exc)
        ex.shutdown()
        """,
    )
    assert done.returncode == 0, done.stderr
    assert 'if __name__ == "__main__":' in done.stdout
    assert "script.py" in done.stdout
    assert "relative import" not in done.stdout + done.stderr


def test_calls_have_no_hang_timeout_unless_one_is_set() -> None:
    with Executor(max_workers=0) as ex:
        assert ex.coordinator.hang_timeout is None
    with Executor(max_workers=0, hang_timeout=5.0) as ex:
        assert ex.coordinator.hang_timeout == 5.0


def test_an_executor_starts_its_workers_without_importing_numpy(tmp_path: Path) -> None:
    """Its coordinator makes no buffer pool unless asked (deciding whether one can exist
    imports NumPy, before the first worker can start); arrays still travel."""
    pytest.importorskip("numpy")
    done = _run_script(
        tmp_path,
        """
        import sys
        from pytaskqml import Executor

        if __name__ == "__main__":
            with Executor(max_workers=1) as ex:
                assert ex.submit(pow, 2, 5).result(60) == 32
                print("numpy" in sys.modules)
            with Executor(max_workers=1, max_buffer_bytes=1 << 20) as ex:
                ex.submit(pow, 2, 5).result(60)
                print("numpy" in sys.modules)
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


def test_a_result_over_the_frame_limit_fails_its_call_and_the_worker_lives() -> None:
    with Executor(max_workers=1, max_frame_size=4 * 1024 * 1024) as ex:
        assert ex.submit(f.square, 3).result(T) == 9
        (pid,) = _pids(ex)
        with pytest.raises(ValueError, match="too large to send") as info:
            ex.submit(f.big_bytes, 5 * 1024 * 1024).result(T)
        assert "max_frame_size" in str(info.value)
        # Results that fit one by one still travel, however they were sent.
        assert [len(b) for b in ex.map(f.big_bytes, [3 << 20] * 3, chunksize=1)] == [3 << 20] * 3
        assert ex.submit(f.square, 4).result(T) == 16
        assert _pids(ex) == [pid]
        assert ex.coordinator.statistics().restarts == 0


def test_a_map_read_after_the_with_block_gives_every_result() -> None:
    with Executor(max_workers=2) as ex:
        results = ex.map(f.square, range(50))
        started = ex.map(f.square, range(1000), buffersize=8)
        assert next(started) == 0
    assert list(results) == [x * x for x in range(50)]
    assert list(started) == [x * x for x in range(1, 1000)]


@pytest.mark.parametrize("wait", [True, False])
def test_a_map_read_by_another_thread_during_the_shutdown_gives_every_result(wait: bool) -> None:
    ex = Executor(max_workers=2)
    results = ex.map(f.square, range(3000), buffersize=16)
    got: list[int] = []
    reading = threading.Event()

    def read() -> None:
        for value in results:
            got.append(value)
            if len(got) == 10:
                reading.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert reading.wait(T)
        ex.shutdown(wait=wait)  # while the reader reads: one of them takes the rest
    finally:
        reader.join(T)
        ex.shutdown()
    assert not reader.is_alive()
    assert got == [x * x for x in range(3000)]


def test_a_map_read_after_shutdown_without_wait_gives_every_result() -> None:
    ex = Executor(max_workers=2)
    try:
        results = ex.map(f.square, range(500), buffersize=16)
        ex.shutdown(wait=False)  # its thread runs the map while this one reads it
        assert list(results) == [x * x for x in range(500)]
        with pytest.raises(RuntimeError, match="shutdown"):
            ex.map(f.square, [1])
    finally:
        ex.shutdown()


def test_a_map_read_after_a_cancelling_shutdown_raises_cancelled() -> None:
    ex = Executor(max_workers=1)
    try:
        never_read = ex.map(f.square, range(10))
        started = ex.map(f.square, range(1000), buffersize=8)
        assert next(started) == 0
    finally:
        ex.shutdown(cancel_futures=True)
    with pytest.raises(CancelledError):
        next(never_read)
    got = []
    with pytest.raises(CancelledError):
        for value in started:  # what was in before the shutdown, then CancelledError
            got.append(value)
    assert got == [x * x for x in range(1, len(got) + 1)]
    assert len(got) < 999


def test_cancel_futures_a_call_either_ran_or_reports_cancelled(tmp_path: Path) -> None:
    gate = str(tmp_path / "never")
    ex = Executor(max_workers=2)
    try:
        assert ex.submit(f.square, 2).result(T) == 4
        assert ex.submit(f.sleep_then, 0, 0.0).result(T) == 0
        # Calls sent to a worker's window but not started there yet are cancelled too.
        quick = [ex.submit(f.sleep_then, i, 0.05) for i in range(50)]
        blocked = [ex.submit(f.wait_for_file, gate) for _ in range(2)]
        assert ex.coordinator.wait_until(lambda s: s.in_flight >= 2, T)
    finally:
        ex.shutdown(cancel_futures=True)
    for fut in blocked + quick:
        assert fut.done()
        if not fut.cancelled():
            assert fut.exception(0) is None
    assert all(fut.cancelled() for fut in blocked)


def test_an_inherited_classmethod_runs_bound_to_its_subclass() -> None:
    with Executor(max_workers=1) as ex:
        assert ex.submit(f.Sub.make, 1).result(T) == ["Sub", 1]
        assert ex.submit(f.Base.make, 2).result(T) == ["Base", 2]
        assert list(ex.map(f.Sub.make, [3])) == [["Sub", 3]]


@pytest.mark.parametrize("chunksize", [1, 4])
def test_the_map_iterator_keeps_no_result_it_has_yielded(chunksize: int) -> None:
    with Executor(max_workers=1) as ex:
        results = ex.map(f.array_of, [1 << 16] * 20, chunksize=chunksize)
        first = next(results)
        # Every other result is in, waiting in the iterator.
        assert ex.coordinator.wait_until(lambda s: s.in_flight == 0 and s.queued == 0, T)
        refs = [weakref.ref(first)]
        del first
        for value in results:
            refs.append(weakref.ref(value))
            del value
        gc.collect()
        # Nothing keeps a result the caller dropped: not the iterator, not the batch it came
        # in, not the connection's reader (which holds no frame between frames).
        assert [r() for r in refs] == [None] * 20


@pytest.mark.parametrize("how", ["kill_workers", "terminate_workers"])
def test_kill_and_terminate_workers_stop_the_processes_and_cancel_the_calls(
    tmp_path: Path, how: str
) -> None:
    gate = str(tmp_path / "never")
    ex = Executor(max_workers=2)
    try:
        assert ex.coordinator.wait_until(lambda s: len(s.workers) == 2, T)
        assert ex.submit(f.square, 2).result(T) == 4
        running = ex.submit(f.wait_for_file, gate)
        queued = [ex.submit(f.wait_for_file, gate) for _ in range(4)]
        assert ex.coordinator.wait_until(lambda s: s.in_flight >= 1, T)
        pids = _pids(ex)
        assert len(pids) == 2
        getattr(ex, how)()
        assert running.cancelled()
        assert all(q.cancelled() for q in queued)
        assert not any(_alive(p) for p in pids)
        with pytest.raises(RuntimeError, match="shutdown"):
            ex.submit(f.square, 1)
    finally:
        ex.shutdown(cancel_futures=True)


def test_subclasses_of_builtin_exceptions_are_caught_as_their_builtin_base() -> None:
    with Executor(max_workers=1) as ex:
        with pytest.raises(ValueError, match="JSONDecodeError: Expecting value") as info:
            ex.submit(json.loads, "not json").result(T)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "JSONDecodeError" in str(info.value.__cause__)
        with pytest.raises(ValueError, match=r"executor_funcs\.MyValueError: bad") as info2:
            ex.submit(f.fail_with_subclass, "bad").result(T)
        assert "fail_with_subclass" in str(info2.value.__cause__)
        with pytest.raises(ValueError, match="MyValueError"):
            list(ex.map(f.fail_with_subclass, ["x"]))
        # A type with no builtin base but Exception stays TaskFailed, as before.
        with pytest.raises(TaskFailed) as info3:
            ex.submit(f.fail_with, "custom", "mine").result(T)
        assert info3.value.remote_type == "executor_funcs.CustomError"


def test_keyboard_interrupt_raised_in_a_call_fails_that_call_and_the_worker_lives() -> None:
    with Executor(max_workers=1) as ex:
        assert ex.submit(f.square, 5).result(T) == 25
        (pid,) = _pids(ex)
        with pytest.raises(TaskFailed) as info:
            ex.submit(f.interrupt).result(T)
        assert info.value.remote_type == "KeyboardInterrupt"
        assert "raised by the task's own code" in info.value.message
        with pytest.raises(TaskFailed, match="KeyboardInterrupt"):
            list(ex.map(f.interrupt, [1, 2], chunksize=2))
        assert ex.submit(f.square, 6).result(T) == 36
        assert _pids(ex) == [pid]
        assert ex.coordinator.statistics().restarts == 0
        assert ex.coordinator.statistics().workers_lost == 0
