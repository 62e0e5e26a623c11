"""The exception tree.

::

    PyTaskQMLError
     ├── ProtocolError            a peer sent bytes that are not a valid frame (garbage, wrong
     │                            version, oversize, lying buffer lengths, bad JSON)
     ├── AuthenticationError      the handshake failed: wrong or missing key, replay, timeout
     ├── ConnectionLost           the peer broke the connection (EOF, reset, heartbeat silence)
     ├── ClosedError              *you* closed it: submit after shutdown, put after close
     ├── WorkerStartError         a worker could not start (import error, setup() raised, a
     │    │                       process that kept failing to start: then also what tasks that
     │    │                       nothing else could run fail with)
     │    └── ModelLoadError      no worker could load a named model (coord.models.load, a
     │                            pipeline's model stage): names the model, version and cause
     ├── TaskFailed               process() raised; carries the remote type and traceback text
     ├── EntryLostError           a Redis queue lost the entry of a task (the server restarted
     │                            without persistence, the stream was deleted) or could not be
     │                            reached for longer than the producer's lost_timeout
     └── WorkerLostError          the workers that could run a task were lost:
          │                       raised as such for a *poison* task, one that killed more
          │                       workers than max_retries while running
          └── NoWorkersError      no worker is left and none can come back (no process to
                                  restart, nothing listening or dialling): the coordinator cannot
                                  run anything until a worker is added, as a broken executor

Timeouts reuse the builtin :class:`TimeoutError`; cancellation reuses
:class:`concurrent.futures.CancelledError`.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ClosedError",
    "ConnectionLost",
    "EntryLostError",
    "ModelLoadError",
    "NoWorkersError",
    "ProtocolError",
    "PyTaskQMLError",
    "RemoteTraceback",
    "TaskFailed",
    "WorkerLostError",
    "WorkerStartError",
]


class PyTaskQMLError(Exception):
    """Base class of every error pytaskqml raises on purpose."""


class ProtocolError(PyTaskQMLError):
    """The byte stream from a peer is not a valid pytaskqml frame sequence."""


class AuthenticationError(PyTaskQMLError):
    """The peer failed the mutual HMAC handshake."""


class ConnectionLost(PyTaskQMLError):
    """The peer closed or broke the connection, or fell silent past the heartbeat limit."""


class ClosedError(PyTaskQMLError):
    """The object was closed by its owner: nothing more is accepted."""


class WorkerStartError(PyTaskQMLError):
    """A worker failed before it became ready.

    ``remote_traceback`` holds the traceback of the exception that stopped it, as text, when
    there was one (``setup()`` or the constructor raised), else ``""``.
    """

    remote_traceback: str = ""


class ModelLoadError(WorkerStartError):
    """A named model could not be loaded on any worker.

    ``model`` and ``version`` name it; ``errors`` maps each worker that tried to the error its
    ``load()`` raised (``"Type: message"``), also shown by ``coord.models.status()``. A
    subclass of :class:`WorkerStartError` because to whoever starts a pipeline or a service
    it is one: the workers it needs are not ready, and ``except WorkerStartError`` written for
    that keeps catching it.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str = "",
        version: str = "",
        errors: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.model = model
        self.version = version
        self.errors = dict(errors or {})

    @classmethod
    def of(cls, model: str, version: str, errors: dict[str, str]) -> ModelLoadError:
        """The error for *model* at *version* given each worker's error: one line, the
        cause first (the same cause on several workers is said once)."""
        causes: dict[str, list[str]] = {}
        for worker, why in errors.items():
            causes.setdefault(why or "no reason given", []).append(worker)
        parts = [f"{why} (on {', '.join(sorted(ws))})" for why, ws in causes.items()]
        where = f" version {version!r}" if version else ""
        text = f"model {model!r}{where} failed to load: {'; '.join(parts) or 'no worker answered'}"
        return cls(text, model=model, version=version, errors=errors)


class EntryLostError(PyTaskQMLError):
    """A :class:`~pytaskqml.redis.RedisClient`'s task will not run: Redis lost the entry that held
    it (a restart without persistence, the stream or group deleted) and the producer was told
    not to submit it again (``on_lost="fail"``), or Redis did not answer for longer than the
    producer's ``lost_timeout``."""


class TaskFailed(PyTaskQMLError):
    """``Worker.process`` raised for this task.

    ``remote_type`` is the exception's qualified type name and ``remote_traceback`` the
    formatted traceback, both as text: exceptions never travel as objects. For a remote worker
    ``__cause__`` is a :class:`RemoteTraceback` holding that text; for a local thread worker it
    is the original exception.
    """

    def __init__(self, remote_type: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.message = message
        self.remote_traceback = remote_traceback


class RemoteTraceback(Exception):
    """Holds a traceback formatted in another process, shown as the ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class WorkerLostError(PyTaskQMLError):
    """The task could not be completed because the workers that could run it were lost.

    Raised as such for a *poison* task: one whose attempts killed more than ``max_retries``
    workers.
    """


class NoWorkersError(WorkerLostError):
    """No worker is left and none can come back, so the task cannot run.

    Like ``concurrent.futures.BrokenExecutor``: queued and new work fails with it at once,
    until a worker is added again (``add_local``, ``spawn``, ``connect``, ``listen``).
    """
