"""TaskFuture's own result()/set_result(): the same contract as concurrent.futures.Future."""

from __future__ import annotations

import threading
from concurrent import futures
from concurrent.futures import CancelledError, Future, InvalidStateError

import pytest

from pytaskqml.core.future import TaskFuture

T = 10.0


class _Inline:
    def call(self, fn: object, *args: object) -> None:
        fn(*args)  # type: ignore[operator]


def _future() -> TaskFuture:
    f = TaskFuture()
    f._runner = _Inline()
    return f


@pytest.mark.parametrize("cls", [Future, TaskFuture])
@pytest.mark.parametrize("timeout", [0, -1, 0.01])
def test_a_pending_future_times_out(cls: type[Future[int]], timeout: float) -> None:
    f = cls()
    with pytest.raises(futures.TimeoutError):
        f.result(timeout)
    assert not f._condition._waiters  # type: ignore[attr-defined]
    f.set_result(1)
    assert f.result(0) == 1


def test_a_waiter_is_woken_by_the_setter_on_another_thread() -> None:
    f = _future()
    waiting = threading.Event()
    out: list[object] = []

    def wait() -> None:
        waiting.set()
        out.append(f.result(T))

    t = threading.Thread(target=wait)
    t.start()
    assert waiting.wait(T)
    f.set_result("x")
    t.join(T)
    assert out == ["x"]


def test_an_exception_is_raised_by_result_and_returned_by_exception() -> None:
    f = _future()
    f.set_exception(KeyError("k"))
    with pytest.raises(KeyError):
        f.result(0)
    assert isinstance(f.exception(0), KeyError)
    with pytest.raises(InvalidStateError):
        f.set_result(1)


def test_cancel_wakes_a_waiter_with_cancelled_error() -> None:
    f = _future()
    waiting = threading.Event()
    out: list[BaseException] = []

    def wait() -> None:
        waiting.set()
        try:
            f.result(T)
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    assert waiting.wait(T)
    # (cancel() may come before the waiter has queued itself: either way it ends cancelled)
    assert f.cancel()
    t.join(T)
    assert len(out) == 1 and isinstance(out[0], CancelledError)
    with pytest.raises(InvalidStateError):
        f.set_result(1)


def test_running_then_finished_and_the_stdlib_waiters() -> None:
    fs: list[Future[object]] = [_future() for _ in range(3)]
    assert all(f.set_running_or_notify_cancel() for f in fs[:2])
    assert fs[2].cancel() and not fs[2].set_running_or_notify_cancel()
    fs[1].set_result(2)
    done, _ = futures.wait(fs[:2], T, return_when=futures.FIRST_COMPLETED)
    assert done == {fs[1]}
    threading.Timer(0.01, fs[0].set_exception, (ValueError("v"),)).start()
    assert set(futures.as_completed(fs[:2], T)) == set(fs[:2])
    assert isinstance(fs[0].exception(), ValueError)


def test_done_callbacks_run_once_finished() -> None:
    f = _future()
    seen: list[object] = []
    f.add_done_callback(lambda g: seen.append(g.result()))
    f.set_result(5)
    f.add_done_callback(lambda g: seen.append(-g.result()))
    assert seen == [5, -5]
