"""What runs in a worker: the ``Worker`` base class (``base``), the ``Model`` contract and a
worker's model table (``models``), plain functions as workers (``functions``), start-up shared
by spawned children and the CLI (``bootstrap``), a worker process's serve loop (``serve``,
``readysend``, ``results``) and a spawned worker's entry point (``child``:
``python -m pytaskqml.worker.child``).

May import: ``pytaskqml.errors``, ``wire``, ``core`` (records) and ``buffers``.
"""

from .base import Worker
from .functions import FunctionWorker
from .models import Model, ModelWorker

__all__ = ["FunctionWorker", "Model", "ModelWorker", "Worker"]
