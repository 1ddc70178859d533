"""The reply path: how results and status updates get back to the dispatcher.

Each run of ``luigi-celery run`` owns one reply queue on the broker itself
(``luigi-celery.reply.<run id>``).  Workers publish JSON replies to it through
the default exchange; ONE watcher thread in the dispatcher consumes it with a
connection of its own, for every task in flight.

Why not Celery's result backend: Celery's Redis backend subscribes a pub/sub
channel per task id at publish time and its ``rpc://`` backend ties replies
to the publishing thread; either way a dispatcher with thousands of tasks in
flight pays per task.  A reply queue is one consumer and no polling, needs no
second server with RabbitMQ, and works unchanged on kombu's ``filesystem://``
transport, which is what the embedded mode runs on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from luigi_celery import redis_replies
from luigi_celery.errors import MessageError
from luigi_celery.message import MAX_MESSAGE_BYTES
from luigi_celery.redaction import scrub
from luigi_celery.settings import DEFAULT_OUTAGE_TOLERANCE, redact

logger = logging.getLogger(__name__)

REPLY_QUEUE_PREFIX = "luigi-celery.reply."
# An abandoned reply queue (its dispatcher died) disappears from RabbitMQ after a day.
REPLY_QUEUE_EXPIRES = 24 * 3600.0


def publish_retry_policy(tolerance: float) -> dict[str, float]:
    """kombu's retry policy for publishing through an outage of about ``tolerance`` seconds.

    Waits grow from 0.2 s by 0.5 s a try up to 3 s; the number of tries is
    what adds up to ``tolerance``.
    """
    start, step, most = 0.2, 0.5, 3.0
    waited, interval, tries = 0.0, start, 0
    while waited < tolerance:
        waited, interval, tries = waited + interval, min(interval + step, most), tries + 1
    return {"max_retries": tries, "interval_start": start, "interval_step": step, "interval_max": most}


# A worker publishing a reply retries about 20 s before giving up: a broker restart, a blip.
PUBLISH_RETRY_POLICY = publish_retry_policy(20.0)
# How often the watcher wakes up when no reply arrives (to check it should still run).
WATCH_TICK = 0.2
RECONNECT_BACKOFF_MAX = 5.0

_DEFAULT_EXCHANGE = Exchange("", type="direct")


def reply_queue_name(run_id: str) -> str:
    return REPLY_QUEUE_PREFIX + run_id


def reply_queue(name: str) -> Queue:
    return Queue(
        name,
        exchange=_DEFAULT_EXCHANGE,
        routing_key=name,
        durable=True,
        auto_delete=False,
        expires=REPLY_QUEUE_EXPIRES,
    )


def publish_reply(app: Celery, reply_to: str, payload: dict[str, Any]) -> None:
    """Send one reply (a JSON object) to a dispatcher's reply queue."""
    with app.producer_pool.acquire(block=True) as producer:
        producer.publish(
            payload,
            exchange="",
            routing_key=reply_to,
            serializer="json",
            delivery_mode=2,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )


# A reply queue seen to exist is taken to exist for this long: a worker online when its
# dispatcher is interrupted also hears Celery's revoke broadcast.
REPLY_QUEUE_SEEN_FOR = 1.0


class ReplyQueueCheck:
    """Tells a worker with no coordination store (RabbitMQ alone) whether a message's run is
    over: its dispatcher deletes its reply queue when it closes the run (or is interrupted),
    and the reply queue's name is unique to that dispatcher (its run id is random there)."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._seen: dict[str, float] = {}  # reply queue -> when it was seen to exist

    def __call__(self, msg: Any) -> bool:
        name: str = msg.reply_to
        now = time.monotonic()
        if now - self._seen.get(name, float("-inf")) < REPLY_QUEUE_SEEN_FOR:
            return False
        gone = not self._exists(name)
        if not gone:
            self._seen = {q: t for q, t in self._seen.items() if now - t < REPLY_QUEUE_SEEN_FOR}
            self._seen[name] = now
        return gone

    def _exists(self, name: str) -> bool:
        from amqp.exceptions import NotFound

        try:
            with self._app.pool.acquire(block=True) as conn:
                channel = conn.channel()  # a channel of its own: a missing queue closes it
                try:
                    channel.queue_declare(queue=name, passive=True)
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
        except NotFound:
            return False
        except Exception as e:  # the broker is away for a moment: run it (its reply will be retried)
            logger.warning("could not check reply queue %s: %s", name, e)
        return True


class ResultWatcher(threading.Thread):
    """Consumes one reply queue and hands every reply to ``on_reply``.

    ``on_reply`` runs in this thread and must only hand the data over (to a
    queue); ``on_tick`` is called about every ``WATCH_TICK`` seconds, whether
    or not replies arrive.  Connection errors are retried with backoff for as
    long as the watcher runs; once the broker has been gone for ``tolerance``
    seconds, ``on_lost`` is called once with the reason (the dispatcher then
    fails what is in flight), and the watcher keeps trying.
    """

    def __init__(
        self,
        app: Celery,
        queue_name: str,
        on_reply: Callable[[Any], None],
        on_tick: Callable[[], None] = lambda: None,
        on_lost: Callable[[str], None] = lambda reason: None,
        tolerance: float = DEFAULT_OUTAGE_TOLERANCE,
    ) -> None:
        super().__init__(name="luigi-celery-results", daemon=True)
        self._app = app
        self._queue = reply_queue(queue_name)
        self._on_reply = on_reply
        self._on_tick = on_tick
        self._on_lost = on_lost
        self._tolerance = tolerance
        self._down_since: float | None = None
        self._stopping = threading.Event()
        self.ready = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            try:
                self._consume()
                return
            except Exception as e:  # the broker went away: reconnect, never die silently
                if self._stopping.is_set():
                    # The run is closing: its reply queue (or the embedded broker's folder) is
                    # being removed under the consumer. Nothing was lost.
                    logger.debug("result watcher stopped: %s", e)
                    return
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                elif now - self._down_since >= self._tolerance:
                    self._down_since = float("inf")  # said once per outage
                    url = self._app.conf.broker_url
                    reason = scrub(str(e), urls=[url])
                    self._on_lost(f"lost the broker at {redact(url)} for more than {self._tolerance:g} s: {reason}")
                logger.warning("result watcher lost the broker (%s); reconnecting in %.1f s", e, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX)

    def _consume(self) -> None:
        with self._app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            if redis_replies.can_read(conn.default_channel):
                self._consume_redis(redis_replies.RedisReplies(conn.default_channel, self._queue.name))
                return
            with conn.Consumer(
                self._queue,
                on_message=self._on_message,
                accept=["json"],
                no_ack=True,
                on_decode_error=self._on_decode_error,
            ):
                self.ready.set()
                self._down_since = None
                next_tick = time.monotonic() + WATCH_TICK
                while not self._stopping.is_set():
                    try:
                        conn.drain_events(timeout=WATCH_TICK)
                    except TimeoutError:
                        conn.heartbeat_check()
                    if time.monotonic() >= next_tick:
                        self._tick()
                        next_tick = time.monotonic() + WATCH_TICK

    def _consume_redis(self, replies: redis_replies.RedisReplies) -> None:
        """Many replies a round trip, where the broker is Redis (redis_replies.py)."""
        self.ready.set()
        self._down_since = None
        next_tick = time.monotonic() + WATCH_TICK
        while not self._stopping.is_set():
            for item in replies.take(timeout=WATCH_TICK):
                try:
                    body = redis_replies.decode(item)
                except MessageError as e:
                    logger.error("dropped a reply: %s", e)
                    continue
                self._hand_over(body)
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + WATCH_TICK

    def _tick(self) -> None:
        try:
            self._on_tick()
        except Exception:
            logger.exception("result watcher tick failed")

    def _on_message(self, message: Any) -> None:
        # Anyone on the broker can publish here: the size is checked before the JSON is read
        # (and kombu refuses to inflate a compressed message: guard.py).
        size = len(message.body or b"")
        if size > MAX_MESSAGE_BYTES:
            logger.error("dropped a reply of %d bytes (at most %d)", size, MAX_MESSAGE_BYTES)
            return
        try:
            body = message.decode()
        except Exception as e:
            self._on_decode_error(message, e)
            return
        self._hand_over(body)

    def _hand_over(self, body: Any) -> None:
        try:
            self._on_reply(body)
        except Exception:
            logger.exception("could not handle a reply")

    def _on_decode_error(self, message: Any, exc: Exception) -> None:
        logger.error("dropped a reply that is not valid JSON (%s): %s", message.content_type, exc)
