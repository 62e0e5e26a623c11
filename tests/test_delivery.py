"""TaskFuture is a concurrent.futures.Future in every way a caller can see, and users'
callbacks never run on the coordinator's own threads."""

from __future__ import annotations

import threading
from concurrent import futures
from concurrent.futures import Future

import pytest
from sample_workers import Echo, Sleepy

from pytaskqml import Coordinator
from pytaskqml.engine.delivery import CallbackRunner, TaskFuture

T = 10.0


def make() -> TaskFuture:
    f = TaskFuture()
    f._runner = CallbackRunner("test")
    return f


def test_a_task_future_has_the_fields_of_a_future() -> None:
    assert set(vars(make())) - {"_runner"} == set(vars(Future()))


def test_wait_and_as_completed_work_on_task_futures() -> None:
    a, b = make(), make()
    for f in (a, b):
        assert f.set_running_or_notify_cancel()
    threading.Timer(0.05, a.set_result, args=(1,)).start()
    done, pending = futures.wait([a, b], timeout=T, return_when=futures.FIRST_COMPLETED)
    assert done == {a} and pending == {b}
    b.set_exception(ValueError("x"))
    assert {f for f in futures.as_completed([a, b], timeout=T)} == {a, b}
    assert a.result() == 1 and isinstance(b.exception(), ValueError)


def test_a_pending_task_future_can_be_cancelled_and_times_out_like_a_future() -> None:
    f = make()
    with pytest.raises(futures.TimeoutError):
        f.result(timeout=0.01)
    assert f.cancel() and f.cancelled()
    with pytest.raises(futures.CancelledError):
        f.result(timeout=T)


def test_done_callbacks_run_on_the_callback_thread_not_on_a_reader() -> None:
    ran: list[str] = []
    done = threading.Event()
    with Coordinator() as coord:
        coord.spawn(Sleepy, processes=1)
        fut = coord.submit(0.5)  # still running when the callback is added

        def cb(f: Future[object]) -> None:
            ran.append(threading.current_thread().name)
            done.set()

        fut.add_done_callback(cb)
        assert fut.result(T) == 0.5 and done.wait(T)
        assert ran[0].startswith("pytaskqml-callbacks"), ran
        # On a finished future the callback runs at once, in the caller's thread.
        fut.add_done_callback(cb)
        assert ran[1] == threading.current_thread().name


def test_a_slow_callback_does_not_hold_up_other_results() -> None:
    release = threading.Event()
    with Coordinator() as coord:
        coord.add_local(Echo(), threads=2)
        first = coord.submit("a")
        first.add_done_callback(lambda f: release.wait(T))
        assert first.result(T) == "a"
        # The callback is blocked; results keep coming.
        assert [coord.submit(i).result(T) for i in range(5)] == list(range(5))
        release.set()
