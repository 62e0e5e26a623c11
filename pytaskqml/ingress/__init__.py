"""Ports through which other processes submit work to a coordinator or a pipeline: the ingress
port (``server``: one ordered stream per producer connection, credit per producer), the ports
a coordinator started (``ports``) and the HTTP JSON ingress on a control endpoint (``http``).
``pytaskqml.Client`` is their producer.

May import: ``pytaskqml.errors``, ``wire`` and ``core``. (They sit below the front because a
:class:`~pytaskqml.Coordinator` serves them itself.)
"""

from .server import IngressServer, IngressStats

__all__ = ["IngressServer", "IngressStats"]
