"""Wire fuzzer: random and mutated frames against a LIVE worker and a LIVE coordinator.

``python -m benchmark.fuzz --frames 1000000`` starts

* a worker through the CLI (``pytaskqml worker benchmark.fuzz:FuzzWorker --listen 127.0.0.1:0``
  with a key file), and
* a coordinator in a child process (``Coordinator(authkey=...).listen()`` plus its control
  endpoint), driven over stdin/stdout,

then throws frames at both from several threads until ``--frames`` are sent or ``--seconds``
pass. Each connection carries a batch of frames. Scenarios:

``preauth``        a hostile first frame (mutated handshake, random JSON, deep nesting, lying
                   lengths, huge declared sizes, wrong version, random bytes...) plus filler;
``early``          the same, sent before reading the server's challenge;
``auth-garbage``   a correct handshake, then a hostile frame at once;
``auth-stream``    a correct handshake, then up to thousands of frames, nearly all valid
                   (worker: ping/config/run; coordinator: hello, then ping/done), with rare
                   mutations; an authenticated peer's garbage only drops that connection;
``flood``          every ``--flood-every`` seconds, hundreds of connections opened at once
                   that never speak, held for a second, then closed.

Before a peer authenticates, a server reads only its first frame, so filler frames exercise
the drop path; ``parsed >=`` counts the frames a server must have decoded (the valid prefix of
authenticated streams). At the end the fuzzer reports frames, connections, rejections (the
peer closed the connection before we finished), crashes (a process exited), hangs (the worker
must still run a real coordinator's tasks within 5 s, the coordinator must run tasks on a
fresh worker within 5 s, /health must answer), and RSS before/after. All traffic goes to
127.0.0.1. Exit status 0 means no crash and no hang.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pytaskqml import Coordinator, Worker
from pytaskqml.wire import codec as _codec
from pytaskqml.wire import get_health
from pytaskqml.wire import protocol as _protocol

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PREFIX = struct.Struct("!2sBBIII")
IO_TIMEOUT = 30.0  # no single socket operation of the fuzzer may block longer
GRACE = 0.02  # after sending, how long we wait for the peer to hang up before our EOF
HANG_AFTER_EOF = 10.0  # a peer that keeps a connection this long after our EOF is "hung"
CHECK_TASKS = 20
CHECK_DEADLINE = 5.0


class FuzzWorker(Worker):
    """The worker class the fuzzed CLI worker serves (echo)."""

    def process(self, payload: Any) -> Any:
        return payload


# =========================================================================== frame generation


def encode(header: dict[str, Any]) -> bytes:
    text, bufs = _codec.encode(header)
    return b"".join(bytes(c) for c in _protocol.encode_frame(text, bufs))


def raw_frame(
    head: bytes, buffers: tuple[bytes, ...] = (), lengths: tuple[int, ...] | None = None
) -> bytes:
    lens = tuple(len(b) for b in buffers) if lengths is None else lengths
    body = b"".join(buffers)
    prefix = PREFIX.pack(b"PQ", 1, 0, len(head), len(lens), len(body))
    return prefix + struct.pack(f"!{len(lens)}I", *lens) + head + body


class Gen:
    """Seeded frame factory. One per thread (``random.Random`` is not shared)."""

    OPS = (
        "auth",
        "challenge",
        "welcome",
        "denied",
        "run",
        "done",
        "ping",
        "hello",
        "bye",
        "config",
    )

    def __init__(self, seed: int, *, empty_buffers: bool = True) -> None:
        self.rng = random.Random(seed)
        self.min_bytes = 0 if empty_buffers else 1
        r = self.rng
        self.worker_valid = [self._worker_frame() for _ in range(400)]
        self.coord_valid = [self._coord_frame() for _ in range(400)]
        handshake = [
            encode({"op": "auth", "proof": r.randbytes(32).hex(), "nonce": r.randbytes(32).hex()})
            for _ in range(50)
        ]
        self.seeds = self.worker_valid + self.coord_valid + handshake
        self.hostile_pool = [self._hostile() for _ in range(3000)]

    # -------------------------------------------------------------- values

    def json_value(self, depth: int = 0) -> Any:
        r = self.rng
        x = r.random()
        if depth >= 4 or x < 0.55:
            return r.choice(
                [
                    r.randint(-(2**70), 2**70),
                    r.randint(-5, 5),
                    r.random() * 10 ** r.randint(-300, 300),
                    float("nan"),
                    float("inf"),
                    -0.0,
                    True,
                    False,
                    None,
                    "".join(chr(r.randint(0, 0x2FFF)) for _ in range(r.randint(0, 12))),
                    "\ud800",
                    "",
                ]
            )
        if x < 0.8:
            return [self.json_value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.json_value(9) if r.random() < 0.1 else f"k{r.randint(0, 9)}": 0} | {
            f"f{i}": self.json_value(depth + 1) for i in range(r.randint(0, 4))
        }

    def _payload(self) -> Any:
        r = self.rng
        if r.random() < 0.2:
            return r.randbytes(r.randint(self.min_bytes, 64))
        return self.json_value()

    def _worker_frame(self) -> bytes:
        """A valid frame a coordinator may send to a worker (never "stop")."""
        r = self.rng
        kind = r.random()
        if kind < 0.5:
            return encode({"op": "ping"})
        if kind < 0.7:
            return encode({"op": "config", "x": self.json_value()})
        rows: list[Any] = []
        for _ in range(r.randint(1, 4)):
            if r.random() < 0.8:
                rows.append([r.randint(1, 2**40), self._payload()])
            else:
                rows.append([r.randint(1, 2**40), [self._payload() for _ in range(3)], 1])
        return encode({"op": "run", "t": rows})

    def _coord_frame(self) -> bytes:
        """A valid frame a worker may send to a coordinator (never "bye")."""
        r = self.rng
        if r.random() < 0.5:
            return encode({"op": "ping"})
        rows: list[Any] = []
        for _ in range(r.randint(1, 4)):
            tid = r.randint(10**6, 2**40)  # never a real task id
            y = r.random()
            if y < 0.6:
                rows.append([tid, 0, self._payload()])
            elif y < 0.8:
                rows.append([tid, 1, ["ValueError", "boom", "Traceback..."]])
            else:
                rows.append([tid, 2, [[0, self._payload()], [1, ["E", "m", "t"]]]])
        return encode({"op": "done", "bt": r.random(), "r": rows})

    # -------------------------------------------------------------- hostility

    def mutate(self, frame: bytes) -> bytes:
        r = self.rng
        data = bytearray(frame)
        for _ in range(r.randint(1, 3)):
            how = r.randrange(10)
            pos = r.randrange(max(1, len(data)))
            if how == 0 and data:
                for _ in range(r.randint(1, 4)):
                    data[r.randrange(len(data))] ^= r.randint(1, 255)
            elif how == 1:
                del data[pos:]
            elif how == 2:
                data[pos:pos] = r.randbytes(r.randint(1, 32))
            elif how == 3 and len(data) >= 16:  # inflate or deflate one length field
                at = r.choice((4, 8, 12))
                (n,) = struct.unpack_from("!I", data, at)
                n = max(0, min(2**32 - 1, n + r.choice((-3, -1, 1, 7, 4096, 2**20))))
                struct.pack_into("!I", data, at, n)
            elif how == 4 and len(data) >= 16:  # huge declared sizes
                struct.pack_into("!I", data, r.choice((4, 8, 12)), r.randint(2**24, 2**32 - 1))
            elif how == 5 and len(data) >= 3:
                data[2] = r.choice((0, 2, 255))
            elif how == 6 and len(data) >= 4:
                data[3] = r.randint(1, 255)
            elif how == 7 and len(data) >= 2:
                data[0:2] = r.randbytes(2)
            elif how == 8:
                data += data[: r.randint(1, max(1, len(data)))]
            elif data:
                del data[pos : pos + r.randint(1, 16)]
        return bytes(data)

    def _hostile(self) -> bytes:
        r = self.rng
        kind = r.randrange(12)
        if kind <= 4:
            return self.mutate(r.choice(self.seeds))
        if kind == 5:  # random JSON header with a random op
            head = {"op": r.choice(self.OPS) if r.random() < 0.7 else self.json_value()}
            head.update({f"f{i}": self.json_value() for i in range(r.randint(0, 3))})
            return raw_frame(json.dumps(head).encode())
        if kind == 6:  # deep nesting
            d = r.choice((65, 100, 1000, 1900, 20_000, 200_000)) if r.random() < 0.05 else 100
            return raw_frame(b'{"op":"ping","x":' + b"[" * d + b"]" * d + b"}")
        if kind == 7:  # a number past int_max_str_digits
            return raw_frame(b'{"op":"ping","n":' + b"9" * r.randint(4301, 6000) + b"}")
        if kind == 8:
            return r.randbytes(r.randint(1, 200))
        if kind == 9:  # buffer table lies
            bufs = tuple(r.randbytes(r.randint(0, 20)) for _ in range(r.randint(1, 4)))
            lens = tuple(r.randint(0, 30) for _ in bufs)
            return raw_frame(b'{"op":"ping"}', bufs, lens)
        if kind == 10:  # buffer-marker abuse
            spec = r.choice(
                [
                    5,
                    -1,
                    ["O", [1]],
                    ["i4,i4", [1]],
                    ["V0", [10**30]],
                    ["<f8", [2**62, 2**62]],
                    ["S99999999999", [1]],
                    [[], []],
                    "x",
                    ["u1", [0] * 100],
                ]
            )
            head = json.dumps({"op": "done", "r": [[1, 0, {"\x00pq": spec}]]}).encode()
            return raw_frame(
                head, tuple(r.randbytes(r.randint(0, 16)) for _ in range(r.randint(0, 2)))
            )
        return raw_frame(b'{"op":"ping","x":"\xff\xfe' + r.randbytes(8) + b'"}')  # not UTF-8

    def hostile(self) -> bytes:
        frame = self.rng.choice(self.hostile_pool)
        return self.mutate(frame) if self.rng.random() < 0.3 else frame

    def filler(self, n: int) -> list[bytes]:
        r = self.rng
        return [
            r.choice(self.hostile_pool) if r.random() < 0.5 else r.choice(self.seeds)
            for _ in range(n)
        ]

    def stream(self, valid: list[bytes], n: int, *, forbid: bytes) -> tuple[list[bytes], int]:
        """*n* frames, nearly all valid; returns them and the length of the clean prefix."""
        r = self.rng
        frames: list[bytes] = []
        clean = -1
        for i in range(n):
            if r.random() < 1 / 1500 or (i == n - 1 and r.random() < 0.5):
                bad = self.hostile()
                if forbid in bad:
                    continue
                if clean < 0:
                    clean = len(frames)
                frames.append(bad)
            else:
                frames.append(r.choice(valid))
        return frames, (len(frames) if clean < 0 else clean)


# =========================================================================== one connection


@dataclass
class Tally:
    frames: int = 0
    parsed: int = 0
    connections: int = 0
    flood_connections: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    scenarios: Counter[str] = field(default_factory=Counter)
    by_target: Counter[str] = field(default_factory=Counter)

    def add(self, other: Tally) -> None:
        self.frames += other.frames
        self.parsed += other.parsed
        self.connections += other.connections
        self.flood_connections += other.flood_connections
        self.outcomes.update(other.outcomes)
        self.scenarios.update(other.scenarios)
        self.by_target.update(other.by_target)


def read_one(sock: socket.socket, dec: _protocol.FrameDecoder, pending: list[Any]) -> Any:
    while not pending:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        pending.extend(dec.feed(chunk))
    return pending.pop(0)


def read_challenge(sock: socket.socket, dec: _protocol.FrameDecoder, pending: list[Any]) -> bytes:
    """The server's nonce; raises Refused if it hangs up first (a coordinator at capacity)."""
    try:
        challenge = read_one(sock, dec, pending)
    except (OSError, ConnectionError) as exc:
        raise Refused(str(exc)) from None
    if challenge.op != "challenge":
        raise _protocol.ProtocolError(f"expected a challenge, got {challenge.op!r}")
    return bytes.fromhex(challenge.header["nonce"])


class Refused(Exception):
    """The server closed the connection before sending its challenge."""


def client_handshake(sock: socket.socket, key: bytes) -> bool:
    dec = _protocol.FrameDecoder()
    pending: list[Any] = []
    nonce = read_challenge(sock, dec, pending)
    mine = _protocol.new_nonce()
    proof = _protocol.auth_digest(key, nonce, "client").hex()
    sock.sendall(_protocol.encode_message("auth", {"proof": proof, "nonce": mine.hex()}))
    welcome = read_one(sock, dec, pending)
    return welcome.op == "welcome" and _protocol.auth_verify(
        key, mine, "server", welcome.header.get("proof")
    )


def pump(sock: socket.socket, data: bytes) -> str:
    """Send *data* while draining replies; then give the peer GRACE to hang up, send EOF and
    wait for it to close. Returns "rejected" (the peer closed first), "closed-after-eof" or
    "hung" (still open HANG_AFTER_EOF after our EOF)."""
    sock.setblocking(False)
    view = memoryview(data)
    sent = 0
    eof_at: float | None = None
    grace_end: float | None = None
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    send_deadline = time.monotonic() + IO_TIMEOUT
    try:
        while True:
            now = time.monotonic()
            if sent >= len(data) and grace_end is None:
                grace_end = now + GRACE
                sel.modify(sock, selectors.EVENT_READ)
            if grace_end is not None and eof_at is None and now >= grace_end:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    return "rejected"
                eof_at = now
            if eof_at is not None and now - eof_at > HANG_AFTER_EOF:
                return "hung"
            if grace_end is None and now > send_deadline:
                return "hung"
            timeout = (
                0.5
                if grace_end is None
                else max(0.0, (grace_end if eof_at is None else eof_at + HANG_AFTER_EOF) - now)
            )
            for _key, mask in sel.select(timeout):
                if mask & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(262144)
                    except BlockingIOError:
                        chunk = b"x"
                    except OSError:
                        return "rejected" if eof_at is None else "closed-after-eof"
                    if not chunk:
                        return "rejected" if eof_at is None else "closed-after-eof"
                if mask & selectors.EVENT_WRITE and sent < len(data):
                    try:
                        sent += sock.send(view[sent : sent + 262144])
                    except BlockingIOError:
                        pass
                    except OSError:
                        return "rejected"
    finally:
        sel.close()


def session(addr: tuple[str, int], key: bytes, gen: Gen, target: str, tally: Tally) -> None:
    """One connection: pick a scenario, build its batch, run it, record the outcome."""
    r = gen.rng
    x = r.random()
    if x < 0.05:
        scenario = "early"
    elif x < 0.75:
        scenario = "preauth"
    elif x < 0.88:
        scenario = "auth-garbage"
    else:
        scenario = "auth-stream"
    frames: list[bytes]
    parsed = 0
    if scenario in ("early", "preauth"):
        frames = [gen.hostile(), *gen.filler(r.randint(0, 60))]
    elif scenario == "auth-garbage":
        frames = [gen.hostile(), *gen.filler(r.randint(0, 20))]
    elif target == "worker":
        frames, parsed = gen.stream(gen.worker_valid, r.randint(100, 1000), forbid=b"stop")
    else:
        hello = encode({"op": "hello", "name": f"fuzz-{r.randrange(10**6)}", "pid": 1})
        body, clean = gen.stream(gen.coord_valid, r.randint(100, 1000), forbid=b"bye")
        frames, parsed = [hello, *body], clean + 1
    data = b"".join(frames)
    try:
        sock = socket.create_connection(addr, timeout=IO_TIMEOUT)
    except OSError:
        tally.outcomes["connect-failed"] += 1
        return
    try:
        outcome = None
        try:
            if scenario.startswith("auth"):
                if not client_handshake(sock, key):
                    outcome = "handshake-failed"
            elif scenario == "preauth":
                read_challenge(sock, _protocol.FrameDecoder(), [])
        except Refused:
            outcome = "refused-at-capacity"
        except (OSError, ConnectionError, _protocol.ProtocolError):
            outcome = "handshake-failed"
        if outcome is None:
            outcome = pump(sock, data)
            tally.frames += len(frames)
            tally.parsed += parsed if scenario == "auth-stream" else 1
            tally.by_target[target] += len(frames)
        tally.connections += 1
        tally.outcomes[outcome] += 1
        tally.scenarios[scenario] += 1
    finally:
        sock.close()
    if outcome == "refused-at-capacity":
        time.sleep(0.01)  # a flood holds every handshake slot: do not spin


def flood(addrs: list[tuple[str, int]], n: int, hold: float) -> int:
    """Open *n* connections to each address at once, never speak, hold, close."""
    socks: list[socket.socket] = []
    try:
        for addr in addrs:
            for _ in range(n):
                s = socket.socket()
                socks.append(s)
                s.setblocking(False)
                s.connect_ex(addr)
        time.sleep(hold)
    finally:
        for s in socks:
            s.close()
    return len(socks)


# =========================================================================== processes


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PYTASKQML_AUTHKEY", None)
    return env


def wait_in_file(
    path: Path, pattern: str, proc: subprocess.Popen[Any], timeout: float
) -> re.Match[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = re.search(pattern, path.read_text(errors="replace"))
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"process did not start; its log says: {path.read_text()[-2000:]}")


class CoordinatorChild:
    """The coordinator under test, in its own process, driven by JSON lines over stdin."""

    def __init__(self, key_file: Path, log: Path) -> None:
        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmark.fuzz",
                "--serve-coordinator",
                "--authkey-file",
                str(key_file),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=child_env(),
            cwd=str(ROOT),
        )
        self._replies: list[str] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        info = self.ask(None, timeout=30)
        self.port, self.ctl, self.pid = info["port"], info["control"], info["pid"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self._replies.append(line)
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def ask(self, command: str | None, timeout: float = 30) -> dict[str, Any]:
        with self._cv:
            seen = len(self._replies)
        if command is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        with self._cv:
            if not self._cv.wait_for(
                lambda: len(self._replies) > seen or self.proc.poll() is not None, timeout
            ):
                raise TimeoutError(f"coordinator did not answer {command!r}")
            if len(self._replies) <= seen:
                raise RuntimeError("the coordinator process exited")
            return dict(json.loads(self._replies[seen]))

    def close(self) -> int | None:
        with contextlib.suppress(OSError, TimeoutError, RuntimeError):
            if self.proc.poll() is None:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._log.close()
        return self.proc.returncode


def serve_coordinator(key_file: str) -> int:
    """The child side of :class:`CoordinatorChild`."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    key = Path(key_file).read_bytes().strip()
    out: TextIO = sys.stdout

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    coord = Coordinator(authkey=key, max_retries=1000)
    try:
        _, port = coord.listen((HOST, 0))
        _, ctl = coord.serve_control((HOST, 0))
        reply({"port": port, "control": ctl, "pid": os.getpid()})
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            if cmd[0] == "stats":
                s = coord.statistics()
                reply(
                    {
                        "rejected_peers": s.rejected_peers,
                        "workers_lost": s.workers_lost,
                        "workers": [w.name for w in s.workers],
                    }
                )
            elif cmd[0] == "check":
                reply(_check_coordinator(coord, cmd[1]))
    finally:
        coord.shutdown(cancel_futures=True, timeout=10)
    return 0


def _check_coordinator(coord: Coordinator, name: str) -> dict[str, Any]:
    end = time.monotonic() + 20
    while time.monotonic() < end and [w.name for w in coord.workers] != [name]:
        time.sleep(0.05)
    workers = [w.name for w in coord.workers]
    if workers != [name]:
        return {"ok": False, "why": f"workers attached: {workers}"}
    t0 = time.monotonic()
    try:
        futs = [coord.submit(["check", i]) for i in range(CHECK_TASKS)]
        ok = [f.result(CHECK_DEADLINE) for f in futs] == [["check", i] for i in range(CHECK_TASKS)]
    except Exception as exc:
        return {"ok": False, "why": repr(exc)}
    return {"ok": ok, "seconds": round(time.monotonic() - t0, 4)}


def check_worker(port: int, key: bytes) -> dict[str, Any]:
    """A real coordinator connects to the fuzzed worker and runs tasks, all within 5 s."""
    t0 = time.monotonic()
    try:
        with Coordinator(authkey=key) as coord:
            coord.connect((HOST, port), timeout=CHECK_DEADLINE)
            futs = [coord.submit(["check", i]) for i in range(CHECK_TASKS)]
            left = max(0.01, CHECK_DEADLINE - (time.monotonic() - t0))
            ok = [f.result(left) for f in futs] == [["check", i] for i in range(CHECK_TASKS)]
            seconds = time.monotonic() - t0
    except Exception as exc:
        return {"ok": False, "why": repr(exc)}
    return {"ok": ok and seconds <= CHECK_DEADLINE, "seconds": round(seconds, 4)}


def health(port: int) -> tuple[bool, float]:
    t0 = time.monotonic()
    try:
        status, _ = get_health((HOST, port), timeout=5.0)
    except OSError:
        return False, time.monotonic() - t0
    return status == 200, time.monotonic() - t0


# =========================================================================== main loop


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    key = secrets.token_hex(32).encode()
    tmp = Path(tempfile.mkdtemp(prefix="pytaskqml-fuzz-"))
    key_file = tmp / "authkey"
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    worker_log, coord_log = tmp / "worker.log", tmp / "coordinator.log"
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    say(f"fuzz: seed {seed}; logs in {tmp}")

    worker: subprocess.Popen[bytes] | None = None
    coord: CoordinatorChild | None = None
    real: subprocess.Popen[bytes] | None = None
    files: list[Any] = []
    try:
        wlog = open(worker_log, "w")  # noqa: SIM115 - closed in finally
        files.append(wlog)
        worker = subprocess.Popen(
            [
                sys.executable, "-m", "pytaskqml", "worker", "benchmark.fuzz:FuzzWorker",
                "--listen", f"{HOST}:0", "--control", f"{HOST}:0",
                "--authkey-file", str(key_file), "--name", "fuzz-target",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=wlog,
            env=child_env(), cwd=str(ROOT),
        )  # fmt: skip
        m = wait_in_file(
            worker_log,
            r"listening on 127\.0\.0\.1:(\d+); control at http://127\.0\.0\.1:(\d+)",
            worker,
            30,
        )
        w_port, w_ctl = int(m.group(1)), int(m.group(2))
        coord = CoordinatorChild(key_file, coord_log)
        say(
            f"fuzz: worker pid {worker.pid} port {w_port}; "
            f"coordinator pid {coord.pid} port {coord.port}"
        )
        rss_before = {"worker": rss_kib(worker.pid), "coordinator": rss_kib(coord.pid)}

        total = Tally()
        lock = threading.Lock()
        stop = threading.Event()
        probes: list[tuple[bool, float]] = []
        crashed: dict[str, int | None] = {}

        def loop(index: int, target: str, addr: tuple[str, int]) -> None:
            gen = Gen(seed * 1000 + index, empty_buffers=not args.no_empty_buffers)
            while not stop.is_set():
                mine = Tally()
                for _ in range(5):
                    session(addr, key, gen, target, mine)
                with lock:
                    total.add(mine)
                    if total.frames >= args.frames:
                        stop.set()

        targets = [("worker", (HOST, w_port)), ("coordinator", (HOST, coord.port))]
        threads = [
            threading.Thread(target=loop, args=(i, *targets[i % 2]), daemon=True)
            for i in range(args.threads)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        next_flood = started + args.flood_every
        next_probe = started + 5.0
        next_report = started + 5.0
        while not stop.is_set():
            now = time.monotonic()
            if now - started > args.seconds:
                say("fuzz: time cap reached")
                stop.set()
                break
            for name, proc in (("worker", worker), ("coordinator", coord.proc)):
                if proc.poll() is not None:
                    crashed[name] = proc.returncode
            if crashed:
                say(f"fuzz: CRASH {crashed}")
                stop.set()
                break
            if now >= next_flood:
                n = flood([(HOST, w_port), (HOST, coord.port)], args.flood_size, 1.0)
                with lock:
                    total.flood_connections += n
                next_flood = time.monotonic() + args.flood_every
            if now >= next_probe:
                probes.extend([health(w_ctl), health(coord.ctl)])
                next_probe = now + 10.0
            if now >= next_report:
                with lock:
                    rate = total.frames / max(1e-9, now - started)
                    say(
                        f"[{now - started:6.0f}s] frames {total.frames:,} ({rate:,.0f}/s) "
                        f"conns {total.connections:,} rejected {total.outcomes['rejected']:,} "
                        f"hung {total.outcomes['hung']}"
                    )
                next_report = now + 5.0
            stop.wait(0.1)
        for t in threads:
            t.join(IO_TIMEOUT + HANG_AFTER_EOF + 5)
        elapsed = time.monotonic() - started
        for name, proc in (("worker", worker), ("coordinator", coord.proc)):
            if proc.poll() is not None:
                crashed[name] = proc.returncode

        # ------------------------------------------------------------ afterwards
        checks: dict[str, Any] = {}
        if "worker" not in crashed:
            checks["worker_task"] = check_worker(w_port, key)
            checks["worker_health"] = health(w_ctl)[0]
        if "coordinator" not in crashed:
            real = subprocess.Popen(
                [
                    sys.executable, "-m", "pytaskqml", "worker", "benchmark.fuzz:FuzzWorker",
                    "--connect", f"{HOST}:{coord.port}", "--authkey-file", str(key_file),
                    "--no-control", "--name", "fuzz-real",
                ],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=child_env(), cwd=str(ROOT),
            )  # fmt: skip
            checks["coordinator_task"] = coord.ask("check fuzz-real", timeout=60)
            checks["coordinator_health"] = health(coord.ctl)[0]
            checks["coordinator_stats"] = coord.ask("stats")
        rss_after = {
            "worker": rss_kib(worker.pid) if worker.poll() is None else {},
            "coordinator": rss_kib(coord.pid) if coord.proc.poll() is None else {},
        }
        hung_flag = not all(
            [
                checks.get("worker_task", {}).get("ok", False),
                checks.get("coordinator_task", {}).get("ok", False),
                checks.get("worker_health", False),
                checks.get("coordinator_health", False),
            ]
        )
        log_lines = {
            "worker": worker_log.read_text(errors="replace").count("rejected connection from"),
            "coordinator": coord_log.read_text(errors="replace").count("rejected connection from"),
        }
        result = {
            "seed": seed,
            "seconds": round(elapsed, 1),
            "frames_sent": total.frames,
            "frames_parsed_at_least": total.parsed,
            "frames_by_target": dict(total.by_target),
            "connections": total.connections,
            "flood_connections": total.flood_connections,
            "outcomes": dict(total.outcomes),
            "scenarios": dict(total.scenarios),
            "crashed": crashed,
            "hung": hung_flag,
            "checks": checks,
            "probes": {
                "count": len(probes),
                "failed": sum(not ok for ok, _ in probes),
                "max_seconds": round(max((s for _, s in probes), default=0.0), 3),
            },
            "rss_kib_before": rss_before,
            "rss_kib_after": rss_after,
            "rejections_logged": log_lines,
            "empty_buffers": not args.no_empty_buffers,
        }
        print_report(result)
        if args.json:
            print(json.dumps(result))
        return 0 if not crashed and not hung_flag else 1
    finally:
        for proc in (real, worker):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        if coord is not None:
            coord.close()
        for f in files:
            f.close()
        key_file.unlink(missing_ok=True)  # the logs stay for inspection; the key does not


def print_report(r: dict[str, Any]) -> None:
    def mib(d: dict[str, int], k: str) -> str:
        return f"{d[k] / 1024:.1f}" if k in d else "?"

    o, c, by = r["outcomes"], r["checks"], r["frames_by_target"]
    sent, secs = r["frames_sent"], r["seconds"]
    lines = [
        f"pytaskqml fuzz, seed {r['seed']}: {sent:,} frames in {secs} s "
        f"({sent / max(secs, 1e-9):,.0f}/s)",
        f"  frames sent        {sent:,} (worker {by.get('worker', 0):,}, coordinator "
        f"{by.get('coordinator', 0):,}); decoded by a server: at least "
        f"{r['frames_parsed_at_least']:,}",
        f"  connections        {r['connections']:,} (+ {r['flood_connections']:,} flood "
        f"connections that never spoke); scenarios {r['scenarios']}",
        f"  rejected           {o.get('rejected', 0):,} (peer closed the connection first); "
        f"closed after our EOF {o.get('closed-after-eof', 0):,}; hung {o.get('hung', 0)}; "
        f"refused at capacity (closed before the challenge, during floods) "
        f"{o.get('refused-at-capacity', 0):,}; our handshake failed otherwise "
        f"{o.get('handshake-failed', 0)}; connect failed {o.get('connect-failed', 0)}",
        f"  crashed            {r['crashed'] or 'no'}",
        f"  hung               {'YES' if r['hung'] else 'no'}: worker task check "
        f"{c.get('worker_task')}, coordinator task check {c.get('coordinator_task')}, "
        f"/health worker {c.get('worker_health')} coordinator {c.get('coordinator_health')}; "
        f"probes during the run {r['probes']}",
        f"  rejections logged  {r['rejections_logged']}; coordinator {c.get('coordinator_stats')}",
    ]
    for who in ("worker", "coordinator"):
        b, a = r["rss_kib_before"][who], r["rss_kib_after"][who]
        lines.append(
            f"  RSS {who:<12}   {mib(b, 'VmRSS')} MiB -> {mib(a, 'VmRSS')} MiB "
            f"(peak {mib(a, 'VmHWM')} MiB)"
        )
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmark.fuzz",
        description="Fuzz a live pytaskqml worker (CLI, with a key) and a live coordinator "
        "listen() port with random and mutated frames; report rejections, crashes, hangs and "
        "RSS. Only 127.0.0.1 is contacted.",
    )
    p.add_argument("--frames", type=int, default=1_000_000, help="frames to send (default 1000000)")
    p.add_argument("--seconds", type=float, default=900.0, help="time cap (default 900)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--threads", type=int, default=4, help="sending threads, split between targets")
    p.add_argument(
        "--flood-every", type=float, default=20.0, metavar="SECONDS", help="flood period"
    )
    p.add_argument("--flood-size", type=int, default=200, help="connections per target per flood")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.add_argument(
        "--no-empty-buffers",
        action="store_true",
        help="never put an empty bytes value in a task payload (a known hang: a frame whose "
        "last buffer is empty makes Connection._sendmsg_all spin forever)",
    )
    p.add_argument("--serve-coordinator", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--authkey-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_coordinator:
        return serve_coordinator(args.authkey_file)
    if args.frames <= 0 or args.seconds <= 0 or args.threads < 2:
        p.error("--frames and --seconds must be positive and --threads at least 2")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
