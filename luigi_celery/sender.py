"""Publish Luigi tasks as Celery messages and route the replies back.

The :class:`Sender` knows nothing of Luigi's worker internals: it publishes a
*flight* (anything with a ``task``, a ``worker_timeout`` and two callbacks)
and calls the flight back from the watcher thread when a reply arrives.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import luigi
from celery import Celery

from luigi_celery import message as m
from luigi_celery.errors import (
    BrokerUnavailable,
    ConfigError,
    DispatchRefused,
    LuigiCeleryError,
    MessageError,
    RunAlreadyActive,
)
from luigi_celery.metrics import DispatcherMetrics, hook, labels
from luigi_celery.monitor import Monitor, Tracked
from luigi_celery.options import task_options
from luigi_celery.pacing import Pacer, Waits
from luigi_celery.queues import QueueDepthCollector
from luigi_celery.ratelimit import Limiter, MemoryLimiter
from luigi_celery.redaction import ENCODING_HINT, needs_encoding, scrub
from luigi_celery.results import ResultWatcher, publish_retry_policy, reply_queue, reply_queue_name
from luigi_celery.sent_events import SentEvents
from luigi_celery.settings import HARD_TIME_LIMIT_GRACE, Settings, redact
from luigi_celery.store import Store, died_here, owner_here

logger = logging.getLogger(__name__)

# How much of a task's message Flower shows (Celery's own default).
KWARGSREPR_MAX = 1024

# How long closing a run waits for the coordination store.
STORE_CLOSE_TIMEOUT = 5.0

# Tasks Luigi's loop sends between two waits go out in one round trip, where the broker
# allows it (Redis: one pipeline), up to this many at a time.
PUBLISH_BATCH = 100


class Flight(Protocol):
    """One Luigi task on its way to a worker, as the sender sees it."""

    task: luigi.Task
    worker_timeout: float | None

    def on_result(self, result: m.ResultMessage) -> None: ...

    def on_status(self, status: m.StatusMessage) -> None: ...


def check_broker(app: Celery, timeout: float) -> None:
    """Connect to the broker once, giving up after about ``timeout`` seconds."""
    url = app.conf.broker_url
    conn = app.connection_for_write()
    try:
        conn.ensure_connection(max_retries=1, timeout=timeout)
        conn.default_channel  # noqa: B018  (opening a channel proves the login works)
    except Exception as e:
        # (a password that should have been percent-encoded sends kombu to a host made of a piece of it)
        hint = f" ({ENCODING_HINT})" if needs_encoding(url) else ""
        raise BrokerUnavailable(f"cannot reach the broker at {redact(url)}: {scrub(str(e), urls=[url])}{hint}") from e
    finally:
        conn.release()


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
        self.app = app
        self.settings = settings
        self.run_id = run_id or uuid.uuid4().hex[:12]
        # This dispatcher, among every one that ever runs the same pipeline (the run id is the
        # same for all of them): what it sent is dropped unrun once it has closed its run.
        self.session = uuid.uuid4().hex
        self.reply_to = reply_queue_name(self.run_id)
        self.store = store
        # every Celery id of every attempt still in flight -> its task's record
        self._in_flight: dict[str, Tracked] = {}
        self._lock = threading.Lock()
        self._attempts: collections.Counter[str] = collections.Counter()
        self._broken: str | None = None
        self._owner = owner_here("dispatcher")
        # task digest -> Celery ids an earlier dispatcher of this run saw started
        self._adoptable: dict[str, list[str]] = {}
        # Reserves rate-limit slots. Shared with the workers, which check a task's slot where it
        # starts; without one (RabbitMQ with no store) this dispatcher paces its own tasks only.
        self._limiter: Limiter = limiter if limiter is not None else MemoryLimiter()
        self._limiter_shared = limiter is not None
        self._warned_unshared = False
        # replies that came for adoptable ids before Luigi asked for their task
        self._early: dict[str, m.ResultMessage] = {}
        # Every Celery id this dispatcher published or adopted: a reply for any other id was
        # not asked for (forged, or another run's), and is dropped.
        self._issued: set[str] = set()
        # Modules whose tasks a reply may name as dynamic dependencies (the dispatcher imports
        # them): those of the tasks this run sends, their packages, and the task_modules setting.
        self._modules: set[str] = set(settings.task_modules)
        # Tasks waiting on purpose (a rate slot, a retry) by Luigi task id, and the thread
        # that publishes rate-limited tasks when their slot is due.
        self._waits = Waits()
        self._pacer = Pacer(self._send_when_due)
        # Called (from the watcher thread) when a task starts waiting: the dispatcher's
        # loop may then send another task. The Luigi worker sets it.
        self.wake: Callable[[], None] = lambda: None
        # Luigi task ids revoked when the run was interrupted, and their Celery ids.
        self.revoked: list[str] = []
        self._to_revoke: list[str] = []
        self._health_checks: list[Callable[[], str | None]] = []
        self._watcher = ResultWatcher(
            app, self.reply_to, self._on_reply, self._tick, on_lost=self.fail_all, tolerance=settings.outage_tolerance
        )
        self._retry_policy = publish_retry_policy(settings.outage_tolerance)
        # Celery's task-sent events (for Flower), sent in batches by a thread of their own.
        self._sent_events = SentEvents(app) if app.conf.task_send_sent_event else None
        # Luigi's thread publishes through this producer, in batches (None: not yet, or not batching).
        self._producer: Any = None
        self._batching = True
        self._batch: Any = None
        self._batched: list[tuple[Tracked, str]] = []
        self._monitor = Monitor(
            self.run_id,
            store,
            self.snapshot,
            self.republish,
            self._fail_tracked,
            self._consumed_queues,
            queue_timeout=None if settings.embedded else settings.queue_timeout,
            on_check=self._refresh_claim,
            lease=settings.lock_ttl,
        )
        # who holds this run's claim when it is not this dispatcher (None: it is)
        self._claim_holder: str | None = None
        # The dispatcher's Luigi [worker] settings that travel with each task.
        self.check_unfulfilled_deps = True
        self.check_complete_on_run = False
        self._metrics = metrics
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
        if self.store is not None:
            self._claim_run()
        self._pacer.start()
        if self._sent_events is not None:
            self._sent_events.start()
        self._watcher.start()
        if not self._watcher.ready.wait(self.settings.connect_timeout):
            raise BrokerUnavailable(f"cannot consume replies from {redact(self.app.conf.broker_url)}")
        self._monitor.start()

    def _claim_run(self) -> None:
        """Become this run's only dispatcher, and find what an earlier one left in flight."""
        assert self.store is not None
        holder = self.store.claim_run(self.run_id, self._owner, self.settings.lock_ttl)
        if holder is not None and died_here(holder):
            self.store.release_run(self.run_id, holder)  # its dispatcher was killed: take over
            holder = self.store.claim_run(self.run_id, self._owner, self.settings.lock_ttl)
        if holder is not None:
            raise RunAlreadyActive(f"this pipeline is already being run by {holder} (run {self.run_id})")
        for celery_id in self.store.started(self.run_id):
            parsed = m.parse_celery_id(celery_id)
            if parsed is not None:
                self._adoptable.setdefault(parsed[0], []).append(celery_id)
        if self._adoptable:
            logger.info("run %s: %d task(s) were started by an earlier dispatcher", self.run_id, len(self._adoptable))

    def close(self) -> None:
        # No join: nothing is left to consume, and kombu's Redis transport only lets
        # go of a blocking BRPOP after its timeout (up to a second). Both threads are
        # daemons and stop by themselves.
        self._watcher.stop()
        self._monitor.stop()
        self._pacer.stop()
        # A batch left here was never published: the run was cut short, and Luigi has given up on its tasks.
        self._drop_batch()
        if self._producer is not None:
            self._producer.release()
        self._revoke_marked()
        if self._sent_events is not None:
            self._sent_events.close()
        if self.store is not None:
            # Not for long: the store may be what failed the run. Left undone, the claim
            # expires by itself, and a later run re-checks the tasks it would adopt.
            closing = threading.Thread(target=self._close_in_store, name="luigi-celery-close", daemon=True)
            closing.start()
            closing.join(STORE_CLOSE_TIMEOUT)
            if closing.is_alive():
                logger.warning("the coordination store did not answer; run %s was not closed in it", self.run_id)
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                reply_queue(self.reply_to)(conn.default_channel).delete()
        except Exception as e:
            logger.debug("could not delete reply queue %s: %s", self.reply_to, e)

    def _close_in_store(self) -> None:
        assert self.store is not None
        try:
            # Whatever this dispatcher sent that is still queued (a Ctrl-C, a task failed for
            # want of a worker) is dropped by the worker that receives it, even much later.
            self.store.end_session(self.session)
            self.store.forget_run(self.run_id)  # the run is over: nothing to adopt
            self.store.release_run(self.run_id, self._owner)
        except Exception as e:
            logger.warning("could not close run %s in the store: %s", self.run_id, e)

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
            params = m.check_dispatchable(task)
            options = task_options(type(task))
        except (DispatchRefused, ConfigError) as e:
            self._fail(flight, f"luigi-celery refused to dispatch {task.task_id}: {e}")
            return
        msg = m.TaskMessage(
            task_id=task.task_id,
            module=task.task_module,
            family=task.task_family,
            params=params,
            attempt=1,
            run_id=self.run_id,
            reply_to=self.reply_to,
            check_unfulfilled_deps=self.check_unfulfilled_deps,
            check_complete_on_run=self.check_complete_on_run,
            worker_timeout=flight.worker_timeout or None,
            session=self.session,
        )
        self._allow_module(task.task_module)
        publish_options: dict[str, Any] = {"queue": options.queue or self.settings.queue, "priority": options.priority}
        if msg.worker_timeout:
            publish_options["soft_time_limit"] = msg.worker_timeout
            publish_options["time_limit"] = msg.worker_timeout + HARD_TIME_LIMIT_GRACE
        tracked = Tracked(flight, msg, publish_options["queue"], publish_options)
        self.queues_used.add(tracked.queue)
        if self._adopt(tracked):
            return
        if options.rate is None:
            self._publish(tracked, batched=True)
            return
        # Reserve the start's slot before publishing, and publish when it is due: workers get
        # rate-limited tasks spread out, not in a burst. The slot travels with the task; a
        # worker it reaches late (a busy pool, a slow broker) takes a new one.
        try:
            wait, slot = self._limiter.reserve(options.rate_key, options.rate)
        except LuigiCeleryError as e:
            self._fail(flight, f"could not reserve a rate-limit slot for {task.task_id}: {e}")
            return
        if self._limiter_shared:
            tracked.msg = dataclasses.replace(tracked.msg, rate_slot=slot)
        elif not self._warned_unshared:
            self._warned_unshared = True
            logger.warning(
                "%s has a rate limit, but no coordination store is configured: this dispatcher paces its "
                "own tasks only, and workers do not check it (set LUIGI_CELERY_REDIS_URL for a global limit)",
                task.task_family,
            )
        self._publish(tracked, delay=wait)

    def _adopt(self, tracked: Tracked) -> bool:
        """Watch attempts an earlier dispatcher of this run started, instead of sending again.

        Their replies may already have come (kept in ``_early``); if their worker is
        gone, the monitor sees the lock gone and publishes the task again.
        Returns False when there is nothing to adopt.
        """
        with self._lock:
            celery_ids = self._adoptable.pop(m.task_digest(tracked.msg.task_id), None)
            if not celery_ids:
                return False
            parsed = sorted((m.parse_celery_id(cid), cid) for cid in celery_ids)  # (all parse: see _claim_run)
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
        logger.info("adopted %s (attempt %d) from an earlier dispatcher of this run", tracked.msg.task_id, last.attempt)
        if early is not None:
            tracked.flight.on_result(early)  # it finished while no dispatcher watched
        else:  # a worker has it: running, not queued
            tracked.flight.on_status(m.StatusMessage(attempts[-1], tracked.msg.task_id, "started", ""))
        return True

    def republish(self, tracked: Tracked) -> None:
        """Publish ``tracked`` again under a new attempt (its worker died)."""
        with self._lock:
            if tracked.msg.celery_id not in self._in_flight:
                return  # its reply arrived meanwhile
        tracked.started, tracked.lock_gone_since, tracked.waiting_since = False, None, time.monotonic()
        tracked.hold_until = 0.0
        self._publish(tracked)

    def _publish(self, tracked: Tracked, delay: float = 0.0, batched: bool = False) -> None:
        """Publish a new attempt of ``tracked``, now or ``delay`` seconds from now (its rate slot).

        ``batched`` (Luigi's thread only): in the batch :meth:`flush` sends."""
        task_id = tracked.msg.task_id
        with self._lock:
            self._attempts[task_id] += 1
            tracked.msg = dataclasses.replace(tracked.msg, attempt=self._attempts[task_id], token=m.new_token())
            celery_id = tracked.msg.celery_id
            tracked.celery_ids.append(celery_id)
            self._issued.add(celery_id)
            # Registered before publishing: a fast worker can reply before publish() returns.
            self._in_flight[celery_id] = tracked
        if delay > 0:
            due = time.monotonic() + delay
            tracked.waiting_since = due
            with self._lock:
                self._waits.set(task_id, due)
            self._pacer.at(due, (tracked, celery_id))
            return
        self._send(tracked, celery_id, batched)

    def _send_when_due(self, item: tuple[Tracked, str]) -> None:
        tracked, celery_id = item
        with self._lock:
            wanted = self._in_flight.get(celery_id) is tracked  # not revoked or failed meanwhile
        if wanted:
            self._send(tracked, celery_id)

    def _send(self, tracked: Tracked, celery_id: str, batched: bool = False) -> None:
        task_id = tracked.msg.task_id
        tracked.msg = dataclasses.replace(tracked.msg, sent_at=time.time())
        kwargs = {"message": m.sign(tracked.msg.to_dict(), self.settings.secret)}
        producer = self._batch_producer() if batched else None
        try:
            self.app.send_task(
                m.TASK_NAME,
                kwargs=kwargs,
                # what Flower shows; Celery's own saferepr of it cost more than the publish
                argsrepr="()",
                kwargsrepr=repr(kwargs)[:KWARGSREPR_MAX],
                task_id=celery_id,
                shadow=task_id,
                ignore_result=self.settings.result_backend is None,
                retry=True,
                retry_policy=self._retry_policy,
                event_dispatcher=self._sent_events,
                producer=producer,
                **tracked.publish_options,
            )
        except Exception as e:
            if producer is not None:  # the batch broke (the broker went away): one by one, with retries
                self._resend(self._drop_batch(), e)
                self._send(tracked, celery_id)
                return
            url = self.app.conf.broker_url
            self._fail_tracked(tracked, f"could not publish {task_id} to {redact(url)}: {scrub(str(e), urls=[url])}")
            return
        logger.debug("sent %s as %s", task_id, celery_id)
        if self._metrics is not None:
            with hook("a dispatch"):
                self._metrics.dispatched.labels(**labels(tracked.msg.family, tracked.queue)).inc()
        if producer is not None:
            self._batched.append((tracked, celery_id))
            if len(self._batched) >= PUBLISH_BATCH:
                self.flush()

    # --- batches (Luigi's thread) --------------------------------------------

    def _batch_producer(self) -> Any:
        """The producer with a batch open, or None where the broker cannot batch."""
        if not self._batching:
            return None
        if self._producer is None:
            producer = self.app.producer_pool.acquire(block=True)
            if not producer.supports_batch_publish:
                producer.release()
                self._batching = False
                return None
            self._producer = producer
        if self._batch is None:
            self._batch = self._producer.batch(max_size=10 * PUBLISH_BATCH)  # flushed by us, before kombu would
            self._batch.__enter__()
        return self._producer

    def flush(self) -> None:
        """Publish what Luigi's loop has sent since the last flush; it calls this before it waits."""
        batch, pending = self._take_batch()
        if batch is None:
            return
        try:
            batch.__exit__(None, None, None)
        except Exception as e:
            self._resend(pending, e)

    def _take_batch(self) -> tuple[Any, list[tuple[Tracked, str]]]:
        batch, pending = self._batch, self._batched
        self._batch, self._batched = None, []
        return batch, pending

    def _drop_batch(self) -> list[tuple[Tracked, str]]:
        """Close the open batch without publishing it (kombu discards what it holds); return its tasks."""
        batch, pending = self._take_batch()
        if batch is not None:
            with contextlib.suppress(Exception):
                batch.__exit__(RuntimeError, RuntimeError("dropped"), None)
        return pending

    def _resend(self, pending: list[tuple[Tracked, str]], because: BaseException) -> None:
        """Send again, one by one, the tasks of a batch that may not have reached the broker (a
        duplicate of one that did go out runs once: the worker's run lock and start marks know its
        Celery id)."""
        if self._producer is not None:  # its connection may be the broken one: start afresh
            self._producer.release()
            self._producer = None
        if pending:
            logger.warning("a batch of %d task(s) may not have reached the broker (%s): sending each again",
                           len(pending), because)  # fmt: skip
            for item in pending:
                self._send_when_due(item)

    def revoke(self, flight: Flight) -> None:
        """Mark ``flight`` to be revoked; :meth:`close` revokes all of them in one broadcast."""
        with self._lock:
            tracked = next((t for t in self._in_flight.values() if t.flight is flight), None)
            if tracked is not None:
                self._forget(tracked)
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
        with self._lock:
            return list({id(t): t for t in self._in_flight.values()}.values())

    def in_flight(self) -> int:
        return len(self.snapshot())

    def waiting(self) -> int:
        """How many tasks in flight wait on purpose right now (a rate slot, a retry's backoff)."""
        with self._lock:
            return self._waits.count(time.monotonic())

    def fail_all(self, reason: str) -> None:
        """Fail every task in flight (and every later send) with ``reason``."""
        self._broken = reason
        in_flight = self.snapshot()
        logger.error("failing %d task(s) in flight: %s", len(in_flight), reason)
        for tracked in in_flight:
            self._fail_tracked(tracked, reason, quiet=True)

    # --- replies (watcher thread) --------------------------------------------

    def _allow_module(self, module: str) -> None:
        if module not in self._modules:
            with self._lock:
                # (dynamic dependencies often come from a sibling module: the package is allowed too)
                self._modules.update(name for name in (module, module.rpartition(".")[0]) if name)

    def _on_reply(self, data: object) -> None:
        try:
            m.verify(data, self.settings.secret)
            reply = m.parse_reply(data)
        except MessageError as e:
            logger.error("dropped an invalid reply on %s: %s", self.reply_to, e)
            return
        if reply.celery_id not in self._issued and not self._adoptable_id(reply.celery_id):
            # Anyone on the broker can publish here; only an attempt's own token answers it.
            logger.warning("dropped a reply for %s, an attempt this run did not send", reply.celery_id[:200])
            return
        if isinstance(reply, m.ResultMessage) and reply.new_deps:
            reply = self._check_new_deps(reply)
        with self._lock:
            tracked = self._in_flight.get(reply.celery_id)
            if tracked is not None and isinstance(reply, m.ResultMessage):
                self._forget(tracked)
            elif tracked is not None and isinstance(reply, m.StatusMessage) and reply.field == "retry_in":
                self._waits.set(tracked.msg.task_id, time.monotonic() + float(reply.value))
            elif tracked is None and isinstance(reply, m.ResultMessage) and self._adoptable_id(reply.celery_id):
                self._early[reply.celery_id] = reply  # an earlier dispatcher's work, not asked for yet
                return
        if tracked is None:
            logger.debug("reply for %s, which is not in flight (stale or duplicate)", reply.celery_id)
        elif isinstance(reply, m.StatusMessage) and reply.field == "retry_in":
            # Not lost while it waits, nor until its worker had a heartbeat's time to take it up.
            tracked.hold_until = time.monotonic() + float(reply.value) + self.settings.lock_ttl
            tracked.flight.on_status(reply)
            self.wake()
        elif isinstance(reply, m.ResultMessage):
            self._count_answer(tracked.msg.family, tracked.queue, reply.status)
            tracked.flight.on_result(reply)
        else:
            tracked.flight.on_status(reply)

    def _check_new_deps(self, reply: m.ResultMessage) -> m.ResultMessage:
        """``reply``, or a FAILED one when it names a dynamic dependency from a module this
        run does not use: the dispatcher would import that module to build the task."""
        with self._lock:
            refused = sorted({mod for mod, _, _ in reply.new_deps if not m.module_allowed(mod, self._modules)})
        if not refused:
            return reply
        expl = (
            f"{reply.task_id}: refused its dynamic dependencies from module(s) {', '.join(map(repr, refused))}: "
            f"not a module (or package) of this run's tasks nor in task_modules (LUIGI_CELERY_TASK_MODULES)"
        )
        logger.error("%s", expl)
        return dataclasses.replace(reply, status=m.FAILED, expl=expl, new_deps=[], missing=[])

    def _adoptable_id(self, celery_id: str) -> bool:
        parsed = m.parse_celery_id(celery_id)
        return parsed is not None and celery_id in self._adoptable.get(parsed[0], ())

    def _tick(self) -> None:
        for check in self._health_checks:
            problem = check()
            if problem:
                self.fail_all(problem)

    def _forget(self, tracked: Tracked) -> None:
        """Drop every attempt of ``tracked``; the caller holds the lock."""
        for cid in tracked.celery_ids:
            self._in_flight.pop(cid, None)
        self._waits.drop(tracked.msg.task_id)

    def _fail_tracked(self, tracked: Tracked, expl: str, quiet: bool = False) -> None:
        with self._lock:
            if tracked.msg.celery_id not in self._in_flight:
                return  # already answered
            self._forget(tracked)
        self._fail(tracked.flight, expl, quiet, tracked.queue)

    def _count_answer(self, family: str, queue: str, status: str) -> None:
        if self._metrics is not None:
            with hook("an answer"):
                self._metrics.completed.labels(**labels(family, queue), status=status).inc()

    def _fail(self, flight: Flight, expl: str, quiet: bool = False, queue: str | None = None) -> None:
        self._count_answer(flight.task.task_family, queue or self.settings.queue, m.FAILED)
        if not quiet:
            logger.error("%s", expl)
        flight.on_result(
            m.ResultMessage(
                celery_id="", task_id=flight.task.task_id, status=m.FAILED, expl=expl, host=socket.gethostname()
            )
        )

    def _refresh_claim(self) -> None:
        """Keep this run's claim alive; take it again when the store has lost it.

        A claim that vanished tells that the store lost its data (or was away longer
        than the claim's TTL): the workers' run locks went with it, and the monitor
        waits for them to be taken again before calling any task lost.
        """
        if self.store is None or self.store.refresh_run(self.run_id, self._owner, self.settings.lock_ttl):
            self._claim_holder = None
            return
        holder = self.store.claim_run(self.run_id, self._owner, self.settings.lock_ttl)
        if holder is None:
            logger.warning("took the claim on run %s again: it had vanished from the coordination store", self.run_id)
        elif holder != self._claim_holder:
            logger.error("lost the claim on run %s to %s: another dispatcher runs it too", self.run_id, holder)
        if self._claim_holder is None:  # it was ours until now
            self._monitor.settle()
        self._claim_holder = holder

    def _consumed_queues(self) -> set[str] | None:
        """The queues some worker consumes right now, or None if the workers could not be asked."""
        try:
            answers = self.app.control.inspect(timeout=2.0).active_queues() or {}
        except Exception as e:
            logger.warning("could not ask the workers which queues they consume: %s", e)
            return None
        return {q["name"] for queues in answers.values() for q in queues}
