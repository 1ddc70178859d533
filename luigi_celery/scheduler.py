"""Luigi's local scheduler, with a ``get_work`` whose cost does not grow with the DAG.

Luigi's ``Scheduler.get_work`` prunes the whole graph, sorts every pending task
and counts every pending task (walking its upstream) on each call, and a run
calls it once per task: a 10,000-task run is quadratic. :class:`FastScheduler`
gives the same answers from bookkeeping it updates as statuses change:

- for each worker, a heap of its tasks whose dependencies are all DONE, by
  Luigi's rank (priority, then the oldest first, then the first created).
  An entry is checked again when it reaches the top, and dropped there if
  it went stale (another worker took the task, say);
- for each task, where in its dependencies the first one not yet DONE is, so
  a task with thousands of them is not rescanned each time one finishes;
- for each worker, the three numbers ``count_pending`` counts;
- a prune at most once a second (or less often when pruning is slow), not on
  every call.

It answers from that bookkeeping only where Luigi's own ``get_work`` takes its
"trivial worker" branch and nothing else is involved: not an assistant, no
task with resources, no batcher, not paused (and, for the counts, no DISABLED
task). Any number of workers may share the scheduler, as on a central one. Everywhere else it calls Luigi's own method,
so those cases are Luigi's by construction. ``tests/test_scheduler.py``
drives this and Luigi's scheduler through the same random histories and
compares every reply, and ``scripts/luigi-scheduler-tests`` runs Luigi's own
scheduler tests against this class.

For ``luigi-celery scheduler`` (scheduler_server.py) it also writes its whole
state as JSON and reads it back (:meth:`FastScheduler.state_json`,
:meth:`FastScheduler.restore_state`), and :data:`CLOCK` lets a replica apply
a call at the time the leader applied it, so both end in the same state.

Like ``dispatch.py`` for the worker, this is the one module that reads the
scheduler's internals: ``_state`` (``_tasks``, ``_status_tasks``,
``_active_workers``, ``_task_batchers``), ``_paused``, ``_resources``, ``_config``,
``_update_worker``, ``_update_priority``, ``_rank``, ``_schedulable``,
``_reset_orphaned_batch_running_tasks`` and ``_update_task_history``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import heapq
import itertools
import time as _time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from luigi import scheduler as luigi_scheduler
from luigi.task_status import DISABLED, DONE, FAILED, PENDING, RUNNING

STATE_VERSION = 1  # of state_json's format


class _Clock:
    """Stands for the ``time`` module here and in ``luigi.scheduler``: while a call is
    applied (see :func:`clock_at`), ``time()`` is the call's moment, so the same calls
    read the same times on every replica."""

    def __init__(self) -> None:
        self.frozen: float | None = None
        self.ids = 0  # uuids made during the call

    def time(self) -> float:
        return _time.time() if self.frozen is None else self.frozen

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


class _Uuids:
    """Stands for the ``uuid`` module in ``luigi.scheduler`` (its message ids): while a call
    is applied, ``uuid4()`` follows from the call's moment, the same on every replica."""

    def uuid4(self) -> uuid.UUID:
        if CLOCK.frozen is None:
            return uuid.uuid4()
        CLOCK.ids += 1
        digest = hashlib.sha256(f"{CLOCK.frozen!r} {CLOCK.ids}".encode()).digest()
        return uuid.UUID(bytes=digest[:16], version=4)

    def __getattr__(self, name: str) -> Any:
        return getattr(uuid, name)


CLOCK = _Clock()
time = CLOCK  # this module's clock, as luigi.scheduler's once install_clock() ran


def install_clock() -> None:
    """Make Luigi's scheduler read :data:`CLOCK`, and make its ids from it (a scheduler server
    does, once)."""
    luigi_scheduler.time = CLOCK  # type: ignore[assignment]
    luigi_scheduler.uuid = _Uuids()  # type: ignore[assignment]


@contextlib.contextmanager
def clock_at(moment: float) -> Iterator[None]:
    """Every scheduler reading of the time inside is ``moment``: applied at the same
    moment, the same calls leave the same state on every replica."""
    CLOCK.frozen, CLOCK.ids = moment, 0
    try:
        yield
    finally:
        CLOCK.frozen = None


PRUNE_EVERY = 1.0  # seconds, at least, between two prunes from get_work
PRUNE_SHARE = 0.05  # and pruning takes at most this share of the time


class _ObservedState(luigi_scheduler.SimpleTaskState):
    """Luigi's task state, telling the scheduler of every change it keeps books on."""

    def __init__(self, state_path: str, on_task: Any, on_workers_removed: Any, on_created: Any) -> None:
        super().__init__(state_path)
        self._on_created = on_created
        self._on_task = on_task
        self._on_workers_removed = on_workers_removed

    def set_status(self, task: Any, new_status: str, config: Any = None) -> None:
        super().set_status(task, new_status, config)
        self._on_task(task.id)

    def inactivate_tasks(self, delete_tasks: Any) -> None:
        super().inactivate_tasks(delete_tasks)
        for task_id in delete_tasks:
            self._on_task(task_id)

    def _remove_workers_from_tasks(self, workers: Any, remove_stakeholders: bool = True) -> None:
        super()._remove_workers_from_tasks(workers, remove_stakeholders)
        self._on_workers_removed()

    def get_task(self, task_id: str, default: Any = None, setdefault: Any = None) -> Any:
        if setdefault is not None and task_id not in self._tasks:
            self._on_created(task_id)
        return super().get_task(task_id, default, setdefault)

    def get_worker(self, worker_id: str) -> Any:
        if worker_id not in self._active_workers:
            worker = super().get_worker(worker_id)
            # Luigi breaks ties in rank by the order of this set: its insertion order, the same
            # on every replica, rather than the order of objects in memory
            worker.tasks = luigi_scheduler.OrderedSet(worker.tasks)
            return worker
        return super().get_worker(worker_id)


class FastScheduler(luigi_scheduler.Scheduler):
    """A drop-in for ``luigi.scheduler.Scheduler`` (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._changed: set[str] = set()  # task ids whose status, deps, workers or priority changed
        self._order: dict[str, int] = {}  # task id -> when it was created: the last tie-break
        self._counter = itertools.count()
        observed = _ObservedState(self._config.state_path, self._task_changed, self._recount, self._created)
        observed._metrics_collector = self._state._metrics_collector
        self._state = observed
        self._reset_bookkeeping()

    def _reset_bookkeeping(self) -> None:
        self._changed.clear()
        self._resources_seen = False  # a task had resources: Luigi's own get_work from then on
        # worker id -> heap of (-priority, time, order, task id) of its ready tasks
        self._ready: defaultdict[str, list[tuple[Any, ...]]] = defaultdict(list)
        self._queued: dict[tuple[str, str], tuple[Any, ...]] = {}  # (worker, task id) -> its live entry
        self._blockers: dict[str, list[Any]] = {}  # task id -> [its deps set, as a list, first not DONE]
        self._dependents: defaultdict[str, set[str]] = defaultdict(set)
        # count_pending's numbers, by worker: PENDING or FAILED tasks it has, those it alone has,
        # those it was the last to add; and what each task adds to them
        self._pending: collections.Counter[str] = collections.Counter()
        self._unique: collections.Counter[str] = collections.Counter()
        self._last: collections.Counter[str] = collections.Counter()
        self._counts: dict[str, tuple[tuple[str, ...], str]] = {}  # task id -> (its workers, the last)
        # and the RUNNING tasks count_pending lists, by worker (a dict: in the order they started)
        self._running: defaultdict[str, dict[str, None]] = defaultdict(dict)
        self._running_for: dict[str, tuple[str, ...]] = {}  # task id -> the workers it is listed for
        self._timed_prune = False  # inside get_work: prune only when one is due
        self._pruned_at = float("-inf")
        self._prune_gap = PRUNE_EVERY
        self._retry_due = float("inf")  # the first time a prune would bring back a FAILED or DISABLED task

    # -- what changes the bookkeeping ---------------------------------------------------------

    def _task_changed(self, task_id: str) -> None:
        self._changed.add(task_id)
        task = self._state.get_task(task_id)
        if task is not None:
            self._retry_due = min(self._retry_due, self._comes_back_at(task))

    def _comes_back_at(self, task: Any) -> float:
        """When a prune would make this FAILED task PENDING, or this DISABLED one FAILED."""
        if task.status == FAILED and self._config.retry_delay >= 0:
            return float(task.retry or time.time() + self._config.retry_delay)
        if task.status == DISABLED and task.scheduler_disable_time is not None:
            return float(task.scheduler_disable_time + self._config.disable_persist)
        return float("inf")

    def _created(self, task_id: str) -> None:
        self._order[task_id] = next(self._counter)

    def add_task(self, *args: Any, **kwargs: Any) -> None:
        super().add_task(*args, **kwargs)
        task_id: str = args[0] if args else kwargs["task_id"]
        task = self._state.get_task(task_id)
        if task is not None and task.resources:
            self._resources_seen = True
        self._changed.add(task_id)

    def _update_priority(self, task: Any, prio: Any, worker: Any) -> None:
        before = task.priority
        super()._update_priority(task, prio, worker)  # recurses through this method for the deps
        if task.priority != before:
            self._changed.add(task.id)

    def prune(self) -> None:
        started = time.time()
        if self._timed_prune and self._pruned_at <= started < min(self._pruned_at + self._prune_gap, self._retry_due):
            return  # not due yet (a clock set back makes it due)
        super().prune()
        self._pruned_at = time.time()
        self._prune_gap = max(PRUNE_EVERY, (self._pruned_at - started) / PRUNE_SHARE)
        waiting = self._state.get_active_tasks_by_status(FAILED, DISABLED)
        self._retry_due = min((self._comes_back_at(task) for task in waiting), default=float("inf"))

    def load(self) -> None:
        super().load()
        self._reset_bookkeeping()
        self._resources_seen = any(task.resources for task in self._state._tasks.values())
        self._order = {task_id: n for n, task_id in enumerate(self._state._tasks)}
        self._counter = itertools.count(len(self._order))
        self._changed.update(self._state._tasks)  # the heaps, the blockers and the counts follow from the tasks
        self._recount()

    # -- the state as JSON (a scheduler server's snapshot; never pickle) ----------------------

    def state_json(self) -> dict[str, Any]:
        """The scheduler's whole state as plain JSON values: :meth:`restore_state` of it
        gives a scheduler that answers every call as this one does."""
        state = self._state
        return {
            "version": STATE_VERSION,
            "tasks": [_plain(vars(task)) for task in state._tasks.values()],
            "by_status": {status: list(tasks) for status, tasks in state._status_tasks.items() if tasks},
            "workers": [
                _plain({**vars(worker), "tasks": [_task_ref(task, state._tasks) for task in worker.tasks]})
                for worker in state._active_workers.values()
            ],
            "batchers": _plain(state._task_batchers),
            "paused": self._paused,
            "resources": self._resources,
            # what decides which code path answers, and when get_work prunes: a restored
            # scheduler must take the same paths, to read the clock as often
            "fast": {"resources_seen": self._resources_seen, "pruned_at": self._pruned_at,
                     "prune_gap": self._prune_gap, "retry_due": self._retry_due},
        }

    def restore_state(self, data: dict[str, Any]) -> None:
        """Replace the state by one :meth:`state_json` wrote (this scheduler's config stays)."""
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"scheduler state of version {data.get('version')!r}; this one reads {STATE_VERSION}")
        state = self._state
        state._tasks = {}
        for fields in data["tasks"]:
            task = object.__new__(luigi_scheduler.Task)
            task.__dict__.update(_unplain(fields))
            state._tasks[task.id] = task
        state._status_tasks = collections.defaultdict(dict)
        for status, task_ids in data["by_status"].items():
            state._status_tasks[status] = {task_id: state._tasks[task_id] for task_id in task_ids}
        state._active_workers = {}
        for fields in data["workers"]:
            worker = object.__new__(luigi_scheduler.Worker)
            worker.__dict__.update(_unplain(fields))
            worker.tasks = luigi_scheduler.OrderedSet(_task_of(ref, state._tasks) for ref in worker.tasks)
            state._active_workers[worker.id] = worker
        state._task_batchers = _unplain(data["batchers"])
        self._paused = data["paused"]
        self._resources = data["resources"]
        self._reset_bookkeeping()
        fast = data["fast"]
        self._resources_seen = fast["resources_seen"]
        self._pruned_at, self._prune_gap, self._retry_due = fast["pruned_at"], fast["prune_gap"], fast["retry_due"]
        self._order = {task_id: n for n, task_id in enumerate(state._tasks)}  # (the order they were created)
        self._counter = itertools.count(len(self._order))
        self._changed.update(state._tasks)  # the heaps, the blockers and the counts follow from the tasks
        self._recount()

    # -- the answers --------------------------------------------------------------------------

    def get_work(self, host: Any = None, assistant: bool = False, current_tasks: Any = None,
                 worker: Any = None, **kwargs: Any) -> Any:  # fmt: skip
        self._timed_prune = True
        try:
            if self._config.prune_on_get_work:
                self.prune()
            worker_id = worker
            if worker_id is None or assistant or not self._trivial(worker_id, self._state.get_worker(worker_id)):
                return super().get_work(
                    host=host, assistant=assistant, current_tasks=current_tasks, worker=worker_id, **kwargs
                )
            self._update_worker(worker_id, worker_reference={"host": host}, get_work=True)
            return self._get_work(worker_id, host, current_tasks)
        finally:
            self._timed_prune = False

    def get_work_many(self, limit: int, current_tasks: Any = None, **kwargs: Any) -> list[Any]:
        """The replies of up to ``limit`` calls of ``get_work`` in a row, by a worker that starts
        each task handed out before it asks again (its ``current_tasks`` grow by each one);
        the last reply is the first with no task, or the ``limit``-th. One call of the worker's
        loop for as many tasks as it has free slots (dispatch.BatchedLoop)."""
        current = list(current_tasks) if current_tasks is not None else None
        replies = []
        for _ in range(max(1, limit)):
            reply = self.get_work(current_tasks=current, **kwargs)
            replies.append(reply)
            if reply["task_id"] is None:
                break
            if current is not None:
                current.append(reply["task_id"])
        return replies

    def count_pending(self, worker: Any) -> Any:
        if not self._counts_for(worker):
            return super().count_pending(worker)
        self._absorb_changes()
        state = self._state
        running = []
        for task_id in self._running[worker]:
            task = state._tasks[task_id]
            other_worker = state.get_worker(task.worker_running)
            if other_worker is not None:
                more_info = {"task_id": task.id, "worker": str(other_worker)}
                more_info.update(other_worker.info)
                running.append(more_info)
        return {
            "n_pending_tasks": self._pending[worker],
            "n_unique_pending": self._unique[worker],
            "n_pending_last_scheduled": self._last[worker],
            "worker_state": state.get_worker(worker).state,
            "running_tasks": running,
        }

    def _counts_for(self, worker_id: str) -> bool:
        """Whether the books count for this worker: an enabled one, whose tasks are those that
        name it (a disabled worker's were taken from it), and no DISABLED task to look behind."""
        worker = self._state._active_workers.get(worker_id)
        return bool(worker is not None and worker.enabled and not self._state._status_tasks[DISABLED])

    def _trivial(self, worker_id: str, worker: Any) -> bool:
        """Luigi's trivial-worker branch, and no batcher: what _get_work answers for."""
        if self._paused or self._resources_seen:
            return False
        return bool(worker.enabled and not worker.assistant and not self._state._task_batchers.get(worker_id))

    def _get_work(self, worker_id: str, host: Any, current_tasks: Any) -> dict[str, Any]:
        """Luigi's get_work in its trivial-worker branch, with no batcher (its code, shortened)."""
        best_task = None
        if current_tasks is not None:
            ct_set = set(current_tasks)
            for task in sorted(self._state.get_active_tasks_by_status(RUNNING), key=self._rank):
                if task.worker_running == worker_id and task.id not in ct_set:
                    best_task = task
            self._reset_orphaned_batch_running_tasks(worker_id)
        if best_task is None:
            best_task = self._best_ready(worker_id)

        reply = self.count_pending(worker_id)
        if best_task is None:
            reply["task_id"] = None
            return reply
        self.update_metrics_task_started(best_task)
        self._state.set_status(best_task, RUNNING, self._config)
        best_task.worker_running = worker_id
        best_task.resources_running = best_task.resources.copy()
        best_task.time_running = time.time()
        self._update_task_history(best_task, RUNNING, host=host)
        reply["task_id"] = best_task.id
        reply["task_family"] = best_task.family
        reply["task_module"] = getattr(best_task, "module", None)
        reply["task_params"] = best_task.params
        return reply

    def _best_ready(self, worker_id: str) -> Any:
        """The highest-ranked PENDING task of the worker whose dependencies are all DONE."""
        self._absorb_changes()
        ready = self._ready.get(worker_id)
        while ready:
            entry = ready[0]
            task_id = entry[-1]
            if self._queued.get((worker_id, task_id)) is not entry:
                heapq.heappop(ready)  # superseded by a newer entry of the same task
                continue
            task = self._state.get_task(task_id)
            if (task is not None and task.status == PENDING and worker_id in task.workers
                    and self._key(task) == entry[:-1] and self._schedulable(task)):  # fmt: skip
                return task
            heapq.heappop(ready)
            del self._queued[(worker_id, task_id)]
            if task is not None and task.status == PENDING and task_id in self._blockers:
                self._blockers[task_id][2] = 0  # a dependency went back from DONE: look again from the start
        return None

    # -- the bookkeeping ----------------------------------------------------------------------

    def _absorb_changes(self) -> None:
        get_task = self._state.get_task
        while self._changed:
            task_id = self._changed.pop()
            task = get_task(task_id)
            self._count(task_id, task)
            if task is None:
                self._blockers.pop(task_id, None)  # pruned
                continue
            if task.status == PENDING:
                self._consider(task)
            elif task.status == DONE:
                for dependent_id in self._dependents.get(task_id, ()):
                    dependent = get_task(dependent_id)
                    if dependent is not None and dependent.status == PENDING:
                        self._consider(dependent)

    def _consider(self, task: Any) -> None:
        """Queue a PENDING task for each of its workers if its dependencies are all DONE (or
        requeue it at a new rank)."""
        if not self._deps_done(task):
            return
        entry = (*self._key(task), task.id)
        for worker_id in task.workers:
            if self._queued.get((worker_id, task.id)) != entry:
                self._queued[(worker_id, task.id)] = entry
                heapq.heappush(self._ready[worker_id], entry)

    def _key(self, task: Any) -> tuple[Any, ...]:
        return (-task.priority, task.time, self._order[task.id])

    def _deps_done(self, task: Any) -> bool:
        blocker = self._blockers.get(task.id)
        deps = task.deps or ()
        if blocker is None or blocker[0] is not deps or len(blocker[1]) != len(deps):
            blocker = self._blockers[task.id] = [deps, list(deps), 0]
            for dep in blocker[1]:
                self._dependents[dep].add(task.id)
        _, ordered, i = blocker
        while i < len(ordered):
            dep = self._state.get_task(ordered[i])
            if dep is None or dep.status != DONE:
                break
            i += 1
        blocker[2] = i
        return i == len(ordered)

    def _count(self, task_id: str, task: Any) -> None:
        """Take the task's share out of count_pending's numbers and list of running tasks, and
        put its new share in."""
        before = self._counts.pop(task_id, None)
        if before is not None:
            workers, last = before
            self._pending.subtract(workers)
            if len(workers) == 1:
                self._unique[workers[0]] -= 1
            self._last[last] -= 1
        for worker_id in self._running_for.pop(task_id, ()):
            self._running[worker_id].pop(task_id, None)
        if task is not None and task.status == RUNNING and task.workers:
            self._running_for[task_id] = tuple(task.workers)
            for worker_id in task.workers:
                self._running[worker_id][task_id] = None
        if task is not None and task.status in (PENDING, FAILED) and task.workers:
            workers, last = tuple(task.workers), task.workers.peek(last=True)
            self._counts[task_id] = (workers, last)
            self._pending.update(workers)
            if len(workers) == 1:
                self._unique[workers[0]] += 1
            self._last[last] += 1

    def _recount(self) -> None:
        """After workers left tasks (pruned or disabled): count again, and forget the heaps of
        workers that are gone."""
        self._pending.clear()
        self._unique.clear()
        self._last.clear()
        self._counts.clear()
        self._running.clear()
        self._running_for.clear()
        for task in self._state.get_active_tasks_by_status(PENDING, FAILED, RUNNING):
            self._count(task.id, task)
        active = self._state._active_workers
        for worker_id in [worker_id for worker_id in self._ready if worker_id not in active]:
            del self._ready[worker_id]
        self._queued = {key: entry for key, entry in self._queued.items() if key[0] in active}


# -- state_json's encoding of the types Luigi's state holds beyond JSON's -------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {_str_key(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, luigi_scheduler.RetryPolicy):
        return {"~retry_policy": list(value)}
    if isinstance(value, tuple):
        return {"~tuple": [_plain(item) for item in value]}
    if isinstance(value, luigi_scheduler.OrderedSet):
        return {"~ordered_set": [_plain(item) for item in value]}
    if isinstance(value, (set, frozenset)):
        return {"~set": sorted(_plain(item) for item in value)}
    if isinstance(value, collections.deque):
        return {"~deque": [_plain(item) for item in value], "maxlen": value.maxlen}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"the scheduler's state holds a {type(value).__name__}, which its JSON state does not know")


def _task_ref(task: Any, tasks: dict[str, Any]) -> str | dict[str, Any]:
    """A worker's task: its id, or, for one pruned from the state since (Luigi keeps it in
    the worker's set), the whole task."""
    task_id = str(task.id)
    return task_id if tasks.get(task_id) is task else {"~detached": vars(task)}


def _task_of(ref: Any, tasks: dict[str, Any]) -> Any:
    if isinstance(ref, str):
        return tasks[ref]
    task = object.__new__(luigi_scheduler.Task)
    task.__dict__.update(ref["~detached"])
    return task


def _str_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"the scheduler's state holds a {type(key).__name__} key, which JSON cannot keep")
    return key


def _unplain(value: Any) -> Any:
    if isinstance(value, list):
        return [_unplain(item) for item in value]
    if not isinstance(value, dict):
        return value
    if "~retry_policy" in value:
        return luigi_scheduler.RetryPolicy(*value["~retry_policy"])
    if "~tuple" in value:
        return tuple(_unplain(item) for item in value["~tuple"])
    if "~ordered_set" in value:
        return luigi_scheduler.OrderedSet(_unplain(item) for item in value["~ordered_set"])
    if "~set" in value:
        return {_unplain(item) for item in value["~set"]}
    if "~deque" in value:
        return collections.deque((_unplain(item) for item in value["~deque"]), value["maxlen"])
    return {key: _unplain(item) for key, item in value.items()}
