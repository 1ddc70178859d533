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

import collections
import logging
import os
import threading
import time
from typing import Any

from celery import Celery
from celery.events.event import Event, get_exchange
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset

logger = logging.getLogger(__name__)

# A batch holds at most this many events; it goes out this long after the first one of a burst.
BATCH_SIZE = 200
BATCH_DELAY = 0.05
MAX_QUEUED = 100_000
_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


class SentEvents(threading.Thread):
    """Stands in for Celery's event dispatcher where ``send_task`` publishes ``task-sent``.

    ``publish`` appends to a deque and wakes the thread only when it sleeps: the sending
    thread takes no lock and wakes nobody per event (a queue.Queue did both, for 5% of the
    dispatcher's CPU on a wide DAG)."""

    def __init__(self, app: Celery) -> None:
        super().__init__(name="luigi-celery-sent-events", daemon=True)
        self._app = app
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._closing = False
        self._hostname = anon_nodename()
        self._pid = os.getpid()
        self.dropped = 0

    # Called by Celery's send_task_message, in the sending thread.
    def publish(self, type: str, fields: dict[str, Any], producer: Any, **kwargs: Any) -> None:
        if len(self._events) >= MAX_QUEUED:
            self._drop(1, "the queue of events is full")
            return
        # The fields Celery's own dispatcher adds, with the time of sending.
        event = Event(type, hostname=self._hostname, utcoffset=utcoffset(), pid=self._pid, **fields)
        event["clock"] = self._app.clock.forward()
        self._events.append(event)
        if not self._wake.is_set():
            self._wake.set()

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds) and stop."""
        self._closing = True
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        with self._app.connection_for_write() as conn:
            exchange = get_exchange(conn, name=self._app.conf.event_exchange)
        while not self._closing:
            self._wake.wait()
            self._wake.clear()  # (before taking: an event appended from now on wakes it again)
            if not self._closing:
                time.sleep(BATCH_DELAY)  # the events of the next few sends go in the same batch
            self._send_queued(exchange)
        self._send_queued(exchange)

    def _send_queued(self, exchange: Any) -> None:
        """Send every event queued, ``BATCH_SIZE`` to a message."""
        while self._events:
            batch = [self._events.popleft() for _ in range(min(BATCH_SIZE, len(self._events)))]
            self._send(batch, exchange)

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
