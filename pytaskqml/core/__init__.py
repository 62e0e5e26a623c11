"""The sans-IO scheduling core: no threads, sockets or clocks of its own.

The task table and outcomes (``tasks``), the bounded fair queue and the reorder buffer
(``ordered``), the core's record of a worker (``workerstate``), routing by model, key or worker
(``routing``), the scheduler (``scheduler``: admission, overflow, dispatch by credit, results,
worker loss, retries, deadlines, model events, how tasks end without a result; time is passed
in), the action records its transitions return for the engine to carry out (``actions``), the
Future ``submit()`` returns (``future``), histograms and the statistics
records (``histogram``, ``stats``).

May import: ``pytaskqml.errors`` only. A higher layer's type it needs is a ``Protocol`` here.
"""

from .histogram import HistogramSnapshot
from .stats import BufferStats, ModelStats, QueueStats, SourceStats, Statistics, WorkerStats
from .tasks import LateResult, ModelResult, TaskTimeout

__all__ = [
    "BufferStats",
    "HistogramSnapshot",
    "LateResult",
    "ModelResult",
    "ModelStats",
    "QueueStats",
    "SourceStats",
    "Statistics",
    "TaskTimeout",
    "WorkerStats",
]
