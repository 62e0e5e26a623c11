"""Who is at the other end: the mutual HMAC handshake (after ``multiprocessing.connection``)
and TLS contexts.

Both peers prove they hold the shared key without sending it: each sends a random nonce, the
other answers with an HMAC-SHA256 of it bound to its role (so a proof cannot be reflected
back), compared with ``hmac.compare_digest``. Frames before the handshake is complete are
capped at a few KiB, and the whole exchange must finish within a deadline, so a slow or
hostile peer costs a thread for at most that long. The pure parts (digests, nonces) are in
:mod:`._protocol`.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable

from ..errors import AuthenticationError, ConnectionLost, ProtocolError
from .connection import Connection, Deadline
from .protocol import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    TLS_ANSWER,
    Message,
    auth_digest,
    auth_verify,
    new_nonce,
)


def resolve_authkey(authkey: bytes | str | None) -> bytes | None:
    """The shared key as bytes: *authkey*, else the ``PYTASKQML_AUTHKEY`` environment
    variable, else ``None`` (no key)."""
    if authkey is None:
        env = os.environ.get("PYTASKQML_AUTHKEY")
        return env.encode() if env else None
    return authkey.encode() if isinstance(authkey, str) else bytes(authkey)


def tls_server_context(
    certfile: str, keyfile: str | None = None, cafile: str | None = None
) -> ssl.SSLContext:
    """A TLS context for the listening side. With *cafile*, peers must show a certificate
    signed by that CA (mutual TLS). TLS 1.2 at least. ``OSError``/``ssl.SSLError`` for a
    file that cannot be read or does not hold what it should."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if cafile:
        ctx.load_verify_locations(cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_client_context(
    cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """A TLS context for the dialling side: verifies the server's certificate and host name
    against *cafile* (or the system's CAs); *certfile*/*keyfile* present a client certificate.
    TLS 1.2 at least. ``OSError``/``ssl.SSLError`` for a file that cannot be read or does
    not hold what it should."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def _expect(conn: Connection, op: str) -> Message:
    msg = conn.recv()
    if msg.op == "denied":
        why = msg.header.get("why")
        if why == BUSY:
            raise ConnectionLost(f"{conn.peer} is busy (too many connections in the handshake)")
        raise AuthenticationError(f"{conn.peer} refused the handshake: {why}")
    if msg.op != op:
        raise AuthenticationError(f"handshake: expected {op!r}, got {msg.op!r}")
    return msg


def _handshake(
    conn: Connection, timeout: float | None, steps: Callable[[], None], *, dialling: bool
) -> None:
    """Run handshake *steps* under a deadline; on any failure close the connection and raise
    :class:`AuthenticationError` (or :class:`ConnectionLost` if the peer just went away)."""
    try:
        conn.sock.settimeout(timeout)
        with Deadline(conn.abort, timeout) as deadline:
            try:
                steps()
            except ConnectionLost as exc:
                if deadline.expired:
                    raise TimeoutError from None
                if dialling and conn.bytes_in == 0 and not isinstance(exc, TLSExpected):
                    # A pytaskqml peer greets at once; one that hangs up on our first bytes
                    # without a word expects TLS (or is not pytaskqml at all).
                    raise TLSExpected(
                        f"{conn.peer} hung up without a greeting: it expects TLS (pass "
                        "ssl_context=tls_client_context(...), or --tls-ca), or is not a "
                        "pytaskqml peer"
                    ) from None
                raise
        conn.sock.settimeout(None)
        conn.set_authenticated()
    except TimeoutError:
        conn.abort()
        raise AuthenticationError(f"{conn.peer} did not complete the handshake in time") from None
    except ProtocolError as exc:
        conn.abort()
        if dialling and str(exc) == TLS_ANSWER:
            raise TLSExpected(
                f"{conn.peer} answered with TLS: it expects a TLS connection (pass "
                "ssl_context=tls_client_context(...), or --tls-ca on the command line)"
            ) from None
        raise AuthenticationError(f"{conn.peer} sent garbage during the handshake: {exc}") from None
    except BaseException:
        conn.abort()
        raise


def server_handshake(conn: Connection, key: bytes, *, timeout: float | None) -> None:
    """Run the listening side of the mutual HMAC handshake; raise AuthenticationError."""

    def steps() -> None:
        nonce = new_nonce()
        conn.send("challenge", {"nonce": nonce.hex(), "v": PROTOCOL_VERSION})
        msg = conn.recv()
        if msg.op == "hi":  # sent by the dialling side before it saw the challenge
            msg = _expect(conn, "auth")
        elif msg.op != "auth":
            raise AuthenticationError(f"handshake: expected 'auth', got {msg.op!r}")
        if not auth_verify(key, nonce, "client", msg.header.get("proof")):
            with contextlib.suppress(ConnectionLost):
                conn.send("denied", {"why": "authentication failed"})
            raise AuthenticationError(f"{conn.peer} failed authentication (wrong or missing key)")
        theirs = _nonce_from(msg.header.get("nonce"))
        conn.send("welcome", {"proof": auth_digest(key, theirs, "server").hex()})

    _handshake(conn, timeout, steps, dialling=False)


# What a listener that is full says before it closes (the dialler retries later).
BUSY = "busy"


class TLSExpected(ConnectionLost):
    """The peer answered our first bytes with TLS: it was started with TLS and we were not."""


def client_handshake(conn: Connection, key: bytes, *, timeout: float | None) -> None:
    """Run the dialling side of the mutual HMAC handshake; raise AuthenticationError (or
    :class:`TLSExpected` when the peer turns out to speak TLS).

    The dialling side speaks first (``hi``), without waiting for the challenge: a peer that
    expects TLS refuses those bytes at once, instead of both sides waiting for the other until
    the deadline."""

    def steps() -> None:
        conn.send("hi", {"v": PROTOCOL_VERSION})
        msg = _expect(conn, "challenge")
        if msg.header.get("v") != PROTOCOL_VERSION:
            raise AuthenticationError(f"peer speaks protocol version {msg.header.get('v')!r}")
        theirs = _nonce_from(msg.header.get("nonce"))
        mine = new_nonce()
        conn.send(
            "auth",
            {"proof": auth_digest(key, theirs, "client").hex(), "nonce": mine.hex()},
        )
        reply = _expect(conn, "welcome")
        if not auth_verify(key, mine, "server", reply.header.get("proof")):
            raise AuthenticationError(f"{conn.peer} could not prove it holds the key")

    _handshake(conn, timeout, steps, dialling=True)


def _nonce_from(value: object) -> bytes:
    if isinstance(value, str) and len(value) == 2 * NONCE_SIZE:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise AuthenticationError("handshake: malformed nonce")
