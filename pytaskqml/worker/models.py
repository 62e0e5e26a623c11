"""Named models on a worker: the :class:`Model` contract and the table a worker keeps them in.

A worker - a thread worker, a spawned process or ``pytaskqml worker`` - can host several
models by name, besides its own ``Worker.process``. A task addressed to a model
(``submit(item, model="detector")``) runs ``predict`` of the version loaded under that name.

Loading is asked for by the coordinator with *data*: a spec ``{"class": "module:Class",
"config": {...}}`` and a version. The class is imported only if the worker allows it: a
``pytaskqml worker`` allows the classes of its ``--models`` file and nothing else, so a peer
cannot make it import a module of its choosing; a worker a coordinator spawned, or its thread
workers, trust that coordinator (their channel to it is private), as they trust it with
the class of the worker itself - and the coordinator sends them only specs its operator chose
or allowed (a request from outside names a class of its allow list, never one that imports
what its config names: see :mod:`._modelreg`).

Swapping. A new version is constructed and ``load()``-ed on a thread of its own, so tasks for
the models already there keep running. Once ready it replaces the old one in one step: a task
that started on the old version finishes on it, every later one runs on the new. The old
version is ``unload()``-ed once no task uses it. A load that fails leaves the old version
serving and is reported with its error.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..wire.protocol import CHUNK_ROW, RESULT_ERROR, RESULT_OK
from .base import TASK_ERRORS, Worker, error_info, run_chunk, run_entries
from .bootstrap import load_class

log = logging.getLogger(__name__)


class Model:
    """Subclass this for a model a worker serves by name. Name it to workers as
    ``module:Class``.

    ``max_batch_size`` above 1 lets the worker call :meth:`predict_batch` with up to that many
    items of one frame at once.
    """

    max_batch_size: int = 1

    def load(self, config: dict[str, Any]) -> None:
        """Load weights, open files: *config* is the JSON ``config`` of the spec."""

    def predict(self, item: Any) -> Any:
        """The result for one item. An exception fails this item only. Not overridden, it
        raises ``NotImplementedError`` (a model that overrides only :meth:`predict_batch`
        is never called here)."""
        raise NotImplementedError(f"{type(self).__name__} must override predict()")

    def predict_batch(self, items: list[Any]) -> list[Any]:
        """Results for several items, one per item, in order (an ``Exception`` in a slot fails
        that item alone)."""
        return [self.predict(i) for i in items]

    def unload(self) -> None:
        """Release what :meth:`load` took. Called once no task uses this version any more."""

    def key_moved(self, key: str) -> None:
        """Tasks with *key* come to this worker from now on, because the worker that served
        them died: rebuild the state kept for that key (a tracker's history, say)."""


class ModelWorker(Worker):
    """A worker that only serves named models (``pytaskqml worker --models FILE`` without a
    class runs this one)."""

    def process(self, payload: Any) -> Any:
        """Always ``ValueError``: a ``ModelWorker`` runs tasks sent with ``model=NAME`` only."""
        raise ValueError("this worker serves named models only: submit with model=NAME")


class _Target:
    """A loaded version, as the task runner calls it (process/process_batch of a Worker)."""

    def __init__(self, name: str, version: str, model: Model) -> None:
        self.name = name
        self.version = version
        self.model = model
        self.process = model.predict
        self.process_batch = model.predict_batch
        self.max_batch_size = max(1, int(getattr(model, "max_batch_size", 1) or 1))
        self.in_use = 0
        self.retired = False


class ModelTable:
    """The models one worker holds (see the module's docstring).

    *allowed* is the set of ``module:Class`` names it may import (``None``: any, for workers
    whose coordinator is their operator). *report* receives a status dict for every change:
    ``{"name", "version", "state": "loaded" | "failed" | "unloaded", "error"?}``.
    """

    def __init__(self, allowed: set[str] | None, report: Callable[[dict[str, Any]], None]) -> None:
        self.allowed = allowed
        self._report = report
        self._lock = threading.Lock()
        self._current: dict[str, _Target] = {}
        self._old: list[_Target] = []
        self._unloaded: set[str] = set()  # unloaded by command, not loaded again since

    def loaded(self) -> dict[str, str]:
        """``{name: version}`` of the models ready now."""
        with self._lock:
            return {n: t.version for n, t in self._current.items()}

    # ------------------------------------------------------------------ commands

    def command(self, cmd: dict[str, Any]) -> None:
        """A command from the coordinator: ``{"action": "load", "name", "spec", "version"}``
        or ``{"action": "unload", "name"}``. Never raises: problems are reported."""
        action, name = cmd.get("action"), cmd.get("name")
        if not isinstance(name, str) or not name:
            log.warning("model command without a name: %r", cmd)
            return
        if action == "unload":
            self.unload(name)
        elif action == "load":
            threading.Thread(
                target=self._load_logged,
                args=(name, cmd.get("spec"), str(cmd.get("version") or "")),
                name=f"pytaskqml-model-{name}",
                daemon=True,
            ).start()
        else:
            self._report({"name": name, "state": "failed", "error": f"unknown action {action!r}"})

    def load_now(self, name: str, spec: Any, version: str) -> bool:
        """Load in the calling thread (a worker's models at start-up); True if it loaded."""
        return self._load(name, spec, version)

    def _load_logged(self, name: str, spec: Any, version: str) -> None:
        try:
            self._load(name, spec, version)
        except BaseException:
            log.exception("loading model %s crashed", name)

    def _load(self, name: str, spec: Any, version: str) -> bool:
        try:
            target = self._construct(name, spec, version)
        except Exception as exc:
            kind, message, _ = error_info(exc)
            log.warning("model %s version %r failed to load: %s: %s", name, version, kind, message)
            self._report(
                {"name": name, "version": version, "state": "failed", "error": f"{kind}: {message}"}
            )
            return False
        with self._lock:
            old = self._current.get(name)
            self._current[name] = target
            self._unloaded.discard(name)
            if old is not None:
                old.retired = True
                self._old.append(old)
        self.reap()
        self._report({"name": name, "version": version, "state": "loaded"})
        return True

    def _construct(self, name: str, spec: Any, version: str) -> _Target:
        if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
            raise ValueError('a model spec is {"class": "module:Class", "config": {...}}')
        cls_name = spec["class"]
        if self.allowed is not None and cls_name not in self.allowed:
            raise PermissionError(
                f"class {cls_name!r} is not in this worker's allow-list (its --models file)"
            )
        config = spec.get("config") or {}
        if not isinstance(config, dict):
            raise ValueError("a model's config must be a JSON object")
        cls = load_class(cls_name, Model)
        if self.allowed is not None and getattr(cls, "trusted_only", False):
            raise PermissionError(
                f"{cls_name} imports what its config names: only workers a coordinator "
                "spawned (or its thread workers) load it"
            )
        model = cls()
        model.load(config)
        return _Target(name, version, model)

    def unload(self, name: str) -> None:
        with self._lock:
            old = self._current.pop(name, None)
            self._unloaded.add(name)
            if old is not None:
                old.retired = True
                self._old.append(old)
        self.reap()
        self._report({"name": name, "state": "unloaded"})

    # ------------------------------------------------------------------ running

    def acquire(self, name: str) -> _Target:
        """The current version of *name* for one task; release() it afterwards. KeyError if
        the model is not loaded here."""
        with self._lock:
            target = self._current[name]
            target.in_use += 1
            return target

    def missing(self, name: str) -> LookupError:
        """The error of a task for *name*, which is not loaded here: a task the coordinator
        sent before it unloaded the model (the unload reached this worker first) says so."""
        with self._lock:
            unloaded = name in self._unloaded
        if unloaded:
            return LookupError(f"model {name!r} was unloaded before this task ran")
        return LookupError(f"model {name!r} is not loaded here")

    def release(self, target: _Target) -> None:
        with self._lock:
            target.in_use -= 1
            idle = target.retired and target.in_use == 0
        if idle:
            self.reap()

    def reap(self) -> None:
        """Unload replaced versions no task uses any more."""
        with self._lock:
            done = [t for t in self._old if t.in_use == 0]
            self._old = [t for t in self._old if t.in_use != 0]
        for t in done:
            try:
                t.model.unload()
            except Exception:
                log.exception("unload() of model %s version %r raised", t.name, t.version)

    def close(self) -> None:
        """Unload everything (the worker is stopping)."""
        with self._lock:
            for t in self._current.values():
                t.retired = True
                self._old.append(t)
            self._current.clear()
        self.reap()


def read_model_file(path: str) -> tuple[set[str], dict[str, tuple[dict[str, Any], str]]]:
    """Parse a model file (JSON, or TOML on Python 3.11+) into (allowed classes, models to
    load: ``{name: (spec, version)}``). ``ValueError`` with the reason for a bad file.

    Format::

        {"allow": ["myapp:Detector", "myapp:Tracker"],
         "models": {"detector": {"class": "myapp:Detector", "version": "1",
                                 "config": {"threshold": 0.5}}}}

    Every class named under ``models`` is allowed too.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    data: Any
    if path.endswith(".toml"):
        try:
            tomllib: Any = importlib.import_module("tomllib")
        except ImportError:  # Python 3.10
            raise ValueError("TOML model files need Python 3.11; use JSON") from None
        try:
            data = tomllib.loads(raw.decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None
    else:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object with 'allow' and/or 'models'")
    allowed = data.get("allow", [])
    if not isinstance(allowed, list) or not all(isinstance(c, str) for c in allowed):
        raise ValueError(f"{path}: 'allow' must be a list of module:Class names")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ValueError(f"{path}: 'models' must map names to specs")
    out: dict[str, tuple[dict[str, Any], str]] = {}
    for name, spec in models.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
            raise ValueError(f"{path}: model {name!r} needs a 'class' (module:Class)")
        config = spec.get("config", {})
        if not isinstance(config, dict):
            raise ValueError(f"{path}: model {name!r}: 'config' must be an object")
        out[name] = ({"class": spec["class"], "config": config}, str(spec.get("version", "")))
    return {*allowed, *(s["class"] for s, _ in out.values())}, out


# ---------------------------------------------------------------------------- running rows


def run_option_row(
    worker: Worker, table: ModelTable | None, row: list[Any]
) -> tuple[tuple[int, int, Any], str | None]:
    """Run one task row with options ``[id, payload, {"c"?, "m"?, "k"?, "mv"?}]`` (a chunk,
    a model, a key, "the key moved here"). Returns the result row and the model version that
    produced it (``None`` for the worker's own process)."""
    tid, payload, opts = row[0], row[1], row[2]
    name = opts.get("m")
    key = opts.get("k")
    target: Any = worker
    version = None
    held = None
    if name is not None:
        if table is None:
            return (tid, RESULT_ERROR, LookupError("this worker hosts no models")), None
        try:
            held = table.acquire(name)
        except KeyError:
            return (tid, RESULT_ERROR, table.missing(name)), None
        target, version = held, held.version
    try:
        if opts.get("mv") and isinstance(key, str):
            hook = held.model.key_moved if held is not None else worker.key_moved
            try:
                hook(key)
            except TASK_ERRORS as exc:
                return (tid, RESULT_ERROR, exc), version
        if opts.get("c"):
            return run_chunk(target.process, tid, payload), version
        try:
            return (tid, RESULT_OK, target.process(payload)), version
        except TASK_ERRORS as exc:
            return (tid, RESULT_ERROR, exc), version
    finally:
        if held is not None and table is not None:
            table.release(held)


def run_rows(
    worker: Worker, table: ModelTable | None, rows: list[list[Any]], batch: bool
) -> tuple[list[tuple[int, int, Any]], dict[int, str]]:
    """Run a frame's rows - plain, chunks, or with options - in order; a model's rows next
    to each other run as one batch when it batches. Returns the result rows and the version
    of each row a model ran."""
    out: list[tuple[int, int, Any]] = []
    versions: dict[int, str] = {}
    i = 0
    while i < len(rows):
        row = rows[i]
        if len(row) == 3 and type(row[2]) is dict:
            name = row[2].get("m")
            j = i + 1
            if batch or name is not None:
                while j < len(rows) and _same_target(rows[j], name):
                    j += 1
            group = rows[i:j]
            if name is not None and table is not None and j - i > 1 and not _any_moved(group):
                out.extend(_run_model_batch(table, name, group, versions))
            else:
                for r in group:
                    result, version = run_option_row(worker, table, r)
                    out.append(result)
                    if version is not None:
                        versions[r[0]] = version
            i = j
            continue
        j = i + 1
        while j < len(rows) and not (len(rows[j]) == 3 and type(rows[j][2]) is dict):
            j += 1
        out.extend(run_entries(worker, rows[i:j], batch))
        i = j
    return out, versions


def _same_target(row: list[Any], name: str | None) -> bool:
    return len(row) == 3 and type(row[2]) is dict and row[2].get("m") == name


def _any_moved(rows: list[list[Any]]) -> bool:
    return any(r[2].get("mv") for r in rows)


def _run_model_batch(
    table: ModelTable, name: str, rows: list[list[Any]], versions: dict[int, str]
) -> list[tuple[int, int, Any]]:
    try:
        held = table.acquire(name)
    except KeyError:
        err = table.missing(name)
        return [(r[0], RESULT_ERROR, err) for r in rows]
    try:
        plain = [[r[0], r[1], CHUNK_ROW] if r[2].get("c") else [r[0], r[1]] for r in rows]
        results = run_entries(held, plain, held.max_batch_size > 1)
    finally:
        table.release(held)
    for r in rows:
        versions[r[0]] = held.version
    return results
