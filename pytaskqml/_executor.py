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
import concurrent.futures
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, InvalidStateError
from typing import Any, TypeVar

from ._coordinator import Coordinator
from ._delivery import TaskFuture
from ._errors import ClosedError, TaskFailed
from ._functions import FunctionModel, FunctionWorker, function_target

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
      as ``pow``, a class such as ``int``, a static or class method); it is named as
      ``module:qualname`` and imported in the worker, never pickled. Lambdas, nested
      functions, bound methods, ``functools.partial`` and functions of a ``__main__`` that is
      not a file raise ``TypeError`` at ``submit()``/``map()``. A function of a script's
      ``__main__`` is loaded from that file, as ``multiprocessing``'s spawn does, so keep the
      script's work under ``if __name__ == "__main__":``.
    - **Arguments and results are data**, what JSON, bytes and NumPy arrays carry: tuples
      arrive as lists, dict keys as strings, NumPy scalars as Python numbers (see
      ``pytaskqml._codec.as_sent``). Arguments that cannot travel (a ``set``, an object)
      raise ``TypeError`` at ``submit()``, and in ``map()`` where it reaches them; a result
      that cannot travel fails its call with ``TypeError``.
    - **Exceptions travel as text.** An exception of a builtin type (``ValueError``,
      ``KeyError``, ``ZeroDivisionError``, ``OSError`` with its errno, ...) is raised again
      as that type, with its message as its argument and the worker's traceback as a
      :class:`RemoteTraceback` ``__cause__``; any other type (your own, a library's) is
      raised as :class:`TaskFailed`, whose ``remote_type``, ``message`` and
      ``remote_traceback`` say what it was.
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
      ``timeout`` counts from the ``map()`` call, as in the standard library.
    - **Back-pressure**: ``submit()`` blocks while ``max_queue`` (10,000) calls wait for a
      worker.
    - An ``initializer`` is named by import path as well; one that raises makes its worker
      fail to start: it is started again with backoff, and after ``max_start_failures``
      failures in a row calls fail with :class:`WorkerStartError` (carrying the traceback).
    - ``with`` and ``shutdown()`` wait for every call, as the standard library does (so does
      the end of the program, for an executor not shut down) - except when the block
      ends on ``KeyboardInterrupt`` (or another exception that is not an ``Exception``): then
      queued calls are cancelled and running ones get ``cancel_grace`` (0.5 s), so Ctrl-C
      ends the program at once.
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
        self._models: dict[tuple[Any, str], str] = {}
        self._lock = threading.Lock()
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
        (default: chosen from the measured time per call of *fn*)."""
        if chunksize is not None and (isinstance(chunksize, bool) or chunksize < 1):
            raise ValueError("chunksize must be >= 1.")
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
        return _translated(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; with *wait*, return once every call has finished (or, with
        *cancel_futures*, been cancelled) and every worker process is gone."""
        self._coord.shutdown(wait, cancel_futures=cancel_futures)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        interrupted = exc_type is not None and not issubclass(exc_type, Exception)
        self.shutdown(wait=True, cancel_futures=interrupted)

    def __repr__(self) -> str:
        return f"<pytaskqml.Executor workers={len(self._coord.workers)}>"


def _shutdown_at_exit(ref: weakref.ref[Executor]) -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown(wait=True)


def _translated(results: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from results
    except TaskFailed as exc:
        err = caller_error(exc)
        raise err from err.__cause__
    except TimeoutError:
        # concurrent.futures.TimeoutError: the builtin from Python 3.11 on, its own class before
        raise concurrent.futures.TimeoutError("map() result not ready within its timeout") from None


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
            if inner.cancelled():
                Future.cancel(self)
                self.set_running_or_notify_cancel()  # wakes wait() and as_completed()
                return
            exc = inner.exception(0)
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
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return exc
    try:
        err = _rebuild(cls, exc.message)
    except Exception:  # a type whose constructor wants more (UnicodeDecodeError, ...)
        return exc
    err.__cause__ = exc.__cause__
    return err


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
