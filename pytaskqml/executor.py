""":class:`Executor`: ``concurrent.futures.Executor`` on a coordinator of its own.

Each function the executor is given becomes a named model on its workers (a
:class:`~._functions.FunctionModel`, loaded the first time the function is used; the workers
are :class:`~._functions.FunctionWorker` processes, whose model table trusts this coordinator,
see :mod:`._functions`). A call is a task for that model, whose payload is the argument list
(``[args, kwargs]`` for calls with keyword arguments): a ``map()`` names its function once per
task, not once per call, and is the coordinator's ``map()`` - bounded, ordered, chunked. What
comes back as a :class:`TaskFailed` naming a builtin exception type is raised as that type
again (:func:`caller_error`).
"""

from __future__ import annotations

import ast
import atexit
import builtins
import collections
import concurrent.futures
import contextlib
import gc
import os
import re
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any, TypeVar

from .coordinator import Coordinator
from .engine.delivery import TaskFuture
from .errors import ClosedError, TaskFailed
from .worker.functions import FunctionModel, FunctionWorker, function_target

__all__ = ["Executor", "caller_error"]

_ERRNO = re.compile(r"\[Errno (-?\d+)\] (.*)", re.S)
_SHUT = "cannot schedule new futures after shutdown"

T = TypeVar("T")


class Executor(concurrent.futures.Executor):
    """A drop-in for :class:`concurrent.futures.ProcessPoolExecutor` that sends no pickle.

    ``Executor(max_workers=None, initializer=None, initargs=(), **options)`` spawns
    ``max_workers`` (default ``os.cpu_count()``) worker processes; ``options`` go to the
    :class:`Coordinator` it owns (``max_retries``, ``max_queue``, ``hang_timeout``, ...), which
    :attr:`coordinator` is. ``submit()`` returns a :class:`concurrent.futures.Future`;
    ``map()``, ``shutdown()`` and ``with`` work as in the standard library, with pytaskqml's
    guarantees: results in order, a call whose worker dies runs again on another one, nothing
    pickled. Where it differs from ``ProcessPoolExecutor``:

    - **Functions by import path.** ``fn`` must be a module-level function (or a builtin such
      as ``pow``, a class such as ``int``, a static or class method - an inherited class
      method runs bound to the class you took it from); it is named as
      ``module:qualname`` and imported in the worker, never pickled. Lambdas, nested
      functions, bound methods, ``functools.partial`` and functions of a ``__main__`` that is
      not a file raise ``TypeError`` at ``submit()``/``map()``. A function of a script's
      ``__main__`` is loaded from that file, as ``multiprocessing``'s spawn does, so keep the
      script's work under ``if __name__ == "__main__":`` (a script that starts an executor
      while a worker loads it fails those calls with a ``RuntimeError`` that says so).
    - **Arguments and results are data**, what JSON, bytes and NumPy arrays carry: tuples
      arrive as lists, dict keys as strings, NumPy scalars as Python numbers (see
      ``pytaskqml.wire.codec.as_sent``). Arguments that cannot travel (a ``set``, an object)
      raise ``TypeError`` at ``submit()``, and in ``map()`` where it reaches them; a result
      that cannot travel fails its call with ``TypeError``, and one larger than
      ``max_frame_size`` (64 MiB) with ``ValueError`` (the worker goes on).
    - **Exceptions travel as text.** An exception of a builtin type (``ValueError``,
      ``KeyError``, ``ZeroDivisionError``, ``OSError`` with its errno, ...) is raised again
      as that type, with its message as its argument and the worker's traceback as a
      :class:`RemoteTraceback` ``__cause__``. A subclass of one (``json.JSONDecodeError``,
      your ``class MyError(ValueError)``) is raised as its nearest builtin base, its message
      starting with the type's name (``ValueError("json.decoder.JSONDecodeError: ...")``),
      so ``except ValueError`` catches it - when this process has imported the type's module
      (nothing is imported for a name a worker sends). Any other type is raised as
      :class:`TaskFailed`, whose ``remote_type``, ``message`` and ``remote_traceback`` say
      what it was. ``KeyboardInterrupt`` raised by a call fails that call (as
      ``TaskFailed``); the worker goes on.
    - **No time limit on a call** unless you set one: ``hang_timeout`` (seconds a worker may
      go without returning a result before it is stopped and its calls retried) is off by
      default here, where a coordinator has 60 s.
    - **Worker processes are spawned, not forked, and restarted when they die.** A call whose
      worker dies (``kill -9``, a segfault, ``os._exit``, ``sys.exit``) runs again on
      another worker; a call that killed ``max_retries + 1`` workers fails alone with
      :class:`WorkerLostError`, and the executor goes on working - where
      ``ProcessPoolExecutor`` raises ``BrokenProcessPool`` and breaks for good.
    - **map() is lazy and bounded**: the iterables are read as results are taken, at most a
      buffer ahead (``buffersize``, default sized from the measured time per call), instead
      of all at once - an endless or huge input works, in constant memory. So the calls of
      a ``map()`` run while you iterate it: a ``map()`` never iterated runs nothing. Without
      ``chunksize`` the calls are chunked automatically (tiny calls travel in chunks of
      about 2 ms of work, slow ones alone); a chunk's calls still fail one by one. The
      ``timeout`` counts from the ``map()`` call, as in the standard library. A ``map()``
      still unread when its executor shuts down runs to its end first, and its results stay
      readable after (with ``cancel_futures``, reading it past the results already in
      raises ``CancelledError``); so ``close()`` an endless one you stopped reading (or drop
      it) before the shutdown. Results are not kept once yielded.
    - **Back-pressure**: ``submit()`` blocks while ``max_queue`` (10,000) calls wait for a
      worker.
    - No ``coordinator.buffer()`` pool unless you pass ``max_buffer_bytes``: arrays in
      arguments still reach the workers through shared memory.
    - An ``initializer`` is named by import path as well; one that raises makes its worker
      fail to start: it is started again with backoff, and after ``max_start_failures``
      failures in a row calls fail with :class:`WorkerStartError` (carrying the traceback).
    - ``with`` and ``shutdown()`` wait for every call, as the standard library does (so does
      the end of the program, for an executor not shut down) - except when the block
      ends on ``KeyboardInterrupt`` (or another exception that is not an ``Exception``): then
      queued calls are cancelled and running ones get ``cancel_grace`` (0.5 s), so Ctrl-C
      ends the program at once. A call stopped that way, or by ``shutdown(cancel_futures=
      True)``, reports ``cancelled()``. ``terminate_workers()`` and ``kill_workers()`` stop
      the worker processes at once, as in Python 3.14.
    - A function a worker cannot import (its module is not on the worker's path) fails each
      of its calls with that ``ImportError``.
    - Not supported: ``mp_context``, ``max_tasks_per_child``. ``max_workers=0`` spawns
      nothing, for workers of your own: ``ex.coordinator.add_local(FunctionWorker(),
      threads=4)`` makes it a thread pool. The calls go only to workers that trust this
      coordinator (spawned or thread workers): a ``pytaskqml worker`` never runs a function
      a peer names.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        **options: Any,
    ) -> None:
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 0:
            raise ValueError(f"max_workers must be a whole number, got {max_workers!r}")
        kwargs: dict[str, Any] = {}
        if initializer is not None:
            kwargs["initializer"], kwargs["main_path"] = function_target(initializer)
            kwargs["initargs"] = list(initargs)
        # A call may run as long as it needs, as in the standard library: a hang timeout is
        # for tasks of known length (the user may still set one).
        options.setdefault("hang_timeout", None)
        # No buffer pool unless asked for: calls carry their arrays through each worker's own
        # shared memory, and deciding whether a pool can exist imports NumPy here, before the
        # first worker process can start (a third of a second on a busy machine).
        options.setdefault("max_buffer_bytes", 0)
        self._models: dict[tuple[Any, str], str] = {}
        self._lock = threading.Lock()
        self._maps: weakref.WeakSet[_MapState] = weakref.WeakSet()
        self._closed = False
        self._coord = Coordinator(**options)
        try:
            if max_workers:
                self._coord.spawn(FunctionWorker, max_workers, kwargs=kwargs, wait=False)
        except BaseException:
            self._coord.shutdown(wait=True, cancel_futures=True)
            raise
        # As concurrent.futures does: calls submitted and never waited for still run before
        # the interpreter exits (the reference is weak: it keeps no executor alive).
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    @property
    def coordinator(self) -> Coordinator:
        """The :class:`Coordinator` the calls go through (statistics, more workers)."""
        return self._coord

    def _model(self, fn: Callable[..., object], call: str) -> str:
        """The name of the model that runs *fn* with items of kind *call* (see
        :class:`FunctionModel`), loaded on the workers the first time."""
        try:
            return self._models[fn, call]
        except (KeyError, TypeError):  # not seen yet, or unhashable
            pass
        target, main_path = function_target(fn)
        name = f"call:{call}:{target}"
        try:
            hash(fn)
        except TypeError:
            raise TypeError(f"{fn!r} is not a function: pass a module-level function") from None
        with self._lock:
            if (fn, call) not in self._models:
                config = {"function": target, "main_path": main_path, "call": call}
                self._coord.models.load(name, FunctionModel, config=config, wait=False)
                self._models[fn, call] = name
        return name

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` in a worker process; returns a Future.

        ``TypeError`` here for a function that has no import path, or arguments that cannot
        travel; ``RuntimeError`` after :meth:`shutdown`."""
        if self._closed:
            raise RuntimeError(_SHUT)
        model = self._model(fn, "kwargs" if kwargs else "args")
        try:
            inner = self._coord.submit([args, kwargs] if kwargs else args, model=model)
        except ClosedError:
            raise RuntimeError(_SHUT) from None
        except TypeError as exc:
            raise TypeError(
                f"the arguments of {model.split(':', 2)[2]} cannot be sent to a worker "
                f"(JSON, bytes and NumPy arrays only, never pickle): {exc}"
            ) from exc
        assert isinstance(inner, TaskFuture)
        return CallFuture(inner)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """``fn(*args)`` for the items of *iterables* taken together (as ``zip``), results in
        order; lazy and bounded (see the class docstring). ``timeout`` counts from this call:
        every result ready by then is yielded, then ``TimeoutError`` is raised and the calls
        not started yet are cancelled. ``chunksize`` calls travel and run as one task
        (default: chosen from the measured time per call of *fn*); at most ``buffersize``
        calls are outstanding ahead of the results taken (default: sized from that same
        measured time, as :meth:`Coordinator.map` does). ``ValueError`` for a ``chunksize``
        below 1, ``RuntimeError`` once the executor is shut down."""
        if chunksize is not None and (isinstance(chunksize, bool) or chunksize < 1):
            raise ValueError("chunksize must be >= 1.")
        if self._closed:
            raise RuntimeError(_SHUT)
        # One iterable: its items are the arguments themselves, nothing to pack or unpack.
        # Several: zip's tuples, the shortest input ending it as in the standard library.
        one = len(iterables) == 1
        model = self._model(fn, "one" if one else "args")
        try:
            results = self._coord.map(
                iterables[0] if one else zip(*iterables, strict=False),
                model=model,
                chunksize=chunksize,
                buffersize=buffersize,
                total_timeout=None if timeout is None else max(0.0, timeout),
            )
        except ClosedError:
            raise RuntimeError(_SHUT) from None
        state = _MapState(results)
        with self._lock:
            self._maps.add(state)
        return _map_results(state)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; with *wait*, return once every call has finished (or, with
        *cancel_futures*, been cancelled) and every worker process is gone.

        A ``map()`` not read to its end by then still runs all its calls first (they were
        asked for before the shutdown, as in the standard library), and its results stay
        readable after (``close()`` one you will not read); with *cancel_futures* its calls
        not started are cancelled, and reading it past the results already in raises
        ``CancelledError``."""
        if not cancel_futures and len(self._maps):
            gc.collect()  # a map dropped unread is not run (PyPy frees it only when collected)
        with self._lock:
            self._closed = True
            maps = [m for m in self._maps if not m.finished]
        if cancel_futures:
            for m in maps:
                m.cancelled = True
            self._coord.shutdown(wait, cancel_futures=True)
        elif not maps:
            self._coord.shutdown(wait)
        elif wait:
            self._finish_maps(maps)
        else:
            threading.Thread(
                target=self._finish_maps, args=(maps,), name="pytaskqml-executor-shutdown"
            ).start()

    def _finish_maps(self, maps: list[_MapState]) -> None:
        try:
            # A map another thread is reading right now is left to it: the shutdown waits
            # until that reader is done with it.
            busy = [m for m in maps if not m.run_to_end()]
            for m in busy:
                m.done.wait()
        finally:
            self._coord.shutdown(True)

    def terminate_workers(self) -> None:
        """Stop every worker process now, as Python 3.14's ``ProcessPoolExecutor`` does:
        calls not started are cancelled, each worker is sent ``SIGTERM`` (it finishes the
        call in hand if it can within ``cancel_grace`` seconds, else it is killed), and the
        executor is shut down. A call that did not finish reports ``cancelled()``."""
        self._stop_workers(terminate=True)

    def kill_workers(self) -> None:
        """Kill every worker process at once (``SIGKILL``), cancel every call not finished,
        and shut the executor down (Python 3.14's ``ProcessPoolExecutor.kill_workers``)."""
        self._stop_workers(terminate=False)

    def _stop_workers(self, *, terminate: bool) -> None:
        with self._lock:
            self._closed = True
            maps = list(self._maps)
        for m in maps:
            m.cancelled = True
        if terminate:
            pids = [w.pid for w in self._coord.statistics().workers if w.pid is not None]
            self._coord.shutdown(False, cancel_futures=True)
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
            self._coord.shutdown(True)
        else:
            self._coord.shutdown(True, cancel_futures=True, timeout=0)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        interrupted = exc_type is not None and not issubclass(exc_type, Exception)
        self.shutdown(wait=True, cancel_futures=interrupted)

    def __repr__(self) -> str:
        return f"<pytaskqml.Executor workers={len(self._coord.workers)}>"


def _shutdown_at_exit(ref: weakref.ref[Executor]) -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown(wait=True)


class _MapState:
    """What a shutdown needs of a running :meth:`Executor.map` (see :func:`_map_results`):
    its results can be run to the end and kept for a later read (:meth:`run_to_end`), or it
    can be told that a shutdown cancelled it (:attr:`cancelled`)."""

    def __init__(self, results: Iterator[Any]) -> None:
        self.results = results
        # Results taken by a shutdown before the caller read them, then what ended the map.
        self.kept: collections.deque[Any] = collections.deque()
        self.end: BaseException | None = None
        self.cancelled = False
        self.finished = False
        self.taking = False  # a shutdown is running it to the end: a reader waits for that
        self.taken = threading.Event()
        self.done = threading.Event()  # the caller's iterator ended (or was dropped)

    def run_to_end(self) -> bool:
        """Take every remaining result now, to be read later (what ends the map is raised
        then). False if another thread is reading it right now: that reader takes the rest
        itself, and :attr:`done` says when."""
        if self.finished:
            return True
        self.taking = True
        try:
            for value in self.results:
                self.kept.append(value)
        except ValueError as exc:
            if "already executing" in str(exc):
                self.taking = False
                return False
            self.end = self.caller_error(exc)
        except Exception as exc:
            self.end = self.caller_error(exc)
        self.finished = True
        self.taken.set()
        return True

    def caller_error(self, exc: BaseException) -> BaseException:
        """The error the caller gets for *exc*, which ended the map."""
        if isinstance(exc, TaskFailed):
            return caller_error(exc)
        if isinstance(exc, TimeoutError):
            # concurrent.futures.TimeoutError: the builtin from 3.11 on, its own class before
            return concurrent.futures.TimeoutError("map() result not ready within its timeout")
        if isinstance(exc, ClosedError):
            if self.cancelled:
                return CancelledError("map() cancelled by shutdown(cancel_futures=True)")
            return RuntimeError(f"{_SHUT}: the executor shut down while this map() ran")
        return exc


def _map_results(state: _MapState) -> Iterator[Any]:
    """What :meth:`Executor.map` returns. The coordinator's iterator is delegated to with
    ``yield from`` (no Python code per result, and no reference kept to one handed out; one
    level of it, as each level costs per result); after it: what a shutdown took for the
    caller, then what ended the map."""
    try:
        while True:
            try:
                yield from state.results
                break
            except ValueError as exc:
                # Resumed while a shutdown in another thread runs the map to its end: wait
                # for it, then read what it kept.
                if not (state.taking and "already executing" in str(exc)):
                    raise
                state.taken.wait()
    except BaseException as exc:  # GeneratorExit too: the caller closed or dropped it
        state.finished = True
        state.done.set()
        err = state.caller_error(exc)
        if err is exc:
            raise
        raise err from err.__cause__
    try:
        state.finished = True
        kept = state.kept
        while kept:
            yield kept.popleft()
        if state.end is not None:
            err, state.end = state.end, None
            raise err
    finally:
        state.done.set()


class CallFuture(TaskFuture):
    """The Future of an :meth:`Executor.submit` call: the coordinator's future for the task,
    mirrored, with its exception as :func:`caller_error` makes it.

    It is settled by the thread that finishes the task's own future (a reader, the deadline
    timer, a canceller): that runs no user code, as this future's done-callbacks go to the
    coordinator's callback thread too (see :class:`TaskFuture`).
    """

    def __init__(self, inner: TaskFuture) -> None:
        super().__init__()
        self._runner = inner._runner
        self._inner = inner
        Future.add_done_callback(inner, self._settle)  # not TaskFuture's: no thread hop

    def _settle(self, inner: Future[Any]) -> None:
        try:
            exc = None if inner.cancelled() else inner.exception(0)
            if inner.cancelled() or isinstance(exc, (CancelledError, ClosedError)):
                # Never ran, or stopped by a shutdown that cancelled it: it reports cancelled(),
                # as the standard library's futures do, never a CancelledError it did not get
                # from cancel().
                Future.cancel(self)
                self.set_running_or_notify_cancel()  # wakes wait() and as_completed()
                return
            if exc is not None:
                self.set_exception(caller_error(exc))
            else:
                self.set_result(inner.result(0))
        except InvalidStateError:
            pass

    def cancel(self) -> bool:
        # A call not started yet is cancelled in the coordinator (and settles this future).
        return self._inner.cancel()

    def running(self) -> bool:
        return not self.done() and self._inner.running()


def caller_error(exc: BaseException) -> BaseException:
    """A :class:`TaskFailed` of a builtin exception type raised as that type again (message
    as its argument, the same ``__cause__``: the worker's traceback); anything else as it is.
    """
    if not isinstance(exc, TaskFailed):
        return exc
    cls = getattr(builtins, exc.remote_type, None) if "." not in exc.remote_type else None
    message = exc.message
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = _builtin_base(exc.remote_type)
        if cls is None:
            return exc
        message = f"{exc.remote_type}: {exc.message}"
    try:
        err = _rebuild(cls, message) if message is exc.message else cls(message)
    except Exception:  # a type whose constructor wants more (UnicodeDecodeError, ...)
        return exc
    err.__cause__ = exc.__cause__
    return err


def _builtin_base(remote_type: str) -> type[Exception] | None:
    """The nearest builtin base (not ``Exception`` itself) of the exception type named
    *remote_type* (``json.decoder.JSONDecodeError`` -> ``ValueError``), if this process has
    that type's module loaded already - nothing is imported for a name a worker sent. The
    caller's script's own types come from the worker as ``__mp_main__.X`` (or ``X``)."""
    module_name, _, qualname = remote_type.rpartition(".")
    if module_name in ("", "__mp_main__"):
        module_name = "__main__"
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    if not (isinstance(obj, type) and issubclass(obj, Exception)):
        return None
    for base in obj.__mro__[1:]:
        if base.__module__ == "builtins" and issubclass(base, Exception):
            # ``Exception`` itself says nothing TaskFailed does not (it is one too)
            return None if base is Exception else base
    return None


def _rebuild(cls: type[Exception], message: str) -> Exception:
    if not message:
        return cls()
    if issubclass(cls, KeyError):
        found, key = _literal(message)  # str(KeyError(k)) is repr(k): give back k
        if found:
            return cls(key)
    if issubclass(cls, OSError):
        # "[Errno 2] No such file or directory: 'x'": errno, strerror and filename again,
        # which make the same str()
        m = _ERRNO.fullmatch(message)
        if m:
            strerror, _, tail = m.group(2).rpartition(": ")
            found, filename = _literal(tail)
            if strerror and found and isinstance(filename, str):
                return cls(int(m.group(1)), strerror, filename)
            return cls(int(m.group(1)), m.group(2))
    return cls(message)


def _literal(text: str) -> tuple[bool, Any]:
    """``(True, value)`` when *text* is exactly ``repr(value)`` of a Python literal.
    ``literal_eval`` only parses literals, it never runs code."""
    if len(text) > 10_000:
        return False, None
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None
    return repr(value) == text, value
