"""Queue depth: how many tasks wait in a queue, the signal an autoscaler follows.

Waiting messages come from a passive ``queue_declare``: kombu sums Redis's
priority sub-queues, and RabbitMQ answers with its ready count.  On Redis,
messages handed to a worker and not yet acknowledged (a running task, a
countdown) are in kombu's ``unacked`` hash; those routed to the queue count
too.  RabbitMQ reports its unacknowledged messages only through the
management API, which this does not use yet: there the depth is the ready
count.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from celery import Celery

from luigi_celery.errors import BrokerUnavailable
from luigi_celery.settings import redact

logger = logging.getLogger(__name__)


def queue_depths(app: Celery, queues: Iterable[str]) -> dict[str, int]:
    """Depth per queue, in one connection; a queue that does not exist has depth 0."""
    depths: dict[str, int] = {}
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            redis_broker = conn.transport.driver_type == "redis"
            reserved = _reserved_on_redis(conn.default_channel) if redis_broker else {}
            for queue in queues:
                depths[queue] = _waiting(conn, queue) + reserved.get(queue, 0)
    except Exception as e:
        raise BrokerUnavailable(f"cannot read queue depths from {redact(app.conf.broker_url)}: {e}") from e
    return depths


def _waiting(conn: Any, queue: str) -> int:
    channel = conn.channel()  # a passive declare of a missing queue closes its channel
    try:
        return int(channel.queue_declare(queue=queue, passive=True).message_count)
    except conn.channel_errors:
        return 0
    finally:
        conn.maybe_close_channel(channel)


def _reserved_on_redis(channel: Any) -> dict[str, int]:
    """Unacknowledged messages per queue, from kombu's ``unacked`` hash ([message, exchange, routing key])."""
    counts: dict[str, int] = {}
    for raw in channel.client.hvals(channel.unacked_key):
        try:
            routing_key = json.loads(raw)[2]
        except (ValueError, TypeError, IndexError, KeyError):
            continue
        if isinstance(routing_key, str):
            counts[routing_key] = counts.get(routing_key, 0) + 1
    return counts


class QueueDepthCollector:
    """A Prometheus collector: ``luigi_celery_queue_depth{queue}``, read from the broker at each scrape."""

    def __init__(self, app: Celery, queues: Callable[[], Iterable[str]]) -> None:
        self._app = app
        self._queues = queues

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        gauge = GaugeMetricFamily(
            "luigi_celery_queue_depth",
            "Messages waiting in a queue plus those handed to a worker and not yet acknowledged (Redis)",
            labels=["queue"],
        )
        try:
            for queue, depth in sorted(queue_depths(self._app, self._queues()).items()):
                gauge.add_metric([queue], depth)
        except BrokerUnavailable as e:
            logger.warning("%s", e)  # an empty gauge this scrape; the next one tries again
        yield gauge
