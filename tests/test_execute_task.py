"""The Celery execute task itself, without a broker: what a retry sends back to the queue,
and what Celery (and Flower with it) records for each Luigi outcome."""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace
from typing import Any

import pytest
from celery.exceptions import Retry

from luigi_celery import execute
from luigi_celery import message as m
from luigi_celery.app import make_app
from luigi_celery.settings import Settings
from tests.pipelines import Fails, Flaky, OutTask, Succeeds


class Requeued(Exception):
    def __init__(self, **options: Any) -> None:
        super().__init__("requeued")
        self.options = options


def _message(task: OutTask, **fields: Any) -> m.TaskMessage:
    return m.TaskMessage(
        task_id=task.task_id, module=task.task_module, family=task.task_family, params=task.to_str_params(),
        attempt=1, run_id="r", reply_to="q", **fields,
    )  # fmt: skip


@pytest.fixture
def replies(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The replies the execute task publishes, recorded instead of sent."""
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(execute, "publish_reply", lambda app, reply_to, payload: sent.append(payload))
    return sent


def _execute_task(modules: tuple[str, ...] = ("tests",)) -> Any:
    # RabbitMQ alone (no store), at an address nobody answers: nothing here reaches a broker
    return make_app(Settings(broker_url="amqp://guest:guest@127.0.0.1:1//", task_modules=modules)).tasks[m.TASK_NAME]


def test_a_task_luigi_calls_failed_is_a_celery_failure_after_its_reply_went_out(tmp_path, replies) -> None:
    task = _execute_task()
    # When a task fails in Luigi's sense
    with pytest.raises(execute.LuigiTaskFailed, match="boom from Fails"):
        task.run(message=_message(Fails(out=str(tmp_path))).to_dict())
    # Then the dispatcher already has its FAILED reply, and Celery records an expected failure
    assert [r["status"] for r in replies if r["kind"] == "result"] == [m.FAILED]
    assert execute.LuigiTaskFailed in task.throws


def test_a_task_a_worker_may_not_run_is_a_celery_failure_too(tmp_path, replies) -> None:
    with pytest.raises(execute.LuigiTaskFailed, match="allowlist"):
        _execute_task(("examples",)).run(message=_message(Fails(out=str(tmp_path))).to_dict())
    assert [r["status"] for r in replies if r["kind"] == "result"] == [m.FAILED]


def test_each_app_in_a_process_runs_its_own_execute_task(tmp_path, replies) -> None:
    # Celery's default "shared" task would give the second app the first one's allowlist
    allows_tests, allows_examples = _execute_task(("tests",)), _execute_task(("examples",))
    assert allows_tests is not allows_examples
    with pytest.raises(execute.LuigiTaskFailed, match="allowlist"):
        allows_examples.run(message=_message(Succeeds(out=str(tmp_path))).to_dict())
    assert allows_tests.run(message=_message(Succeeds(out=str(tmp_path))).to_dict()) == m.DONE


def test_a_task_luigi_calls_done_is_a_celery_success_with_its_status_as_the_result(tmp_path, replies) -> None:
    returned = _execute_task().run(message=_message(Succeeds(out=str(tmp_path))).to_dict())
    # short: Celery reprs it twice a task; the dispatcher reads the reply
    assert returned == m.DONE
    assert [r["status"] for r in replies if r["kind"] == "result"] == [m.DONE]


def test_the_failure_hook_sends_no_second_reply_for_a_luigi_failure(tmp_path, replies) -> None:
    task = _execute_task()
    msg = _message(Fails(out=str(tmp_path)))
    task.on_failure(execute.LuigiTaskFailed("boom"), "celery-id", (), {"message": msg.to_dict()}, None)
    assert replies == []
    task.on_failure(RuntimeError("escaped"), "celery-id", (), {"message": msg.to_dict()}, None)
    assert [r["status"] for r in replies] == [m.FAILED]


def test_a_retry_goes_back_with_one_more_failure_and_its_queue_clock_at_the_end_of_the_countdown(
    tmp_path, monkeypatch: pytest.MonkeyPatch, replies
) -> None:
    # Given the execute task of an app whose replies are recorded, not sent
    task = _execute_task()
    monkeypatch.setattr(task, "retry", lambda **options: Requeued(**options))
    msg = _message(Flaky(out=str(tmp_path)), sent_at=time.time() - 100)
    # When its first attempt fails with a retryable error
    with pytest.raises(Requeued) as requeued:
        task.run(message=msg.to_dict())
    # Then it goes back with a countdown from the backoff policy, one more failure, and a queue
    # clock that starts when the countdown ends (so the backoff is not counted as time queued)
    options = requeued.value.options
    again = m.TaskMessage.from_dict(options["kwargs"]["message"])
    assert 0 <= options["countdown"] <= Flaky.retry_backoff
    assert again.failures == 1 and again.attempt == 1
    assert again.sent_at == pytest.approx(time.time() + options["countdown"], abs=1.0)
    # and the dispatcher heard how long it waits, and why, in Luigi's status message
    said = {r["field"]: r["value"] for r in replies if r["kind"] == "status"}
    assert said["retry_in"] == pytest.approx(options["countdown"])
    assert said["status_message"].startswith("retry 1/3 in ")


def test_the_sent_event_is_named_like_the_task_so_flower_shows_the_luigi_task_id(monkeypatch) -> None:
    # Given the app the dispatcher publishes with (task-sent events on, as for Flower)
    app = make_app(Settings(broker_url="amqp://guest:guest@127.0.0.1:1//"))
    assert app.conf.task_send_sent_event
    sent: list[Any] = []
    monkeypatch.setattr(app.amqp, "send_task_message", lambda producer, name, message, **options: sent.append(message))
    producer = SimpleNamespace(connection=SimpleNamespace(_reraise_as_library_errors=contextlib.nullcontext))
    # When a task goes out the way the sender sends it, with its Luigi task id as shadow name
    app.send_task(m.TASK_NAME, kwargs={"message": {}}, task_id="c1", shadow="Report_2026_11_01_abc", producer=producer)
    # Then the sent event carries the Luigi task id too, as the worker's events do
    (message,) = sent
    assert message.headers["shadow"] == "Report_2026_11_01_abc"
    assert message.sent_event["name"] == "Report_2026_11_01_abc"


def test_a_task_can_go_back_to_the_queue_any_number_of_times(monkeypatch) -> None:
    # Rate-limit re-queues are not failures: Celery's own retry limit must not end the task
    task = _execute_task()
    monkeypatch.setattr("celery.canvas.Signature.apply_async", lambda self, *a, **k: None)
    task.push_request(id="c1", retries=25, delivery_info={}, called_directly=False)
    try:
        with pytest.raises(Retry):
            task.retry(countdown=1, max_retries=None, kwargs={"message": {}})
    finally:
        task.pop_request()
