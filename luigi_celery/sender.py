"""Publish Luigi tasks as Celery messages and route the replies back.

The :class:`Sender` knows nothing of Luigi's worker internals: it publishes a
*flight* (anything with a ``task``, a ``worker_timeout`` and two callbacks)
and calls the flight back from the watcher thread when a reply arrives. It
wires the pieces of the dispatcher's side: the ledger of what is in flight
(ledger.py), the publisher (publisher.py), the hooks of the policies
(hooks.py: rate limits in ratelimit.py, metrics in metrics.py), the run's claim
and adoption after a restart (claim.py), the reply watcher (results.py) and
the monitor of lost tasks (monitor.py).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery

from luigi_celery import inbox, signing
from luigi_celery import message as m
from luigi_celery.allowlist import RunModules
from luigi_celery.claim import RunClaim
from luigi_celery.errors import BrokerUnavailable, ConfigError, DispatchRefused, LuigiCeleryError, MessageError
from luigi_celery.hooks import DispatchHook, hold_for, tell_answered, tell_published
from luigi_celery.ledger import Ledger, Route
from luigi_celery.metrics import DispatcherMetrics
from luigi_celery.monitor import Flight, Monitor, Tracked
from luigi_celery.pacing import Pacer
from luigi_celery.process import ResultQueue
from luigi_celery.publisher import Publisher, track
from luigi_celery.publisher import check_broker as check_broker  # (where the CLI and run.py find it)
from luigi_celery.queues import QueueDepthCollector
from luigi_celery.ratelimit import Limiter, RatePacing
from luigi_celery.redaction import scrub
from luigi_celery.results import ResultWatcher, reply_queue, reply_queue_name
from luigi_celery.settings import Settings, redact
from luigi_celery.store import Store

logger = logging.getLogger(__name__)


class Sender:
    """Publishes tasks for one run and matches the replies to what is in flight."""

    def __init__(
        self,
        app: Celery,
        settings: Settings,
        run_id: str | None = None,
        store: Store | None = None,
        limiter: Limiter | None = None,
        metrics: DispatcherMetrics | None = None,
    ) -> None:
        """``limiter``: the rate limiter shared with the workers (None: this dispatcher paces
        its own tasks); ``metrics``: counted at the hooks' moments (None: nothing is counted)."""
        self.app = app
        self.settings = settings
        self.run_id = run_id or uuid.uuid4().hex[:12]
        # This dispatcher, among every one that ever runs the same pipeline (the run id is the
        # same for all of them): what it sent is dropped unrun once it has closed its run.
        self.session = uuid.uuid4().hex
        self.reply_to = reply_queue_name(self.run_id)
        self.store = store
        self.ledger = Ledger()
        self._hooks: Sequence[DispatchHook] = [RatePacing(limiter), *([metrics] if metrics is not None else [])]
        self._broken: str | None = None
        # Modules whose tasks a reply may name as dynamic dependencies (the dispatcher imports them).
        self._modules = RunModules(settings.task_modules)
        # publishes rate-limited tasks when their slot is due
        self._pacer = Pacer(self._send_when_due)
        # Luigi's worker takes its results from here; the sender wakes it when a task starts
        # waiting (its loop may then send another), and it publishes the batch before it waits.
        self.results = ResultQueue(before_wait=self.flush)
        # Luigi task ids revoked when the run was interrupted, and their Celery ids.
        self.revoked: list[str] = []
        self._to_revoke: list[str] = []
        self._health_checks: list[Callable[[], str | None]] = []
        # the inboxes this run posted scheduler messages to (deleted when it closes)
        self._inboxes: set[str] = set()
        self._watcher = ResultWatcher(
            app, self.reply_to, self._on_reply, self._tick, on_lost=self.fail_all, tolerance=settings.outage_tolerance
        )
        self._publisher = Publisher(
            app, settings, sent=lambda tracked: tell_published(self._hooks, tracked), failed=self._fail_tracked,
            wanted=self.ledger.is_current,
        )  # fmt: skip
        self._claim = RunClaim(store, self.run_id, settings.lock_ttl, lambda: self._monitor.settle()) if store else None
        self._monitor = Monitor(
            self.run_id,
            store,
            self.ledger.snapshot,
            self.republish,
            self._fail_tracked,
            self._consumed_queues,
            queue_timeout=None if settings.embedded else settings.queue_timeout,
            on_check=self._claim.refresh if self._claim is not None else lambda: None,
            lease=settings.lock_ttl,
        )
        # the queues this run has sent to: their depth is exported with the metrics
        self.queues_used = {settings.queue}
        if metrics is not None:
            metrics.watch_in_flight(self.in_flight)
            metrics.watch_queues(QueueDepthCollector(app, lambda: sorted(self.queues_used), settings.rabbitmq_api_url))

    # --- life cycle --------------------------------------------------------

    def start(self) -> None:
        """Declare the reply queue and start watching it."""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=self.settings.connect_timeout)
                reply_queue(self.reply_to)(conn.default_channel).declare()
        except Exception as e:
            url = self.app.conf.broker_url
            raise BrokerUnavailable(f"cannot reach the broker at {redact(url)}: {scrub(str(e), urls=[url])}") from e
        if self._claim is not None:
            adoptable = self.ledger.adoptable(self._claim.take())
            if adoptable:
                logger.info("run %s: %d task(s) were started by an earlier dispatcher", self.run_id, adoptable)
        self._pacer.start()
        self._publisher.start()
        self._watcher.start()
        if not self._watcher.ready.wait(self.settings.connect_timeout):
            raise BrokerUnavailable(f"cannot consume replies from {redact(self.app.conf.broker_url)}")
        self._monitor.start()

    def close(self) -> None:
        # No join: nothing is left to consume, and kombu's Redis transport only lets
        # go of a blocking BRPOP after its timeout (up to a second). Both threads are
        # daemons and stop by themselves.
        self._watcher.stop()
        self._monitor.stop()
        self._pacer.stop()
        self._publisher.close()
        self._revoke_marked()
        inbox.delete(self.app, self._inboxes)
        if self._claim is not None:
            self._claim.close(self.session)
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                reply_queue(self.reply_to)(conn.default_channel).delete()
        except Exception as e:
            logger.debug("could not delete reply queue %s: %s", self.reply_to, e)

    def add_health_check(self, check: Callable[[], str | None]) -> None:
        """``check`` returns None while all is well, or why the run cannot go on."""
        self._health_checks.append(check)

    # --- publishing --------------------------------------------------------

    def send(self, flight: Flight) -> None:
        """Publish one task; any failure comes back to the flight as a FAILED result."""
        task = flight.task
        if self._broken:
            self._fail(flight, self._broken)
            return
        try:
            run = {"run_id": self.run_id, "reply_to": self.reply_to, "session": self.session}
            tracked = track(flight, self.settings.queue, local_ok=self.settings.embedded, **run)
        except (DispatchRefused, ConfigError) as e:
            self._fail(flight, f"luigi-celery refused to dispatch {task.task_id}: {e}")
            return
        self._modules.add(task.task_module)
        self.queues_used.add(tracked.queue)
        if self._adopt(tracked):
            return
        try:
            hold = hold_for(self._hooks, tracked)
        except LuigiCeleryError as e:
            self._fail(flight, str(e))
            return
        self._publish(tracked, delay=hold, batched=hold <= 0)

    def _adopt(self, tracked: Tracked) -> bool:
        """Watch attempts an earlier dispatcher of this run started, instead of sending again.

        Their replies may already have come; if their worker is gone, the monitor sees
        the lock gone and publishes the task again. False when there is nothing to adopt.
        """
        adopted = self.ledger.adopt(tracked)
        if adopted is None:
            return False
        attempts, early = adopted
        logger.info("adopted %s (attempt %d) from an earlier dispatcher of this run", tracked.msg.task_id,
                    tracked.msg.attempt)  # fmt: skip
        if early is not None:
            tracked.flight.on_result(early)  # it finished while no dispatcher watched
        else:  # a worker has it: running, not queued
            tracked.flight.on_status(m.StatusMessage(attempts[-1], tracked.msg.task_id, "started", ""))
        return True

    def republish(self, tracked: Tracked) -> None:
        """Publish ``tracked`` again under a new attempt (its worker died)."""
        if not self.ledger.in_flight(tracked):
            return  # its reply arrived meanwhile
        tracked.started, tracked.lock_gone_since, tracked.waiting_since = False, None, time.monotonic()
        tracked.hold_until = 0.0
        tracked.msg = dataclasses.replace(tracked.msg, republished=True)
        self._publish(tracked)

    def _publish(self, tracked: Tracked, delay: float = 0.0, batched: bool = False) -> None:
        """Publish a new attempt of ``tracked``, now or ``delay`` seconds from now (its rate slot).

        ``batched`` (Luigi's thread only): in the batch :meth:`flush` sends."""
        celery_id = self.ledger.new_attempt(tracked)
        if delay > 0:
            due = time.monotonic() + delay
            tracked.waiting_since = due
            self.ledger.wait(tracked.msg.task_id, due)
            self._pacer.at(due, (tracked, celery_id))
            return
        self._publisher.send(tracked, celery_id, batched)

    def _send_when_due(self, item: tuple[Tracked, str]) -> None:
        tracked, celery_id = item
        if self.ledger.is_current(tracked, celery_id):  # not revoked or failed meanwhile
            self._publisher.send(tracked, celery_id)

    def flush(self) -> None:
        """Publish what Luigi's loop has sent since the last flush; it calls this before it waits."""
        self._publisher.flush()

    def relay(self, flight: Flight, message_id: str, content: Any, payload: dict[str, Any]) -> None:
        """Post a message from the scheduler to the attempt of ``flight``'s task in flight, if any."""
        msg = self.ledger.current(flight)
        if msg is None:
            logger.info("dropped a scheduler message for %s: it is not in flight", flight.task.task_id)
            return
        note = m.SchedulerNote(msg.celery_id, msg.task_id, message_id, content, payload)
        try:
            self._inboxes.add(inbox.post(self.app, note, msg.token, self.settings.secret))
        except Exception as e:  # best effort, as under Luigi
            logger.warning("could not relay a scheduler message to %s: %s", msg.task_id, e)

    def revoke(self, flight: Flight) -> None:
        """Mark ``flight`` to be revoked; :meth:`close` revokes all of them in one broadcast."""
        tracked = self.ledger.take_flight(flight)
        if tracked is not None:
            self.revoked.append(tracked.msg.task_id)
            self._to_revoke.extend(tracked.celery_ids)

    def _revoke_marked(self) -> None:
        """Stop the marked tasks: not started ones never start, running ones are terminated
        (as stock Luigi terminates its task processes when interrupted)."""
        if not self._to_revoke:
            return
        try:
            self.app.control.revoke(self._to_revoke, terminate=True, signal="SIGTERM")
        except Exception as e:
            logger.warning("could not revoke %d task(s): %s", len(self._to_revoke), e)

    def snapshot(self) -> list[Tracked]:
        """Each task in flight, once."""
        return self.ledger.snapshot()

    def in_flight(self) -> int:
        return len(self.ledger.snapshot())

    def waiting(self) -> int:
        """How many tasks in flight wait on purpose right now (a rate slot, a retry's backoff)."""
        return self.ledger.waiting()

    def fail_all(self, reason: str) -> None:
        """Fail every task in flight (and every later send) with ``reason``."""
        self._broken = reason
        in_flight = self.ledger.snapshot()
        logger.error("failing %d task(s) in flight: %s", len(in_flight), reason)
        for tracked in in_flight:
            self._fail_tracked(tracked, reason, quiet=True)

    # --- replies (watcher thread) --------------------------------------------

    def _on_reply(self, data: object) -> None:
        try:
            signing.verify(data, self.settings.secret)
            reply = m.parse_reply(data)
        except MessageError as e:
            logger.error("dropped an invalid reply on %s: %s", self.reply_to, e)
            return
        if isinstance(reply, m.ResultMessage) and reply.new_deps:
            reply = self._modules.check(reply)
        route, tracked = self.ledger.route(reply)
        if route is Route.FORGED:
            # Anyone on the broker can publish here; only an attempt's own token answers it.
            logger.warning("dropped a reply for %s, an attempt this run did not send", reply.celery_id[:200])
        elif tracked is None:
            logger.debug("reply for %s: %s", reply.celery_id, route.value)
        elif route is Route.HOLD:
            assert isinstance(reply, m.StatusMessage)
            # Not lost while it waits, nor until its worker had a heartbeat's time to take it up.
            tracked.hold_until = time.monotonic() + float(reply.value) + self.settings.lock_ttl
            tracked.flight.on_status(reply)
            self.results.wake()
        elif route is Route.RESULT:
            assert isinstance(reply, m.ResultMessage)
            tell_answered(self._hooks, tracked.msg.family, tracked.queue, reply.status)
            tracked.flight.on_result(reply)
        else:
            assert isinstance(reply, m.StatusMessage)
            tracked.flight.on_status(reply)

    def _tick(self) -> None:
        for check in self._health_checks:
            problem = check()
            if problem:
                self.fail_all(problem)

    def _fail_tracked(self, tracked: Tracked, expl: str, quiet: bool = False) -> None:
        if self.ledger.take(tracked):  # (not answered already)
            self._fail(tracked.flight, expl, quiet, tracked.queue)

    def _fail(self, flight: Flight, expl: str, quiet: bool = False, queue: str | None = None) -> None:
        tell_answered(self._hooks, flight.task.task_family, queue or self.settings.queue, m.FAILED)
        if not quiet:
            logger.error("%s", expl)
        flight.on_result(
            m.ResultMessage(
                celery_id="", task_id=flight.task.task_id, status=m.FAILED, expl=expl, host=socket.gethostname()
            )
        )

    def _consumed_queues(self) -> set[str] | None:
        """The queues some worker consumes right now, or None if the workers could not be asked."""
        try:
            answers = self.app.control.inspect(timeout=2.0).active_queues() or {}
        except Exception as e:
            logger.warning("could not ask the workers which queues they consume: %s", e)
            return None
        return {q["name"] for queues in answers.values() for q in queues}
