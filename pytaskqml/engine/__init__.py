"""The threaded shell around the core: where workers run and how work reaches them.

The engine (``engine``: one lock, the deadline thread, delivery with the lock released, and
what the front asks of it about workers); handles (``handles``: the interface,
thread workers; ``remote``: workers over a connection); spawned pools (``pool``, ``launch``,
``seats``, ``supervisor``, ``autoscale``), the dialer (``links``); delivery and the callback
thread (``delivery``), task building (``intake``), ``map()``/``stream()`` iteration
(``iterate``, ``progress``), named models (``modelreg``) and broadcasts (``broadcast``).

May import: ``pytaskqml.errors``, ``core``, ``wire``, ``buffers`` and ``worker``.
"""

from .broadcast import Broadcast
from .iterate import Stream
from .progress import Progress

__all__ = ["Broadcast", "Progress", "Stream"]
