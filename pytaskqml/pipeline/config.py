"""A pipeline described in a TOML (Python 3.11+) or JSON file: read it, check all of it (every
problem, one line each), build its steps, and print the plan of what it would start.

::

    [pipeline]
    name = "frames"
    buffersize = 64
    steps = ["decode", "look", "annotate"]      # stage or branches names, in order

    [stages.decode]
    worker = "myapp:Decode"                     # module:Class (or module:function)
    threads = 2                                 # or [min, max]

    [stages.detect]
    worker = "myapp:Detect"
    processes = [1, 4]                          # spawned; or connect = ["host:port"], listen
    kwargs = { scale = 2 }
    timeout = 5.0

    [stages.classify]                           # a named model on a pool of ModelWorkers
    model = "classifier"
    load = "myapp:Classifier"                   # a Model subclass, loaded at start
    config = { threshold = 0.5 }
    version = "3"
    processes = 2

    [branches.look]                             # fan-out, converged by item
    paths = { faces = ["detect"], sizes = ["measure"] }
    join = ["faces", "sizes"]                   # default: every path
    timeout = 2.0

    [service]                                   # for `pytaskqml serve`
    ingress = "127.0.0.1:7000"
    http = "127.0.0.1:7080"
    control = "127.0.0.1:7100"
    log_file = "frames.log"

Limits, so that a typo cannot ask for what no machine runs: ``processes`` at most
:data:`MAX_PROCESSES` per stage and in all, ``threads`` at most :data:`MAX_THREADS` per stage
and in all, ``buffersize`` and ``max_queue`` at most :data:`MAX_ITEMS`, ``window`` at most
:data:`MAX_WINDOW`, ``max_retries`` at most :data:`MAX_RETRIES`, a ``timeout`` finite and at
most :data:`MAX_SECONDS`; a file nests at most :data:`MAX_DEPTH` levels deep. Checking is
linear in the size of the file: the cycle check visits each branch and each path once.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ..core.ordered import OVERFLOW_POLICIES
from ..wire import connection as _connection
from ..wire import protocol as _protocol
from ..worker.base import Worker
from ..worker.functions import is_function
from ..worker.models import Model
from .stages import Branches, Stage, resolve_worker

TOP = {"pipeline", "stages", "branches", "service"}
PIPELINE_KEYS = {"name", "buffersize", "steps"}
STAGE_KEYS = {
    "worker",
    "model",
    "load",
    "config",
    "version",
    "threads",
    "processes",
    "connect",
    "listen",
    "kwargs",
    "timeout",
    "buffersize",
    "max_queue",
    "overflow",
    "window",
    "max_retries",
}
BRANCH_KEYS = {"paths", "join", "timeout"}
SERVICE_KEYS = {"ingress", "http", "control", "log_file"}

MAX_PROCESSES = 1024
MAX_THREADS = 4096
MAX_ITEMS = 10_000_000
MAX_WINDOW = 65_536
MAX_RETRIES = 1000
MAX_SECONDS = 365 * 86_400.0
MAX_DEPTH = 64


class ConfigError(ValueError):
    """A configuration with problems; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def read(path: str | Path) -> dict[str, Any]:
    """The file's table (``ConfigError`` with one line if it cannot be read or parsed)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    if p.suffix == ".toml":
        if sys.version_info < (3, 11):
            raise ConfigError([f"{p}: TOML needs Python 3.11 or later; use a .json file"])
        tomllib: Any = importlib.import_module("tomllib")
        try:
            doc: Any = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{p}: not valid TOML: {exc}"]) from None
        except RecursionError:
            raise ConfigError([f"{p}: nests deeper than {MAX_DEPTH} levels"]) from None
        if _too_deep(doc):
            raise ConfigError([f"{p}: nests deeper than {MAX_DEPTH} levels"])
        return dict(doc)
    dupes: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in items:
            if k in seen:
                dupes.append(f"duplicate name {k!r}")
            seen[k] = v
        return seen

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{p}: not valid JSON: {exc}"]) from None
    if _protocol.json_depth_exceeds(text, MAX_DEPTH):
        raise ConfigError([f"{p}: nests deeper than {MAX_DEPTH} levels"])
    try:
        doc = json.loads(text, object_pairs_hook=pairs)
    except ValueError as exc:
        raise ConfigError([f"{p}: not valid JSON: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{p}: nests deeper than {MAX_DEPTH} levels"]) from None
    if dupes:
        raise ConfigError(dupes)
    if not isinstance(doc, dict):
        raise ConfigError([f"{p}: the top level must be a table (a JSON object)"])
    return doc


def _too_deep(doc: Any) -> bool:
    """True when *doc* (parsed) nests deeper than MAX_DEPTH; iterative, and it stops there."""
    todo: list[tuple[Any, int]] = [(doc, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                return True
            todo.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return False


def _is_count(v: Any, pair: bool, most: int) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return 1 <= v <= most
    return (
        pair
        and isinstance(v, list)
        and len(v) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        and 1 <= v[0] <= v[1] <= most
    )


_COUNT_LIMITS = {
    "threads": MAX_THREADS,
    "processes": MAX_PROCESSES,
    "buffersize": MAX_ITEMS,
    "max_queue": MAX_ITEMS,
    "window": MAX_WINDOW,
}


def _most(spec: dict[str, Any], key: str) -> int:
    """The largest count a stage's *key* asks for (0 if none, or one reported already)."""
    v = spec.get(key)
    if not _is_count(v, pair=True, most=_COUNT_LIMITS[key]):
        return 0
    if isinstance(v, list):
        return int(v[1])
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _check_stage(name: str, spec: Any, problems: list[str]) -> None:
    where = f"stages.{name}"
    if not isinstance(spec, dict):
        problems.append(f"{where}: must be a table")
        return
    for k in sorted(set(spec) - STAGE_KEYS):
        problems.append(f"{where}: unknown option {k!r}")
    worker = spec.get("worker")
    _check_model(where, spec, problems)
    if worker is None and "model" in spec:
        pass  # a ModelWorker
    elif not isinstance(worker, str):
        problems.append(f"{where}: worker must be a module:Class name")
    else:
        try:
            obj = resolve_worker(worker)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
        else:
            if not (isinstance(obj, type) and issubclass(obj, Worker)) and not is_function(obj):
                problems.append(f"{where}: {worker} is not a Worker subclass or a function")
    for k in ("threads", "processes"):
        if k in spec and not _is_count(spec[k], pair=True, most=_COUNT_LIMITS[k]):
            problems.append(
                f"{where}: {k} must be a positive integer or [min, max], at most {_COUNT_LIMITS[k]}"
            )
    for k in ("buffersize", "max_queue", "window"):
        if k in spec and not _is_count(spec[k], pair=False, most=_COUNT_LIMITS[k]):
            problems.append(f"{where}: {k} must be a positive integer, at most {_COUNT_LIMITS[k]}")
    retries = spec.get("max_retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        problems.append(f"{where}: max_retries must be an integer from 0 to {MAX_RETRIES}")
    if "timeout" in spec and not _is_seconds(spec["timeout"]):
        problems.append(
            f"{where}: timeout must be a positive number of seconds, at most {MAX_SECONDS:g}"
        )
    if "overflow" in spec and spec["overflow"] not in OVERFLOW_POLICIES:
        problems.append(f"{where}: overflow must be one of {', '.join(OVERFLOW_POLICIES)}")
    if "kwargs" in spec and not isinstance(spec["kwargs"], dict):
        problems.append(f"{where}: kwargs must be a table")
    connect = spec.get("connect", [])
    if not isinstance(connect, list):
        problems.append(f"{where}: connect must be a list of HOST:PORT")
        connect = []
    for addr in [*connect, *([spec["listen"]] if "listen" in spec else [])]:
        _check_address(f"{where}: ", addr, problems)


def _is_seconds(v: Any) -> bool:
    return (
        isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
        and 0 < v <= MAX_SECONDS
    )


def _check_address(where: str, addr: Any, problems: list[str]) -> None:
    try:
        _connection.parse_address(addr)
    except (ValueError, TypeError) as exc:
        problems.append(f"{where}bad address {addr!r}: {exc}")


def _check_branches(
    name: str,
    spec: Any,
    doc: dict[str, Any],
    problems: list[str],
    used: list[str],
    cycles: dict[tuple[str, str], str],
) -> None:
    where = f"branches.{name}"
    if not isinstance(spec, dict):
        problems.append(f"{where}: must be a table")
        return
    for k in sorted(set(spec) - BRANCH_KEYS):
        problems.append(f"{where}: unknown option {k!r}")
    paths = spec.get("paths")
    if not isinstance(paths, dict) or not paths:
        problems.append(f"{where}: paths must be a table of branch = [stage, ...]")
        paths = {}
    stages, branches = doc.get("stages", {}), doc.get("branches", {})
    for b, path in paths.items():
        if not isinstance(path, list) or not path or not all(isinstance(s, str) for s in path):
            problems.append(f"{where}: path {b!r} must be a non-empty list of stage names")
            continue
        for s in path:
            if s in branches:
                cycle = cycles.get((name, s))
                problems.append(
                    f"{where}: cycle {cycle}"
                    if cycle
                    else f"{where}: path {b!r} names branches {s!r}; a path holds stages only"
                )
            elif s not in stages:
                problems.append(f"{where}: path {b!r} names unknown stage {s!r}")
            else:
                used.append(s)
    join = spec.get("join", list(paths))
    if not isinstance(join, list):
        problems.append(f"{where}: join must be a list of branch names")
        join = []
    for b in join:
        if b not in paths:
            problems.append(f"{where}: join names unknown branch {b!r}")
    if "timeout" in spec and not _is_seconds(spec["timeout"]):
        problems.append(
            f"{where}: timeout must be a positive number of seconds, at most {MAX_SECONDS:g}"
        )


def _cycles(branches: dict[str, Any]) -> dict[tuple[str, str], str]:
    """``{(branches, named branches): "a -> b -> a"}`` for each path step that closes a cycle.

    One depth-first walk over the branches that paths name, each visited once and each step
    followed once: linear in the size of the configuration, however the paths interleave (a
    search of every route from every branch is exponential in a chain of fan-outs)."""

    def steps(name: str) -> list[str]:
        spec = branches.get(name)
        paths = spec.get("paths", {}) if isinstance(spec, dict) else {}
        out: list[str] = []
        for path in paths.values() if isinstance(paths, dict) else []:
            if isinstance(path, list):
                out.extend(s for s in path if isinstance(s, str) and s in branches)
        return out

    found: dict[tuple[str, str], str] = {}
    done: set[str] = set()
    for root in branches:
        if root in done:
            continue
        trail: list[str] = [root]  # the walk from root to here
        on_trail: dict[str, int] = {root: 0}
        todo = [iter(steps(root))]
        while todo:
            here = trail[-1]
            nxt = next(todo[-1], None)
            if nxt is None:
                todo.pop()
                done.add(trail.pop())
                del on_trail[here]
                continue
            if nxt in on_trail:
                loop = trail[on_trail[nxt] :]
                if len(loop) > 8:  # a long loop is named by its ends
                    loop = [*loop[:4], "...", *loop[-3:]]
                found[(here, nxt)] = " -> ".join([*loop, nxt])
            elif nxt not in done:
                on_trail[nxt] = len(trail)
                trail.append(nxt)
                todo.append(iter(steps(nxt)))
    return found


def check(doc: dict[str, Any]) -> list[str]:
    """Every problem of the configuration, one line each (empty: it is good). Imports each
    worker's module; builds nothing and starts nothing."""
    problems: list[str] = []
    for k in sorted(set(doc) - TOP):
        problems.append(f"unknown table {k!r}")
    pipe = doc.get("pipeline")
    if not isinstance(pipe, dict):
        problems.append("no [pipeline] table")
        pipe = {}
    for k in sorted(set(pipe) - PIPELINE_KEYS):
        problems.append(f"pipeline: unknown option {k!r}")
    if "buffersize" in pipe and not _is_count(pipe["buffersize"], pair=False, most=MAX_ITEMS):
        problems.append(f"pipeline: buffersize must be a positive integer, at most {MAX_ITEMS}")
    stages = doc.get("stages", {})
    branches = doc.get("branches", {})
    if not isinstance(stages, dict) or not isinstance(branches, dict):
        problems.append("stages and branches must be tables")
        return problems
    for n in sorted(set(stages) & set(branches)):
        problems.append(f"duplicate name {n!r}: both a stage and branches")
    for n, spec in stages.items():
        _check_stage(n, spec, problems)
    used: list[str] = []
    cycles = _cycles(branches)
    for n, spec in branches.items():
        _check_branches(n, spec, doc, problems, used, cycles)
    steps = pipe.get("steps")
    if not isinstance(steps, list) or not steps:
        problems.append("pipeline: steps must be a non-empty list of stage or branches names")
        steps = []
    for s in steps:
        if s in stages:
            used.append(s)
        elif s not in branches:
            problems.append(f"pipeline: steps names unknown stage {s!r}")
    for s, n in sorted(Counter(used).items()):
        if n > 1:
            problems.append(f"stage {s!r} is used more than once (each stage is one pool)")
    _check_totals(stages, used, problems)
    service = doc.get("service", {})
    if not isinstance(service, dict):
        problems.append("service must be a table")
        service = {}
    for k in sorted(set(service) - SERVICE_KEYS):
        problems.append(f"service: unknown option {k!r}")
    for k in ("ingress", "http", "control"):
        if k in service:
            _check_address("service: ", service[k], problems)
    if "log_file" in service and not isinstance(service["log_file"], str):
        problems.append("service: log_file must be a path")
    return problems


def _check_totals(stages: dict[str, Any], used: list[str], problems: list[str]) -> None:
    """What all the stages together would start, against the same limits."""
    specs = [stages[u] for u in set(used) if isinstance(stages.get(u), dict)]
    for key, most in (("processes", MAX_PROCESSES), ("threads", MAX_THREADS)):
        total = sum(_most(spec, key) for spec in specs)
        if total > most:
            problems.append(f"the stages would start up to {total} {key} in all: at most {most}")


def load(path: str | Path) -> dict[str, Any]:
    """Read and check a configuration (``ConfigError`` listing every problem)."""
    doc = read(path)
    problems = check(doc)
    if problems:
        raise ConfigError(problems)
    return doc


def _check_model(where: str, spec: dict[str, Any], problems: list[str]) -> None:
    model = spec.get("model")
    if model is None:
        for k in ("load", "config", "version"):
            if k in spec:
                problems.append(f"{where}: {k} needs model = NAME")
        return
    if not isinstance(model, str) or not model:
        problems.append(f"{where}: model must be a name")
    if "config" in spec and not isinstance(spec["config"], dict):
        problems.append(f"{where}: config must be a table")
    if "version" in spec and not isinstance(spec["version"], str):
        problems.append(f"{where}: version must be a string")
    load = spec.get("load")
    if load is None:
        return
    if not isinstance(load, str):
        problems.append(f"{where}: load must be a module:Class name")
        return
    try:
        obj = resolve_worker(load)
    except ValueError as exc:
        problems.append(f"{where}: {exc}")
        return
    if not (isinstance(obj, type) and issubclass(obj, Model)):
        problems.append(f"{where}: {load} is not a Model subclass")


def _stage(name: str, spec: dict[str, Any], authkey: bytes | str | None) -> Stage:
    def count(v: Any) -> int | tuple[int, int] | None:
        return tuple(v) if isinstance(v, list) else v

    return Stage(
        spec.get("worker"),
        name=name,
        model=spec.get("model"),
        load=spec.get("load"),
        config=spec.get("config"),
        version=spec.get("version"),
        threads=count(spec.get("threads")),
        processes=count(spec.get("processes")),
        connect=spec.get("connect", []),
        listen=spec.get("listen"),
        kwargs=spec.get("kwargs"),
        timeout=spec.get("timeout"),
        buffersize=spec.get("buffersize", 64),
        max_queue=spec.get("max_queue", 10_000),
        overflow=spec.get("overflow", "block"),
        window=spec.get("window", 64),
        max_retries=spec.get("max_retries", 2),
        authkey=authkey,
    )


def build(doc: dict[str, Any], *, authkey: bytes | str | None = None) -> list[Stage | Branches]:
    """The steps of a checked configuration, for :class:`~pytaskqml.Pipeline`."""
    stages, branches = doc.get("stages", {}), doc.get("branches", {})
    steps: list[Stage | Branches] = []
    for s in doc["pipeline"]["steps"]:
        if s in stages:
            steps.append(_stage(s, stages[s], authkey))
            continue
        spec = branches[s]
        paths = {b: [_stage(n, stages[n], authkey) for n in p] for b, p in spec["paths"].items()}
        steps.append(
            Branches(paths, name=s, timeout=spec.get("timeout"), join=spec.get("join"))  # type: ignore[arg-type]
        )
    return steps


def _pool(spec: dict[str, Any]) -> str:
    parts = []
    for k, what in (("threads", "thread"), ("processes", "spawned process")):
        v = spec.get(k)
        if v is not None:
            n = f"{v[0]}-{v[1]}" if isinstance(v, list) else str(v)
            parts.append(f"{n} {what}{'' if v == 1 else 'es' if k == 'processes' else 's'}")
    parts += [f"connect {a}" for a in spec.get("connect", [])]
    if "listen" in spec:
        parts.append(f"listen on {spec['listen']}")
    if not parts:
        parts.append("1 thread")
    extra = [f"{k} {spec[k]}" for k in ("timeout", "buffersize", "kwargs") if k in spec]
    what = spec.get("worker", "pytaskqml.worker:ModelWorker")
    if "model" in spec:
        what += f" serving model {spec['model']}" + (f" ({spec['load']})" if "load" in spec else "")
    return f"{what} on {', '.join(parts)}" + (f" ({'; '.join(extra)})" if extra else "")


def plan(doc: dict[str, Any]) -> str:
    """What the configuration would start, as text (nothing is started)."""
    pipe, stages = doc["pipeline"], doc.get("stages", {})
    lines = [
        f"pipeline {pipe.get('name', 'pipeline')!r}: {len(pipe['steps'])} steps, "
        f"buffersize {pipe.get('buffersize', 64)}"
    ]
    procs = [0, 0]
    threads = 0
    ports: list[str] = []

    def note(spec: dict[str, Any]) -> None:
        nonlocal threads
        p = spec.get("processes")
        if p is not None:
            lo, hi = (p[0], p[1]) if isinstance(p, list) else (p, p)
            procs[0] += lo
            procs[1] += hi
        t = spec.get("threads")
        if t is not None or (p is None and not spec.get("connect") and "listen" not in spec):
            threads += (t[1] if isinstance(t, list) else t) or 1
        if "listen" in spec:
            ports.append(str(spec["listen"]))

    for i, s in enumerate(pipe["steps"], 1):
        if s in stages:
            lines.append(f"  {i}. stage {s}: {_pool(stages[s])}")
            note(stages[s])
            continue
        spec = doc["branches"][s]
        join = ", ".join(spec.get("join", list(spec["paths"])))
        t = f", timeout {spec['timeout']}s" if "timeout" in spec else ""
        lines.append(f"  {i}. branches {s} (converge {join} by item{t})")
        for b, path in spec["paths"].items():
            for n in path:
                lines.append(f"       {b}: stage {n}: {_pool(stages[n])}")
                note(stages[n])
    service = doc.get("service", {})
    if service:
        lines.append("service: " + ", ".join(f"{k} {v}" for k, v in service.items()))
        ports += [str(service[k]) for k in ("ingress", "http", "control") if k in service]
    n_proc = f"{procs[0]}" if procs[0] == procs[1] else f"{procs[0]}-{procs[1]}"
    lines.append(
        f"would start: {n_proc} processes, up to {threads} threads, "
        f"listening on {', '.join(ports) if ports else 'no port'}"
    )
    return "\n".join(lines)
