"""CPython's own ``concurrent.futures`` tests, run against :class:`pytaskqml.Executor`.

The suite is not copied here: it ships with Python installations (``Lib/test``), often
without the ``test`` package's larger parts - Debian's ``libpython3.X-testsuite``, pyenv
builds. :func:`find_suite` looks for one, preferring the running interpreter's version and
else the newest found (``PYTASKQML_CPYTHON_FUTURES=PATH`` names one). It is imported under a
name of its own (``_cpython_futures_suite``: a symlink to the module, or for a package a
package of ours whose ``__path__`` is the suite's, in a temporary directory on ``sys.path``),
so the functions its tests submit - ``mul``, ``capture``, ``init`` - are named
to our workers by that import path, as any function is, and spawned workers (which get the
coordinator's ``sys.path``) import them from the same file.

The adapter is :class:`PyTaskQMLMixin`: the suite's own ``ExecutorMixin`` building a
``pytaskqml.Executor``. The generic executor, wait, as_completed, shutdown and initializer
test classes are combined with it, as the suite combines them with its thread and process
mixins. A few shims make a newer suite import on an older interpreter (``test.support``
names it lacks). Each test runs on two workers (the suite's process tests use five), and
``setUp`` waits until they are up.

Every test that is known to fail is in :data:`KNOWN`, with the reason; nowhere else. A
``difference`` must fail (a documented difference of our executor; should it pass, the table
is wrong); a ``race`` entry may pass or fail, by timing, for the reason given (it fails
more often on a loaded machine). Any other failure is a bug.
``docs/executor-cpython-tests.md`` is this table, written by ``python tests/cpython_futures.py
--write-docs`` and checked by the tests.

Run alone: ``python tests/cpython_futures.py`` (``-k NAME`` to select).
"""

from __future__ import annotations

import atexit
import functools
import glob
import importlib
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import unittest
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytaskqml

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "executor-cpython-tests.md"
ALIAS = "_cpython_futures_suite"

DIFFERENCE = "difference"
RACE = "race"

# The test classes of the suite run against our executor, and the module (of a suite that is a
# package, Python 3.12 on) each is in. The others test ThreadPoolExecutor or
# ProcessPoolExecutor internals (its processes, mp_context, pickling deadlocks).
MIXINS = {
    "ExecutorTest": "executor",
    "WaitTests": "test_wait",
    "AsCompletedTests": "test_as_completed",
    "ExecutorShutdownTest": "test_shutdown",
    "InitializerMixin": "test_init",
    "FailingInitializerMixin": "test_init",
}

_SUBPROCESS = (
    "starts a fresh interpreter running `from concurrent.futures import <class name>`: it "
    "tests the standard library's executor of that name, not one passed to it (our atexit "
    "behaviour is tested in tests/test_executor.py)"
)

# Every test known to fail, and why: (kind, reason). Keys are "Class.test" as in the suite.
KNOWN: dict[str, tuple[str, str]] = {
    "ExecutorTest.test_free_reference": (
        DIFFERENCE,
        "arguments and results are data (JSON, bytes, NumPy arrays), never pickle: "
        "`make_dummy_object` returns an object, so the call fails with TypeError",
    ),
    "ExecutorTest.test_no_stale_references": (
        DIFFERENCE,
        "functions are named by import path: a bound method (`my_object.my_method`) is "
        "refused at submit() with TypeError",
    ),
    "ExecutorTest.test_max_workers_negative": (
        DIFFERENCE,
        "`max_workers=0` is accepted: it spawns no process, for workers of your own "
        "(`ex.coordinator.add_local(FunctionWorker(), threads=4)`)",
    ),
    "ExecutorTest.test_submit_keyword": (
        DIFFERENCE,
        "results are data: tuples arrive as lists (`capture` returns `((1,), {...})`, "
        "which comes back as `[[1], {...}]`)",
    ),
    "ExecutorTest.test_map_exception": (
        DIFFERENCE,
        "results are data: tuples arrive as lists (`divmod` returns `(0, 1)`, which comes "
        "back as `[0, 1]`)",
    ),
    "WaitTests.test_first_exception": (
        RACE,
        "calls start as soon as a worker has their function loaded, not strictly in "
        "submission order: `time.sleep` (a builtin) is ready at once, while `mul` and "
        "`sleep_and_raise` wait for the suite's module to be imported in the worker; when "
        "that import takes over 1.5 s (a loaded machine), the 3 s sleep started first "
        "finishes before `sleep_and_raise` raises and the test finds no call pending",
    ),
    "ExecutorShutdownTest.test_cancel_futures": (
        RACE,
        "the 50 calls of `time.sleep`, new to the executor, wait until a worker has loaded "
        "it; `shutdown(cancel_futures=True)` right after the submits cancels every call not "
        "started (each reports `cancelled()`, as it must), which on a loaded machine can be "
        "all 50: the test wants at least one to have run",
    ),
    "ExecutorShutdownTest.test_interpreter_shutdown": (DIFFERENCE, _SUBPROCESS),
    "ExecutorShutdownTest.test_submit_after_interpreter_shutdown": (DIFFERENCE, _SUBPROCESS),
    "ExecutorShutdownTest.test_hang_gh83386": (DIFFERENCE, _SUBPROCESS),
    "FailingInitializerMixin.test_initializer": (
        DIFFERENCE,
        "an initializer that raises does not break the executor for good (no "
        "`BrokenExecutor`, no `_broken`): its worker is started again with backoff, and after "
        "`max_start_failures` failures in a row calls fail with `WorkerStartError`",
    ),
}


@dataclass(frozen=True)
class Suite:
    """An installed ``test_concurrent_futures``: a module (to Python 3.11) or a package."""

    path: Path
    version: tuple[int, int]

    @property
    def is_package(self) -> bool:
        return self.path.is_dir()

    def describe(self) -> str:
        return f"Python {self.version[0]}.{self.version[1]}'s suite at {self.path}"


def _candidates() -> list[Path]:
    roots: list[str] = [sysconfig.get_paths()["stdlib"]]
    roots += glob.glob("/usr/lib/python3*")
    roots += glob.glob("/usr/local/lib/python3*")
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    roots += glob.glob(os.path.join(pyenv, "versions", "*", "lib", "python3*"))
    found: list[Path] = []
    for root in roots:
        for name in ("test_concurrent_futures", "test_concurrent_futures.py"):
            p = Path(root) / "test" / name
            if (p / "__init__.py").is_file() if name == "test_concurrent_futures" else p.is_file():
                found.append(p)
    return found


def _version_of(path: Path) -> tuple[int, int] | None:
    m = re.search(r"python(\d+)\.(\d+)", str(path))
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_suite() -> Suite | None:
    """The suite to run: ``$PYTASKQML_CPYTHON_FUTURES`` if set, else the running
    interpreter's version if installed, else the newest found. None when there is none
    (3.10 or newer: older suites test what older executors did)."""
    named = os.environ.get("PYTASKQML_CPYTHON_FUTURES")
    paths = [Path(named)] if named else _candidates()
    suites = []
    for p in paths:
        v = _version_of(p.resolve())
        if v is not None and (named or v >= (3, 10)):
            suites.append(Suite(p, v))
    if not suites:
        return None
    mine = [s for s in suites if s.version == sys.version_info[:2]]
    return (mine or sorted(suites, key=lambda s: s.version))[-1]


def _shim_support() -> None:
    """What a newer suite takes from ``test.support`` that this interpreter's lacks."""
    from test import support

    if not hasattr(support, "Py_GIL_DISABLED"):
        support.Py_GIL_DISABLED = False  # type: ignore[attr-defined]
    original = support.check_sanitizer
    if getattr(original, "_pytaskqml_shim", False):
        return

    def check_sanitizer(**kwargs: bool) -> bool:
        # A newer suite asks about sanitizers this interpreter's support does not know
        # (thread=True): this build has none of them.
        known = {k: v for k, v in kwargs.items() if k in ("address", "memory", "ub")}
        return bool(any(known.values()) and original(**known))

    def skip_if_sanitizer(reason: str | None = None, **kwargs: bool) -> Any:
        return unittest.skipIf(check_sanitizer(**kwargs), reason or "sanitizer")

    check_sanitizer._pytaskqml_shim = True  # type: ignore[attr-defined]
    support.check_sanitizer = check_sanitizer
    support.skip_if_sanitizer = skip_if_sanitizer


@functools.lru_cache(maxsize=1)
def load(suite: Suite) -> dict[str, ModuleType]:
    """Import *suite* as ``_cpython_futures_suite``; returns the module holding each class of
    :data:`MIXINS` (and ``"util"``: the one holding ``ExecutorMixin`` and ``BaseTestCase``)."""
    _shim_support()
    where = tempfile.mkdtemp(prefix="pytaskqml-cpython-futures-")
    atexit.register(shutil.rmtree, where, True)
    if suite.is_package:
        # A package of ours whose modules are the suite's: its __init__ applies the shims,
        # in every process that imports it (worker processes import the suite's modules for
        # the functions the tests submit).
        os.mkdir(os.path.join(where, ALIAS))
        Path(where, ALIAS, "__init__.py").write_text(
            f'"""CPython\'s test_concurrent_futures at {suite.path}, shimmed."""\n'
            "import cpython_futures\n\n"
            "cpython_futures._shim_support()\n"
            f"__path__ = [{str(suite.path)!r}]\n",
            encoding="utf-8",
        )
    else:
        os.symlink(suite.path, os.path.join(where, ALIAS + ".py"))
    # Appended: nothing of ours or the standard library's is shadowed. Spawned workers get
    # this sys.path, so they import the suite's functions from the same file.
    sys.path.append(where)
    importlib.invalidate_caches()
    if not suite.is_package:
        module = importlib.import_module(ALIAS)
        return {name: module for name in [*MIXINS, "util"]}
    modules = {"util": importlib.import_module(f"{ALIAS}.util")}
    for name, mod in MIXINS.items():
        modules[name] = importlib.import_module(f"{ALIAS}.{mod}")
    return modules


class SuiteExecutor(pytaskqml.Executor):
    """The executor the suite builds: ours, with the suite's positional ``max_workers``."""


def _adapter(util: ModuleType) -> type:
    class PyTaskQMLMixin(util.ExecutorMixin):  # type: ignore[name-defined,misc]
        """The suite's ExecutorMixin building a :class:`pytaskqml.Executor`."""

        executor_type = SuiteExecutor
        # Two workers, not five: the tests need two at most (the shutdown tests "few"), and
        # each test starts its own executor on a machine of two cores.
        worker_count = 2

        def setUp(self) -> None:
            super().setUp()
            # Our workers start in the background; ProcessPoolExecutor counts the calls it
            # moved to its call queue as running while its processes start. Waiting for the
            # workers keeps the shutdown tests' "some of the calls ran" meaningful.
            executor = self.executor
            if isinstance(executor, pytaskqml.Executor):
                n = self.worker_count
                ready = executor.coordinator.wait_until(lambda s: len(s.workers) >= n, 60.0)
                assert ready, "the executor's workers did not start within 60 s"

    return PyTaskQMLMixin


def _test_base(util: ModuleType) -> type:
    class Base(util.BaseTestCase):  # type: ignore[name-defined,misc]
        """The suite's base, without ``support.reap_children()``: in a test process that
        runs other tests too it would collect the exit status of their children."""

        def tearDown(self) -> None:
            from test.support import threading_helper

            threading_helper.threading_cleanup(*self._thread_key)

    return Base


@functools.lru_cache(maxsize=1)
def test_classes(suite: Suite) -> dict[str, type[unittest.TestCase]]:
    """``{"Class": TestCase class}`` for each class of :data:`MIXINS`, built on our executor."""
    modules = load(suite)
    util = modules["util"]
    mixin, base = _adapter(util), _test_base(util)
    out: dict[str, type[unittest.TestCase]] = {}
    for name in MIXINS:
        cls = type(f"PyTaskQML{name}", (getattr(modules[name], name), mixin, base), {})
        cls.__module__ = __name__  # no setUpModule of the suite's runs for it
        out[name] = cls
    return out


def test_ids(suite: Suite) -> list[str]:
    """Every test the runner runs, as ``Class.test``."""
    loader = unittest.TestLoader()
    return [
        f"{name}.{method}"
        for name, cls in test_classes(suite).items()
        for method in loader.getTestCaseNames(cls)
    ]


@dataclass
class Outcome:
    test: str
    status: str  # "passed", "failed", "skipped"
    detail: str = ""


def run_one(suite: Suite, test: str) -> Outcome:
    """Run one test of the suite (``Class.test``) against our executor."""
    name, method = test.split(".")
    case = test_classes(suite)[name](method)
    result = unittest.TestResult()
    case.run(result)
    problems = [text for _, text in result.errors + result.failures]
    if problems:
        return Outcome(test, "failed", "\n".join(problems))
    if result.skipped:
        return Outcome(test, "skipped", result.skipped[0][1])
    return Outcome(test, "passed")


def verdict(outcome: Outcome) -> str | None:
    """Why *outcome* is wrong by :data:`KNOWN`, or None when it is as expected."""
    known = KNOWN.get(outcome.test)
    if outcome.status == "failed" and known is None:
        return f"{outcome.test} failed and is not in KNOWN:\n{outcome.detail}"
    if outcome.status == "passed" and known is not None and known[0] == DIFFERENCE:
        return (
            f"{outcome.test} passed but KNOWN lists it as a difference ({known[1]}): "
            "take it out of the table (and the docs)"
        )
    return None


def docs_table() -> str:
    lines = [
        "# CPython's concurrent.futures tests against pytaskqml.Executor",
        "",
        "`tests/test_cpython_futures.py` runs the generic executor, wait, as_completed,",
        "shutdown and initializer tests of CPython's own `test_concurrent_futures` (from the",
        "Python installation it finds: the running interpreter's version if installed, e.g.",
        "Debian's `libpython3.11-testsuite`, else the newest one) against `pytaskqml.Executor`.",
        "Every other test passes. These fail (a race: may fail), each for the reason given:",
        "",
        "| test | kind | why |",
        "|---|---|---|",
    ]
    for test, (kind, reason) in KNOWN.items():
        label = "documented difference" if kind == DIFFERENCE else "race"
        lines.append(f"| `{test}` | {label} | {reason.replace('|', '/')} |")
    lines += [
        "",
        "*Documented difference*: what `pytaskqml.Executor` does differently on purpose (see",
        "its docstring). *Race*: passes or fails by timing (more often fails on a loaded",
        "machine), for the reason given.",
        "",
        "This file is written by `python tests/cpython_futures.py --write-docs` from the table",
        "in that runner, and the tests check that it matches.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if "--write-docs" in argv:
        DOC.write_text(docs_table(), encoding="utf-8")
        print(f"wrote {DOC}")
        return 0
    suite = find_suite()
    if suite is None:
        print("no CPython test_concurrent_futures installed (try libpython3.X-testsuite)")
        return 0
    pattern = argv[argv.index("-k") + 1] if "-k" in argv else ""
    print(f"running {suite.describe()}")
    bad = 0
    for test in test_ids(suite):
        if pattern not in test:
            continue
        outcome = run_one(suite, test)
        problem = verdict(outcome)
        mark = "UNEXPECTED" if problem else ("known" if outcome.test in KNOWN else "")
        print(f"{outcome.status:8} {mark:10} {test}", flush=True)
        if problem:
            bad += 1
            print(problem)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
