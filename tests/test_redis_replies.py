"""Replies read from Redis many at a time (redis_replies.py), by the real watcher on the real broker."""

from __future__ import annotations

import base64
import json
import pickle
import threading
import uuid
import zlib
from typing import Any

import pytest
import redis
from kombu import Connection

from luigi_celery import redis_replies
from luigi_celery.app import make_app
from luigi_celery.errors import MessageError
from luigi_celery.message import MAX_MESSAGE_BYTES
from luigi_celery.results import ResultWatcher, publish_reply, reply_queue, reply_queue_name
from luigi_celery.settings import Settings
from tests.conftest import REDIS_URL, wait_until

pytestmark = pytest.mark.broker


def _envelope(content: Any, **changes: Any) -> bytes:
    envelope = {
        "body": base64.b64encode(json.dumps(content).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {},
        "properties": {"body_encoding": "base64"},
    }
    envelope.update(changes)
    return json.dumps(envelope).encode()


def test_decode_reads_json_bodies_only() -> None:
    assert redis_replies.decode(_envelope({"n": 1})) == {"n": 1}
    as_text = {"body": json.dumps({"n": 2}), "properties": {}}
    assert redis_replies.decode(_envelope(None, **as_text)) == {"n": 2}
    refused = {
        "pickled": _envelope(None, body=base64.b64encode(pickle.dumps({"n": 3})).decode(),
                             **{"content-type": "application/x-python-serialize"}),
        "compressed": _envelope(None, body=base64.b64encode(zlib.compress(b'{"n": 4}')).decode(),
                                headers={"compression": "application/x-gzip"}),
        "not json": _envelope(None, body=base64.b64encode(b"{nope").decode()),
        "bad base64": _envelope(None, body="***"),
        "no envelope": b"[1, 2",
        "too big": _envelope("x" * MAX_MESSAGE_BYTES),
    }  # fmt: skip
    for name, item in refused.items():
        with pytest.raises(MessageError):
            redis_replies.decode(item)
        assert name  # (named for the reader of a failure)


def test_the_watcher_takes_many_replies_a_round_trip_in_order_and_drops_hostile_ones(monkeypatch, caplog) -> None:
    # Given a reply queue on Redis holding 60 replies as workers publish them, and four hostile ones
    app = make_app(Settings(broker_url=REDIS_URL))
    name = reply_queue_name(f"bulk-{uuid.uuid4().hex[:8]}")
    with Connection(REDIS_URL) as conn:
        reply_queue(name)(conn.default_channel).declare()
        producer = conn.Producer()
        producer.publish({"n": "pickled"}, routing_key=name, serializer="pickle")
        producer.publish({"n": "compressed"}, routing_key=name, serializer="json", compression="zlib")
        conn.default_channel.client.lpush(name, b"not kombu's", _envelope("x" * MAX_MESSAGE_BYTES))
    for n in range(60):
        publish_reply(app, name, {"n": n})
    takes: list[int] = []
    take = redis_replies.RedisReplies.take

    def counted(self, timeout):
        items = take(self, timeout)
        takes.append(len(items))
        return items

    monkeypatch.setattr(redis_replies.RedisReplies, "take", counted)
    got: list[Any] = []
    watcher = ResultWatcher(app, name, got.append)
    watcher.start()
    try:
        # When the watcher reads it / Then it hands over the 60, in order, in a round trip or two
        wait_until("60 replies", lambda: len(got) == 60, timeout=10)
        assert got == [{"n": n} for n in range(60)]
        assert sum(takes) == 64 and len([t for t in takes if t]) <= 2
        # and drops each hostile one, with a line that says why
        dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped a reply")]
        assert len(dropped) == 4, dropped
        # and a reply published later still arrives, one at a time
        publish_reply(app, name, {"n": "late"})
        wait_until("the late reply", lambda: got[-1] == {"n": "late"}, timeout=10)
    finally:
        watcher.stop()
        watcher.join(5)
        with Connection(REDIS_URL) as conn:
            reply_queue(name)(conn.default_channel).delete()


@pytest.mark.parametrize("prefix", ["", "lc-prefix-"])
def test_each_take_is_one_round_trip_whether_replies_wait_or_come_later(monkeypatch, prefix) -> None:
    # Given a reply queue on Redis (behind kombu's key prefix, when the transport has one)
    name = reply_queue_name(f"trips-{uuid.uuid4().hex[:8]}")
    with Connection(REDIS_URL, transport_options={"global_keyprefix": prefix}) as conn:
        client = conn.default_channel.client
        replies = redis_replies.RedisReplies(conn.default_channel, name)
        commands: list[str] = []
        real = redis.Redis.execute_command

        def counted(self, *args, **kwargs):
            commands.append(str(args[0]))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(redis.Redis, "execute_command", counted)
        try:
            # When three replies wait / Then one take, one command, hands over all three, oldest first
            client.lpush(name, _envelope(1), _envelope(2), _envelope(3))
            commands.clear()
            assert [redis_replies.decode(i) for i in replies.take(timeout=1)] == [1, 2, 3]
            assert len(commands) == 1
            # and a take that waits for the next reply to come is one command too
            later = threading.Timer(0.2, lambda: client.lpush(name, _envelope(4)))
            later.start()
            commands.clear()
            assert [redis_replies.decode(i) for i in replies.take(timeout=5)] == [4]
            assert len([c for c in commands if c != "LPUSH"]) == 1  # (the LPUSH is the timer's)
            # and a quiet queue gives nothing once its timeout is out
            assert replies.take(timeout=0.1) == []
        finally:
            monkeypatch.undo()
            client.delete(name)
