"""pytaskqml: ordered, crash-safe task orchestration for Python models over live streams.

A :class:`Coordinator` owns an in-memory task queue and sends framed tasks over raw TCP to
worker processes (spawned here, or started elsewhere with ``pytaskqml worker``) and to local
thread workers. Results come back in submission order. Standard library only.
"""

from ._auth import tls_client_context, tls_server_context
from ._broadcast import Broadcast
from ._client import Client, ClientStats, ClientStream
from ._control import get_health, request_shutdown
from ._coordinator import Coordinator
from ._errors import (
    AuthenticationError,
    ClosedError,
    ConnectionLost,
    EntryLostError,
    ModelLoadError,
    NoWorkersError,
    ProtocolError,
    PyTaskQMLError,
    RemoteTraceback,
    TaskFailed,
    WorkerLostError,
    WorkerStartError,
)
from ._executor import Executor
from ._functions import FunctionWorker
from ._handoff import load, spill
from ._histogram import HistogramSnapshot
from ._ingress import IngressServer, IngressStats
from ._iterate import Stream
from ._models import Model, ModelWorker
from ._pipeline import Pipeline, PipelineStats, PipelineStream
from ._progress import Progress
from ._redisclient import ProducerStats, RedisClient
from ._redisqueue import RedisQueue
from ._stages import Branches, Stage
from ._stats import BufferStats, ModelStats, QueueStats, SourceStats, Statistics, WorkerStats
from ._tasks import LateResult, ModelResult, TaskTimeout
from ._worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Branches",
    "Broadcast",
    "BufferStats",
    "Client",
    "ClientStats",
    "ClientStream",
    "ClosedError",
    "ConnectionLost",
    "Coordinator",
    "EntryLostError",
    "Executor",
    "FunctionWorker",
    "HistogramSnapshot",
    "IngressServer",
    "IngressStats",
    "LateResult",
    "Model",
    "ModelLoadError",
    "ModelResult",
    "ModelStats",
    "ModelWorker",
    "NoWorkersError",
    "Pipeline",
    "PipelineStats",
    "PipelineStream",
    "ProducerStats",
    "Progress",
    "ProtocolError",
    "PyTaskQMLError",
    "QueueStats",
    "RedisClient",
    "RedisQueue",
    "RemoteTraceback",
    "SourceStats",
    "Stage",
    "Statistics",
    "Stream",
    "TaskFailed",
    "TaskTimeout",
    "Worker",
    "WorkerLostError",
    "WorkerStartError",
    "WorkerStats",
    "__version__",
    "get_health",
    "load",
    "request_shutdown",
    "spill",
    "tls_client_context",
    "tls_server_context",
]
