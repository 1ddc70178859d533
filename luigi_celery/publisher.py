"""Publishing task messages: one Celery message per attempt, in batches where the broker allows.

The tasks Luigi's loop sends between two waits go out in one round trip on
Redis (kombu's ``Producer.batch``: one pipeline); RabbitMQ and the embedded
transport publish each at once. A batch the broker refuses is sent again task
by task, with the usual retry policy: a copy that did get through the first
time is caught by the worker's run lock and start marks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.utils.nodenames import anon_nodename

from luigi_celery import message as m
from luigi_celery import signing
from luigi_celery.dispatchable import check_dispatchable
from luigi_celery.errors import BrokerUnavailable
from luigi_celery.monitor import Flight, Tracked
from luigi_celery.options import task_options
from luigi_celery.redaction import ENCODING_HINT, needs_encoding, scrub
from luigi_celery.results import publish_retry_policy
from luigi_celery.sent_events import SentEvents
from luigi_celery.settings import HARD_TIME_LIMIT_GRACE, Settings, redact

logger = logging.getLogger(__name__)

# How much of a task's message Flower shows (Celery's own default).
KWARGSREPR_MAX = 1024

# Tasks Luigi's loop sends between two waits go out in one round trip, where the broker
# allows it (Redis: one pipeline), up to this many at a time.
PUBLISH_BATCH = 100

# The sender's name in every message, as Celery's (``origin``: its node name, and process id).
_ORIGIN = anon_nodename()


def track(flight: Flight, default_queue: str, local_ok: bool = False, **fields: Any) -> Tracked:
    """The record of ``flight``'s task on its way: its message (the run's ``fields``, and the
    task's: its parameters, its time limit, Luigi's [worker] checks as Luigi started it) and how
    it is published (its queue, priority and time limits).

    Raises :class:`DispatchRefused` for a task a worker could not rebuild, and
    :class:`ConfigError` for bad per-task options."""
    task = flight.task
    params = check_dispatchable(task, local_ok)
    options = task_options(type(task))
    msg = m.TaskMessage(
        task_id=task.task_id, module=task.task_module, family=task.task_family, params=params, attempt=1,
        worker_timeout=flight.worker_timeout or None, check_unfulfilled_deps=flight.check_unfulfilled_deps,
        check_complete_on_run=flight.check_complete_on_run, cache_task_completion=flight.cache_task_completion,
        token="",  # (each attempt gets its own when it is sent or adopted: ledger.py)
        **fields,
    )  # fmt: skip
    publish_options: dict[str, Any] = {"queue": options.queue or default_queue, "priority": options.priority}
    if msg.worker_timeout:
        publish_options["soft_time_limit"] = msg.worker_timeout
        publish_options["time_limit"] = msg.worker_timeout + HARD_TIME_LIMIT_GRACE
    return Tracked(flight, msg, publish_options["queue"], publish_options)


def celery_message(
    celery_id: str,
    shadow: str,
    kwargs: dict[str, Any],
    kwargsrepr: str,
    ignore_result: bool,
    time_limit: float | None,
    soft_time_limit: float | None,
) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
    """The body, headers and task-sent event of the Celery message (protocol 2) that runs
    luigi-celery's task with ``kwargs``: what ``Celery.send_task`` builds for them, built here
    for a quarter of its cost (``tests/test_celery_message.py`` holds the two side by side)."""
    headers = {
        "lang": "py", "task": m.TASK_NAME, "id": celery_id, "shadow": shadow, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [time_limit, soft_time_limit],
        "root_id": celery_id, "parent_id": None, "argsrepr": "()", "kwargsrepr": kwargsrepr, "origin": _ORIGIN,
        "ignore_result": ignore_result, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }  # fmt: skip
    body = ((), kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    # named like the task in Flower: the Luigi task id, as the worker's own events name it
    sent = {"uuid": celery_id, "root_id": celery_id, "parent_id": None, "name": shadow, "args": "()",
            "kwargs": kwargsrepr, "retries": 0, "eta": None, "expires": None}  # fmt: skip
    return body, headers, sent


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


class Publisher:
    """Sends the attempts of tracked tasks; says which went out, and which could not."""

    def __init__(
        self,
        app: Celery,
        settings: Settings,
        sent: Callable[[Tracked], None],
        failed: Callable[[Tracked, str], None],
        wanted: Callable[[Tracked, str], bool],
    ) -> None:
        """``sent(tracked)`` after each attempt is out, ``failed(tracked, why)`` when one cannot
        go out, ``wanted(tracked, celery_id)`` whether an attempt is still to be sent."""
        self._app = app
        self._settings = settings
        self._sent, self._failed, self._wanted = sent, failed, wanted
        self._retry_policy = publish_retry_policy(settings.outage_tolerance)
        self._ignore_result = settings.result_backend is None
        # Celery's task-sent events (for Flower), sent in batches by a thread of their own.
        self._events = SentEvents(app) if app.conf.task_send_sent_event else None
        # Luigi's thread publishes through this producer, in batches (None: not yet, or not batching).
        self._producer: Any = None
        self._batching = True
        self._batch: Any = None
        self._batched: list[tuple[Tracked, str]] = []
        # The queues that producer has declared: it declares each once (kombu would skip the
        # declaration too, but its check of its cache cost 4% of the dispatcher's CPU).
        self._declared: set[str] = set()

    def start(self) -> None:
        if self._events is not None:
            self._events.start()

    def close(self) -> None:
        # A batch left here was never published: the run was cut short, and Luigi has given up on its tasks.
        self._drop_batch()
        if self._producer is not None:
            self._producer.release()
        if self._events is not None:
            self._events.close()

    def send(self, tracked: Tracked, celery_id: str, batched: bool = False) -> None:
        """Publish the attempt ``celery_id`` of ``tracked``; ``batched`` (Luigi's thread only): in
        the batch :meth:`flush` sends."""
        task_id = tracked.msg.task_id
        tracked.msg = dataclasses.replace(tracked.msg, sent_at=time.time())
        kwargs = {"message": signing.sign(tracked.msg.to_dict(), self._settings.secret)}
        producer = self._batch_producer() if batched else None
        declared = False
        if producer is not None:
            declared = tracked.queue in self._declared
            self._declared.add(tracked.queue)
        try:
            self._put(producer, tracked, celery_id, kwargs, declared)
        except Exception as e:
            if producer is not None:  # the batch broke (the broker went away): one by one, with retries
                self._resend(self._drop_batch(), e)
                self.send(tracked, celery_id)
                return
            url = self._app.conf.broker_url
            self._failed(tracked, f"could not publish {task_id} to {redact(url)}: {scrub(str(e), urls=[url])}")
            return
        logger.debug("sent %s as %s", task_id, celery_id)
        self._sent(tracked)
        if producer is not None:
            self._batched.append((tracked, celery_id))
            if len(self._batched) >= PUBLISH_BATCH:
                self.flush()

    def _put(self, producer: Any, tracked: Tracked, celery_id: str, kwargs: dict[str, Any], declared: bool) -> None:
        """Publish the Celery message of one attempt with ``producer`` (None: one of the pool's,
        at once), and queue its task-sent event. ``declared``: the producer declared its queue."""
        options = tracked.publish_options
        kwargsrepr = repr(kwargs)[:KWARGSREPR_MAX]  # what Flower shows
        body, headers, sent = celery_message(
            celery_id, tracked.msg.task_id, kwargs, kwargsrepr, self._ignore_result,
            options.get("time_limit"), options.get("soft_time_limit"),
        )  # fmt: skip
        queue = self._app.amqp.queues[tracked.queue]
        publish = {
            "exchange": "", "routing_key": tracked.queue, "serializer": "json", "compression": None,
            "delivery_mode": queue.exchange.delivery_mode or self._app.conf.task_default_delivery_mode,
            "declare": [] if declared else [queue], "headers": headers, "timeout": None, "confirm_timeout": None,
            "correlation_id": celery_id, "reply_to": self._app.thread_oid, "priority": options.get("priority"),
            "argsrepr": "()", "kwargsrepr": kwargsrepr,
        }  # fmt: skip
        if producer is not None:  # into the batch: nothing goes out, nothing to retry, until flush()
            producer.publish(body, retry=False, **publish)
        else:
            with self._app.producer_pool.acquire(block=True) as producer:
                producer.publish(body, retry=True, retry_policy=self._retry_policy, **publish)
        if self._events is not None:
            self._events.publish("task-sent", {**sent, "queue": tracked.queue, "exchange": "",
                                               "routing_key": tracked.queue}, producer)  # fmt: skip

    def flush(self) -> None:
        """Publish what Luigi's loop has sent since the last flush; it calls this before it waits."""
        batch, pending = self._take_batch()
        if batch is None:
            return
        try:
            batch.__exit__(None, None, None)
        except Exception as e:
            self._resend(pending, e)

    def _batch_producer(self) -> Any:
        """The producer with a batch open, or None where the broker cannot batch."""
        if not self._batching:
            return None
        if self._producer is None:
            producer = self._app.producer_pool.acquire(block=True)
            if not producer.supports_batch_publish:
                producer.release()
                self._batching = False
                return None
            self._producer = producer
        if self._batch is None:
            self._batch = self._producer.batch(max_size=10 * PUBLISH_BATCH)  # flushed by us, before kombu would
            self._batch.__enter__()
        return self._producer

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
            self._declared.clear()
        if pending:
            logger.warning("a batch of %d task(s) may not have reached the broker (%s): sending each again",
                           len(pending), because)  # fmt: skip
            for tracked, celery_id in pending:
                if self._wanted(tracked, celery_id):
                    self.send(tracked, celery_id)
