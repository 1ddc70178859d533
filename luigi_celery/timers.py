"""Call a function a moment from now, from one thread per process.

A thread per call (``threading.Timer``) costs about as much as a short task's
whole bookkeeping; one thread with a heap of due times costs a push and a
pop.  The thread starts on first use in each process, so a forked pool child
starts its own.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Timer:
    """One call to come; :meth:`Timers.cancel` it before it is due and it never happens."""

    __slots__ = ("fn", "cancelled")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.cancelled = False


class Timers:
    def __init__(self) -> None:
        self._due: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._pid: int | None = None

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Call ``fn`` in about ``delay`` seconds (in this module's thread; an error is logged)."""
        timer = Timer(fn)
        with self._changed:
            if self._pid != os.getpid():  # first use in this process
                self._pid = os.getpid()
                self._due = []
                threading.Thread(target=self._run, name="luigi-celery-timers", daemon=True).start()
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), timer))
            self._changed.notify()
        return timer

    def cancel(self, timer: Timer) -> None:
        timer.cancelled = True  # (left in the heap: dropped when it comes due)

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                if not self._due or self._due[0][0] > now:
                    self._changed.wait(None if not self._due else self._due[0][0] - now)
                    continue
                _, _, timer = heapq.heappop(self._due)
            if not timer.cancelled:
                try:
                    timer.fn()
                except Exception:
                    logger.exception("a timed call failed")
