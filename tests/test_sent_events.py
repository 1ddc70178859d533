"""Celery's task-sent events leave the dispatcher in batches, and Celery's own receiver
(the one Flower uses) reads each event of a batch, on both brokers."""

from __future__ import annotations

import contextlib
import threading
import uuid

import kombu
import luigi
import pytest

from luigi_celery import message as m
from luigi_celery.app import make_app
from luigi_celery.monitor import Tracked
from luigi_celery.sender import Sender
from luigi_celery.sent_events import SentEvents
from luigi_celery.settings import Settings
from tests.conftest import wait_until

pytestmark = pytest.mark.broker


class Received:
    """Celery's event receiver in a thread: what Flower runs."""

    def __init__(self, app) -> None:
        self.events: list[dict] = []
        self.messages = 0
        self._app = app
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Received:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        with self._app.connection_for_read() as conn:
            receiver = self._app.events.Receiver(conn, handlers={"*": self.events.append})

            def on_message(body, message) -> None:
                self.messages += 1
                receiver._receive(body, message)  # Celery's own: a list body is a batch

            with conn.Consumer([receiver.queue], callbacks=[on_message], no_ack=True, accept=receiver.accept):
                # Redis delivers events by pub/sub, which keeps nothing for a subscriber to come:
                # kombu subscribes on the first poll, so poll once before saying we listen.
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.3)
                self._ready.set()
                while not self._stop.is_set():
                    with contextlib.suppress(TimeoutError):  # a quiet moment: look at _stop again
                        conn.drain_events(timeout=0.2)

    def sent(self) -> list[dict]:
        return [e for e in self.events if e.get("type") == "task-sent"]


@pytest.fixture(params=["redis", "rabbitmq"])
def app(request, brokers):
    return make_app(Settings(broker_url=brokers[request.param], queue=f"sent-events-{uuid.uuid4().hex[:8]}"))


def test_sent_events_go_out_in_one_batch_and_each_reaches_the_receiver(app) -> None:
    ids = [uuid.uuid4().hex for _ in range(5)]
    with Received(app) as received:
        events = SentEvents(app)
        events.start()
        for task_id in ids:
            events.publish("task-sent", {"uuid": task_id, "name": f"Report_{task_id[:6]}", "queue": "q"}, None)
        events.close()
        wait_until("five task-sent events", lambda: len(received.sent()) == 5, timeout=10)
    # each event whole, named, with Celery's own fields, in fewer messages than events
    assert [e["uuid"] for e in received.sent()] == ids
    assert all(e["name"] == f"Report_{e['uuid'][:6]}" and e["hostname"] and e["timestamp"] for e in received.sent())
    assert received.messages < 5
    assert events.dropped == 0


def test_the_dispatcher_sends_its_task_sent_events_through_the_batches(app, monkeypatch) -> None:
    # Given a dispatcher's sender, whose task-sent events must not go out one publish per task
    sender = Sender(app, Settings(broker_url=app.conf.broker_url, queue=app.conf.task_default_queue))
    batched = []
    monkeypatch.setattr(SentEvents, "publish", lambda self, type, fields, producer, **kw: batched.append(fields))

    class Flight:
        task = luigi.Task()
        worker_timeout = None
        check_unfulfilled_deps, check_complete_on_run, cache_task_completion = True, False, False

        def on_result(self, result):
            raise AssertionError(result.expl)

    # When it sends a task
    try:
        sender._publish(_tracked(sender, Flight()))
    finally:
        with app.connection_for_write() as conn:
            kombu.Queue(sender.settings.queue)(conn.default_channel).delete()
    # Then Celery handed the sent event to the batches, named like the task
    assert [f["name"] for f in batched] == [Flight.task.task_id]


def _tracked(sender, flight):
    msg = m.TaskMessage(
        task_id=flight.task.task_id, module="luigi", family="Task", params={}, attempt=1,
        run_id=sender.run_id, reply_to=sender.reply_to,
    )  # fmt: skip
    return Tracked(flight, msg, sender.settings.queue, {"queue": sender.settings.queue})
