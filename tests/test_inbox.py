"""A task's inbox of messages from the scheduler, on a real broker: what it takes, what it drops."""

from __future__ import annotations

import queue
import uuid
from typing import Any

import pytest

from luigi_celery import message as m
from luigi_celery import signing
from luigi_celery.app import make_app
from luigi_celery.inbox import Inbox, delete, inbox_name, post
from luigi_celery.settings import Settings
from tests.conftest import wait_until

pytestmark = pytest.mark.broker

SECRET = "inbox-test-secret"


@pytest.fixture(params=["redis", "rabbitmq"])
def app(request, brokers):
    return make_app(Settings(broker_url=brokers[request.param], queue=f"inbox-{uuid.uuid4().hex[:8]}"))


def _attempt() -> m.TaskMessage:
    return m.TaskMessage(
        task_id="Listens_abc", module="tests.pipelines", family="Listens", params={}, attempt=1, run_id="r",
        reply_to="luigi-celery.reply.r",
    )  # fmt: skip


class Sent:
    """The status replies a task's responses make (RemoteStatusReporter.send)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []

    def __call__(self, field: str, value: Any) -> None:
        self.items.append((field, value))


@pytest.fixture
def attempt(app):
    msg = _attempt()
    yield msg
    delete(app, [inbox_name(msg.token)])


def test_a_posted_message_is_read_in_order_and_its_response_goes_back(app, attempt) -> None:
    # Given an attempt's inbox, empty at first (as Luigi's queue, it can be asked)
    sent = Sent()
    inbox = Inbox(app, attempt, sent, SECRET)
    assert inbox.empty()
    with pytest.raises(queue.Empty):
        inbox.get_nowait()
    # When its dispatcher posts two messages from the scheduler
    for n, content in enumerate(["pause", {"rows": 3}]):
        note = m.SchedulerNote(attempt.celery_id, attempt.task_id, f"id-{n}", content, {"n": n})
        post(app, note, attempt.token, SECRET)
    # Then the task reads them in order, as Luigi's SchedulerMessage, and its responses go back
    wait_until("the first message", lambda: not inbox.empty(), timeout=10)
    first = inbox.get(timeout=5)
    assert (str(first), first == "pause", first.payload) == ("pause", True, {"n": 0})
    first.respond("paused")
    assert inbox.get(timeout=5).content == {"rows": 3}
    assert inbox.empty()
    assert sent.items == [("scheduler_message_response", {"message_id": "id-0", "response": "paused"})]
    inbox.close()


def test_a_blocking_get_waits_its_timeout_for_a_message(app, attempt) -> None:
    inbox = Inbox(app, attempt, Sent(), None)
    with pytest.raises(queue.Empty):
        inbox.get(timeout=0.3)
    post(app, m.SchedulerNote(attempt.celery_id, attempt.task_id, "id", "go"), attempt.token, None)
    assert inbox.get(timeout=5).content == "go"
    inbox.close()


@pytest.mark.parametrize(
    "bad",
    ["unsigned", "signed with another secret", "for another attempt", "not a scheduler message", "too big"],
)
def test_what_the_dispatcher_did_not_send_is_dropped(app, attempt, bad, caplog) -> None:
    # Given a message on the attempt's inbox that its dispatcher did not send
    note = m.SchedulerNote(attempt.celery_id, attempt.task_id, "id", "forged").to_dict()
    if bad == "unsigned":
        body = note
    elif bad == "signed with another secret":
        body = signing.sign(note, "another")
    elif bad == "for another attempt":
        body = signing.sign({**note, "celery_id": _attempt().celery_id}, SECRET)
    elif bad == "not a scheduler message":
        body = signing.sign({**note, "kind": "task"}, SECRET)
    else:
        body = signing.sign({**note, "content": "x" * m.MAX_MESSAGE_BYTES}, SECRET)
    inbox = Inbox(app, attempt, Sent(), SECRET)
    assert inbox.empty()  # (the inbox exists now: RabbitMQ drops what is sent to no queue)
    with app.producer_pool.acquire(block=True) as producer:
        producer.publish(body, exchange="", routing_key=inbox_name(attempt.token), serializer="json")
    post(app, m.SchedulerNote(attempt.celery_id, attempt.task_id, "real", "real"), attempt.token, SECRET)
    # Then the task never sees it, and one line says why
    assert inbox.get(timeout=5).content == "real"
    dropped = lambda: any("dropped a scheduler message" in r.getMessage() for r in caplog.records)  # noqa: E731
    wait_until("the other one dropped", lambda: inbox.empty() and dropped(), timeout=10)
    inbox.close()
