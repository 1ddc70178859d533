"""Celery's ``task-sent`` events, published in batches off the dispatcher's main thread.

Celery publishes one event message per task sent, in the sending thread, right
after the task: a second broker round trip on the path of every dispatch. The
dispatcher hands Celery a :class:`SentEvents` as its ``event_dispatcher``
instead: ``publish`` only builds the event, as Celery would, and queues it; one
thread sends what has queued as one list message. That is how Celery's own
worker sends its task events (``buffer_group``), and Flower reads such lists.

Events are for watching, not for running: a batch the broker does not take
after a few tries is dropped (and logged), as are new events past
``MAX_QUEUED`` waiting.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

from celery import Celery
from celery.events.event import Event, get_exchange
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset

logger = logging.getLogger(__name__)

# A batch goes out when it holds this many events, or this long after its first one.
BATCH_SIZE = 200
BATCH_DELAY = 0.05
MAX_QUEUED = 100_000
_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


class SentEvents(threading.Thread):
    """Stands in for Celery's event dispatcher where ``send_task`` publishes ``task-sent``."""

    def __init__(self, app: Celery) -> None:
        super().__init__(name="luigi-celery-sent-events", daemon=True)
        self._app = app
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._hostname = anon_nodename()
        self._pid = os.getpid()
        self.dropped = 0

    # Called by Celery's send_task_message, in the sending thread.
    def publish(self, type: str, fields: dict[str, Any], producer: Any, **kwargs: Any) -> None:
        if self._queue.qsize() >= MAX_QUEUED:
            self._drop(1, "the queue of events is full")
            return
        # The fields Celery's own dispatcher adds, with the time of sending.
        event = Event(type, hostname=self._hostname, utcoffset=utcoffset(), pid=self._pid, **fields)
        event["clock"] = self._app.clock.forward()
        self._queue.put(event)

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds) and stop."""
        self._queue.put(None)
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        with self._app.connection_for_write() as conn:
            exchange = get_exchange(conn, name=self._app.conf.event_exchange)
        while True:
            batch, closed = self._next_batch()
            if batch:
                self._send(batch, exchange)
            if closed:
                return

    def _next_batch(self) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``BATCH_SIZE`` events: the first one waited for, the rest for ``BATCH_DELAY``."""
        event = self._queue.get()
        deadline = time.monotonic() + BATCH_DELAY
        batch: list[dict[str, Any]] = []
        while event is not None:
            batch.append(event)
            if len(batch) >= BATCH_SIZE:
                return batch, False
            try:
                event = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return batch, False
        return batch, True

    def _send(self, batch: list[dict[str, Any]], exchange: Any) -> None:
        try:
            with self._app.producer_pool.acquire(block=True) as producer:
                producer.publish(
                    batch,
                    exchange=exchange.name,
                    routing_key="task.multi",
                    declare=[exchange],
                    serializer="json",
                    headers={"hostname": self._hostname},
                    delivery_mode=1,  # transient, like every Celery event
                    retry=True,
                    retry_policy=_RETRY_POLICY,
                )
        except Exception as e:
            self._drop(len(batch), str(e))

    def _drop(self, count: int, why: str) -> None:
        if not self.dropped:
            logger.warning("dropped %d task-sent event(s) (Flower will miss them): %s", count, why)
        self.dropped += count
