"""The wire: everything that crosses a socket, and nothing that decides what to send.

Framing (``protocol``: versioned length-prefixed frames, sans-IO), payloads (``codec``: JSON
plus out-of-band buffers), the connection (``connection``: the only code that touches a worker
connection's socket), the mutual HMAC handshake and TLS (``auth``), acceptor and dialling
(``endpoints``), and the HTTP control endpoint and its client (``control``).

May import: ``pytaskqml.errors`` only.
"""

from .auth import tls_client_context, tls_server_context
from .control import get_health, request_shutdown

__all__ = ["get_health", "request_shutdown", "tls_client_context", "tls_server_context"]
