"""The Redis transport survives losing its connection while it holds an unacknowledged message."""

from __future__ import annotations

import uuid

import pytest
import redis
from kombu import Connection, Queue

from luigi_celery.redis_broker import TRANSPORT
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.broker


def _channel_holding_a_message(conn: Connection):
    queue = Queue(f"lc-test-{uuid.uuid4().hex[:10]}", routing_key="x")
    with conn.Producer() as producer:
        producer.publish({"n": 1}, exchange="", routing_key=queue.name, declare=[queue], serializer="json")
    channel = conn.channel()
    message = queue(channel).get(no_ack=False)
    assert message is not None
    return channel, queue


def test_closing_a_channel_after_its_connection_raises_only_a_connection_error(brokers):
    conn = Connection(REDIS_URL, transport=TRANSPORT)
    try:
        # Given a channel that holds a message it has not acknowledged
        channel, queue = _channel_holding_a_message(conn)
        # When the transport has let go of its connection first (Celery 5.7 on a lost broker)
        client = channel.connection.client
        channel.connection.client = None
        # Then closing the channel raises kombu's connection error, which Celery ignores
        with pytest.raises(redis.ConnectionError):
            channel.close()
        channel.connection.client = client
        client.maybe_close_channel(channel)  # what Celery calls: nothing escapes it
    finally:
        conn.release()
    # and the message is not gone: it waits in Redis's unacknowledged set to be given out again
    with redis.Redis.from_url(REDIS_URL) as r:
        assert any(queue.name.encode() in v for v in r.hvals("unacked"))
        r.delete(queue.name)


def test_publishing_reuses_one_client_per_connection_pool(brokers):
    conn = Connection(REDIS_URL, transport=TRANSPORT)
    try:
        channel = conn.channel()
        queue = Queue(f"lc-test-{uuid.uuid4().hex[:10]}", routing_key="x")
        # Given a channel that published twice
        with conn.Producer(channel) as producer:
            for n in range(2):
                producer.publish({"n": n}, exchange="", routing_key=queue.name, declare=[queue], serializer="json")
        first = channel._create_client()
        # Then it used one client, not one per message, and both messages arrived
        assert channel._create_client() is first
        assert [queue(channel).get(no_ack=True).payload["n"] for _ in range(2)] == [0, 1]
        # and a pool made again (after a lost connection) gets a client of its own
        channel._pool = None
        assert channel._create_client() is not first
        assert channel._create_client().connection_pool is channel.pool
        queue(channel).delete()
    finally:
        conn.release()
