"""From a caller's payloads to admitted tasks: checking what can travel, chunking tiny items,
sizing ``map()``'s buffer, and the two meanings of a timeout.

Deadlines. A deadline counted from *submission* (``submit(timeout=)``, ``stream(timeout=)``)
bounds how old an item may get - a live frame that waited too long is worth nothing. A deadline
counted from the *start of its run* (``map(timeout=)``) bounds how long an item may run: its
clock starts when a worker takes it up, so an item never times out for waiting behind others
(the scheduler sends such a task only to a worker that can start it at once).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ..buffers.pool import BufferPool
from ..core.tasks import Route, Source, Task
from ..wire import codec as _codec
from .engine import Engine

_SCALARS = frozenset({str, int, float, bool, type(None)})
_NUMBERS = frozenset({int, float})
# map()'s automatic buffer holds about this much work per worker, and at most MAX_MAP_BUFFER
# items.
MAP_BUFFER_TIME = 0.05
MAX_MAP_BUFFER = 65_536
# map() chunks aim at this much worker time per chunk, and hold at most MAX_CHUNK items.
CHUNK_BUDGET = 0.002
MAX_CHUNK = 4096

# What admission made of a payload: the bytes of its raw buffers; its JSON text, when the frame
# can carry that as it is (None: it is encoded when framed); and the sources of the buffers
# its text's markers stand for (None: it holds none; see _codec.encode_kept).
Encoded = tuple[int, "str | None", "list[Any] | None"]


class Intake:
    """Builds and admits the tasks of one coordinator."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_frame_size: int,
        pool: Callable[[], BufferPool | None] = lambda: None,
    ) -> None:
        self.engine = engine
        self.max_frame_size = max_frame_size
        self._pool = pool  # the coordinator's buffer pool, once made
        # Submitted pool arrays made read-only: id -> [array, tasks using it, was writable].
        self._frozen: dict[int, list[Any]] = {}
        self._frozen_lock = threading.Lock()

    def pool_fits(self, payload: Any) -> int | None:
        """How many buffers of the size of the largest pool buffer in *payload* the pool holds
        (``None``: the payload holds none)."""
        pool = self._pool()
        if pool is None:
            return None
        found: list[Any] = []
        _pool_arrays(payload, pool, found, 0)
        return pool.capacity_for(max(a.nbytes for a in found)) if found else None

    def freeze(self, task: Task) -> int | None:
        """Make the pool buffers in *task*'s payload read-only until the task is gone (its
        outcome delivered, every retry over), and return how many buffers of the largest one's
        size the pool holds (``None``: it holds none).

        A pool buffer is not copied when it is sent: the worker maps the producer's memory, and
        a worker that has not read a page yet sees what is written there now. So a buffer
        written again after it was submitted - the next frame decoded into the same array -
        would change what the task computes on. Read-only, that write raises at once
        (``ValueError: assignment destination is read-only``) instead of corrupting a result;
        once the task is over the array is writable again (to draw on it, say)."""
        pool = self._pool()
        if pool is None:
            return None
        found: list[Any] = []
        _pool_arrays(task.payload, pool, found, 0)
        if not found:
            return None
        weakref.finalize(task, self._thaw, self._freeze(found))
        return pool.capacity_for(max(a.nbytes for a in found))

    def hold(self, item: Any) -> list[int] | None:
        """Make the pool buffers in *item* read-only now - an item ``map()`` has just read
        from the caller's iterator and will admit with the rest of its batch - so that a
        producer writing the next item into the same buffer is stopped at that write
        (``ValueError``), not left to change what this item's task computes on. Returns
        what :meth:`unhold` takes once the batch is admitted (its tasks hold the buffers
        from then on), or ``None`` when *item* holds none."""
        pool = self._pool()
        if pool is None:
            return None
        found: list[Any] = []
        _pool_arrays(item, pool, found, 0)
        return self._freeze(found) if found else None

    def unhold(self, held: list[list[int]]) -> None:
        """Undo :meth:`hold` for each of *held* (a buffer stays read-only while a task holds
        it)."""
        for ids in held:
            self._thaw(ids)

    def pooled(self) -> bool:
        """Whether this coordinator's buffer pool has handed out a buffer yet (until then no
        payload can hold one, and :meth:`hold` has nothing to look for)."""
        pool = self._pool()
        return pool is not None and pool.handed > 0

    def _freeze(self, arrays: list[Any]) -> list[int]:
        """Make *arrays* read-only, counted: the same array submitted twice is writable again
        only once both are let go (:meth:`_thaw` of what this returns)."""
        with self._frozen_lock:
            for a in arrays:
                entry = self._frozen.get(id(a))
                if entry is None:
                    self._frozen[id(a)] = [a, 1, a.flags.writeable]
                    a.flags.writeable = False
                else:
                    entry[1] += 1
        return [id(a) for a in arrays]

    def check_payload(self, payload: Any) -> int:
        """Raise TypeError/ValueError here, in the caller, for a payload that cannot travel;
        return the bytes of raw buffers it holds."""
        if type(payload) in _SCALARS and (type(payload) is not str or len(payload) < 4096):
            return 0  # always encodable, never holds a buffer
        return self._encoded(payload)[0]

    def payload_text(self, payload: Any) -> Encoded:
        """:meth:`check_payload`, keeping the JSON it made: the frame then carries that text
        as it is instead of encoding the payload a second time (so the payload is encoded once
        on its way to a worker process, and a thread worker decodes that text instead of
        copying the payload). A payload changed after submit() travels as it was at submit(),
        as the items of a chunk always have - but for the contents of its buffers, which are
        read when it is sent.

        A payload holding buffers keeps their sources with its text: where each buffer goes -
        in the frame, or through shared memory to a spawned worker - is the sending
        connection's to decide, and it rewrites only those buffers' markers. The text is
        ``None`` for a float or an int too large for the fast path (always encodable: encoded
        once, when framed) and for a payload holding a buffer that had to be copied to be
        sent (a non-contiguous array: encoded again when framed rather than holding the
        copy while it waits)."""
        text = _codec.scalar_json(payload)
        if text is not None or payload.__class__ in _NUMBERS:
            return 0, text, None
        return self._encoded(payload)

    def payload_texts(self, items: list[Any]) -> list[Encoded]:
        """:meth:`payload_text` of each item, with one encoder set-up for all of them; raises
        for the first item that cannot travel."""
        out: list[Encoded] = []
        rest: list[int] = []  # the items that need the encoder
        scalar = _codec.scalar_json
        for i, p in enumerate(items):
            text = scalar(p)
            if text is None and p.__class__ not in _NUMBERS:
                rest.append(i)
            out.append((0, text, None))
        if not rest:
            return out
        try:
            texts, bufs, kept = _codec.encode_kept([items[i] for i in rest])
        except (TypeError, ValueError):
            for i in rest:
                self._encoded(items[i])  # raises for the first that cannot travel
            raise  # (the items changed meanwhile)
        for i, text, b, k in zip(rest, texts, bufs, kept, strict=True):
            out[i] = self._sized(text, b, k)
        return out

    def _encoded(self, payload: Any) -> Encoded:
        texts, bufs, kept = _codec.encode_kept([payload])
        return self._sized(texts[0], bufs[0], kept[0])

    def _sized(self, text: str, bufs: list[memoryview], kept: list[Any] | None) -> Encoded:
        """Refuse an encoded payload too large for a frame; what admission keeps of it (see
        :data:`Encoded`)."""
        nbytes = sum(b.nbytes for b in bufs) if bufs else 0
        if nbytes + len(text) + 64 > self.max_frame_size:
            raise ValueError(
                f"payload of {nbytes + len(text)} bytes is larger than max_frame_size="
                f"{self.max_frame_size}: send big items through a file with pytaskqml.spill() "
                "(the worker reads them with pytaskqml.load()), or raise max_frame_size"
            )
        if not bufs:
            return 0, text, None
        return (nbytes, text, kept) if kept is not None else (nbytes, None, None)

    def plain_json(self, items: list[Any]) -> str | None:
        """The JSON of *items* if it can travel, holds no raw buffers and fits in a frame."""
        try:
            text, bufs = _codec.encode(items)
        except (TypeError, ValueError):
            return None
        return text if not bufs and len(text) + 64 <= self.max_frame_size else None

    def _thaw(self, ids: list[int]) -> None:
        # A finalizer: runs wherever the task's last reference went, so only this short lock.
        with self._frozen_lock:
            for i in ids:
                entry = self._frozen[i]
                entry[1] -= 1
                if not entry[1]:
                    del self._frozen[i]
                    if entry[2]:
                        with contextlib.suppress(ValueError):
                            entry[0].flags.writeable = True

    def one(
        self,
        payload: Any,
        sink: Any,
        seq: int,
        timeout: float | None,
        *,
        put_timeout: float | None = None,
        route: Route | None = None,
        source: Source | None = None,
        priority: int = 0,
        encoded: Encoded | None = None,
    ) -> Task:
        """Admit one task whose deadline (if any) counts from now; *route* says where it may
        run (a model, a key, one worker); *source* and *priority* its place in the queue;
        *encoded*: the payload's :meth:`payload_text`, when the caller made it already (one
        broadcast, many tasks)."""
        engine = self.engine
        nbytes, text, kept = self.payload_text(payload) if encoded is None else encoded
        t = Task(engine.new_ids(1)[0], payload, nbytes, sink, seq, engine.clock(), 1, text, kept)
        if timeout is not None:
            t.deadline = t.t_submit + timeout
        if route is not None:
            t.route = route
        t.source = source
        t.priority = priority
        if t.nbytes:
            self.freeze(t)
        engine.admit(
            [t], timed=timeout is not None, routed=route is not None, put_timeout=put_timeout
        )
        return t

    def task(self, payload: Any, sink: Any, route: Route) -> Task:
        """A task not admitted yet (retained broadcasts for a joining worker)."""
        engine = self.engine
        nbytes, text, kept = self.payload_text(payload)
        t = Task(engine.new_ids(1)[0], payload, nbytes, sink, 0, engine.clock(), 1, text, kept)
        t.route = route
        return t

    def many(
        self,
        items: list[Any],
        sink: Any,
        seq: int,
        *,
        run_timeout: float | None,
        chunk: int,
        route: Callable[[Any], Route] | None = None,
        source: Source | None = None,
        priority: int = 0,
    ) -> int | None:
        """Admit the items of a map(), *chunk* at a time; a deadline counts from each task's
        start; *route(item or chunk)* says where each task may run. Returns how many of the
        largest pool buffer among the items the pool holds (``None``: they hold none)."""
        engine = self.engine
        ids, now = iter(engine.new_ids(len(items))), engine.clock()  # enough for one per item
        if chunk > 1:
            # Each chunk is encoded once, here: that checks it can travel, and the text is what
            # the frame will carry. A chunk holding raw buffers, or one that fails, is looked at
            # item by item.
            tasks = []
            for i in range(0, len(items), chunk):
                part = items[i : i + chunk]
                text = self.plain_json(part) if len(part) > 1 else None
                if text is not None:
                    tasks.append(Task(next(ids), part, 0, sink, seq + i, now, len(part), text))
                    continue
                tasks.extend(
                    Task(next(ids), p, n, sink, seq + i + j, now, 1, t, k)
                    for j, (p, (n, t, k)) in enumerate(
                        zip(part, self.payload_texts(part), strict=True)
                    )
                )
        else:
            # Each item keeps its own JSON, framed as it is: encoded once on its way.
            tasks = [
                Task(next(ids), p, n, sink, seq + i, now, 1, t, k)
                for i, (p, (n, t, k)) in enumerate(
                    zip(items, self.payload_texts(items), strict=True)
                )
            ]
        if run_timeout is not None:
            for t in tasks:
                t.run_timeout = run_timeout
        if route is not None:
            for t in tasks:
                t.route = route(t.payload)
        if source is not None or priority:
            for t in tasks:
                t.source = source
                t.priority = priority
        room = None
        for t in tasks:
            if t.nbytes:
                fits = self.freeze(t)
                if fits is not None:
                    room = fits if room is None else min(room, fits)
        engine.admit(tasks, routed=route is not None)
        return room

    # ------------------------------------------------------------------ sizing

    def auto_buffersize(self, chunked: bool, kind: str | None = None) -> int:
        """map()'s default buffer: about MAP_BUFFER_TIME of work per worker, by the time per
        item measured for this *kind* of work (a model's name; None: the workers' own
        process()). Items that travel one per task (a deadline, chunksize=1) cost a task
        object each, so fewer of them."""
        engine = self.engine
        workers = max(1, engine.worker_count())
        floor = max(64, 16 * workers)
        per = engine.item_time(kind)
        if per is None:
            return max(256, floor)
        want = int(workers * MAP_BUFFER_TIME / max(per, 1e-7))
        return max(floor, min(MAX_MAP_BUFFER if chunked else MAX_MAP_BUFFER // 16, want))

    def auto_chunksize(self, items: int, kind: str | None = None) -> int:
        """Items per chunk, for *items* about to be admitted: about CHUNK_BUDGET seconds of
        work by the time measured for this *kind* of work, leaving every worker a share of
        them. 1 until a result has shown how long an item of this kind takes."""
        engine = self.engine
        per = engine.item_time(kind)
        if per is None or per >= CHUNK_BUDGET:
            return 1
        share = items // (4 * max(1, engine.worker_count()))
        return max(1, min(int(CHUNK_BUDGET / max(per, 1e-7)), MAX_CHUNK, share))


def _pool_arrays(value: Any, pool: BufferPool, found: list[Any], depth: int) -> None:
    """Collect the arrays in *value* (an encodable payload) whose memory lies in *pool*."""
    np = _codec.loaded_numpy()
    if np is not None and isinstance(value, np.ndarray):
        if value.nbytes and pool.holds(value):
            found.append(value)
    elif depth < 64 and isinstance(value, dict):
        for v in value.values():
            _pool_arrays(v, pool, found, depth + 1)
    elif depth < 64 and isinstance(value, list | tuple):
        for v in value:
            _pool_arrays(v, pool, found, depth + 1)


def check_priority(priority: Any) -> int:
    """A task's priority: any int (higher goes first); TypeError for anything else."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise TypeError(f"priority must be an int, got {priority!r}")
    return priority


def check_weight(weight: Any) -> int:
    """A source's weight: an int >= 1 (tasks per turn); ValueError/TypeError otherwise."""
    if not isinstance(weight, int) or isinstance(weight, bool):
        raise TypeError(f"weight must be an int, got {weight!r}")
    if weight < 1:
        raise ValueError(f"weight must be 1 or more, got {weight!r}")
    return weight


def route_for(
    check: Callable[[str], None], model: str | None, key: Any, with_meta: bool
) -> Route | None:
    """The route of a task with these options (None: any worker); ValueError/TypeError for
    options that cannot work (a model that cannot run, a key that is not a string)."""
    if model is None and key is None:
        if with_meta:
            raise ValueError("with_meta=True needs a model=")
        return None
    if key is not None and not isinstance(key, str):
        raise TypeError("key must be a str")
    if model is not None:
        check(model)
    return Route(model=model, key=key, meta=with_meta and model is not None)


def item_routes(
    check: Callable[[str | None, Any, bool], Route | None],
    model: str | Callable[[Any], str] | None,
    key: Callable[[Any], str] | None,
    with_meta: bool,
) -> tuple[Callable[[Any], Route] | None, bool]:
    """map()'s routes: a function of the item (or None), and whether it differs per item
    (then items cannot share a chunk)."""
    if callable(model):
        pick = model

        def route(item: Any) -> Route:
            name = pick(item)
            check(name, None, False)
            return Route(model=name, key=key(item) if key is not None else None, meta=with_meta)

        return route, True
    if model is None and key is None:
        check(None, None, with_meta)
        return None, False
    template = check(model, "" if key is not None else None, with_meta)
    assert template is not None
    m, meta = template.model, template.meta

    def fixed(item: Any) -> Route:
        return Route(model=m, key=key(item) if key is not None else None, meta=meta)

    return fixed, key is not None or meta
