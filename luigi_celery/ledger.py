"""The dispatcher's ledger: every attempt in flight, and every attempt this run ever sent.

One lock guards it all; Luigi's thread (publishing), the watcher thread
(replies), the pacer and the monitor all go through these methods. The ledger
decides nothing about the broker: it answers "is this reply for us, and for
which task", "which attempt is this", "how many tasks wait on purpose".
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import threading
import time

from luigi_celery import message as m
from luigi_celery.monitor import Tracked
from luigi_celery.pacing import Waits


class Route(enum.Enum):
    """What a reply is, for the run (see :meth:`Ledger.route`)."""

    FORGED = "no attempt this run sent or adopted has its id"
    STALE = "its task is no longer in flight"
    EARLY = "an earlier dispatcher's attempt, for a task Luigi has not asked for yet"
    RESULT = "how an attempt in flight ended"
    HOLD = "an attempt in flight waits on purpose"
    STATUS = "a status update of an attempt in flight"


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # every Celery id of every attempt still in flight -> its task's record
        self._in_flight: dict[str, Tracked] = {}
        self._attempts: collections.Counter[str] = collections.Counter()
        # Every Celery id this run published or adopted: a reply for any other id was not
        # asked for (forged, or another run's).
        self._issued: set[str] = set()
        # task digest -> Celery ids an earlier dispatcher of this run saw started
        self._adoptable: dict[str, list[str]] = {}
        # replies that came for adoptable ids before Luigi asked for their task
        self._early: dict[str, m.ResultMessage] = {}
        # tasks waiting on purpose (a rate slot, a retry's backoff), by Luigi task id
        self._waits = Waits()

    # --- attempts ------------------------------------------------------------

    def new_attempt(self, tracked: Tracked) -> str:
        """Give ``tracked`` its next attempt (a fresh token) and register it; return its Celery id.

        Registered before it is published: a fast worker can reply before publish() returns."""
        task_id = tracked.msg.task_id
        with self._lock:
            self._attempts[task_id] += 1
            tracked.msg = dataclasses.replace(tracked.msg, attempt=self._attempts[task_id], token=m.new_token())
            celery_id = tracked.msg.celery_id
            tracked.celery_ids.append(celery_id)
            self._issued.add(celery_id)
            self._in_flight[celery_id] = tracked
        return celery_id

    def wait(self, task_id: str, until: float) -> None:
        with self._lock:
            self._waits.set(task_id, until)

    def is_current(self, tracked: Tracked, celery_id: str) -> bool:
        """True while ``celery_id`` is an attempt of ``tracked`` in flight (not answered, revoked or failed)."""
        with self._lock:
            return self._in_flight.get(celery_id) is tracked

    def in_flight(self, tracked: Tracked) -> bool:
        with self._lock:
            return tracked.msg.celery_id in self._in_flight

    def take(self, tracked: Tracked) -> bool:
        """Drop every attempt of ``tracked``; False when it had been answered already."""
        with self._lock:
            if tracked.msg.celery_id not in self._in_flight:
                return False
            self._forget(tracked)
            return True

    def take_flight(self, flight: object) -> Tracked | None:
        """Drop and return the task in flight for ``flight``, if any."""
        with self._lock:
            tracked = next((t for t in self._in_flight.values() if t.flight is flight), None)
            if tracked is not None:
                self._forget(tracked)
            return tracked

    def current(self, flight: object) -> m.TaskMessage | None:
        """The latest attempt of ``flight``'s task in flight, if it is in flight."""
        with self._lock:
            return next((t.msg for t in self._in_flight.values() if t.flight is flight), None)

    def snapshot(self) -> list[Tracked]:
        """Each task in flight, once."""
        with self._lock:
            return list({id(t): t for t in self._in_flight.values()}.values())

    def waiting(self) -> int:
        """How many tasks in flight wait on purpose right now."""
        with self._lock:
            return self._waits.count(time.monotonic())

    def _forget(self, tracked: Tracked) -> None:
        for cid in tracked.celery_ids:
            self._in_flight.pop(cid, None)
        self._waits.drop(tracked.msg.task_id)

    # --- adoption (a dispatcher restarted) --------------------------------------

    def adoptable(self, celery_ids: list[str]) -> int:
        """Remember the attempts an earlier dispatcher of this run started; return how many tasks."""
        with self._lock:
            for celery_id in celery_ids:
                parsed = m.parse_celery_id(celery_id)
                if parsed is not None:
                    self._adoptable.setdefault(parsed.digest, []).append(celery_id)
            return len(self._adoptable)

    def adopt(self, tracked: Tracked) -> tuple[list[str], m.ResultMessage | None] | None:
        """Take over the attempts an earlier dispatcher started at ``tracked``'s task.

        Returns None when there are none; else their Celery ids, and the reply that
        already came for one of them (then nothing is left in flight)."""
        with self._lock:
            celery_ids = self._adoptable.pop(m.task_digest(tracked.msg.task_id), None)
            if not celery_ids:
                return None
            parsed = sorted((m.parse_celery_id(cid), cid) for cid in celery_ids)  # (all parse: see adoptable)
            attempts = [cid for _, cid in parsed]
            last = parsed[-1][0]
            assert last is not None
            self._attempts[tracked.msg.task_id] = last.attempt
            tracked.msg = dataclasses.replace(tracked.msg, attempt=last.attempt, token=last.token)
            tracked.celery_ids.extend(attempts)
            self._issued.update(attempts)
            tracked.started = True
            early = next((self._early.pop(cid) for cid in attempts if cid in self._early), None)
            if early is None:
                for cid in attempts:
                    self._in_flight[cid] = tracked
            return attempts, early

    def _adoptable_id(self, celery_id: str) -> bool:
        parsed = m.parse_celery_id(celery_id)
        return parsed is not None and celery_id in self._adoptable.get(parsed.digest, ())

    # --- replies ------------------------------------------------------------------

    def route(self, reply: m.ResultMessage | m.StatusMessage) -> tuple[Route, Tracked | None]:
        """What ``reply`` is for this run, and its task's record when it is in flight.

        A result takes its task out of the ledger; a hold marks it waiting."""
        cid = reply.celery_id
        with self._lock:
            if cid not in self._issued and not self._adoptable_id(cid):
                return Route.FORGED, None
            tracked = self._in_flight.get(cid)
            result = isinstance(reply, m.ResultMessage)
            if tracked is None:
                if result and self._adoptable_id(cid):
                    self._early[cid] = reply  # type: ignore[assignment]
                    return Route.EARLY, None
                return Route.STALE, None
            if result:
                self._forget(tracked)
                return Route.RESULT, tracked
            if isinstance(reply, m.StatusMessage) and reply.field == "retry_in":
                self._waits.set(tracked.msg.task_id, time.monotonic() + float(reply.value))
                return Route.HOLD, tracked
            return Route.STATUS, tracked
