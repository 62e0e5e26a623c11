"""Pipelines: steps joined by bounded FIFOs, results in submission order (``pipeline``),
``Stage``, ``Branches`` and a stream's lane through a stage (``stages``), and a pipeline in a
TOML/JSON file (``config``).

May import: the front (``pytaskqml.coordinator``, ``pytaskqml.errors``), ``engine``,
``worker``, ``core`` and ``wire``.
"""

from .pipeline import Pipeline, PipelineStats, PipelineStream
from .stages import Branches, Stage

__all__ = ["Branches", "Pipeline", "PipelineStats", "PipelineStream", "Stage"]
