"""pytaskqml: ordered, crash-safe task orchestration for Python models over live streams.

A :class:`Coordinator` owns an in-memory task queue and sends framed tasks over raw TCP to
worker processes (spawned here, or started elsewhere with ``pytaskqml worker``) and to local
thread workers. Results come back in submission order. Standard library only.

The names here are what a user types first. The rest live in the subpackages that own them
(``pytaskqml.errors``, ``pytaskqml.pipeline``, ``pytaskqml.redis``, ``pytaskqml.core`` for the
statistics records, ...; docs/layout.md has the map). ``import pytaskqml`` imports neither
NumPy nor the features (pipelines, Redis, the status page, services), and each name here is
loaded on first use.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from .errors import (
    ClosedError,
    NoWorkersError,
    PyTaskQMLError,
    TaskFailed,
    WorkerLostError,
    WorkerStartError,
)

if TYPE_CHECKING:
    from .buffers.handoff import load, spill
    from .client import Client
    from .coordinator import Coordinator
    from .core.stats import Statistics
    from .core.tasks import LateResult, TaskTimeout
    from .executor import Executor
    from .pipeline.pipeline import Pipeline
    from .pipeline.stages import Branches, Stage
    from .worker.base import Worker
    from .worker.models import Model

__version__ = "0.1.0"

__all__ = [
    "Branches",
    "Client",
    "ClosedError",
    "Coordinator",
    "Executor",
    "LateResult",
    "Model",
    "NoWorkersError",
    "Pipeline",
    "PyTaskQMLError",
    "Stage",
    "Statistics",
    "TaskFailed",
    "TaskTimeout",
    "Worker",
    "WorkerLostError",
    "WorkerStartError",
    "__version__",
    "load",
    "spill",
]

# Front-door names, each imported from the module that holds it when first asked for: a
# worker process, which needs only ``Worker`` or ``Model`` of these, never loads the
# coordinator's side (half its start-up time), and a script that makes a Coordinator never
# loads the pipelines.
_LAZY = {
    "Client": "pytaskqml.client",
    "Coordinator": "pytaskqml.coordinator",
    "Executor": "pytaskqml.executor",
    "LateResult": "pytaskqml.core.tasks",
    "Model": "pytaskqml.worker.models",
    "Pipeline": "pytaskqml.pipeline",
    "Stage": "pytaskqml.pipeline",
    "Branches": "pytaskqml.pipeline",
    "Statistics": "pytaskqml.core.stats",
    "TaskTimeout": "pytaskqml.core.tasks",
    "Worker": "pytaskqml.worker.base",
    "load": "pytaskqml.buffers.handoff",
    "spill": "pytaskqml.buffers.handoff",
}

# Names this package exported before the subpackages held them: still served, for one
# release, with a DeprecationWarning that says where they live now.
_MOVED = {
    "AuthenticationError": "pytaskqml.errors",
    "ConnectionLost": "pytaskqml.errors",
    "EntryLostError": "pytaskqml.errors",
    "ModelLoadError": "pytaskqml.errors",
    "ProtocolError": "pytaskqml.errors",
    "RemoteTraceback": "pytaskqml.errors",
    "BufferStats": "pytaskqml.core",
    "HistogramSnapshot": "pytaskqml.core",
    "ModelResult": "pytaskqml.core",
    "ModelStats": "pytaskqml.core",
    "QueueStats": "pytaskqml.core",
    "SourceStats": "pytaskqml.core",
    "WorkerStats": "pytaskqml.core",
    "Broadcast": "pytaskqml.engine",
    "Progress": "pytaskqml.engine",
    "Stream": "pytaskqml.engine",
    "ClientStats": "pytaskqml.client",
    "ClientStream": "pytaskqml.client",
    "FunctionWorker": "pytaskqml.worker",
    "ModelWorker": "pytaskqml.worker",
    "IngressServer": "pytaskqml.ingress",
    "IngressStats": "pytaskqml.ingress",
    "PipelineStats": "pytaskqml.pipeline",
    "PipelineStream": "pytaskqml.pipeline",
    "ProducerStats": "pytaskqml.redis",
    "RedisClient": "pytaskqml.redis",
    "RedisQueue": "pytaskqml.redis",
    "get_health": "pytaskqml.wire",
    "request_shutdown": "pytaskqml.wire",
    "tls_client_context": "pytaskqml.wire",
    "tls_server_context": "pytaskqml.wire",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _MOVED:
        warnings.warn(
            f"pytaskqml.{name} moved: import it from {_MOVED[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        value = getattr(importlib.import_module(_MOVED[name]), name)
    else:
        raise AttributeError(f"module 'pytaskqml' has no attribute {name!r}")
    if name in _LAZY:
        globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
