"""Tasks that wait on purpose: for their rate-limit slot, or for a retry's backoff.

Such a task is in flight for Luigi, yet nothing runs it. Two small pieces
serve it:

- :class:`Pacer` publishes rate-limited tasks when their slot is due: one
  thread for every waiting task, however many there are (a timer thread per
  task would not survive a large DAG);
- :class:`Waits` counts the tasks that wait, cheaply, so the dispatcher can
  leave them out of Luigi's ``--workers`` limit: a family held back by its
  rate limit or by retries must not keep unrelated tasks from being sent.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


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
