"""The Celery execute task itself, without a broker: what a retry sends back to the queue."""

from __future__ import annotations

import time
from typing import Any

import pytest

from luigi_celery import execute
from luigi_celery import message as m
from luigi_celery.app import make_app
from luigi_celery.settings import Settings
from tests.pipelines import Flaky


class Requeued(Exception):
    def __init__(self, **options: Any) -> None:
        super().__init__("requeued")
        self.options = options


def test_a_retry_goes_back_with_one_more_failure_and_its_queue_clock_at_the_end_of_the_countdown(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the execute task of an app whose replies are recorded, not sent (RabbitMQ alone: no store)
    replies: list[dict[str, Any]] = []
    monkeypatch.setattr(execute, "publish_reply", lambda app, reply_to, payload: replies.append(payload))
    task = make_app(Settings(broker_url="amqp://guest:guest@127.0.0.1:1//", task_modules=("tests",))).tasks[m.TASK_NAME]
    monkeypatch.setattr(task, "retry", lambda **options: Requeued(**options))
    flaky = Flaky(out=str(tmp_path))
    msg = m.TaskMessage(
        task_id=flaky.task_id, module=flaky.task_module, family=flaky.task_family, params=flaky.to_str_params(),
        attempt=1, run_id="r", reply_to="q", sent_at=time.time() - 100,
    )  # fmt: skip
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
