"""Sans-IO framing: messages to bytes, and a decoder you feed bytes that yields messages.

No sockets, threads or clocks live here, so every rule below is tested byte by byte.

Frame layout (all integers big-endian)::

    offset  size  field
    0       2     magic  b"PQ"
    2       1     protocol version (PROTOCOL_VERSION)
    3       1     flags, reserved: must be 0
    4       4     H  header length in bytes
    8       4     N  number of raw buffers
    12      4     B  total length of the buffers
    16      4*N   length of each buffer
    16+4N   H     header: a UTF-8 JSON object with at least {"op": <str>}
    ...     B     the buffers, back to back

The decoder validates the 16-byte prefix as soon as it has it - magic, version, flags, buffer
count and the total size against ``max_frame_size`` - so an oversize or garbage frame is
refused *before* anything is buffered for it. The buffer table must add up to ``B``; the header
must be a JSON object whose buffer markers (see :mod:`._codec`) claim every buffer exactly once.

JSON nesting is bounded two ways. Before a peer has authenticated, its frames are at most
:data:`HANDSHAKE_MAX_FRAME_SIZE` bytes and nest at most :data:`DEFAULT_MAX_DEPTH` deep, checked
explicitly. After, the explicit check (which costs as much as parsing on a frame of many small
tasks) is off by default and nesting is bounded by the interpreter's recursion limit: the C JSON
parser raises ``RecursionError`` on a deeper document, which is reported like any other bad
frame. Pass ``max_depth`` to enforce a tighter bound on every frame.

Anything malformed is a :class:`ProtocolError`, and nothing else is ever raised. After an
error the decoder stays failed: the stream cannot be resynchronised, so the connection must be
dropped.

Authentication (mutual HMAC-SHA256 challenge-response, in the manner of
``multiprocessing.connection``) is built from the pure helpers at the end of this module.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from collections.abc import Sequence
from typing import Any

from ..errors import ProtocolError
from . import codec as _codec

MAGIC = b"PQ"
PROTOCOL_VERSION = 1
_PREFIX = struct.Struct("!2sBBIII")
PREFIX_SIZE = _PREFIX.size  # 16

DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
DEFAULT_MAX_BUFFERS = 4096
DEFAULT_MAX_DEPTH = 64
#: Frames exchanged before a peer is authenticated are tiny; a peer gets no more than this.
HANDSHAKE_MAX_FRAME_SIZE = 4096
# Frames at least this big are received straight into a buffer of their own.
LARGE_FRAME = 64 * 1024
SCRATCH_SIZE = 256 * 1024


# Messages after the handshake, coordinator -> worker: "run" (tasks), "stop", "ping";
# worker -> coordinator: "hello" (or "failed" if it could not start), "done" (results), "free"
# (shared-memory slots released), "ping", "bye" (it leaves; whatever it still holds never started).
#
# A "run" frame's header is {"op": "run", "t": [row, ...]} (plus "b": 1 when the worker batches):
# a row is [task id, payload], or [task id, [item, ...], CHUNK_ROW] for a chunk of items that run
# one after another as one task.
CHUNK_ROW = 1
# A "done" frame's header is {"op": "done", "r": [row, ...], "bt": busy seconds, "f": [offset,
# ...]}: a row is [task id, flag, value] with one of these flags.
RESULT_OK = 0  # value: the result
RESULT_ERROR = 1  # value: [qualified type name, message, traceback text]
RESULT_CHUNK = 2  # value: [[RESULT_OK, result] or [RESULT_ERROR, error], ...], one per item
RESULT_RUN = 6  # value: [result, ...]: a chunk whose items all succeeded


class Message:
    """One decoded frame: its JSON header (buffers already swapped in) and its raw buffers.

    (A plain class with slots: one is made per frame received, and a frozen dataclass's
    ``__init__`` cost a microsecond of a round trip's ~20 on a worker.)"""

    __slots__ = ("buffers", "header")

    def __init__(self, header: dict[str, Any], buffers: tuple[memoryview, ...] = ()) -> None:
        self.header = header
        self.buffers = buffers

    def __repr__(self) -> str:
        return f"Message(header={self.header!r}, buffers=<{len(self.buffers)}>)"

    @property
    def op(self) -> str:
        op: str = self.header["op"]
        return op


def encode_frame(
    header_json: str, buffers: Sequence[memoryview] = (), *, max_frame_size: int | None = None
) -> list[bytes | memoryview]:
    """Frame a JSON header (text, as produced by :mod:`._codec`) and its buffers.

    Returns a list of byte chunks to send back to back (suitable for ``socket.sendmsg``): the
    buffers themselves are not copied.
    """
    head = header_json.encode("utf-8")
    if not buffers:  # (most frames: results, small tasks, control messages)
        total = PREFIX_SIZE + len(head)
        if max_frame_size is not None and total > max_frame_size:
            raise ValueError(f"frame of {total} bytes exceeds max_frame_size={max_frame_size}")
        if len(head) > 0xFFFFFFFF:
            raise ValueError("frame too large for the wire format")
        return [_PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(head), 0, 0) + head]
    lengths = [b.nbytes for b in buffers]
    body = sum(lengths)
    total = PREFIX_SIZE + 4 * len(lengths) + len(head) + body
    if max_frame_size is not None and total > max_frame_size:
        raise ValueError(f"frame of {total} bytes exceeds max_frame_size={max_frame_size}")
    if len(lengths) > 0xFFFFFFFF or body > 0xFFFFFFFF or len(head) > 0xFFFFFFFF:
        raise ValueError("frame too large for the wire format")
    prefix = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(head), len(lengths), body)
    if lengths:
        prefix += struct.pack(f"!{len(lengths)}I", *lengths)
    return [prefix + head, *buffers]


def encode_message(op: str, fields: dict[str, Any] | None = None) -> bytes:
    """Frame a small control message with no buffers, as one bytes object."""
    header = {"op": op} if fields is None else {"op": op, **fields}
    return b"".join(encode_frame(_codec.encode_str(header)))


_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_EMPTY_PAIRS = re.compile(r"\[\]|\{\}")


def json_depth_exceeds(text: str, max_depth: int) -> bool:
    """True when the JSON text nests deeper than *max_depth*.

    Works at C speed: strings are removed, then everything but brackets, then innermost
    bracket pairs are stripped one level per pass, so the work is bounded by ``max_depth``
    passes whatever the input. A text with no more than ``max_depth`` opening brackets in all
    cannot be too deep and is not scanned.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return False
    skeleton = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    for _ in range(max_depth):
        if not skeleton:
            return False
        stripped = _EMPTY_PAIRS.sub("", skeleton)
        if stripped == skeleton:
            return False  # unbalanced: json.loads will reject it
        skeleton = stripped
    return bool(skeleton) and _EMPTY_PAIRS.search(skeleton) is not None


# The first byte of a TLS record (handshake or alert) and of its version (3): what a peer that
# expects TLS answers to plain bytes.
_TLS_RECORD_TYPES = frozenset({0x15, 0x16})
TLS_ANSWER = "bad magic: the peer answered with TLS, not a pytaskqml frame"


def _bad_magic(buf: bytearray) -> str:
    if buf and buf[0] in _TLS_RECORD_TYPES and (len(buf) < 2 or buf[1] == 3):
        return TLS_ANSWER
    return "bad magic: not a pytaskqml frame"


class FrameDecoder:
    """Feed bytes in, get :class:`Message` objects out.

    ``feed`` may be called with any split of the byte stream - one byte at a time or many frames
    at once - and yields the same messages.
    """

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_buffers: int = DEFAULT_MAX_BUFFERS,
        max_depth: int | None = None,
        scratch_size: int = SCRATCH_SIZE,
    ) -> None:
        if max_frame_size < PREFIX_SIZE + 2:
            raise ValueError("max_frame_size is too small to hold any frame")
        self.max_frame_size = max_frame_size
        self.max_buffers = max_buffers
        self.max_depth = max_depth
        self._buf = bytearray()
        self._frame_total = 0  # size of the frame being accumulated, once its prefix is known
        self._large: bytearray | None = None  # a large frame's own buffer, being filled
        self._filled = 0
        self._scratch = bytearray(scratch_size)
        self._error: ProtocolError | None = None
        # Resolves buffer markers that point into shared memory (a spawned worker's side).
        self.shared: _codec.SharedMemory | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buf) + self._filled

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add received bytes; return every message they complete (possibly none)."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            self._large = None
            raise

    def _fail(self, why: str) -> ProtocolError:
        return ProtocolError(why)

    def _check_prefix(self) -> int:
        buf = self._buf
        if len(buf) < PREFIX_SIZE:
            # Refuse garbage on its first bytes rather than waiting for a whole prefix.
            n = min(len(buf), 2)
            if bytes(buf[:n]) != MAGIC[:n]:
                raise self._fail(_bad_magic(buf))
            if len(buf) >= 3 and buf[2] != PROTOCOL_VERSION:
                raise self._fail(f"unsupported protocol version {buf[2]}")
            return 0
        magic, version, flags, hlen, nbuf, body = _PREFIX.unpack_from(buf)
        if magic != MAGIC:
            raise self._fail(_bad_magic(buf))
        if version != PROTOCOL_VERSION:
            raise self._fail(f"unsupported protocol version {version}")
        if flags != 0:
            raise self._fail(f"unknown frame flags {flags:#x}")
        if nbuf > self.max_buffers:
            raise self._fail(f"frame declares {nbuf} buffers (max {self.max_buffers})")
        if hlen < 2:
            raise self._fail("frame header too short")
        total: int = PREFIX_SIZE + 4 * nbuf + hlen + body
        if total > self.max_frame_size:
            raise self._fail(f"frame of {total} bytes exceeds max_frame_size={self.max_frame_size}")
        return total

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        out: list[Message] = []
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        if self._large is not None:
            # A large frame is being filled in place: copy into it, then go on with the rest.
            room = len(self._large) - self._filled
            take = min(room, len(view))
            self._large[self._filled : self._filled + take] = view[:take]
            self._filled += take
            if self._filled < len(self._large):
                return out
            out.append(self._finish_large())
            view = view[take:]
        self._buf += view
        while True:
            if not self._frame_total:
                self._frame_total = self._check_prefix()
                if not self._frame_total:
                    return out
            total = self._frame_total
            if len(self._buf) < total:
                if total >= LARGE_FRAME:
                    # Give the frame its own buffer of the right size now, so the rest of it
                    # can be received straight into place (see recv_target).
                    self._large = bytearray(total)
                    self._filled = len(self._buf)
                    self._large[: self._filled] = self._buf
                    self._buf = bytearray()
                return out
            if len(self._buf) == total:
                frame, self._buf = self._buf, bytearray()
            else:
                frame = self._buf[:total]
                del self._buf[:total]
            self._frame_total = 0
            out.append(self._parse(frame))

    def _finish_large(self) -> Message:
        assert self._large is not None
        frame, self._large, self._filled, self._frame_total = self._large, None, 0, 0
        return self._parse(frame)

    def take_buffered(self) -> bytes:
        """Hand over the bytes received but not yet decoded (to a successor decoder)."""
        rest = bytes(self._buf)
        if self._large is not None:
            rest = bytes(self._large[: self._filled])
        self._buf, self._large, self._filled, self._frame_total = bytearray(), None, 0, 0
        return rest

    def recv_target(self) -> memoryview:
        """Where to receive the next bytes: the unfilled rest of a large frame (so its bytes
        are copied once, by the kernel, into their final place), or a scratch buffer.
        Follow with :meth:`commit`."""
        if self._large is not None:
            return memoryview(self._large)[self._filled :]
        return memoryview(self._scratch)

    def commit(self, n: int) -> list[Message]:
        """*n* bytes were written into the view :meth:`recv_target` returned."""
        if self._error is not None:
            raise self._error
        if self._large is None:
            if not self._buf and n > PREFIX_SIZE:
                message = self._whole(n)
                if message is not None:
                    return [message]
            return self.feed(memoryview(self._scratch)[:n])
        self._filled += n
        if self._filled < len(self._large):
            return []
        try:
            return [self._finish_large()]
        except ProtocolError as exc:
            self._error = exc
            raise

    def _whole(self, n: int) -> Message | None:
        """The one frame the scratch buffer's first *n* bytes hold, if they hold exactly one
        small frame without buffers and nothing was pending - the usual shape of a round trip's
        message - decoded without the general path's accumulation and per-frame copies.

        ``None`` for anything else, valid or not: the general path then decodes it (or refuses
        it with the precise reason), so this never raises and never changes the decoder's
        state. That keeps every rule in one place and every split of a stream decoding the
        same."""
        scratch = self._scratch
        magic, version, flags, hlen, nbuf, body = _PREFIX.unpack_from(scratch)
        if (
            nbuf
            or body
            or magic != MAGIC
            or version != PROTOCOL_VERSION
            or flags
            or hlen < 2
            or PREFIX_SIZE + hlen != n
            or n > self.max_frame_size
            or self.max_depth is not None
        ):
            return None
        try:
            text = str(memoryview(scratch)[PREFIX_SIZE:n], "utf-8")
            header = _codec.decode(text, (), self.shared)
        except (UnicodeDecodeError, ProtocolError):
            return None
        if type(header) is not dict or type(header.get("op")) is not str:
            return None
        return Message(header)

    def _parse(self, frame: bytearray) -> Message:
        _, _, _, hlen, nbuf, body = _PREFIX.unpack_from(frame)
        lengths = struct.unpack_from(f"!{nbuf}I", frame, PREFIX_SIZE) if nbuf else ()
        if sum(lengths) != body:
            raise self._fail(
                f"buffer lengths add up to {sum(lengths)} but the frame declares {body}"
            )
        start = PREFIX_SIZE + 4 * nbuf
        try:
            text = frame[start : start + hlen].decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail("frame header is not UTF-8") from None
        if self.max_depth is not None and json_depth_exceeds(text, self.max_depth):
            raise self._fail(f"frame header nests deeper than {self.max_depth}")
        view = memoryview(frame)
        pos = start + hlen
        buffers = []
        for n in lengths:
            buffers.append(view[pos : pos + n])
            pos += n
        header = _codec.decode(text, buffers, self.shared)
        if not isinstance(header, dict) or not isinstance(header.get("op"), str):
            raise self._fail('frame header must be a JSON object with a string "op"')
        return Message(header, tuple(buffers))


# --------------------------------------------------------------------------- handshake

NONCE_SIZE = 32
_AUTH_DOMAIN = b"pytaskqml-auth-v1"


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def auth_digest(key: bytes, nonce: bytes, role: str) -> bytes:
    """HMAC-SHA256 proof of the key over a peer's nonce.

    *role* names who answers ("client" or "server"), so a proof cannot be reflected back at
    the side that issued the challenge.
    """
    return hmac.new(
        key, _AUTH_DOMAIN + b"|" + role.encode() + b"|" + nonce, hashlib.sha256
    ).digest()


def auth_verify(key: bytes, nonce: bytes, role: str, digest_hex: object) -> bool:
    if not isinstance(digest_hex, str) or len(digest_hex) != 64:
        return False
    try:
        got = bytes.fromhex(digest_hex)
    except ValueError:
        return False
    return hmac.compare_digest(got, auth_digest(key, nonce, role))


_TOKEN_LABELS = {"read": b"pytaskqml-control-v1", "act": b"pytaskqml-control-act-v2"}


def control_token(key: bytes, scope: str = "read") -> str:
    """Bearer token for the HTTP control endpoint, derived from the shared key: *scope*
    ``"read"`` for ``/status`` and ``/metrics`` (what a scraper is given), ``"act"`` for the
    routes that change something (it reads too). Neither can be derived from the other.

    The read token keeps the derivation every control token had before acting was split
    off, so a scraper configured then keeps reading and cannot act."""
    return hmac.new(key, _TOKEN_LABELS[scope], hashlib.sha256).hexdigest()
