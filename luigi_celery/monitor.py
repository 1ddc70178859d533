"""Watch what is in flight: re-publish lost tasks, fail tasks no worker will take.

Every ``interval`` seconds, in one round trip to the coordination store, the
monitor learns which tasks in flight have started and which still hold a
live run lock:

- a task that started, whose lock then expired (its worker stopped beating)
  and whose reply has not come within ``grace`` is **lost**: it is published
  again under a new attempt.  So is a task a worker said it holds for a
  countdown (a retry, a rate slot) that has not started once the hold is over:
  a worker that lost its broker connection meanwhile dropped it;
- a task that has not started after ``queue_timeout`` seconds is failed with
  a message naming its queue when no worker consumes that queue.  When some
  worker does, the pool may just be busy, or a worker may have died holding
  the message before starting it (on Redis it would come back only after the
  visibility timeout): with a store, the task is published again (the run
  lock and the complete() check make the copy harmless); without one, its
  clock starts again.

After the store was away, or lost its data (the dispatcher's own run claim
vanished), the locks it shows say nothing yet: live workers take theirs again
at their next heartbeat.  So for a full lease from the moment it answers
again, the monitor records what it sees but calls nothing lost and nothing
waited too long.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import luigi

from luigi_celery import message as m
from luigi_celery.settings import DEFAULT_LOCK_TTL
from luigi_celery.store import Store

logger = logging.getLogger(__name__)

CHECK_INTERVAL = 5.0


class Flight(Protocol):
    """One Luigi task on its way to a worker, as the sender sees it."""

    task: luigi.Task
    worker_timeout: float | None
    # Luigi's [worker] settings as they were when Luigi started the task
    check_unfulfilled_deps: bool
    check_complete_on_run: bool
    cache_task_completion: bool

    def on_result(self, result: m.ResultMessage) -> None: ...

    def on_status(self, status: m.StatusMessage) -> None: ...


@dataclass
class Tracked:
    """One task in flight, over all the attempts this run made at it."""

    flight: Flight
    msg: m.TaskMessage  # the latest attempt
    queue: str
    publish_options: dict[str, Any]
    waiting_since: float = field(default_factory=time.monotonic)
    started: bool = False
    lock_gone_since: float | None = None
    celery_ids: list[str] = field(default_factory=list)
    # A worker holds it for a countdown (a retry, a rate slot) and promised to start it
    # by then (0: no promise).
    hold_until: float = 0.0


@dataclass
class Verdicts:
    lost: list[Tracked] = field(default_factory=list)
    waited_too_long: list[Tracked] = field(default_factory=list)


def judge(
    tracked: list[Tracked],
    locks: list[bool],
    started: list[bool],
    now: float,
    grace: float,
    queue_timeout: float | None,
    settle_until: float = 0.0,
) -> Verdicts:
    """Update ``tracked`` with what the store says and sort out the lost and the waiting.

    ``locks[i]`` says whether ``tracked[i]``'s task holds a live run lock;
    ``started[i]`` whether any of its attempts has started.  Before
    ``settle_until`` (the store has just come back) there are no verdicts.
    """
    verdicts = Verdicts()
    settling = now < settle_until
    for t, lock, has_started in zip(tracked, locks, started, strict=True):
        if now < t.hold_until:
            t.lock_gone_since = None
            continue
        t.started = t.started or has_started or lock or t.hold_until > 0
        if not t.started:
            if not settling and queue_timeout is not None and now - t.waiting_since > queue_timeout:
                verdicts.waited_too_long.append(t)
        elif lock:
            t.lock_gone_since = None
        elif t.lock_gone_since is None:
            t.lock_gone_since = now  # its reply may be on the way: give it a moment
        elif not settling and now - t.lock_gone_since >= grace:
            verdicts.lost.append(t)
    return verdicts


class Monitor(threading.Thread):
    """Runs :func:`judge` every ``interval`` seconds and acts on the verdicts.

    ``lease`` is the run locks' TTL: after the store was away or lost its data,
    verdicts wait that long, and one more check, from when it answers again.
    """

    def __init__(
        self,
        run_id: str,
        store: Store | None,
        snapshot: Callable[[], list[Tracked]],
        republish: Callable[[Tracked], None],
        fail: Callable[[Tracked, str], None],
        consumed_queues: Callable[[], set[str] | None],
        queue_timeout: float | None,
        interval: float = CHECK_INTERVAL,
        on_check: Callable[[], None] = lambda: None,
        lease: float = DEFAULT_LOCK_TTL,
    ) -> None:
        super().__init__(name="luigi-celery-monitor", daemon=True)
        self._run_id = run_id
        self._store = store
        self._snapshot = snapshot
        self._republish = republish
        self._fail = fail
        self._consumed_queues = consumed_queues
        self._queue_timeout = queue_timeout
        self._interval = interval
        self._on_check = on_check
        self._settle_for = lease + interval
        self._settle_until = 0.0
        self._store_away = False  # a check failed: settle once the store answers again
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self._on_check()
                self.check()
            except Exception as e:  # the store or the broker is away: try again next time
                self._store_away = self._store is not None
                logger.warning("could not check the tasks in flight: %s", e)

    def settle(self) -> None:
        """The store has just answered after losing its data or being away: give live
        workers a full lease to take their locks again before calling any task lost."""
        self._store_away = False
        self._settle_until = time.monotonic() + self._settle_for
        logger.warning(
            "the coordination store lost its data or was away: no task is called lost for %g s, "
            "while running tasks take their locks again", self._settle_for
        )  # fmt: skip

    def check(self) -> None:
        tracked = self._snapshot()
        if not tracked:
            return
        if self._store is not None:
            locks, started = self._store.status(
                self._run_id, [t.msg.task_id for t in tracked], [cid for t in tracked for cid in t.celery_ids]
            )
            if self._store_away:  # it answers again
                self.settle()
            started_by_task, i = [], 0
            for t in tracked:
                started_by_task.append(any(started[i : i + len(t.celery_ids)]))
                i += len(t.celery_ids)
        else:  # no store: nothing is known to have started; the queue check still works
            locks, started_by_task = [False] * len(tracked), [False] * len(tracked)
        now = time.monotonic()
        verdicts = judge(tracked, locks, started_by_task, now, self._interval, self._queue_timeout, self._settle_until)
        for t in verdicts.lost:
            logger.warning("%s stopped beating on its worker; publishing it again", t.msg.task_id)
            self._republish(t)
        if verdicts.waited_too_long:
            self._handle_waiting(verdicts.waited_too_long)

    def _handle_waiting(self, waiting: list[Tracked]) -> None:
        consumed = self._consumed_queues()
        if consumed is None:
            return  # could not ask the workers; ask again next time
        for t in waiting:
            if t.queue in consumed:
                if self._store is not None:
                    logger.info("%s has not started on served queue %r; publishing it again", t.msg.task_id, t.queue)
                    self._republish(t)
                else:
                    t.waiting_since = time.monotonic()
            else:
                self._fail(
                    t,
                    f"{t.msg.task_id} was not picked up within {self._queue_timeout:g} s: "
                    f"no worker consumes queue {t.queue!r} (start one with: luigi-celery worker -Q {t.queue} ...)",
                )
