"""The coordination store: run locks with a heartbeat, and start marks.

A worker takes the run lock of a Luigi task before running it and keeps it
alive with a heartbeat; a second delivery of the same task (a redelivered
message, a re-published attempt) finds the lock held and does not run.  The
dispatcher reads, in bulk, which of its tasks have started and which locks
are still alive: a started task whose lock expired without a result ran on a
worker that died, and is published again.  A store may also lose its data (a
restart without persistence, a flush): a live worker then takes its lock again,
and only if nobody else took it meanwhile.

Two implementations with the same semantics: :class:`~luigi_celery.store_redis.RedisStore`
(atomic Lua scripts, expiry on the Redis server's clock) and :class:`MemoryStore`
(one process; for tests and single-process use), here.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import NamedTuple, Protocol

from luigi_celery.brokers import redis_store_url  # noqa: F401  (its home was here: importers may still look here)

KEY_PREFIX = "luigi-celery:"
# Start marks of a run live this long after the last one (a run longer than that
# keeps them alive by starting tasks).
START_MARK_TTL = 7 * 24 * 3600
def lock_key(task_id: str) -> str:
    return f"{KEY_PREFIX}lock:{task_id}"


def run_key(run_id: str) -> str:
    """The claim of the dispatcher running ``run_id`` (a Luigi task id never contains ':')."""
    return f"{KEY_PREFIX}dispatcher:{run_id}"


def starts_key(run_id: str) -> str:
    return f"{KEY_PREFIX}started:{run_id}"


def ended_key(session: str) -> str:
    """Set once the dispatcher ``session`` has closed its run (or was interrupted)."""
    return f"{KEY_PREFIX}ended:{session}"


class Lease(NamedTuple):
    """The answer to asking for a run lock."""

    holder: str | None  # None: the lock is ours; else who holds it
    seen_before: bool  # this Celery id had started before (a repeat delivery)
    ended: bool = False  # the dispatcher that sent it has closed its run: do not run it (no lock taken)


class Store(Protocol):
    """What luigi-celery keeps in the coordination store."""

    def acquire(
        self, task_id: str, owner: str, ttl: float, run_id: str, celery_id: str, session: str | None = None
    ) -> Lease:
        """Take the run lock of ``task_id`` and mark ``celery_id`` started.

        When the lock is already held, change nothing and name the holder; when the
        dispatcher ``session`` has ended its run, change nothing and say so.
        """

    def refresh(self, task_id: str, owner: str, ttl: float) -> bool:
        """Extend the lock if ``owner`` still holds it; False when it was lost."""

    def retake(self, task_id: str, owner: str, ttl: float, run_id: str, celery_id: str) -> str | None:
        """Take the lock ``owner`` held again, unless someone else has it; mark ``celery_id`` started.

        For a live worker whose lock vanished (the store restarted empty, was flushed, or
        was away longer than the TTL). ``owner`` is unique to one attempt in one process,
        so this succeeds only while nobody else took the task meanwhile. Returns None when
        the lock is ``owner``'s (again), else the other holder; then nothing changes.
        """

    def release(self, task_id: str, owner: str) -> None:
        """Drop the lock if ``owner`` holds it."""

    def status(self, run_id: str, task_ids: list[str], celery_ids: list[str]) -> tuple[list[bool], list[bool]]:
        """(lock held, per task id), (started, per celery id), in one round trip."""

    def claim_run(self, run_id: str, owner: str, ttl: float) -> str | None:
        """Become the dispatcher of ``run_id``; None, or the dispatcher that already is."""

    def refresh_run(self, run_id: str, owner: str, ttl: float) -> bool: ...

    def release_run(self, run_id: str, owner: str) -> None: ...

    def started(self, run_id: str) -> list[str]:
        """Every Celery id of ``run_id`` that a worker has started."""

    def forget_run(self, run_id: str) -> None:
        """Drop the start marks of a run that is over."""

    def end_session(self, session: str) -> None:
        """Record that the dispatcher ``session`` is gone for good (its run ended or was
        interrupted): workers drop whatever it sent that is still on a queue."""


class MemoryStore:
    """The in-process twin of :class:`RedisStore` (same semantics, monotonic clock)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[str, float]] = {}
        self._started: dict[str, set[str]] = {}
        self._ended: set[str] = set()
        self._lock = threading.Lock()

    def _holder(self, task_id: str) -> str | None:
        held = self._locks.get(task_id)
        if held is None or held[1] <= time.monotonic():
            self._locks.pop(task_id, None)
            return None
        return held[0]

    def acquire(
        self, task_id: str, owner: str, ttl: float, run_id: str, celery_id: str, session: str | None = None
    ) -> Lease:
        with self._lock:
            if session is not None and session in self._ended:
                return Lease(None, False, ended=True)
            holder = self._holder(task_id)
            if holder is not None:
                return Lease(holder, False)
            self._locks[task_id] = (owner, time.monotonic() + ttl)
            started = self._started.setdefault(run_id, set())
            seen = celery_id in started
            started.add(celery_id)
            return Lease(None, seen)

    def refresh(self, task_id: str, owner: str, ttl: float) -> bool:
        with self._lock:
            if self._holder(task_id) != owner:
                return False
            self._locks[task_id] = (owner, time.monotonic() + ttl)
            return True

    def retake(self, task_id: str, owner: str, ttl: float, run_id: str, celery_id: str) -> str | None:
        with self._lock:
            holder = self._holder(task_id)
            if holder is not None and holder != owner:
                return holder
            self._locks[task_id] = (owner, time.monotonic() + ttl)
            self._started.setdefault(run_id, set()).add(celery_id)
            return None

    def release(self, task_id: str, owner: str) -> None:
        with self._lock:
            if self._holder(task_id) == owner:
                del self._locks[task_id]

    def status(self, run_id: str, task_ids: list[str], celery_ids: list[str]) -> tuple[list[bool], list[bool]]:
        with self._lock:
            started = self._started.get(run_id, set())
            return [self._holder(t) is not None for t in task_ids], [c in started for c in celery_ids]

    # A run's claim is a lock like a task's, under a key no task id can take.
    def claim_run(self, run_id: str, owner: str, ttl: float) -> str | None:
        with self._lock:
            holder = self._holder(run_key(run_id))
            if holder is None:
                self._locks[run_key(run_id)] = (owner, time.monotonic() + ttl)
            return holder

    def refresh_run(self, run_id: str, owner: str, ttl: float) -> bool:
        return self.refresh(run_key(run_id), owner, ttl)

    def release_run(self, run_id: str, owner: str) -> None:
        self.release(run_key(run_id), owner)

    def started(self, run_id: str) -> list[str]:
        with self._lock:
            return sorted(self._started.get(run_id, set()))

    def forget_run(self, run_id: str) -> None:
        with self._lock:
            self._started.pop(run_id, None)

    def end_session(self, session: str) -> None:
        with self._lock:
            self._ended.add(session)


def owner_here(name: str) -> str:
    """An owner string for a lock or claim taken by this process: name|host|pid."""
    return f"{name}|{socket.gethostname()}|{os.getpid()}"


def died_here(holder: str) -> bool:
    """True when ``holder`` (name|host|pid) was a process of this host that no longer exists."""
    parts = holder.rsplit("|", 2)  # a name (a Celery id) may contain "|", a host name does not
    if len(parts) != 3 or parts[1] != socket.gethostname() or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, as another user
    return False
