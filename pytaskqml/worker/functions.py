"""Plain functions as workers: naming one by import path, :class:`FunctionWorker` and
:class:`FunctionModel`.

A function never travels as code or pickle. The caller names it as ``module:qualname``
(:func:`function_target`, which refuses what a worker could not import: lambdas, nested
functions, bound methods, a ``__main__`` that is not a file), and the worker imports it.

Who chooses what a worker imports. Importing a module a task names is exactly what a peer must
never be able to make a worker do. So what a worker may import is decided where it starts, by
whoever starts it:

* ``FunctionWorker("myapp:f")`` (what ``Coordinator.spawn(f)`` and ``add_local(f)`` build):
  one function; each task's payload is its one argument.
* ``FunctionWorker(allow=["myapp:f", "myapp:g"])`` (``pytaskqml worker
  pytaskqml.worker:FunctionWorker --kwargs '{"allow": [...]}'``): tasks ``["module:function",
  [args...], {kwargs}]`` naming one of those; any other name is refused with
  ``PermissionError`` before anything is imported. ``pytaskqml worker`` runs a FunctionWorker
  only with such a list (see :meth:`FunctionWorker.standalone_problem`).
* ``FunctionWorker()``, what an :class:`~pytaskqml.Executor` spawns, runs the functions its
  coordinator loads on it as named models (:class:`FunctionModel`, one per function: the
  function is named once per task, not per call, and the model table loads it again on a
  restarted worker). A FunctionModel imports whatever function its config names, so only a
  model table that trusts its coordinator loads it - a spawned process's (its channel is a
  socketpair nobody else holds) or a thread worker's; a ``pytaskqml worker`` refuses it even
  when its ``--models`` file lists it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

from .base import Worker
from .bootstrap import load_main
from .models import Model

__all__ = ["FunctionModel", "FunctionWorker", "function_target", "is_function", "resolve"]


def is_function(obj: object) -> bool:
    """A callable that is not a class: what ``spawn()``/``add_local()`` take as a function."""
    return callable(obj) and not isinstance(obj, type) and not isinstance(obj, Worker)


def function_target(fn: object) -> tuple[str, str | None]:
    """``("module:qualname", main_path)`` naming *fn* so that another process can import it.

    ``TypeError`` for what has no such name: lambdas, functions defined inside functions, bound
    methods, ``functools.partial`` and other callable objects, a function of a ``__main__``
    that is not a file (``python -c``, an interactive session), and anything whose name does
    not lead back to *fn* itself. *main_path* is the script to load in the worker for a
    function of ``__main__`` (else None).
    """
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    owner = getattr(fn, "__self__", None)
    if inspect.ismethod(fn) and not isinstance(owner, type):
        raise TypeError(
            f"{fn!r} is a bound method: workers call functions by import path, so pass a "
            "module-level function (it can take the object's data as arguments)"
        )
    if inspect.isbuiltin(fn) and owner is not None and not isinstance(owner, types.ModuleType):
        raise TypeError(f"{fn!r} is a bound method: pass a module-level function")
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if inspect.ismethod(fn) and isinstance(owner, type) and isinstance(fn.__name__, str):
        # A class method, maybe inherited: named through the class it is bound to
        # (Sub.create, not Base.create, which would run with cls=Base).
        qualname = f"{owner.__qualname__}.{fn.__name__}"
        module = owner.__module__
    if module is None and hasattr(fn, "__objclass__"):  # str.upper and the like
        module = getattr(fn.__objclass__, "__module__", None)
    if not isinstance(qualname, str) or not isinstance(module, str):
        raise TypeError(
            f"{fn!r} has no import path (functools.partial or a callable object?): workers "
            "call functions by name, so pass a module-level function"
        )
    if "<lambda>" in qualname:
        raise TypeError("a lambda has no import path: define the function with def at module level")
    if "<locals>" in qualname:
        raise TypeError(
            f"{qualname} is defined inside a function: define it at module level so a worker "
            "process can import it"
        )
    main_path = None
    if module in ("__main__", "__mp_main__"):
        main = sys.modules.get(module)
        main_path = getattr(main, "__file__", None)
        if not main_path or not os.path.isfile(main_path):
            raise TypeError(
                f"{qualname} is defined in a __main__ that is not a file (python -c, python - "
                "or an interactive session): put it in an importable module or a script file"
            )
        main_path = os.path.abspath(main_path)
    # The name must lead back to this very object, or the worker would run something else
    # (a function rebound after definition, a decorator that did not keep the name).
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (obj is fn or (inspect.ismethod(fn) and obj == fn)):
        raise TypeError(
            f"{module}:{qualname} does not name {fn!r} (rebound, or wrapped without "
            "functools.wraps?): workers call functions by import path"
        )
    return f"{module}:{qualname}", main_path


def resolve(target: str, main_path: str | None = None) -> Callable[..., Any]:
    """Import the function ``module:qualname`` names. ``ValueError`` for a malformed name,
    ``ImportError``/``AttributeError`` for one that is not there, ``TypeError`` for an object
    that is not callable."""
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"bad function name {target!r}: expected MODULE:FUNCTION")
    if module_name in ("__main__", "__mp_main__"):
        if not main_path:
            raise ImportError(f"{target!r} names a __main__ this worker has no script for")
        module: Any = load_main(main_path)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"module {module_name!r} has no attribute {qualname!r}") from None
    if not callable(obj):
        raise TypeError(f"{target!r} is not callable")
    fn: Callable[..., Any] = obj
    return fn


class FunctionWorker(Worker):
    """Runs plain module-level functions (see the module's docstring for the three ways).

    ``function`` is the one function (``"module:function"``, or the function itself for a
    thread worker); ``allow`` the ``"module:function"`` names a worker that takes calls may
    run; with neither, the worker runs only the functions loaded on it as named models (an
    Executor's workers). ``main_path`` is the caller's script, for functions of its
    ``__main__``. ``initializer`` (``"module:function"``) is called with ``initargs`` in
    :meth:`setup`, once per worker process. ``ValueError`` for both ``function`` and
    ``allow``, ``TypeError`` for a name that is not a ``"module:function"`` string. A task
    naming a function not allowed fails with ``PermissionError`` before anything is imported.
    """

    def __init__(
        self,
        function: str | Callable[..., Any] | None = None,
        *,
        allow: Sequence[str] | None = None,
        main_path: str | None = None,
        initializer: str | None = None,
        initargs: Sequence[Any] = (),
    ) -> None:
        if function is not None and allow is not None:
            raise ValueError("FunctionWorker takes a function or an allow-list, not both")
        if function is not None and not (isinstance(function, str) or callable(function)):
            raise TypeError('function must be a "module:function" name or a function')
        if allow is not None and (
            isinstance(allow, str) or not all(isinstance(a, str) for a in allow)
        ):
            raise TypeError('allow must be a list of "module:function" names')
        if initializer is not None and not isinstance(initializer, str):
            raise TypeError('initializer must be a "module:function" name')
        self.function = function
        self.allow = None if allow is None else frozenset(allow)
        self.main_path = main_path
        self.initializer = initializer
        self.initargs = list(initargs)
        self._single: Callable[[Any], Any] | None = function if callable(function) else None
        self._allowed: dict[str, Callable[..., Any]] = {}

    @classmethod
    def standalone_problem(cls, kwargs: dict[str, Any]) -> str | None:
        """Why ``pytaskqml worker`` must not run a FunctionWorker with *kwargs*, or None: a
        worker that peers reach over the network runs only the functions its operator named."""
        if not kwargs.get("allow") and not kwargs.get("function"):
            return (
                "name the functions this worker may run: "
                '--kwargs \'{"allow": ["myapp:f", ...]}\' (or {"function": "myapp:f"})'
            )
        return None

    def setup(self) -> None:
        """Import the function (or every allowed one, so that a typo fails the start, not the
        first task) and run the initializer; ``ImportError``/``AttributeError``/``TypeError`` if
        a name does not lead to a callable."""
        if isinstance(self.function, str):
            self._single = resolve(self.function, self.main_path)
        if self.allow is not None:
            # Import what is allowed now: a typo fails the start, not the first task.
            self._allowed = {name: resolve(name) for name in sorted(self.allow)}
        if self.initializer is not None:
            resolve(self.initializer, self.main_path)(*self.initargs)

    def process(self, payload: Any) -> Any:
        """Call the function on *payload*; with an allow-list the payload is
        ``["module:function", args, kwargs]`` (kwargs optional), and a name not on the list
        raises ``ValueError`` without importing anything."""
        single = self._single
        if single is not None:
            return single(payload)
        if self.allow is None:
            raise ValueError("this worker runs the functions loaded on it as named models only")
        if (
            type(payload) is not list
            or not 2 <= len(payload) <= 3
            or type(payload[0]) is not str
            or type(payload[1]) is not list
            or (len(payload) == 3 and type(payload[2]) is not dict)
        ):
            raise TypeError(
                'a call for a FunctionWorker is ["module:function", [args...], {kwargs}], got '
                f"{type(payload).__name__}"
            )
        fn = self._allowed.get(payload[0])
        if fn is None:
            raise PermissionError(
                f"function {payload[0]!r} is not on this worker's allow-list "
                f"({', '.join(sorted(self.allow))})"
            )
        if len(payload) == 3:
            return fn(*payload[1], **payload[2])
        return fn(*payload[1])


class FunctionModel(Model):
    """One function as a named model: what an Executor loads on its workers per function.

    Config: ``{"function": "module:qualname", "main_path": ..., "call": kind}``, where *kind*
    says what an item is: ``"args"`` the call's argument list, ``"one"`` its one argument (a
    ``map()`` over one iterable: nothing to unpack), ``"kwargs"`` ``[args, kwargs]``. A
    function that cannot be imported there fails each call with its import error (the load
    itself succeeds), as a call fails in ``ProcessPoolExecutor`` when its worker cannot
    unpickle the function.
    """

    # Imports any function its config names: only for a model table that trusts its
    # coordinator (see _models.ModelTable).
    trusted_only = True

    def load(self, config: dict[str, Any]) -> None:
        name = str(config.get("function"))
        main_path = config.get("main_path")
        kind = config.get("call", "args")
        if kind not in CALL_KINDS:
            raise ValueError(f"call must be one of {', '.join(CALL_KINDS)}, got {kind!r}")
        path = main_path if isinstance(main_path, str) else None
        try:
            fn = resolve(name, path)
        except Exception:
            # Each call tries again (and fails with the error of its own attempt): what was
            # missing may be there by then, and a failed attempt leaves nothing behind.
            def retry(item: Any) -> Any:
                self._bind(resolve(name, path), kind)
                return self.predict(item)

            self.predict = retry  # type: ignore[method-assign]
            return
        self._bind(fn, kind)

    def _bind(self, fn: Callable[..., Any], kind: str) -> None:
        if kind == "one":
            self.predict = fn  # type: ignore[method-assign]
        elif kind == "kwargs":
            self.predict = lambda item: fn(*item[0], **item[1])  # type: ignore[method-assign]
        else:
            self.predict = lambda item: fn(*item)  # type: ignore[method-assign]


# What the items of a FunctionModel are (see its docstring).
CALL_KINDS = ("args", "one", "kwargs")
