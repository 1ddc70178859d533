"""Messages published straight onto a worker's queue, bypassing the dispatcher.

The worker must answer a well-formed message for an unknown task with a
FAILED reply, reject malformed ones (logged, never executed, never
unpickled), and keep serving real work afterwards.
"""

from __future__ import annotations

import pickle
import time
import uuid

import pytest
from kombu import Connection

from luigi_celery import message as m
from luigi_celery.app import make_app
from luigi_celery.results import reply_queue, reply_queue_name
from luigi_celery.settings import Settings
from tests.conftest import run_cli


def _task_message(**changes) -> dict:
    msg = m.TaskMessage(
        task_id="NoSuchTask__99914b932b",
        module="tests.pipelines",
        family="NoSuchTask",
        params={},
        attempt=1,
        run_id="hostile",
        reply_to=changes.pop("reply_to"),
    )
    return {**msg.to_dict(), **changes}


@pytest.fixture
def replies(pool):
    """A reply queue of our own on the pool's broker; yields (name, read_one)."""
    name = reply_queue_name(f"test-{uuid.uuid4().hex[:8]}")
    with Connection(pool.broker) as conn:
        queue = reply_queue(name)(conn.default_channel)
        queue.declare()

        def read_one(timeout: float = 20) -> dict:
            deadline = time.time() + timeout
            while time.time() < deadline:
                message = queue.get(no_ack=True, accept=["json"])
                if message is not None:
                    return message.decode()
                time.sleep(0.05)
            raise AssertionError(f"no reply on {name} within {timeout} s")

        yield name, read_one
        queue.delete()


@pytest.fixture
def app(pool):
    return make_app(Settings(broker_url=pool.broker, queue=pool.queue))


def test_an_unknown_task_family_gets_a_failed_reply(app, pool, replies):
    name, read_one = replies
    app.send_task(m.TASK_NAME, kwargs={"message": _task_message(reply_to=name)}, queue=pool.queue)
    reply = m.ResultMessage.from_dict(read_one())
    assert reply.status == m.FAILED
    assert "no task family 'NoSuchTask' in module 'tests.pipelines'" in reply.expl


def test_malformed_and_pickled_messages_are_rejected_and_the_worker_keeps_serving(app, pool, replies, tmp_path):
    name, read_one = replies
    marker = f"pickled-{uuid.uuid4().hex[:6]}"
    # Given a burst of bad messages straight on the queue
    with Connection(pool.broker) as conn:
        producer = conn.Producer()
        headers = {"task": m.TASK_NAME, "id": str(uuid.uuid4()), "lang": "py"}
        producer.publish(b"{not json", routing_key=pool.queue, content_type="application/json",
                         content_encoding="utf-8", headers=headers)  # fmt: skip
        producer.publish(pickle.dumps(((), {"message": marker}, {})), routing_key=pool.queue,
                         content_type="application/x-python-serialize", content_encoding="binary",
                         headers={**headers, "id": str(uuid.uuid4())})  # fmt: skip
        producer.publish(b"plain text, no headers", routing_key=pool.queue, content_type="text/plain")
    app.send_task(m.TASK_NAME, args=[1, 2, 3], queue=pool.queue)  # wrong call shape
    app.send_task(m.TASK_NAME, kwargs={"message": {"v": 99}}, queue=pool.queue)  # wrong version
    # a message broken in one field, but with enough to answer its sender
    app.send_task(m.TASK_NAME, kwargs={"message": _task_message(reply_to=name, attempt="one")}, queue=pool.queue)

    # Then the sender of the half-valid message hears why
    reply = m.ResultMessage.from_dict(read_one())
    assert reply.status == m.FAILED and "malformed task message" in reply.expl
    # and real work still runs on the same workers
    result = run_cli("run", "--broker", pool.broker, "--queue", pool.queue,
                     "--module", "tests.pipelines", "Succeeds", "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]
    assert all(w.alive() for w in pool.workers)
    logs = pool.logs()
    # each malformed call was rejected by our task, once; had the pickle been loaded,
    # our task would have seen its marker string and rejected a fourth
    assert logs.count("rejected malformed message") == 3
    assert "Refusing to deserialize untrusted content of type pickle" in logs
    assert "Refusing to deserialize untrusted content of type text/plain" in logs
    assert "Expecting property name enclosed in double quotes" in logs  # the broken JSON
