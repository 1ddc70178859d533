"""Queue depth: how many tasks wait in a queue, the signal an autoscaler follows.

Waiting messages come from a passive ``queue_declare``: kombu sums Redis's
priority sub-queues, and RabbitMQ answers with its ready count.  On Redis,
messages handed to a worker and not yet acknowledged (a running task, a
countdown) are in kombu's ``unacked`` hash; those routed to the queue count
too.  RabbitMQ reports its unacknowledged messages only through its
management API (``rabbitmq_management``), which refreshes them every 5 s by
default; when that API does not answer, the depth is the ready count and a
warning says so once.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from celery import Celery

from luigi_celery.brokers import is_rabbitmq, is_redis
from luigi_celery.errors import BrokerUnavailable
from luigi_celery.redaction import redact, scrub

logger = logging.getLogger(__name__)


# The management API's port when the broker URL does not say otherwise (rabbitmq_api_url).
RABBITMQ_API_PORT = 15672
RABBITMQ_API_TIMEOUT = 2.0


def queue_depths(app: Celery, queues: Iterable[str], rabbitmq_api_url: str | None = None) -> dict[str, int]:
    """Depth per queue, in one connection; a queue that does not exist has depth 0."""
    depths: dict[str, int] = {}
    url = app.conf.broker_url
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            if is_redis(url):
                reserved = _reserved_on_redis(conn.default_channel)
            elif is_rabbitmq(url):
                reserved = _reserved_on_rabbitmq(rabbitmq_api_url or _default_api_url(conn), conn.virtual_host)
            else:
                reserved = {}
            for queue in queues:
                depths[queue] = _waiting(conn, queue) + reserved.get(queue, 0)
    except Exception as e:
        raise BrokerUnavailable(f"cannot read queue depths from {redact(url)}: {scrub(str(e), urls=[url])}") from e
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


def _default_api_url(conn: Any) -> str:
    """The management API on the broker's host, with the broker's credentials."""
    user, password = (urllib.parse.quote(str(v or ""), safe="") for v in (conn.userid, conn.password))
    return f"http://{user}:{password}@{conn.hostname}:{RABBITMQ_API_PORT}/"


def rabbitmq_api_url(app: Celery, configured: str | None = None) -> str:
    """The management API's ``/api/`` URL for ``app``'s RabbitMQ broker (``configured`` if given)."""
    return (configured or _default_api_url(app.connection_for_read())).rstrip("/") + "/api/"


_warned_api: set[str] = set()


def _reserved_on_rabbitmq(api_url: str, vhost: str) -> dict[str, int]:
    """Unacknowledged messages per queue of ``vhost``, from RabbitMQ's management API.

    An API that does not answer gives nothing (the depth is then the ready
    count) and a warning, once per URL.
    """
    parts = urllib.parse.urlsplit(api_url)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # the credentials go in a header
    path = parts.path.rstrip("/") + "/api/queues/" + urllib.parse.quote(vhost or "/", safe="")
    url = urllib.parse.urlunsplit((parts.scheme, netloc, path, "columns=name,messages_unacknowledged", ""))
    request = urllib.request.Request(url)
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=RABBITMQ_API_TIMEOUT) as response:
            listed = json.load(response)
    except (OSError, ValueError) as e:
        if api_url not in _warned_api:
            _warned_api.add(api_url)
            logger.warning(
                "RabbitMQ management API at %s did not answer (%s): queue depth counts ready messages only",
                redact(api_url),
                e,
            )
        return {}
    return {
        q["name"]: q["messages_unacknowledged"]
        for q in listed
        if isinstance(q, dict) and isinstance(q.get("name"), str) and isinstance(q.get("messages_unacknowledged"), int)
    }


class QueueDepthCollector:
    """A Prometheus collector: ``luigi_celery_queue_depth{queue}``, read from the broker at each scrape."""

    def __init__(self, app: Celery, queues: Callable[[], Iterable[str]], rabbitmq_api_url: str | None = None) -> None:
        self._app = app
        self._queues = queues
        self._api_url = rabbitmq_api_url

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        gauge = GaugeMetricFamily(
            "luigi_celery_queue_depth",
            "Messages waiting in a queue plus those handed to a worker and not yet acknowledged",
            labels=["queue"],
        )
        try:
            for queue, depth in sorted(queue_depths(self._app, self._queues(), self._api_url).items()):
                gauge.add_metric([queue], depth)
        except BrokerUnavailable as e:
            logger.warning("%s", e)  # an empty gauge this scrape; the next one tries again
        yield gauge
