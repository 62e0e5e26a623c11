"""Tasks that may not run on just any worker: sans-IO, part of the scheduling core.

Three kinds, each with its own queue beside the scheduler's main one (they count against the
same ``max_queue``):

* **By model** (``submit(x, model="detector")``): a queue per model; a task goes to the
  least-loaded worker that has the model *ready*. A worker that is still loading a model gets
  none of its tasks, and keeps running the tasks of the models it has. With ``max_models`` on
  a worker, a model nobody holds is loaded on demand (on a worker with room, or in place of
  its least recently used idle model) - the core asks for it; the front sends the command.
* **By key** (``submit(x, key="camera-7")``): all tasks of a key go to one worker while it
  lives (per-key state stays put). A key's owner is chosen by rendezvous hashing over the
  workers that can take it - the highest ``hash(key, worker)`` wins - so keys spread evenly and
  only the keys of a worker that dies move. The first task of a key on its new worker is marked
  *moved*, and the worker calls its ``key_moved(key)`` hook before running it. Owners are kept
  (the most recent ``MAX_KEYS`` keys) so that a worker joining later does not take keys away.
* **Pinned** (a broadcast to every worker): one task per worker; if that worker goes, its task
  fails rather than run elsewhere.

Keyed and pinned tasks wait in their worker's own queue (``WorkerState.own``), which is served
before anything else: a retained broadcast replayed to a joining worker runs before its first
task.

Each routed queue keeps its tasks by priority (``Task.priority``, higher first; first come
within a priority), as the main queue does; a task never goes ahead of a pinned task waiting
before it. The turns between sources of the main queue do not apply here.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

from .tasks import Task
from .workerstate import WorkerState, leader

MAX_KEYS = 65_536


class Router:
    """The routed queues of one scheduler. Called by it under the same lock."""

    def __init__(self) -> None:
        self.by_model: dict[str, deque[Task]] = {}
        self.unrouted: deque[Task] = deque()  # keyed tasks no worker can take yet
        self.key_owner: OrderedDict[str, WorkerState] = OrderedDict()
        self.moved_keys: set[str] = set()
        self.waiting = 0  # tasks in any routed queue (finished ones until they are popped)
        self.on_demand: set[str] = set()  # models the core may load where it wants
        # ("load" | "unload", worker, model) for the front to send; drained by the engine.
        self.requests: list[tuple[str, WorkerState, str]] = []
        self._reroute = False
        # Models unloaded by name: a task for one that comes back (from a lost worker) or
        # slipped in as it went cannot run anywhere - it goes to `orphans`, for the front to
        # fail, instead of waiting for a load that will never come.
        self.gone: set[str] = set()
        self.orphans: list[Task] = []

    # ------------------------------------------------------------------ admission

    def add(self, t: Task, workers: list[WorkerState], *, front: bool = False) -> None:
        r = t.route
        assert r is not None
        if r.model is not None and r.model in self.gone:
            self.orphans.append(t)
            return
        self.waiting += 1
        if r.pin is not None:
            _put(r.pin.own, t, front)
        elif r.key is not None:
            owner = self._owner(r.key, r.model, workers)
            if owner is None:
                _put(self.unrouted, t, front)
                return
            if r.key in self.moved_keys:
                self.moved_keys.discard(r.key)
                r.moved = True
            _put(owner.own, t, front)
        else:
            assert r.model is not None
            q = self.by_model.get(r.model)
            if q is None:
                q = self.by_model[r.model] = deque()
            _put(q, t, front)

    def _owner(self, key: str, model: str | None, workers: list[WorkerState]) -> WorkerState | None:
        ws = self.key_owner.get(key)
        if ws is not None and ws.accepting and _can_take(ws, model):
            self.key_owner.move_to_end(key)
            return ws
        eligible = [w for w in workers if w.accepting and _can_take(w, model)]
        if not eligible:
            return None
        if ws is not None:
            self.moved_keys.add(key)  # it had an owner that cannot take it any more
        best = max(eligible, key=lambda w: hash((key, w.id)))
        self.key_owner[key] = best
        self.key_owner.move_to_end(key)
        if len(self.key_owner) > MAX_KEYS:
            self.key_owner.popitem(last=False)
        return best

    # ------------------------------------------------------------------ dispatch

    def dispatch(
        self,
        now: float,
        workers: list[WorkerState],
        give: Any,
        kind_time: dict[str | None, float],
    ) -> None:
        """Hand routed tasks to workers with credit; *give(worker, task)* assigns one (it
        returns False if nobody waits for the task any more). *kind_time*: seconds per item
        of each model (None: the workers' own process()), for :meth:`WorkerState.cap`.

        A model's tasks follow the scheduler's work-conserving rule: while a worker that has
        the model can start one at once, they go only to such workers. When tasks of a model
        loaded on demand wait while a worker without it has nothing to do, the model is
        loaded there too."""
        if self._reroute and self.unrouted:
            self._reroute = False
            pending = list(self.unrouted)
            self.unrouted.clear()
            self.waiting -= len(pending)
            for t in pending:
                self.add(t, workers)
        for w in workers:
            own = w.own
            while own and w.accepting:
                t = own[0]
                model = t.route.model if t.route is not None else None
                if model is not None and model not in w.models:
                    break  # its owner is still loading the model: the key waits for it
                per = kind_time.get(model)
                if len(w.inflight) >= w.cap(None if per is None else per * t.count):
                    break
                own.popleft()
                self.waiting -= 1
                if not t.finished:
                    give(w, t)
        for model, q in self.by_model.items():
            if not q:
                continue
            eligible = [w for w in workers if w.accepting and model in w.models]
            if not eligible:
                if model in self.on_demand and not any(model in w.loading for w in workers):
                    self._load_somewhere(model, workers, now)
                continue
            per = kind_time.get(model)
            while q:
                t = q[0]
                if t.finished:
                    q.popleft()
                    self.waiting -= 1
                    continue
                start_now = t.run_timeout is not None or getattr(t.sink, "start_only", False)
                best, _, _ = leader(eligible, None if per is None else per * t.count, not start_now)
                if best is None:
                    break
                q.popleft()
                self.waiting -= 1
                give(best, t)
                best.model_used[model] = now
            if q and model in self.on_demand:
                self._spread(model, workers)

    def _spread(self, model: str, workers: list[WorkerState]) -> None:
        """Tasks of *model* wait: load it on a worker that has nothing to do - in place of
        its least recently used model if it has no room, when no task waits for that one (one
        load at a time, so a burst does not load it everywhere at once)."""
        if any(model in w.loading for w in workers):
            return
        for w in workers:
            if not w.accepting or w.inflight or w.own or w.loading or model in w.models:
                continue
            if w.max_models is None or len(w.models) < w.max_models:
                self._ask_load(w, model)
                return
            idle = [n for n in w.models if not self.by_model.get(n)]
            if idle:
                victim = min(idle, key=lambda n: w.model_used.get(n, 0.0))
                self.requests.append(("unload", w, victim))
                w.models.pop(victim, None)
                self._ask_load(w, model)
                return

    def _load_somewhere(self, model: str, workers: list[WorkerState], now: float) -> None:
        """Ask for *model* on the worker with room for it and the most credit, or else in
        place of the least recently used model of a worker that has no task for it."""
        roomy = [
            w
            for w in workers
            if w.accepting
            and (w.max_models is None or len(w.models) + len(w.loading) < w.max_models)
        ]
        if roomy:
            w = max(roomy, key=lambda w: (w.window - len(w.inflight), -len(w.models)))
            self._ask_load(w, model)
            return
        candidates: list[tuple[float, WorkerState, str]] = []
        for w in workers:
            if not w.accepting or w.loading:
                continue
            busy = {t.route.model for t in w.inflight.values() if t.route is not None}
            busy |= {t.route.model for t in w.own if t.route is not None}
            for name in w.models:
                if name not in busy and not self.by_model.get(name):
                    candidates.append((w.model_used.get(name, 0.0), w, name))
        if candidates:
            _, w, victim = min(candidates, key=lambda c: c[0])
            self.requests.append(("unload", w, victim))
            w.models.pop(victim, None)
            self._ask_load(w, model)

    def _ask_load(self, w: WorkerState, model: str) -> None:
        w.loading.add(model)
        self.requests.append(("load", w, model))

    # ------------------------------------------------------------------ worker events

    def model_ready(self, w: WorkerState, model: str, version: str) -> None:
        w.models[model] = version
        w.loading.discard(model)
        self._reroute = True

    def model_failed(self, w: WorkerState, model: str, workers: list[WorkerState]) -> list[Task]:
        """A load failed on *w* (an older version it had keeps serving). When no worker has or
        is loading the model, its waiting tasks cannot run: returned, to be failed."""
        w.loading.discard(model)
        if any(model in x.models or model in x.loading for x in workers if x.accepting):
            return []
        return self.take(workers, lambda t: t.route is not None and t.route.model == model)

    def model_gone(self, w: WorkerState, model: str) -> None:
        w.models.pop(model, None)
        w.loading.discard(model)

    def worker_added(self) -> None:
        self._reroute = True

    def worker_removed(self, w: WorkerState, held: list[Task]) -> tuple[list[Task], list[Task]]:
        """*w* is gone. Its keys move (their owner is chosen again); *held* (its unfinished
        in-flight routed tasks, running one first) and its own queue go back. Returns
        (tasks to put back in order, pinned tasks that can no longer run)."""
        for key in [k for k, owner in self.key_owner.items() if owner is w]:
            del self.key_owner[key]
            self.moved_keys.add(key)
        waiting = list(w.own)
        w.own.clear()
        self.waiting -= len(waiting)
        back: list[Task] = []
        lost: list[Task] = []
        for t in [*held, *waiting]:
            if t.finished:
                continue
            (lost if t.route is not None and t.route.pin is not None else back).append(t)
        return back, lost

    def put_back(self, tasks: list[Task], workers: list[WorkerState]) -> None:
        """Return tasks that were taken away (a lost worker's), ahead of what waits, in order."""
        for t in reversed(tasks):
            self.add(t, workers, front=True)

    # ------------------------------------------------------------------ endings

    def take(self, workers: list[WorkerState], which: Any = None) -> list[Task]:
        """Remove and return every unfinished waiting task (or those *which(task)* picks)."""
        out: list[Task] = []
        queues: list[deque[Task]] = [self.unrouted, *self.by_model.values()]
        queues.extend(w.own for w in workers)
        for q in queues:
            keep: deque[Task] = deque()
            for t in q:
                if t.finished:
                    self.waiting -= 1
                elif which is None or which(t):
                    out.append(t)
                    self.waiting -= 1
                else:
                    keep.append(t)
            q.clear()
            q.extend(keep)
        return out

    def pop_oldest(self) -> Task | None:
        """The oldest unfinished task of the lowest priority in the longest model queue
        (drop_oldest when the main queue is empty)."""
        queues = sorted(self.by_model.values(), key=len, reverse=True)
        for q in queues:
            while q:
                low = q[-1].priority
                if q[0].priority == low:
                    t = q.popleft()
                else:  # the first of the lowest priority, at the back (see _put)
                    i = len(q) - 1
                    while q[i - 1].priority == low:
                        i -= 1
                    t = q[i]
                    del q[i]
                self.waiting -= 1
                if not t.finished:
                    return t
        return None


def _put(q: deque[Task], t: Task, front: bool) -> None:
    """Put *t* in a routed queue by priority: behind the tasks of its priority and higher, or,
    with *front* (tasks taken back from a lost worker), ahead of those of its priority and
    lower. A task does not go ahead of a pinned task that waits before it. With one priority
    (the usual case) this is append or appendleft."""
    p = t.priority
    if front:
        if not q or q[0].priority <= p:
            q.appendleft(t)
            return
        i = 1
        while i < len(q) and q[i].priority > p:
            i += 1
        q.insert(i, t)
        return
    if not q or q[-1].priority >= p:
        q.append(t)
        return
    i = len(q)
    while i > 0:
        prev = q[i - 1]
        if prev.priority >= p or (prev.route is not None and prev.route.pin is not None):
            break
        i -= 1
    q.insert(i, t)


def _can_take(w: WorkerState, model: str | None) -> bool:
    return model is None or model in w.models or model in w.loading
