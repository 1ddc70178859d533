"""Queue depth, against the real brokers: the autoscaling signal."""

from __future__ import annotations

import time
import uuid

import pytest
from kombu import Connection, Queue

from luigi_celery.app import make_app
from luigi_celery.queues import QueueDepthCollector, queue_depths
from luigi_celery.settings import Settings
from tests.conftest import BROKERS, RABBITMQ_URL, REDIS_URL

pytestmark = pytest.mark.broker

# RabbitMQ's management API refreshes its message counts every 5 s (collect_statistics_interval).
API_REFRESH = 15.0


def _publish(url: str, queue: str, count: int, **options) -> None:
    declared = Queue(queue, routing_key=queue, durable=True, auto_delete=False, max_priority=10)
    with Connection(url) as conn, conn.Producer() as producer:
        for n in range(count):
            producer.publish({"n": n}, exchange="", routing_key=queue, declare=[declared], serializer="json", **options)


def _delete(url: str, queue: str) -> None:
    with Connection(url) as conn:
        Queue(queue, routing_key=queue)(conn.default_channel).delete()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_the_depth_is_what_was_published_to_a_queue_nobody_consumes(brokers, broker):
    # Given 7 messages on a queue with no consumer, 3 of them with a priority, and a queue never used
    url = BROKERS[broker]
    queue, empty = f"lc-test-{uuid.uuid4().hex[:10]}", f"lc-test-{uuid.uuid4().hex[:10]}"
    _publish(url, queue, 4)
    _publish(url, queue, 3, priority=7)
    try:
        # Then the depth counts every one of them, and the unused queue is empty
        assert queue_depths(make_app(Settings(broker_url=url)), [queue, empty]) == {queue: 7, empty: 0}
    finally:
        _delete(url, queue)


def test_on_redis_a_message_handed_out_and_not_acknowledged_still_counts(brokers):
    queue = f"lc-test-{uuid.uuid4().hex[:10]}"
    _publish(REDIS_URL, queue, 3)
    app = make_app(Settings(broker_url=REDIS_URL))
    with Connection(REDIS_URL) as conn:
        channel = conn.channel()
        taken = Queue(queue, routing_key=queue)(channel).get(no_ack=False)
        assert taken is not None
        # Then the one a worker holds still counts: 2 waiting + 1 reserved
        assert queue_depths(app, [queue]) == {queue: 3}
        taken.ack()
    assert queue_depths(app, [queue]) == {queue: 2}
    _delete(REDIS_URL, queue)


def _depth_becomes(app, queue: str, expected: int, api_url: str | None = None) -> dict[str, int]:
    deadline = time.monotonic() + API_REFRESH
    while True:
        depths = queue_depths(app, [queue], api_url)
        if depths == {queue: expected} or time.monotonic() > deadline:
            return depths
        time.sleep(0.5)


def test_on_rabbitmq_a_message_handed_out_and_not_acknowledged_still_counts(brokers):
    queue = f"lc-test-{uuid.uuid4().hex[:10]}"
    _publish(RABBITMQ_URL, queue, 3)
    app = make_app(Settings(broker_url=RABBITMQ_URL))
    try:
        with Connection(RABBITMQ_URL) as conn:
            taken = Queue(queue, routing_key=queue)(conn.channel()).get(no_ack=False)
            assert taken is not None
            # Then the one a consumer holds still counts (from the management API): 2 ready + 1 unacked
            assert _depth_becomes(app, queue, 3) == {queue: 3}
            taken.ack()
            assert _depth_becomes(app, queue, 2) == {queue: 2}
    finally:
        _delete(RABBITMQ_URL, queue)


def test_without_the_management_api_the_rabbitmq_depth_is_the_ready_count(brokers, caplog):
    queue = f"lc-test-{uuid.uuid4().hex[:10]}"
    _publish(RABBITMQ_URL, queue, 3)
    app = make_app(Settings(broker_url=RABBITMQ_URL))
    nowhere = "http://guest:secret@127.0.0.1:1/"
    try:
        with Connection(RABBITMQ_URL) as conn:
            taken = Queue(queue, routing_key=queue)(conn.channel()).get(no_ack=False)
            assert queue_depths(app, [queue], nowhere) == {queue: 2}
            assert queue_depths(app, [queue], nowhere) == {queue: 2}
            taken.ack()
    finally:
        _delete(RABBITMQ_URL, queue)
    # one warning, and it does not show the password
    warnings = [r.getMessage() for r in caplog.records if "management API" in r.getMessage()]
    assert len(warnings) == 1 and "secret" not in warnings[0] and "ready messages only" in warnings[0]


def test_the_collector_exports_the_gauge_and_survives_a_broker_that_is_away(brokers):
    queue = f"lc-test-{uuid.uuid4().hex[:10]}"
    _publish(RABBITMQ_URL, queue, 2)
    try:
        (family,) = QueueDepthCollector(make_app(Settings(broker_url=RABBITMQ_URL)), lambda: [queue]).collect()
        assert [(s.name, s.labels, s.value) for s in family.samples] == [
            ("luigi_celery_queue_depth", {"queue": queue}, 2)
        ]
    finally:
        _delete(RABBITMQ_URL, queue)
    away = QueueDepthCollector(make_app(Settings(broker_url="redis://127.0.0.1:1/0")), lambda: [queue])
    (family,) = away.collect()
    assert family.samples == []
