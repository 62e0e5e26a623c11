"""Buffers shared with worker processes: shared memory (``shm``), the producer's buffer pool
(``pool``: ``coord.buffer()``) and a worker's view of it (``poolview``), and
``spill()``/``load()`` for items too big for a frame (``handoff``).

May import: ``pytaskqml.errors``, ``wire`` and ``core`` (its statistics records).
"""
