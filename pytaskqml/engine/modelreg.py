"""``coord.models``: named models on a coordinator's workers - load, update, unload, status.

The registry keeps the spec and version of every model loaded by name, and what each worker
reported about it. A model is loaded on every worker (and on every worker that joins later,
before any task for it reaches that worker: tasks go only to workers that report the model
ready), unless the coordinator has ``max_models``: then models load on demand, where the core
needs them, and a worker at its limit gives up its least recently used idle model.

Updating is loading a new version under the same name: every worker keeps serving the old
version until the new one is ready there, swaps in one step, and reports; a load that fails
leaves the old version serving, and the error shows in :meth:`Models.status`.

Who chooses the code. Workers import the class a spec names, so the names come from the
operator only. :meth:`Models.load` is the operator's own call (a class object or a name in
the coordinator's process). A request from outside (``POST /models/load`` on the control
endpoint) goes through :meth:`Models.load_requested`, which takes only a class on the allow
list (:meth:`Models.allow`, ``serve_control(allow_models=...)``) and never one that imports
what its config names (``trusted_only``, such as the :class:`FunctionModel` of an Executor),
whatever the list says: a request chooses among the operator's classes and their config, never
a module or a file. Spawned and thread workers load what this registry sends them and nothing
else (their only peer is this process), so every spec that reaches them passed one of those
two doors.
"""

from __future__ import annotations

import builtins
import itertools
import threading
import time
from collections import Counter
from typing import Any

from ..core.stats import ModelStats
from ..errors import ModelLoadError, WorkerStartError
from ..wire import codec as _codec
from ..worker.bootstrap import class_target, load_class
from ..worker.models import Model, read_model_file
from .engine import Engine
from .handles import WorkerHandle

Spec = dict[str, Any]


class Models:
    """The models of one coordinator (``coord.models``)."""

    def __init__(self, engine: Engine, *, on_demand: bool) -> None:
        self._engine = engine
        self._on_demand = on_demand
        self._cv = threading.Condition(threading.Lock())
        self._specs: dict[str, tuple[Spec, str]] = {}
        # name -> worker name -> {"state", "version", "error"?}
        self._status: dict[str, dict[str, dict[str, Any]]] = {}
        self._loads: Counter[str] = Counter()
        self._unloads: Counter[str] = Counter()
        self._load_failures: Counter[str] = Counter()
        self._versions = itertools.count(1)
        self._allowed: set[str] = set()  # module:Class names a request may name
        engine.on_model_request = self._requested
        engine.on_model_status = self._reported

    # ------------------------------------------------------------------ the API

    def load(
        self,
        name: str,
        spec: Any,
        *,
        version: str | None = None,
        config: dict[str, Any] | None = None,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> dict[str, str]:
        """Load *spec* as model *name* on every worker (see the module's docstring).

        *spec* is a :class:`~pytaskqml.Model` subclass, its ``"module:Class"`` name, or a
        dict ``{"class": "module:Class", "config": {...}}``; *config* (JSON) is passed to the
        model's ``load()``. *version* defaults to a number counting loads. With *wait*, returns
        once every worker attached now has answered: ``{worker: "loaded" | "failed: ..."}``;
        :class:`ModelLoadError` if none could load it. Loading again under the same name is an
        update.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("a model needs a name")
        spec = _normalise(spec, config)
        version = str(version) if version is not None else str(next(self._versions))
        with self._cv:
            self._specs[name] = (spec, version)
        self._engine.declare_model(name)
        if self._on_demand:
            self._engine.set_on_demand(name, True)
            return {}
        handles = self._engine.handles()
        for h in handles:
            self._send_load(h, name)
        if not wait or not handles:
            return {}
        return self._wait(name, version, [h.name for h in handles], timeout)

    def allow(self, *classes: type[Model] | str) -> None:
        """Let requests from outside (``POST /models/load``) name these model classes: class
        objects or ``"module:Class"`` names, imported here and now so a typo fails at once.
        ``TypeError`` for what is not a Model subclass, ``PermissionError`` for a class that
        imports what its config names (``trusted_only``): no request may choose that."""
        names = []
        for c in classes:
            if isinstance(c, str):
                try:
                    cls = load_class(c, Model)
                except WorkerStartError as exc:
                    raise ValueError(f"allow({c!r}): {exc}") from None
                names.append(c)
            elif isinstance(c, type) and issubclass(c, Model):
                cls = c
                names.append(_normalise(c, None)["class"])
            else:
                raise TypeError(f"{c!r} is not a Model subclass or a module:Class name")
            if getattr(cls, "trusted_only", False):
                raise PermissionError(
                    f"{cls.__qualname__} imports what its config names: a request must never "
                    "choose it, so it cannot be allowed"
                )
        with self._cv:
            self._allowed.update(names)

    def allowed(self) -> frozenset[str]:
        """The ``module:Class`` names requests may load (see :meth:`allow`)."""
        with self._cv:
            return frozenset(self._allowed)

    def load_requested(
        self, name: str, spec: Any, *, version: str | None = None, timeout: float = 60.0
    ) -> dict[str, str]:
        """:meth:`load` for a request from outside: *spec* is JSON data ``{"class":
        "module:Class", "config": {...}}`` and its class must be on the allow list (see the
        module's docstring); ``PermissionError`` if not, before anything is imported or sent."""
        if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
            raise ValueError('a model spec is {"class": "module:Class", "config": {...}}')
        if set(spec) - {"class", "config"}:
            raise ValueError('a model spec has "class" and "config" only')
        config = spec.get("config") or {}
        if not isinstance(config, dict):
            raise ValueError("a model's config must be a JSON object")
        with self._cv:
            permitted = spec["class"] in self._allowed
        if not permitted:
            raise PermissionError(
                f"model class {spec['class']!r} is not on this coordinator's allow list "
                "(serve_control(allow_models=...) or coord.models.allow())"
            )
        return self.load(
            name, {"class": spec["class"], "config": config}, version=version, timeout=timeout
        )

    def update(self, name: str, spec: Any, **options: Any) -> dict[str, str]:
        """Load a new version of a model already loaded (see :meth:`load`)."""
        with self._cv:
            if name not in self._specs:
                raise KeyError(f"no model named {name!r} to update")
        return self.load(name, spec, **options)

    def unload(self, name: str) -> None:
        """Unload *name* everywhere. Its tasks still waiting for a worker fail at once with
        :class:`ClosedError` (so does one submitted while the unload happens); a task already
        running finishes on the version it started with; one sent to a worker but not started
        there yet fails with that worker's ``LookupError`` (the model was unloaded before this
        task ran). No task of
        it is left pending. To let queued work finish first, wait for it (its futures, or
        :meth:`Coordinator.wait_idle`) before unloading. ``KeyError`` for a name no worker
        knows (neither loaded by name nor brought by a worker)."""
        with self._cv:
            known = name in self._specs or name in self._status
        if not known and not self._engine.has_model(name):
            raise KeyError(f"no model named {name!r} to unload")
        with self._cv:
            self._specs.pop(name, None)
        self._engine.set_on_demand(name, False)
        self._engine.unload_model(name)
        for h in self._engine.handles():
            h.model_command({"action": "unload", "name": name})
            self._unloads[name] += 1

    def load_file(self, path: str, **options: Any) -> dict[str, dict[str, str]]:
        """Load every model of a model file (JSON, or TOML on Python 3.11+; the format of
        ``pytaskqml worker --models``)."""
        _, models = read_model_file(path)
        return {
            name: self.load(name, spec, version=version or None, **options)
            for name, (spec, version) in models.items()
        }

    def list(self) -> dict[str, str]:
        """``{name: version}`` of the models loaded by name."""
        with self._cv:
            return {n: v for n, (_, v) in self._specs.items()}

    def status(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per model, per worker: ``{"state": "loaded" | "loading" | "failed" | "unloaded",
        "version": ..., "error": ...}``. While a worker loads a new version, or after the new
        version failed to load there, the entry is still the version it serves (``"state":
        "loaded"``), with ``"update": {"state": "loading" | "failed", "version", "error"?}``
        beside it."""
        with self._cv:
            return {n: {w: dict(s) for w, s in per.items()} for n, per in self._status.items()}

    def check(self, name: str) -> None:
        """ValueError with the reason when a task for *name* cannot run: no such model, or
        every worker attached now failed to load it (and none will load it on demand).

        A state the caller did not cause is no reason: while no worker has the model - its
        workers are being restarted, a new one is still loading it, none is attached yet - a
        task waits for one that has it (bounded by its own timeout)."""
        there, attached = self._engine.model_presence(name)
        if there:
            return  # ready or loading somewhere (also a model a worker brought)
        with self._cv:
            if name not in self._specs:
                raise ValueError(f"no model named {name!r}: load it first (coord.models.load)")
            if self._on_demand or not attached:
                return
            per = self._status.get(name, {})
            errors = [
                str(per[w].get("error") or "")
                for w in attached
                if w in per and per[w].get("state") == "failed"
            ]
        if len(errors) == len(attached):
            raise ValueError(f"model {name!r} failed to load on every worker: {errors[-1]}")

    # ------------------------------------------------------------------ workers

    def worker_attached(self, handle: WorkerHandle) -> None:
        """A worker joined (or a spawned one was restarted): give it every model."""
        if self._on_demand:
            return
        with self._cv:
            names = list(self._specs)
        for name in names:
            self._send_load(handle, name)

    def _send_load(self, handle: WorkerHandle, name: str) -> None:
        with self._cv:
            entry = self._specs.get(name)
            if entry is None:
                return
            spec, version = entry
            self._set_status(name, handle.name, {"state": "loading", "version": version})
            self._loads[name] += 1
        self._engine.model_loading(handle, name)
        handle.model_command({"action": "load", "name": name, "spec": spec, "version": version})

    def _requested(self, action: str, handle: WorkerHandle, name: str) -> None:
        """The core asks for a load or an unload (models on demand)."""
        if action == "load":
            self._send_load(handle, name)
        else:
            handle.model_command({"action": "unload", "name": name})
            self._unloads[name] += 1

    def _reported(self, handle: WorkerHandle, status: dict[str, Any]) -> None:
        name = status.get("name")
        if not isinstance(name, str):
            return
        with self._cv:
            entry: dict[str, Any] = {
                k: status[k] for k in ("state", "version", "error") if k in status
            }
            self._set_status(name, handle.name, entry)
            if entry.get("state") == "failed":
                self._load_failures[name] += 1
            self._cv.notify_all()

    def _set_status(self, name: str, worker: str, entry: dict[str, Any]) -> None:
        """Lock held. A load that has not succeeded (yet) on a worker serving another version
        does not hide that version: the worker keeps serving it (see the module's
        docstring), so the entry stays the serving one and the attempt goes under
        ``"update"``."""
        per = self._status.setdefault(name, {})
        old = per.get(worker)
        if (
            entry.get("state") in ("loading", "failed")
            and old is not None
            and old.get("state") == "loaded"
            and old.get("version") != entry.get("version")
        ):
            per[worker] = {k: v for k, v in old.items() if k != "update"} | {"update": entry}
        else:
            per[worker] = entry

    def _wait(
        self, name: str, version: str, workers: builtins.list[str], timeout: float
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                per = self._status.get(name, {})
                answers = {w: _attempt(per[w], version) for w in workers if w in per}
                done = {w: s for w, s in answers.items() if s and s.get("state") != "loading"}
                if len(done) == len(workers):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"model {name!r} not loaded within {timeout}s")
                self._cv.wait(remaining)
        out = {
            w: "loaded" if s["state"] == "loaded" else f"failed: {s.get('error', '')}"
            for w, s in done.items()
        }
        if all(v != "loaded" for v in out.values()):
            errors = {w: str(s.get("error", "")) for w, s in done.items()}
            raise ModelLoadError.of(name, version, errors)
        return out

    # ------------------------------------------------------------------ statistics

    def statistics(
        self,
        counts: dict[tuple[str, str], int],
        seconds: dict[tuple[str, str], float] | None = None,
    ) -> tuple[ModelStats, ...]:
        seconds = seconds or {}
        with self._cv:
            names = set(self._specs) | set(self._status) | {m for m, _ in counts}
            out = []
            for name in sorted(names):
                per = self._status.get(name, {})
                out.append(
                    ModelStats(
                        name=name,
                        version=self._specs[name][1] if name in self._specs else None,
                        ready=tuple(
                            (w, str(s.get("version", "")))
                            for w, s in sorted(per.items())
                            if s.get("state") == "loaded"
                        ),
                        loading=tuple(
                            w for w, s in sorted(per.items()) if s.get("state") == "loading"
                        ),
                        failed=tuple(
                            (w, str(s.get("error", "")))
                            for w, s in sorted(
                                [(w, s.get("update", s)) for w, s in per.items()],
                                key=lambda ws: ws[0],
                            )
                            if s.get("state") == "failed"
                        ),
                        results=tuple((v, n) for (m, v), n in sorted(counts.items()) if m == name),
                        loads=self._loads[name],
                        unloads=self._unloads[name],
                        seconds=tuple(
                            (v, round(t, 6)) for (m, v), t in sorted(seconds.items()) if m == name
                        ),
                        load_failures=self._load_failures[name],
                    )
                )
        return tuple(out)


def _attempt(entry: dict[str, Any], version: str) -> dict[str, Any] | None:
    """What a worker's status entry says about loading *version*: the entry itself, or the
    update beside the version it serves; None if it says nothing about that version yet."""
    if entry.get("version") == version:
        return entry
    update = entry.get("update")
    if isinstance(update, dict) and update.get("version") == version:
        return update
    return None


def _normalise(spec: Any, config: dict[str, Any] | None) -> Spec:
    if isinstance(spec, type):
        if not issubclass(spec, Model):
            raise TypeError(f"{spec.__qualname__} is not a subclass of pytaskqml.Model")
        target, _ = class_target(spec)
        if target.startswith(("__main__:", "__mp_main__:")):
            raise ValueError(
                f"{spec.__qualname__} lives in the main script; put models in an importable "
                "module so workers can import them by name"
            )
        spec = {"class": target}
    elif isinstance(spec, str):
        spec = {"class": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise TypeError('a model spec is a Model subclass, "module:Class" or {"class": ...}')
    out = {"class": spec["class"], "config": dict(config or spec.get("config") or {})}
    _codec.encode_str(out)  # it travels as JSON
    return out
