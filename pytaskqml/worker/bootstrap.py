"""Starting a worker: shared by spawned children (:mod:`._child`) and ``pytaskqml worker``.

Naming the class (:func:`class_target`, in the coordinator), importing it in the worker
(:func:`load_worker_class`), constructing it and running ``setup()`` (:func:`start_worker`),
the worker process's logging and malloc tuning. Every failure a user can cause is a
:class:`WorkerStartError` with a one-line message; a failing ``setup()`` also carries its
traceback as text (``remote_traceback``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import platform
import sys
import threading
from typing import Any

from ..errors import WorkerStartError
from .base import Worker, error_info

log = logging.getLogger(__name__)


def class_target(cls: type) -> tuple[str, str | None]:
    """``("module:Qualname", main_path)`` naming *cls* so a child process can import it.

    ``ValueError`` for a class a child cannot import: defined in a function, or in a
    ``__main__`` that is not a file (``python -c``, ``python -``, an interactive session).
    """
    if "<locals>" in cls.__qualname__:
        raise ValueError(
            f"{cls.__qualname__} is defined inside a function; define worker classes at module "
            "level so a child process can import them"
        )
    module = cls.__module__
    main_path = None
    if module in ("__main__", "__mp_main__"):
        main = sys.modules.get("__main__")
        main_path = getattr(main, "__file__", None)
        if not main_path or not os.path.isfile(main_path):
            raise ValueError(
                f"{cls.__qualname__} is defined in a __main__ that is not a file (python -c, "
                "python - or an interactive session); put it in an importable module or a "
                "script file to spawn it"
            )
        main_path = os.path.abspath(main_path)
    return f"{module}:{cls.__qualname__}", main_path


def load_worker_class(target: str, *, main_path: str | None = None) -> type[Worker]:
    """Import ``module:Class`` (or ``module:Outer.Inner``), a Worker subclass; raise
    WorkerStartError clearly."""
    cls: type[Worker] = load_class(target, Worker, main_path=main_path)
    return cls


def load_class(target: str, base: type[Any], *, main_path: str | None = None) -> Any:
    """Import ``module:Class`` and check it subclasses *base*; WorkerStartError if not."""
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name or not qualname:
        raise WorkerStartError(
            f"bad worker {target!r}: expected MODULE:CLASS, e.g. myapp:WordCount"
        )
    try:
        if module_name in ("__main__", "__mp_main__") and main_path:
            module = load_main(main_path)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except WorkerStartError:
        raise
    except Exception as exc:
        raise WorkerStartError(
            f"cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise WorkerStartError(
                f"module {module_name!r} has no attribute {qualname!r}"
            ) from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise WorkerStartError(f"{target!r} is not a subclass of pytaskqml.{base.__name__}")
    return obj


# Held while the caller's main script runs in this process (see load_main): two functions of
# the script loaded at once (each model loads on a thread of its own) must not see it half run.
_MAIN_LOCK = threading.RLock()
_loading = threading.local()  # .main: the script this thread is running, while it runs


def load_main(path: str) -> Any:
    """The caller's main script, run once in this process as ``__mp_main__``.

    It is imported under another name, as multiprocessing does, so its ``if __name__ ==
    "__main__":`` block does not run again here. The module is registered only once it has
    run to the end (a script that raises is run again by the next caller, and raises again).
    """
    with _MAIN_LOCK:
        existing = sys.modules.get("__mp_main__")
        if existing is not None:
            return existing
        spec = importlib.util.spec_from_file_location("__mp_main__", path)
        if spec is None or spec.loader is None:
            raise WorkerStartError(f"cannot load the main script {path!r}")
        module = importlib.util.module_from_spec(spec)
        # In sys.modules while it runs, as any import: its own classes and functions refer
        # to their module by that name (pickle-free, but dataclasses and typing look it up).
        sys.modules["__mp_main__"] = module
        outer = getattr(_loading, "main", None)
        _loading.main = path
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("__mp_main__", None)
            raise
        finally:
            _loading.main = outer
        return module


def refuse_in_bootstrap(what: str) -> None:
    """Raise a clear error if *what* (a coordinator) is being started by the caller's script
    while a worker process runs it to find a function or class in it: a script whose work is
    not under ``if __name__ == "__main__":`` would start pools in every worker."""
    path = getattr(_loading, "main", None)
    if path is not None:
        raise RuntimeError(
            f"{what} was started while a worker process was importing your script "
            f"{path!r} to find a function or class defined in it. Put the code "
            'that starts it under `if __name__ == "__main__":` (as multiprocessing requires), '
            "so that it runs only when the script is run, not when a worker imports it."
        )


def make_worker(cls: type[Worker], kwargs: dict[str, Any] | None) -> Worker:
    try:
        return cls(**(kwargs or {}))
    except Exception as exc:
        raise _start_error(
            f"{cls.__qualname__}(**{kwargs!r}) raised {type(exc).__name__}: {exc}", exc
        ) from exc


def call_setup(worker: Worker) -> None:
    try:
        worker.setup()
    except Exception as exc:
        raise _start_error(
            f"{type(worker).__qualname__}.setup() raised {type(exc).__name__}: {exc}", exc
        ) from exc


def call_teardown(worker: Worker) -> None:
    try:
        worker.teardown()
    except Exception:
        log.exception("%s.teardown() raised", type(worker).__qualname__)


def _start_error(message: str, exc: BaseException) -> WorkerStartError:
    err = WorkerStartError(message)
    err.remote_traceback = error_info(exc)[2]
    return err


def start_worker(
    target: str, kwargs: dict[str, Any] | None, *, main_path: str | None = None
) -> Worker:
    """Import, construct and set up the worker named by *target*; WorkerStartError if any step
    fails."""
    cls = load_worker_class(target, main_path=main_path)
    worker = make_worker(cls, kwargs)
    call_setup(worker)
    return worker


def setup_logging(prefix: str, level: int, path: str | None = None) -> None:
    """Log pytaskqml's records to stderr (or to the file *path*) with *prefix* (a worker
    process's own logging; the root logger is never touched)."""
    logger = logging.getLogger("pytaskqml")
    handler: logging.Handler = (
        logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler()
    )
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {prefix}[{os.getpid()}] %(levelname)s %(message)s")
    )
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


# glibc's mallopt() parameters: blocks from this size up get their own mmap(); bytes kept at
# the top of the heap when it shrinks.
_M_MMAP_THRESHOLD = -3
_M_TOP_PAD = -2
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
MALLOC_TOP_PAD = 16 * 1024 * 1024


def tune_malloc() -> bool:
    """Keep a worker process from returning heap memory to the OS after every task.

    A model over video frames allocates and frees the same few buffers of hundreds of KiB to
    MiBs per frame. With glibc's defaults those pages go back to the OS when freed (munmap,
    or a heap trim) and are faulted in again on the next frame: on a 640x480 blur that was
    ~120 page faults and ~45% of the worker's CPU per frame (`python -m benchmark --system
    pytaskqml-map --workload frames`, with and without a ``MALLOC_*`` variable set), on 1080p
    ~1,000 faults and over half. Serving blocks below 32 MiB from the heap and keeping
    16 MiB at its top removes them, for ~15 MB more resident memory. Only in worker processes
    (never in the caller's), only with glibc, and not when the environment already tunes
    malloc (any ``MALLOC_*`` variable). Returns whether it was applied.
    """
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is None or platform.libc_ver()[0] != "glibc":
            return False
        return all(
            mallopt(ctypes.c_int(param), ctypes.c_int(value))
            for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TOP_PAD, MALLOC_TOP_PAD))
        )
    except (OSError, AttributeError, ValueError):
        return False
