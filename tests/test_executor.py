"""pytaskqml.Executor against concurrent.futures.ProcessPoolExecutor: the same programs, the
same results and exceptions; then the documented differences, each shown on both."""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import json
import multiprocessing
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import executor_funcs as f
import pytest
from conftest import ROOT, Procs, child_env, free_port, read_line_with

from pytaskqml import Coordinator, Executor, TaskFailed, WorkerLostError, WorkerStartError
from pytaskqml.errors import ModelLoadError, RemoteTraceback
from pytaskqml.executor import caller_error
from pytaskqml.worker import FunctionWorker
from pytaskqml.worker.functions import function_target

T = 30.0
SPAWN = multiprocessing.get_context("spawn")  # as ours: no fork of a threaded test process


def make_theirs(n: int = 2, **kw: Any) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=n, mp_context=SPAWN, **kw)


@pytest.fixture(scope="module")
def ours() -> Iterator[Executor]:
    with Executor(max_workers=2) as ex:
        yield ex


@pytest.fixture(scope="module")
def theirs() -> Iterator[ProcessPoolExecutor]:
    with make_theirs() as ex:
        yield ex


# ------------------------------------------------------------------ programs run on both


def p_submit(ex: Any, tmp: Path) -> Any:
    return [
        ex.submit(f.square, 7).result(T),
        ex.submit(f.add, 1, 2, scale=3).result(T),
        ex.submit(f.add, a=4).result(T),
        ex.submit(f.describe, 1, "a", [2, 3.5], k={"x": None, "y": [True]}).result(T),
        ex.submit(pow, 2, 10).result(T),
    ]


def p_map(ex: Any, tmp: Path) -> Any:
    return [
        list(ex.map(f.square, range(200))),
        list(ex.map(f.add, range(10), range(100, 105))),  # the shortest input ends it
        list(ex.map(f.square, [])),
        list(ex.map(f.square, range(50), chunksize=7)),
        list(ex.map(int, ["1", "22"])),
        list(ex.map(str.upper, ["a", "b"])),
    ]


def p_errors(ex: Any, tmp: Path) -> Any:
    out = []
    for call in (
        (f.divide, 1, 0),
        (f.lookup, "zz"),
        (f.lookup, 3),
        (f.fail_with, "value", "bad value"),
        (f.fail_with, "type", "bad type"),
        (f.fail_with, "runtime", ""),
        (f.fail_with, "file", "/nonexistent-pytaskqml"),
    ):
        fut = ex.submit(*call)
        exc = fut.exception(T)
        assert exc is not None
        with pytest.raises(type(exc)):
            fut.result(T)
        out.append((type(exc).__name__, str(exc), exc.args, getattr(exc, "errno", None)))
    return out


def p_map_error(ex: Any, tmp: Path) -> Any:
    got = []
    try:
        for r in ex.map(f.fail_at, range(10), [6] * 10):
            got.append(r)
    except ValueError as exc:
        return got, str(exc)
    return got, None


def p_timeouts(ex: Any, tmp: Path) -> Any:
    out = []
    it = ex.map(f.sleep_then, [1, 2], [0.3, 0.3], timeout=0.05)
    try:
        next(it)
    except concurrent.futures.TimeoutError:
        out.append("map timed out")
    fut = ex.submit(f.sleep_then, 3, 0.3)
    try:
        fut.result(timeout=0.05)
    except concurrent.futures.TimeoutError:
        out.append("result timed out")
    out.append(fut.result(T))
    return out


def p_wait_and_as_completed(ex: Any, tmp: Path) -> Any:
    futs = [ex.submit(f.square, i) for i in range(30)]
    done, not_done = concurrent.futures.wait(futs, timeout=T)
    first = concurrent.futures.wait(
        [ex.submit(f.square, 2)], timeout=T, return_when=concurrent.futures.FIRST_COMPLETED
    )
    return (
        len(done),
        len(not_done),
        len(first.done),
        sorted(x.result() for x in concurrent.futures.as_completed(futs, timeout=T)),
    )


def p_callbacks(ex: Any, tmp: Path) -> Any:
    fut = ex.submit(f.square, 3)
    seen: list[Any] = []
    called = threading.Event()

    def callback(done: Any) -> None:
        seen.append((done is fut, done.result()))
        called.set()

    fut.add_done_callback(callback)
    assert called.wait(T)
    late: list[Any] = []
    fut.add_done_callback(lambda done: late.append(done.result()))  # done: runs at once
    return seen, late, fut.running(), fut.done()


def p_cancel(ex: Any, tmp: Path) -> Any:
    gate = tmp / "gate"
    starts = [tmp / f"started{i}" for i in range(2)]
    blockers = [ex.submit(f.wait_for_file, str(gate), 30.0, str(s)) for s in starts]
    # Both workers busy before the calls are queued (none of them can run, and a worker holds
    # at most its window of them): the last one has not started when it is cancelled.
    deadline = time.monotonic() + T
    while not all(s.exists() for s in starts) and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = [ex.submit(f.square, i) for i in range(300)]
    cancelled = queued[-1].cancel()
    gate.touch()
    results = [q.result(T) for q in queued[:-1]]
    try:
        queued[-1].result(T)
    except concurrent.futures.CancelledError:
        results.append("cancelled")
    return cancelled, queued[-1].cancelled(), results, [Path(b.result(T)).name for b in blockers]


PROGRAMS = [
    p_submit,
    p_map,
    p_errors,
    p_map_error,
    p_timeouts,
    p_wait_and_as_completed,
    p_callbacks,
    p_cancel,
]


def outcome(program: Callable[[Any, Path], Any], ex: Any, tmp: Path) -> Any:
    tmp.mkdir()
    try:
        return ("returned", program(ex, tmp))
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.__name__)
def test_a_program_gives_the_same_results_and_exceptions_on_both(
    program: Callable[[Any, Path], Any],
    ours: Executor,
    theirs: ProcessPoolExecutor,
    tmp_path: Path,
) -> None:
    expected = outcome(program, theirs, tmp_path / "theirs")
    got = outcome(program, ours, tmp_path / "ours")
    assert expected[0] == "returned", expected
    assert got == expected


def lifecycle(make: Callable[..., Any]) -> Any:
    out: list[Any] = []
    ex = make(1)
    futs = [ex.submit(f.square, i) for i in range(5)]
    ex.shutdown(wait=True)
    out.append(([x.done() for x in futs], [x.result() for x in futs]))
    for late in (lambda: ex.submit(f.square, 1), lambda: ex.map(f.square, [1])):
        try:
            late()
        except RuntimeError as exc:
            out.append(str(exc))
    ex.shutdown()  # again: nothing happens
    with make(1, initializer=f.initialize, initargs=("ready",)) as ex2:
        out.append([ex2.submit(f.initialized).result(T), list(ex2.map(f.square, range(3)))])
    return out


def test_shutdown_with_and_an_initializer_behave_the_same_on_both() -> None:
    expected = lifecycle(make_theirs)
    got = lifecycle(lambda n, **kw: Executor(max_workers=n, **kw))
    assert expected[1] == "cannot schedule new futures after shutdown"
    assert got == expected


# ------------------------------------------------------------------ the documented differences


def test_results_are_what_json_carries_and_custom_exceptions_arrive_as_task_failed(
    ours: Executor, theirs: ProcessPoolExecutor
) -> None:
    assert theirs.submit(f.describe, (1, 2), {3: "x"}).result(T) == {
        "args": [(1, 2), {3: "x"}],
        "kwargs": {},
    }
    assert ours.submit(f.describe, (1, 2), {3: "x"}).result(T) == {
        "args": [[1, 2], {"3": "x"}],
        "kwargs": {},
    }
    with pytest.raises(f.CustomError, match="mine"):
        theirs.submit(f.fail_with, "custom", "mine").result(T)
    with pytest.raises(TaskFailed) as info:
        ours.submit(f.fail_with, "custom", "mine").result(T)
    assert info.value.remote_type == "executor_funcs.CustomError"
    assert info.value.message == "mine"
    assert "raise CustomError(message)" in info.value.remote_traceback
    # A builtin type is raised as itself, with the worker's traceback as its cause.
    exc = ours.submit(f.divide, 1, 0).exception(T)
    assert type(exc) is ZeroDivisionError
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "return a / b" in str(exc.__cause__)
    # A result that cannot travel fails its call (ProcessPoolExecutor would pickle the set).
    assert theirs.submit(f.returns_set).result(T) == {1, 2}
    with pytest.raises(TypeError, match="not JSON serializable"):
        ours.submit(f.returns_set).result(T)


def nested_function() -> Callable[[int], int]:
    def inner(x: int) -> int:
        return x

    return inner


class Holder:
    def method(self, x: int) -> int:
        return x

    @staticmethod
    def static(x: int) -> int:
        return x + 1

    @classmethod
    def create(cls, x: int) -> int:
        return x + 2


def test_what_has_no_import_path_or_cannot_travel_is_refused_at_submit(ours: Executor) -> None:
    refused: list[Any] = [
        lambda x: x,
        nested_function(),
        Holder().method,
        functools.partial(f.square, 2),
        "abc".upper,
        print.__call__,
    ]
    for fn in refused:
        with pytest.raises(TypeError):
            ours.submit(fn, 1)
        with pytest.raises(TypeError):
            ours.map(fn, [1])
    for bad in ({1, 2}, object(), {"k": {1}}):
        with pytest.raises(TypeError, match="cannot be sent to a worker"):
            ours.submit(f.describe, bad)
    with pytest.raises(TypeError):
        list(ours.map(f.describe, [1, {2}]))
    # What does have a path runs: static and class methods, builtins, bytes arguments.
    assert ours.submit(Holder.static, 1).result(T) == 2
    assert ours.submit(Holder.create, 1).result(T) == 3
    assert ours.submit(len, b"abcd").result(T) == 4


def test_a_function_a_worker_cannot_import_fails_each_call_with_the_import_error(
    ours: Executor,
) -> None:
    ghost = types.ModuleType("ghost_module_only_here")  # importable here, nowhere else

    def haunt(x: int) -> int:
        return x

    haunt.__module__, haunt.__qualname__ = ghost.__name__, "haunt"
    ghost.haunt = haunt  # type: ignore[attr-defined]
    sys.modules[ghost.__name__] = ghost
    try:
        for _ in range(2):
            exc = ours.submit(haunt, 1).exception(T)
            assert type(exc) is ModuleNotFoundError, exc
            assert "ghost_module_only_here" in str(exc)
        with pytest.raises(ModuleNotFoundError):
            list(ours.map(haunt, range(5)))
        assert ours.submit(f.square, 3).result(T) == 9  # the others are not affected
    finally:
        del sys.modules[ghost.__name__]


def test_function_targets_name_what_a_worker_can_import() -> None:
    assert function_target(f.square) == ("executor_funcs:square", None)
    assert function_target(Holder.static)[0] == "test_executor:Holder.static"
    assert function_target(Holder.create)[0] == "test_executor:Holder.create"
    assert function_target(str.upper)[0] == "builtins:str.upper"
    assert function_target(pow)[0] == "builtins:pow"
    rebound = f.square
    wrapped = functools.lru_cache(f.add)  # keeps the name, but is another object
    for fn, why in (
        (lambda: None, "lambda"),
        (nested_function(), "inside a function"),
        (Holder().method, "bound method"),
        (functools.partial(f.add, 1), "no import path"),
        (wrapped, "does not name"),
    ):
        with pytest.raises(TypeError, match=why):
            function_target(fn)
    assert function_target(rebound)[0] == "executor_funcs:square"


def test_builtin_exceptions_come_back_as_themselves_others_stay_task_failed() -> None:
    def failed(kind: str, message: str) -> TaskFailed:
        err = TaskFailed(kind, message, "Traceback ...")
        err.__cause__ = RemoteTraceback("Traceback ...")
        return err

    key = caller_error(failed("KeyError", "'a b'"))
    assert type(key) is KeyError and key.args == ("a b",)
    assert caller_error(failed("KeyError", "(1, 'x')")).args == ((1, "x"),)
    assert caller_error(failed("KeyError", "<object at 0x1>")).args == ("<object at 0x1>",)
    err = caller_error(failed("FileNotFoundError", "[Errno 2] No such file or directory: 'x'"))
    assert type(err) is FileNotFoundError and err.errno == 2
    assert str(err) == "[Errno 2] No such file or directory: 'x'"
    assert isinstance(err.__cause__, RemoteTraceback)
    assert caller_error(failed("ValueError", "")).args == ()
    for kind in ("UnicodeDecodeError", "myapp.ValueError", "NoSuchName", "SystemExit", "print"):
        original = failed(kind, "m")
        assert caller_error(original) is original
    plain = ValueError("local")
    assert caller_error(plain) is plain


@pytest.mark.slow
def test_a_call_whose_worker_dies_runs_again_where_process_pool_breaks(tmp_path: Path) -> None:
    with make_theirs(1) as theirs:
        with pytest.raises(BrokenProcessPool):
            theirs.submit(f.die_once, str(tmp_path / "theirs"), "again").result(T)
        with pytest.raises(BrokenProcessPool):
            theirs.submit(f.square, 2)
    with Executor(max_workers=1) as ours:
        first = ours.submit(f.pid).result(T)
        assert ours.submit(f.die_once, str(tmp_path / "ours"), "again").result(T) == "again"
        assert (tmp_path / "ours").read_text() == str(first)  # it did kill that worker
        with pytest.raises(WorkerLostError):
            ours.submit(f.exit_worker).result(T)  # kills max_retries + 1 workers
        assert ours.submit(f.square, 2).result(T) == 4  # and the executor goes on
        assert ours.coordinator.statistics().restarts >= 4


@pytest.mark.slow
def test_an_initializer_that_raises_fails_the_calls_where_process_pool_breaks() -> None:
    init = {"initializer": f.fail_with, "initargs": ("value", "init broke")}
    with make_theirs(1, **init) as theirs, pytest.raises(BrokenProcessPool):
        theirs.submit(f.square, 2).result(T)
    with Executor(max_workers=1, **init) as ours:
        with pytest.raises(WorkerStartError, match="init broke") as info:
            ours.submit(f.square, 2).result(T)
        assert "raise cls(message)" in info.value.remote_traceback
        with pytest.raises(WorkerStartError):
            list(ours.map(f.square, [1, 2]))


def test_map_is_lazy_and_bounded_so_an_endless_input_works(ours: Executor) -> None:
    taken = 0

    def numbers() -> Iterator[int]:
        nonlocal taken
        for i in itertools.count():
            taken += 1
            yield i

    results = ours.map(f.square, numbers(), buffersize=64)
    assert taken == 0  # nothing read before iterating
    assert list(itertools.islice(results, 100)) == [i * i for i in range(100)]
    assert taken <= 100 + 64
    results.close()  # what is outstanding is cancelled
    assert ours.coordinator.wait_idle(T)


def test_a_failing_call_in_a_chunk_fails_alone(ours: Executor) -> None:
    got = []
    with pytest.raises(ValueError, match="bad item 6"):
        for r in ours.map(f.fail_at, range(10), [6] * 10, chunksize=4):
            got.append(r)
    assert got == [0, 1, 2, 3, 4, 5]  # ProcessPoolExecutor loses the chunk's 4 and 5


@pytest.mark.slow
def test_shutdown_cancel_futures_and_an_interrupted_with_block(tmp_path: Path) -> None:
    gate = str(tmp_path / "never")
    ex = Executor(max_workers=1)
    blocker = ex.submit(f.wait_for_file, gate)
    queued = [ex.submit(f.square, i) for i in range(200)]
    assert ex.coordinator.wait_until(lambda s: s.in_flight >= 1, T)
    ex.shutdown(wait=True, cancel_futures=True)
    assert blocker.done() and all(q.done() for q in queued)
    assert queued[-1].cancelled()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), Executor(max_workers=1) as ex2:
        stuck = ex2.submit(f.wait_for_file, gate)
        rest = [ex2.submit(f.square, i) for i in range(200)]
        assert ex2.coordinator.wait_until(lambda s: s.in_flight >= 1, T)
        raise KeyboardInterrupt
    assert time.monotonic() - started < 10  # not the 30 s the stuck call would take
    assert stuck.done() and rest[-1].cancelled()


# ------------------------------------------------------------------ plain functions elsewhere


def test_spawn_and_add_local_take_plain_functions() -> None:
    with Coordinator() as coord:
        coord.spawn(f.square, processes=1)
        coord.add_local(f.square)
        assert list(coord.map(range(100))) == [i * i for i in range(100)]
        assert len(coord.workers) == 2
        assert all("FunctionWorker" in w.name for w in coord.workers), coord.workers
        with pytest.raises(TypeError, match="lambda"):
            coord.spawn(lambda x: x)
        with pytest.raises(ValueError, match="kwargs"):
            coord.spawn(f.square, kwargs={"x": 1})
        with pytest.raises(TypeError, match="Worker instance or a function"):
            coord.add_local(FunctionWorker)  # type: ignore[arg-type]
    with Coordinator() as local:
        local.add_local(lambda x: x + 1, threads=2)  # in-process: anything callable
        assert local.submit(1).result(T) == 2
    with Executor(max_workers=0) as threads:  # an Executor on thread workers
        threads.coordinator.add_local(FunctionWorker(), threads=2)
        assert list(threads.map(f.add, range(5), range(5))) == [0, 2, 4, 6, 8]
        assert threads.submit(f.add, 1, b=2).result(T) == 3


@pytest.mark.slow
def test_a_function_of_a_script_main_is_loaded_from_the_script(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        "import pathlib\n"
        "from pytaskqml import Executor\n"
        "def triple(x):\n"
        "    return 3 * x\n"
        "def touch(name):\n"
        "    pathlib.Path(name).touch()\n"
        "if __name__ == '__main__':\n"
        "    print('main ran')\n"
        "    with Executor(max_workers=1) as ex:\n"
        "        print(list(ex.map(triple, [1, 2])), ex.submit(triple, 'a').result(30))\n"
        "    left = Executor(max_workers=1)  # never shut down: its calls still run at exit\n"
        "    for i in range(3):\n"
        "        left.submit(touch, f'touched-{i}')\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=str(tmp_path),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["main ran", "[3, 6] aaa"]
    assert sorted(p.name for p in tmp_path.glob("touched-*")) == [f"touched-{i}" for i in range(3)]
    code = (
        "from pytaskqml import Executor\ndef f(x): return x\nExecutor(max_workers=0).submit(f, 1)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "not a file" in done.stderr


def test_a_cli_function_worker_runs_only_its_allow_list_and_imports_nothing_else(
    procs: Procs, tmp_path: Path
) -> None:
    mark = tmp_path / "imported"
    models = tmp_path / "models.json"  # an operator who lists FunctionModel still gets no
    models.write_text(json.dumps({"allow": ["pytaskqml.worker.functions:FunctionModel"]}))  # peer
    port = free_port()
    allow = json.dumps({"allow": ["executor_funcs:square", "executor_funcs:add"]})
    worker = procs.cli(
        "worker", "pytaskqml.worker:FunctionWorker", "--kwargs", allow, "--models", str(models),
        "--listen", f"127.0.0.1:{port}", "--no-control",
        env=child_env(PYTASKQML_TEST_IMPORT_MARK=str(mark)),
    )  # fmt: skip
    read_line_with(worker, "listening on")
    with Coordinator() as coord:
        coord.connect(("127.0.0.1", port), timeout=T)
        assert coord.submit(["executor_funcs:square", [4]]).result(T) == 16
        assert coord.submit(["executor_funcs:add", [1], {"b": 2, "scale": 3}]).result(T) == 9
        assert list(coord.map([["executor_funcs:add", [i, 10]] for i in range(3)])) == [10, 11, 12]
        with pytest.raises(TaskFailed) as info:
            coord.submit(["executor_funcs:describe", [1]]).result(T)
        assert info.value.remote_type == "PermissionError"
        assert "allow-list" in info.value.message
        with pytest.raises(TaskFailed) as info:
            coord.submit(["import_marker:Marked", []]).result(T)
        assert info.value.remote_type == "PermissionError"
        with pytest.raises(TaskFailed, match="TypeError"):
            coord.submit("not a call").result(T)
        config = {"function": "import_marker:Marked"}
        with pytest.raises(ModelLoadError, match="PermissionError"):
            coord.models.load("sneaky", "pytaskqml.worker.functions:FunctionModel", config=config)
    assert not mark.exists(), "the worker imported a module it was not allowed to"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({}, "name the functions"),
        ({"allow": []}, "name the functions"),
        ({"allow": ["executor_funcs:no_such_function"]}, "no attribute"),
    ],
)
def test_the_cli_refuses_a_function_worker_without_a_list_it_can_import(
    kwargs: dict[str, Any], says: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytaskqml", "worker", "pytaskqml.worker:FunctionWorker",
         "--kwargs", json.dumps(kwargs), "--listen", "127.0.0.1:0", "--no-control"],
        cwd=str(ROOT / "tests"), env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert says in done.stderr
