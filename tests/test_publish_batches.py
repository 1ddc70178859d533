"""Tasks Luigi's loop sends between two waits reach the broker in one round trip (Redis), when
the loop is about to wait; a batch the broker refuses is sent again one task at a time."""

from __future__ import annotations

import queue
import time
import uuid

import kombu
import pytest

from luigi_celery.app import make_app
from luigi_celery.process import ResultQueue
from luigi_celery.sender import Sender
from luigi_celery.settings import Settings
from tests.pipelines import Unlimited
from tests.test_sender_unit import Flight


def _sender(broker: str):
    settings = Settings(broker_url=broker, queue=f"batches-{uuid.uuid4().hex[:8]}")
    made = Sender(make_app(settings), settings)
    yield made
    made._publisher._drop_batch()
    with made.app.connection_for_write() as conn:
        kombu.Queue(settings.queue)(conn.default_channel).delete()


@pytest.fixture(params=["redis", "rabbitmq"])
def sender(request, brokers):
    yield from _sender(brokers[request.param])


@pytest.fixture
def redis_sender(brokers):
    yield from _sender(brokers["redis"])


def _waiting(sender: Sender, expected: int) -> int:
    """Messages in the sender's queue on the broker, once they are ``expected`` (or after 5 s):
    RabbitMQ counts a message published on another connection a moment later."""
    deadline = time.monotonic() + 5
    with sender.app.connection_for_write() as conn:
        while True:
            try:
                count = kombu.Queue(sender.settings.queue)(conn.default_channel).queue_declare(passive=True)
                found = count.message_count
            except conn.channel_errors:  # Redis: not declared yet, as nothing was published to it
                found = 0
            if found == expected or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def _send(sender: Sender, count: int) -> list[Flight]:
    flights = [Flight(Unlimited(n=i, out=f"/tmp/{uuid.uuid4().hex}")) for i in range(count)]
    for flight in flights:
        sender.send(flight)
    return flights


@pytest.mark.broker
def test_tasks_sent_between_waits_reach_the_broker_together_when_the_loop_waits(sender) -> None:
    # When Luigi's loop sends five tasks
    flights = _send(sender, 5)
    # Then on Redis they wait in the batch, on RabbitMQ (no round trip to save) they are out
    redis = sender.app.connection_for_write().transport.driver_type == "redis"
    assert _waiting(sender, 0 if redis else 5) == (0 if redis else 5)
    # and all five are out once the loop waits for a reply
    results = sender.results
    with pytest.raises(queue.Empty):
        results.get(timeout=0.01)
    assert _waiting(sender, 5) == 5
    assert not any(f.results for f in flights)


def test_a_waiting_get_flushes_only_when_it_would_wait() -> None:
    flushed = []
    results = ResultQueue(before_wait=lambda: flushed.append(True))
    results.put(("id", "DONE", "", [], []))
    assert results.get(timeout=1)[0] == "id"
    assert flushed == []  # a reply was there: no wait, no flush
    with pytest.raises(queue.Empty):
        results.get(timeout=0.01)
    assert flushed == [True]


@pytest.mark.broker
def test_a_batch_the_broker_refuses_is_sent_again_one_task_at_a_time(redis_sender, monkeypatch) -> None:
    sender = redis_sender  # only Redis batches publishes
    # Given three tasks in a batch whose pipeline then fails
    _send(sender, 3)
    batch = sender._publisher._batch
    real_exit = batch.__exit__

    def refuse(*exc):
        real_exit(RuntimeError, RuntimeError("the broker went away"), None)  # discarded, as a failed flush
        raise ConnectionError("the broker went away")

    monkeypatch.setattr(batch, "__exit__", refuse)
    # When the loop waits
    sender.flush()
    # Then each of the three went out again, on its own
    assert _waiting(sender, 3) == 3
    assert sender._publisher._batch is None and sender._publisher._batched == []


@pytest.mark.broker
def test_the_batch_producer_declares_a_queue_once_and_again_after_its_connection_broke(redis_sender, monkeypatch):
    sender = redis_sender
    declared: list[str] = []
    real = kombu.Producer.maybe_declare

    def counted(self, entity, *args, **kwargs):
        declared.append(entity.name)
        return real(self, entity, *args, **kwargs)

    monkeypatch.setattr(kombu.Producer, "maybe_declare", counted)
    # Given five tasks sent through the batch producer
    _send(sender, 5)
    sender.flush()
    # Then their queue was declared once, and all five are out
    assert declared == [sender.settings.queue]
    assert _waiting(sender, 5) == 5
    # and a producer made anew after a broken batch declares it again
    sender._publisher._resend([], ConnectionError("the broker went away"))
    _send(sender, 1)
    sender.flush()
    assert declared == [sender.settings.queue] * 2
    assert _waiting(sender, 6) == 6
