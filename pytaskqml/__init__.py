"""pytaskqml: ordered, crash-safe task orchestration for Python models over live streams.

A :class:`Coordinator` owns an in-memory task queue and sends framed tasks over raw TCP to
worker processes (spawned here, or started elsewhere with ``pytaskqml worker``) and to local
thread workers. Results come back in submission order. Standard library only.
"""

from .buffers.handoff import load, spill
from .client import Client, ClientStats, ClientStream
from .coordinator import Coordinator
from .core.histogram import HistogramSnapshot
from .core.stats import BufferStats, ModelStats, QueueStats, SourceStats, Statistics, WorkerStats
from .core.tasks import LateResult, ModelResult, TaskTimeout
from .engine.broadcast import Broadcast
from .engine.iterate import Stream
from .engine.progress import Progress
from .errors import (
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
from .executor import Executor
from .ingress.server import IngressServer, IngressStats
from .pipeline.pipeline import Pipeline, PipelineStats, PipelineStream
from .pipeline.stages import Branches, Stage
from .redis.client import ProducerStats, RedisClient
from .redis.queue import RedisQueue
from .wire.auth import tls_client_context, tls_server_context
from .wire.control import get_health, request_shutdown
from .worker.base import Worker
from .worker.functions import FunctionWorker
from .worker.models import Model, ModelWorker

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
