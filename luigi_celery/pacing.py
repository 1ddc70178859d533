"""The dispatcher's part of rate limits, and the tasks that wait on purpose.

A task of a rate-limited family gets its start slot reserved before it is
published, and is published when the slot is due (:class:`RatePacing`, a
:class:`~luigi_celery.hooks.DispatchHook`); the worker checks the slot where
the task starts (:func:`luigi_celery.ratelimit.gate`). A task waiting for its
slot, or for a retry's backoff, is in flight for Luigi, yet nothing runs it.
Two more small pieces serve those:

- :class:`Pacer` publishes rate-limited tasks when their slot is due: one
  thread for every waiting task, however many there are (a timer thread per
  task would not survive a large DAG);
- :class:`Waits` counts the tasks that wait, cheaply, so the dispatcher can
  leave them out of Luigi's ``--workers`` limit: a family held back by its
  rate limit or by retries must not keep unrelated tasks from being sent.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from luigi_celery.errors import LuigiCeleryError
from luigi_celery.hooks import DispatchHook
from luigi_celery.options import task_options
from luigi_celery.ratelimit import Limiter, MemoryLimiter

if TYPE_CHECKING:
    from luigi_celery.monitor import Tracked

logger = logging.getLogger(__name__)


class RatePacing(DispatchHook):
    """Reserve each rate-limited task's start slot before it is published, and hold it until due.

    Workers then get rate-limited tasks spread out, not in a burst. The slot
    travels with the task (with a ``limiter`` shared with the workers); a worker
    the task reaches late takes a new one. Without a shared limiter (RabbitMQ with
    no store) this dispatcher paces its own tasks only, and says so once.
    """

    def __init__(self, limiter: Limiter | None) -> None:
        self._limiter: Limiter = limiter if limiter is not None else MemoryLimiter()
        self._shared = limiter is not None
        self._warned_unshared = False

    def before_publish(self, tracked: Tracked) -> float:
        task = tracked.flight.task
        options = task_options(type(task))
        if options.rate is None:
            return 0.0
        try:
            wait, slot = self._limiter.reserve(options.rate_key, options.rate)
        except LuigiCeleryError as e:
            raise LuigiCeleryError(f"could not reserve a rate-limit slot for {task.task_id}: {e}") from e
        if self._shared:
            tracked.msg = dataclasses.replace(tracked.msg, rate_slot=slot)
        elif not self._warned_unshared:
            self._warned_unshared = True
            logger.warning(
                "%s has a rate limit, but no coordination store is configured: this dispatcher paces its "
                "own tasks only, and workers do not check it (set LUIGI_CELERY_REDIS_URL for a global limit)",
                task.task_family,
            )
        return wait


class Waits:
    """Which keys wait until when; :meth:`count` drops the ones whose wait is over.

    Not thread-safe: the caller holds its own lock.
    """

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        # (until, key); an entry whose key was dropped or set again is skipped when it comes up
        self._heap: list[tuple[float, str]] = []

    def set(self, key: str, until: float) -> None:
        self._until[key] = until
        heapq.heappush(self._heap, (until, key))

    def drop(self, key: str) -> None:
        self._until.pop(key, None)

    def count(self, now: float) -> int:
        """How many keys still wait at ``now`` (amortized O(log n))."""
        while self._heap and self._heap[0][0] <= now:
            until, key = heapq.heappop(self._heap)
            if self._until.get(key) == until:
                del self._until[key]
        return len(self._until)


class Pacer(threading.Thread):
    """Calls ``fire(item)`` for each item at the monotonic time it was scheduled for."""

    def __init__(self, fire: Callable[[Any], None], clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name="luigi-celery-pacer", daemon=True)
        self._fire = fire
        self._now = clock
        self._due: list[tuple[float, int, Any]] = []
        self._order = itertools.count()  # items due at the same moment go in the order given
        self._changed = threading.Condition()
        self._stopping = False

    def at(self, when: float, item: Any) -> None:
        with self._changed:
            heapq.heappush(self._due, (when, next(self._order), item))
            self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()

    def run(self) -> None:
        while True:
            with self._changed:
                while not self._stopping and (not self._due or self._due[0][0] > self._now()):
                    self._changed.wait(self._due[0][0] - self._now() if self._due else None)
                if self._stopping:
                    return
                _, _, item = heapq.heappop(self._due)
            try:
                self._fire(item)
            except Exception:  # one task's failure to go out must not stop the others
                logger.exception("could not send a paced task")
