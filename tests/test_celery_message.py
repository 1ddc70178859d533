"""The dispatcher builds its Celery messages by hand (``publisher.celery_message``), for a
quarter of what ``Celery.send_task`` costs: the message must be the one ``send_task`` builds."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import pytest

from luigi_celery import message as m
from luigi_celery.app import make_app
from luigi_celery.monitor import Tracked
from luigi_celery.publisher import Publisher
from luigi_celery.settings import Settings


class Recorder:
    """A producer that keeps what it is given."""

    def __init__(self) -> None:
        self.published: list[tuple[Any, dict[str, Any]]] = []
        self.connection = SimpleNamespace(_reraise_as_library_errors=contextlib.nullcontext)

    def publish(self, body: Any, **kwargs: Any) -> None:
        self.published.append((body, kwargs))


class Events:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **kwargs: Any) -> None:
        self.sent.append((type, dict(fields)))


# Compared apart: how each is retried and declared is the publisher's (batched or not).
_OWN = ("retry", "retry_policy", "declare")


@pytest.mark.parametrize(
    "options",
    [
        {"queue": "lc-plain", "priority": None},
        {"queue": "lc-limited", "priority": 3, "soft_time_limit": 5, "time_limit": 35},
    ],
)
@pytest.mark.parametrize("result_backend", [None, "redis://127.0.0.1:1/0"])
def test_the_hand_built_message_is_the_one_celery_send_task_builds(options, result_backend) -> None:
    settings = Settings(broker_url="redis://127.0.0.1:1/0", queue="lc-plain", result_backend=result_backend)
    app = make_app(settings)
    app.backend.on_task_call = lambda producer, task_id: None  # (Celery's result consumer: no message content)
    kwargs = {"message": {"v": m.PROTOCOL_VERSION, "task_id": "Report_2026_11_01_abc", "params": {"x": "1"}}}
    celery_id, shadow = "c0ffee-1", "Report_2026_11_01_abc"
    # Celery's own: send_task, as the dispatcher called it before
    theirs, their_events = Recorder(), Events()
    app.send_task(
        m.TASK_NAME, kwargs=kwargs, argsrepr="()", kwargsrepr=repr(kwargs), task_id=celery_id, shadow=shadow,
        ignore_result=result_backend is None, retry=True, event_dispatcher=their_events, producer=theirs, **options,
    )  # fmt: skip
    # ours: the publisher's
    ours, our_events = Recorder(), Events()
    publisher = Publisher(app, settings, sent=lambda t: None, failed=lambda t, why: None, wanted=lambda t, c: True)
    publisher._events = our_events  # type: ignore[assignment]
    msg = m.TaskMessage(task_id=shadow, module="m", family="Report", params={}, attempt=1, run_id="r", reply_to="q")
    publisher._put(ours, Tracked(None, msg, options["queue"], options), celery_id, kwargs, declared=False)  # type: ignore[arg-type]

    ((their_body, their_kw),), ((our_body, our_kw),) = theirs.published, ours.published
    assert our_body == their_body
    assert {k: v for k, v in our_kw.items() if k not in _OWN} == {k: v for k, v in their_kw.items() if k not in _OWN}
    assert [q.name for q in our_kw["declare"]] == [q.name for q in their_kw["declare"]] == [options["queue"]]
    assert our_kw["declare"][0].queue_arguments == their_kw["declare"][0].queue_arguments
    # and the task-sent event Flower reads is the same, named like the Luigi task
    assert our_events.sent == their_events.sent
    assert our_events.sent[0][1]["name"] == shadow
