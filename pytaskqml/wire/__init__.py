"""The wire: everything that crosses a socket, and nothing that decides what to send.

Framing (``protocol``: versioned length-prefixed frames, sans-IO), payloads (``codec``: JSON
plus out-of-band buffers), the connection (``connection``: the only code that touches a worker
connection's socket), the mutual HMAC handshake and TLS (``auth``), acceptor and dialling
(``endpoints``), and the HTTP control endpoint and its client (``control``).

May import: ``pytaskqml.errors`` only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .auth import tls_client_context, tls_server_context
    from .control import get_health, request_shutdown

# Loaded on first use: a worker process, which needs the framing, the codec and the
# connection, does not load the HTTP control endpoint with them.
_LAZY = {
    "get_health": "pytaskqml.wire.control",
    "request_shutdown": "pytaskqml.wire.control",
    "tls_client_context": "pytaskqml.wire.auth",
    "tls_server_context": "pytaskqml.wire.auth",
}

__all__ = ["get_health", "request_shutdown", "tls_client_context", "tls_server_context"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pytaskqml.wire' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
