"""Run locks on the worker: one per task while it runs, kept alive by a heartbeat.

A worker takes a task's run lock in the coordination store before running it; a
second delivery of the same task finds it held and does not run. One thread per
process refreshes every lock the process holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from luigi_celery import message as m
from luigi_celery.store import Lease, Store, died_here, owner_here

logger = logging.getLogger(__name__)

# The heartbeat refreshes a run lock this many times per lock TTL.
HEARTBEATS_PER_TTL = 6


@dataclasses.dataclass
class _Held:
    """A run lock this process holds, and what it takes to take it again."""

    store: Store
    task_id: str
    owner: str
    ttl: float
    run_id: str
    celery_id: str
    due: float  # the next beat, on the monotonic clock


class _Heartbeats:
    """Keeps alive every run lock this process holds, from one thread.

    A thread per task cost as much as the lock itself; this one is started on
    first use in each process (a forked pool child starts its own).  A lock the
    store lost while its task runs (a restart without persistence, a flush) is
    taken again at the next beat, unless another worker took the task meanwhile.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[int, str], _Held] = {}  # by (store, task id)
        self._changed = threading.Condition()
        self._pid: int | None = None

    def hold(self, store: Store, task_id: str, owner: str, ttl: float, run_id: str, celery_id: str) -> None:
        with self._changed:
            due = time.monotonic() + ttl / HEARTBEATS_PER_TTL
            self._held[(id(store), task_id)] = _Held(store, task_id, owner, ttl, run_id, celery_id, due)
            if self._pid != os.getpid():  # first use in this process
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="luigi-celery-heartbeats", daemon=True).start()
            self._changed.notify()

    def drop(self, store: Store, task_id: str) -> None:
        with self._changed:
            self._held.pop((id(store), task_id), None)

    def _still_held(self, held: _Held) -> bool:
        """False once the task has ended and let its lock go (or a later one holds it)."""
        with self._changed:
            return self._held.get((id(held.store), held.task_id)) is held

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                due = [held for held in self._held.values() if held.due <= now]
                if not due:
                    soonest = min((held.due for held in self._held.values()), default=None)
                    self._changed.wait(None if soonest is None else soonest - now)
                    continue
                for held in due:
                    held.due = now + held.ttl / HEARTBEATS_PER_TTL
            for held in due:
                self._beat(held)

    def _beat(self, held: _Held) -> None:
        try:
            if held.store.refresh(held.task_id, held.owner, held.ttl) or not self._still_held(held):
                return
            holder = held.store.retake(held.task_id, held.owner, held.ttl, held.run_id, held.celery_id)
        except Exception as e:  # the store is away for a moment: try again next beat
            logger.warning("could not refresh the run lock of %s: %s", held.task_id, e)
            return
        if holder is None:
            if self._still_held(held):
                logger.warning(
                    "took the run lock of %s again: it had vanished from the coordination store (restarted "
                    "without its data, flushed, or away longer than the lock TTL) and no other worker had taken it",
                    held.task_id,
                )
                return
            try:  # the task ended while its lock was taken again: let it go
                held.store.release(held.task_id, held.owner)
            except Exception as e:  # it expires by itself
                logger.warning("could not release the run lock of %s: %s", held.task_id, e)
            return
        with self._changed:
            lost = self._held.get((id(held.store), held.task_id)) is held
            if lost:
                del self._held[(id(held.store), held.task_id)]
        if lost:
            logger.error("lost the run lock of %s: another worker may start it (%s holds it)", held.task_id, holder)


_heartbeats = _Heartbeats()


@contextlib.contextmanager
def run_lock(
    store: Store | None, msg: m.TaskMessage, ttl: float, run_over: Callable[[m.TaskMessage], bool] | None = None
) -> Iterator[Lease]:
    """Hold the run lock of ``msg``'s task while the block runs.

    Yields a :class:`Lease` whose ``holder`` is None when the lock is ours,
    whose ``seen_before`` says this very Celery id started before (a repeat),
    and whose ``ended`` says the dispatcher that sent it has closed its run, so
    it must not run at all.  Without a store (the embedded mode, RabbitMQ with
    no Redis configured) there is no lock: the broker's redelivery and the
    complete() check are the guard, and ``run_over`` (if given) tells whether
    the run is over.
    """
    if store is None:
        yield Lease(None, False, ended=run_over is not None and run_over(msg))
        return
    owner = owner_here(msg.celery_id)
    lease = store.acquire(msg.task_id, owner, ttl, msg.run_id, msg.celery_id, msg.session)
    if lease.ended:
        yield lease
        return
    if lease.holder is not None and died_here(lease.holder):
        # A process of this machine held it and is gone (a pool child killed, or
        # out of memory): take over now instead of waiting for the lock to expire.
        logger.warning("taking over %s from %s, which died", msg.task_id, lease.holder)
        store.release(msg.task_id, lease.holder)
        lease = store.acquire(msg.task_id, owner, ttl, msg.run_id, msg.celery_id, msg.session)
    if lease.holder is not None:
        logger.warning("not running %s: it is already running as %s", msg.celery_id, lease.holder)
        yield lease
        return
    _heartbeats.hold(store, msg.task_id, owner, ttl, msg.run_id, msg.celery_id)
    try:
        yield lease
    finally:
        _heartbeats.drop(store, msg.task_id)
        try:
            store.release(msg.task_id, owner)
        except Exception as e:  # it expires by itself
            logger.warning("could not release the run lock of %s: %s", msg.task_id, e)
