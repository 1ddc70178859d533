"""Unit tests for luigi_celery.message: the messages, their checks, and which tasks may travel."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

import luigi
import luigi.worker
import pytest

from luigi_celery import message as m
from luigi_celery import signing
from luigi_celery.dispatchable import check_dispatchable
from luigi_celery.errors import DispatchRefused, MessageError
from tests import unit_tasks

# --- helpers -------------------------------------------------------------------


def a_task_message() -> m.TaskMessage:
    return m.TaskMessage(
        task_id="unit_tasks.WritesOutput_out_0123456789",
        module="tests.unit_tasks",
        family="unit_tasks.WritesOutput",
        params={"root": "/tmp/x", "name": "out"},
        attempt=2,
        run_id="run-42",
        reply_to="luigi_celery.replies.run-42",
        check_unfulfilled_deps=False,
        check_complete_on_run=True,
        worker_timeout=30.5,
        sent_at=1795290886.25,
    )


def a_result_message() -> m.ResultMessage:
    return m.ResultMessage(
        celery_id="unit_tasks.DynamicParent_abc.0123456789abcdef.1",
        task_id="unit_tasks.DynamicParent_abc",
        status=m.PENDING,
        expl="waiting for a child",
        missing=["unit_tasks.Gate_1 (/data/gate)"],
        new_deps=[("tests.unit_tasks", "unit_tasks.DynamicChild", {"root": "/tmp/x", "n": "1"})],
        event="timeout",
        host="worker-7",
    )


def a_status_message(field: str = "progress_percentage", value: Any = 12.5) -> m.StatusMessage:
    return m.StatusMessage(celery_id="c.0123456789abcdef.1", task_id="t", field=field, value=value)


def over_the_wire(data: dict[str, Any]) -> Any:
    """What the other side gets: the message as JSON text, parsed again."""
    return json.loads(json.dumps(data))


def changed(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**data, **changes}


def without(data: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != name}


# --- round trips -----------------------------------------------------------------


def test_a_task_message_survives_the_trip_through_json() -> None:
    # Given a task message with no default values
    sent = a_task_message()

    # When it goes through JSON and is read back
    received = m.TaskMessage.from_dict(over_the_wire(sent.to_dict()))

    # Then it is the same message
    assert received == sent
    assert received.celery_id == m.celery_task_id(sent.task_id, sent.attempt, sent.token)


def test_a_task_message_without_a_time_limit_survives_the_trip_through_json() -> None:
    # Given a task message with the default (no) worker_timeout
    sent = m.TaskMessage(task_id="t", module="mod", family="F", params={}, attempt=1, run_id="r", reply_to="q")

    # When it goes through JSON and is read back
    received = m.TaskMessage.from_dict(over_the_wire(sent.to_dict()))

    # Then it is the same message, with no worker_timeout
    assert received == sent
    assert received.worker_timeout is None


def test_a_result_message_survives_the_trip_through_json() -> None:
    # Given a result with missing deps, dynamic deps (tuples) and an event
    sent = a_result_message()

    # When it goes through JSON and is read back, directly and as a reply
    data = over_the_wire(sent.to_dict())
    received = m.ResultMessage.from_dict(data)
    as_reply = m.parse_reply(data)

    # Then it is the same message, dynamic deps tuples again
    assert received == sent
    assert as_reply == sent
    assert received.new_deps == [("tests.unit_tasks", "unit_tasks.DynamicChild", {"root": "/tmp/x", "n": "1"})]
    assert received.luigi_tuple() == (
        sent.task_id,
        m.PENDING,
        "waiting for a child",
        ["unit_tasks.Gate_1 (/data/gate)"],
        [("tests.unit_tasks", "unit_tasks.DynamicChild", {"root": "/tmp/x", "n": "1"})],
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status_message", "half way"),
        ("progress_percentage", 50),
        ("progress_percentage", 12.5),
        ("tracking_url", "http://tracker.example/1"),
        ("decrease_running_resources", {"gpu": 1}),
    ],
)
def test_a_status_message_survives_the_trip_through_json(field: str, value: Any) -> None:
    # Given a status update of each kind
    sent = a_status_message(field, value)

    # When it goes through JSON and is read back, directly and as a reply
    data = over_the_wire(sent.to_dict())

    # Then it is the same message
    assert m.StatusMessage.from_dict(data) == sent
    assert m.parse_reply(data) == sent


# --- what from_dict rejects ------------------------------------------------------

TASK = a_task_message().to_dict()
RESULT = a_result_message().to_dict()
STATUS = a_status_message().to_dict()

MessageParser = Callable[[object], object]


def _bad_envelopes(parse: MessageParser, good: dict[str, Any]) -> list[Any]:
    kind = good["kind"]
    return [
        pytest.param(parse, [good], "JSON object", id=f"{kind}: a list"),
        pytest.param(parse, "a string", "JSON object", id=f"{kind}: a string"),
        pytest.param(parse, None, "JSON object", id=f"{kind}: None"),
        pytest.param(parse, without(good, "v"), "version", id=f"{kind}: no version"),
        pytest.param(parse, changed(good, v=3), "version", id=f"{kind}: version 3"),
        pytest.param(parse, changed(good, v="1"), "version", id=f"{kind}: version as a string"),
        pytest.param(parse, without(good, "kind"), "kind", id=f"{kind}: no kind"),
    ]


@pytest.mark.parametrize(
    ("parse", "data", "words"),
    _bad_envelopes(m.TaskMessage.from_dict, TASK)
    + _bad_envelopes(m.ResultMessage.from_dict, RESULT)
    + _bad_envelopes(m.StatusMessage.from_dict, STATUS),
)
def test_from_dict_rejects_what_is_not_a_message_of_this_protocol(parse: MessageParser, data: Any, words: str) -> None:
    # Given data that is not an object, or not of this protocol version
    # When it is read / Then it is refused, saying why
    with pytest.raises(MessageError, match=words):
        parse(data)


@pytest.mark.parametrize(
    ("parse", "data"),
    [
        pytest.param(m.TaskMessage.from_dict, RESULT, id="result read as task"),
        pytest.param(m.TaskMessage.from_dict, STATUS, id="status read as task"),
        pytest.param(m.ResultMessage.from_dict, TASK, id="task read as result"),
        pytest.param(m.ResultMessage.from_dict, STATUS, id="status read as result"),
        pytest.param(m.StatusMessage.from_dict, RESULT, id="result read as status"),
        pytest.param(m.StatusMessage.from_dict, changed(STATUS, kind="bogus"), id="unknown kind"),
    ],
)
def test_from_dict_rejects_a_message_of_another_kind(parse: MessageParser, data: dict[str, Any]) -> None:
    # Given a valid message of one kind
    # When it is read as another kind / Then it is refused, naming the kind
    with pytest.raises(MessageError, match="kind"):
        parse(data)


@pytest.mark.parametrize(
    ("parse", "data", "name"),
    [
        pytest.param(parse, data, name, id=f"{data['kind']}: {name}")
        for parse, data in (
            (m.TaskMessage.from_dict, TASK),
            (m.ResultMessage.from_dict, RESULT),
            (m.StatusMessage.from_dict, STATUS),
        )
        for name in data
        if name not in ("v", "kind")
    ],
)
def test_from_dict_rejects_a_message_with_a_missing_field(
    parse: MessageParser, data: dict[str, Any], name: str
) -> None:
    # Given a valid message with one field taken out
    incomplete = without(data, name)

    # When it is read / Then it is refused, naming the missing field
    with pytest.raises(MessageError, match=f"missing field '{name}'"):
        parse(incomplete)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task_id", 1),
        ("module", None),
        ("family", ["F"]),
        ("params", [["name", "out"]]),
        ("params", "name=out"),
        ("attempt", "1"),
        ("attempt", 1.0),
        ("attempt", True),
        ("run_id", 42),
        ("reply_to", None),
        ("check_unfulfilled_deps", "yes"),
        ("check_unfulfilled_deps", 1),
        ("check_complete_on_run", None),
        ("cache_task_completion", "true"),
        ("worker_timeout", "30"),
        ("worker_timeout", True),
        ("sent_at", "now"),
        ("sent_at", True),
        ("session", 7),
        ("session", ""),
        ("session", "x" * 65),
    ],
)
def test_task_message_rejects_a_field_of_the_wrong_type(field: str, value: Any) -> None:
    # Given a task message with one field of the wrong type (bool is never a number)
    data = changed(TASK, **{field: value})

    # When it is read / Then it is refused, naming the field
    with pytest.raises(MessageError, match=field):
        m.TaskMessage.from_dict(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attempt", 0),
        ("attempt", -1),
        ("worker_timeout", 0),
        ("worker_timeout", -5.0),
    ],
)
def test_task_message_rejects_an_out_of_range_number(field: str, value: Any) -> None:
    # Given a task message whose attempt is below 1, or whose time limit is not positive
    data = changed(TASK, **{field: value})

    # When it is read / Then it is refused, naming the field
    with pytest.raises(MessageError, match=field):
        m.TaskMessage.from_dict(data)


@pytest.mark.parametrize(
    "params",
    [{"n": 1}, {"n": None}, {"n": ["a"]}, {"n": {"a": "b"}}, {"n": True}],
    ids=["int", "None", "list", "dict", "bool"],
)
def test_task_message_rejects_params_that_are_not_strings(params: dict[str, Any]) -> None:
    # Given a task message whose params hold a value that is not a string
    data = changed(TASK, params=params)

    # When it is read / Then it is refused: params cross the broker as str params only
    with pytest.raises(MessageError, match="params"):
        m.TaskMessage.from_dict(data)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        pytest.param({"status": "RUNNING"}, "unknown status", id="unknown status"),
        pytest.param({"status": "done"}, "unknown status", id="lower-case status"),
        pytest.param({"status": 1}, "status", id="status not a string"),
        pytest.param({"event": "killed"}, "unknown event", id="unknown event"),
        pytest.param({"event": 1}, "event", id="event not a string"),
        pytest.param({"expl": None}, "expl", id="expl None"),
        pytest.param({"host": 7}, "host", id="host not a string"),
        pytest.param({"celery_id": None}, "celery_id", id="celery_id None"),
        pytest.param({"missing": "a,b"}, "missing", id="missing not a list"),
        pytest.param({"missing": [1]}, "missing", id="missing not strings"),
        pytest.param({"new_deps": {}}, "new_deps", id="new_deps not a list"),
        pytest.param({"new_deps": ["tests.unit_tasks"]}, "new_deps", id="dep not a list"),
        pytest.param({"new_deps": [["m", "F"]]}, "new_deps", id="dep of two"),
        pytest.param({"new_deps": [["m", "F", {}, "x"]]}, "new_deps", id="dep of four"),
        pytest.param({"new_deps": [[1, "F", {}]]}, "new_deps", id="dep module not a string"),
        pytest.param({"new_deps": [["m", None, {}]]}, "new_deps", id="dep family not a string"),
        pytest.param({"new_deps": [["m", "F", []]]}, "params", id="dep params not an object"),
        pytest.param({"new_deps": [["m", "F", {"n": 1}]]}, "new_deps params", id="dep params not strings"),
    ],
)
def test_result_message_rejects_malformed_fields(changes: dict[str, Any], words: str) -> None:
    # Given a result message with one malformed field
    data = changed(RESULT, **changes)

    # When it is read, directly or as a reply / Then it is refused with a message that says what is wrong
    with pytest.raises(MessageError, match=words):
        m.ResultMessage.from_dict(data)
    with pytest.raises(MessageError, match=words):
        m.parse_reply(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status_message", 5),
        ("status_message", None),
        ("progress_percentage", "50"),
        ("progress_percentage", True),
        ("progress_percentage", None),
        ("tracking_url", ["http://x"]),
        ("decrease_running_resources", [["gpu", 1]]),
    ],
)
def test_status_message_rejects_a_value_of_the_wrong_type(field: str, value: Any) -> None:
    # Given a status update whose value does not fit its field
    data = changed(STATUS, field=field, value=value)

    # When it is read / Then it is refused, naming the value
    with pytest.raises(MessageError, match="value"):
        m.StatusMessage.from_dict(data)


@pytest.mark.parametrize(
    "value", [{"response": "ok"}, {"message_id": 7, "response": "ok"}, {"message_id": "m-1"}, "m-1"]
)
def test_a_response_to_a_scheduler_message_names_its_message_and_has_a_response(value: Any) -> None:
    data = changed(STATUS, field="scheduler_message_response", value=value)
    with pytest.raises(MessageError):
        m.StatusMessage.from_dict(data)
    # (any JSON is a response, None and false included)
    for response in (None, False, {"rows": [1]}):
        good = changed(STATUS, field="scheduler_message_response", value={"message_id": "m", "response": response})
        assert m.StatusMessage.from_dict(good).value["response"] == response


def test_a_scheduler_message_reads_back_and_refuses_what_it_cannot_be() -> None:
    note = m.SchedulerNote("c.0123456789abcdef.1", "t", "m-1", {"any": ["json"]}, {"n": 1})
    data = json.loads(json.dumps(note.to_dict()))
    assert m.SchedulerNote.from_dict(data) == note
    for bad in ({"payload": ["n"]}, {"payload": None}, {"message_id": 1}, {"kind": "status"}, {"v": 1}):
        with pytest.raises(MessageError):
            m.SchedulerNote.from_dict({**data, **bad})
    with pytest.raises(MessageError, match="content"):
        m.SchedulerNote.from_dict({k: v for k, v in data.items() if k != "content"})


@pytest.mark.parametrize("field", ["colour", "scheduler_messages", "", 3])
def test_status_message_rejects_an_unknown_field(field: Any) -> None:
    # Given a status update of a field a task cannot set
    data = changed(STATUS, field=field, value="x")

    # When it is read / Then it is refused
    with pytest.raises(MessageError, match="field"):
        m.StatusMessage.from_dict(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(TASK, id="a task"),
        pytest.param(changed(STATUS, kind="bogus"), id="unknown kind"),
        pytest.param(without(RESULT, "kind"), id="no kind"),
        pytest.param(changed(RESULT, kind=["result"]), id="kind not a string"),
        pytest.param(["result"], id="a list"),
        pytest.param(None, id="None"),
    ],
)
def test_parse_reply_rejects_what_is_not_a_reply(data: Any) -> None:
    # Given something on the reply queue that is neither a result nor a status update
    # When it is parsed / Then it is refused
    with pytest.raises(MessageError, match="unknown reply kind"):
        m.parse_reply(data)


def test_parse_reply_still_checks_the_reply_it_recognises() -> None:
    # Given a status reply of the right kind but the wrong version
    data = changed(STATUS, v=0)

    # When it is parsed / Then it is refused
    with pytest.raises(MessageError, match="version"):
        m.parse_reply(data)


# --- celery_task_id --------------------------------------------------------------

TOKEN = "0123456789abcdef0123456789abcdef"


def test_celery_task_id_is_the_same_for_the_same_attempt_and_token() -> None:
    # Given one Luigi task id, attempt and token
    # When the Celery id is computed twice / Then it is the same
    assert m.celery_task_id("Sales_2024_01_01_abc", 1, TOKEN) == m.celery_task_id("Sales_2024_01_01_abc", 1, TOKEN)


def test_celery_task_id_differs_by_attempt_by_task_and_by_token() -> None:
    # Given two attempts at one task, the same attempt at another task, and another token
    first = m.celery_task_id("Sales_2024_01_01_abc", 1, TOKEN)
    second = m.celery_task_id("Sales_2024_01_01_abc", 2, TOKEN)
    other = m.celery_task_id("Sales_2024_01_02_abd", 1, TOKEN)
    guessed = m.celery_task_id("Sales_2024_01_01_abc", 1, m.new_token())

    # Then all four ids differ
    assert len({first, second, other, guessed}) == 4


def test_a_celery_id_gives_back_its_digest_attempt_and_token_and_nothing_else_parses() -> None:
    cid = m.celery_task_id("Sales_2024.01.01_abc", 3, TOKEN)
    assert m.parse_celery_id(cid) == (m.task_digest("Sales_2024.01.01_abc"), 3, TOKEN)
    for bad in ("Sales.0123456789abcdef.3", cid[:-1], cid + "0", "x.short.1." + TOKEN, str(__import__("uuid").uuid4())):
        assert m.parse_celery_id(bad) is None, bad


def test_every_task_message_gets_a_token_of_its_own() -> None:
    one, two = a_task_message(), a_task_message()
    assert one.token != two.token and len(one.token) == 32
    assert one.celery_id != two.celery_id


def test_celery_task_id_stays_short_for_a_long_task_id_but_tells_long_ids_apart() -> None:
    # Given two very long task ids that share their first 80 characters
    prefix = "VeryLongTaskFamilyName_" + "x" * 200
    one, two = prefix + "_one", prefix + "_two"

    # When their Celery ids are computed
    id_one, id_two = m.celery_task_id(one, 1, TOKEN), m.celery_task_id(two, 1, TOKEN)

    # Then both are short, readable, and different
    assert len(id_one) <= 160
    assert len(id_two) <= 160
    assert id_one.startswith("VeryLongTaskFamilyName_")
    assert id_one != id_two


def test_a_task_message_knows_its_celery_id() -> None:
    # Given a task message
    msg = a_task_message()

    # Then its Celery id is the one for its task, attempt and token
    assert msg.celery_id == m.celery_task_id(msg.task_id, msg.attempt, msg.token)


def test_a_task_message_without_a_proper_token_is_malformed() -> None:
    for token in (None, "", "guess", TOKEN.upper(), TOKEN + "00"):
        data = {**a_task_message().to_dict(), "token": token}
        with pytest.raises(MessageError, match="token"):
            m.TaskMessage.from_dict(over_the_wire(data))


# --- signatures ------------------------------------------------------------------


def test_a_signed_message_verifies_and_any_change_or_another_secret_does_not() -> None:
    payload = a_task_message().to_dict()
    signed = signing.sign(payload, "s3cret")
    signing.verify(over_the_wire(signed), "s3cret")  # no error
    signing.verify(payload, None)  # no secret: nothing to check
    assert signing.sign(payload, None) == payload
    for forged, why in [
        (payload, "unsigned"),
        (signing.sign(payload, "another"), "bad signature"),
        ({**signed, "module": "os"}, "bad signature"),
        ({**signed, "sig": 42}, "unsigned"),
        ("not an object", "unsigned"),
    ]:
        with pytest.raises(MessageError, match=why):
            signing.verify(forged, "s3cret")


# --- check_dispatchable ----------------------------------------------------------


def test_check_dispatchable_returns_the_str_params_of_a_task_that_can_travel() -> None:
    # Given a task with dates, ints, lists, dicts, a None optional and an insignificant parameter
    task = unit_tasks.EveryParameterKind(
        day=datetime.date(2024, 1, 2), count=3, names=[1, "a"], options={"a": [1, 2], "b": {"c": 1}}
    )

    # When it is checked
    params = check_dispatchable(task)

    # Then its str params come back, and they rebuild exactly this task
    assert params == {
        "day": "2024-01-02",
        "count": "3",
        "names": '[1, "a"]',
        "options": '{"a": [1, 2], "b": {"c": 1}}',
        "maybe": "",
        "note": "not part of the id",
    }
    assert all(isinstance(v, str) for v in params.values())
    rebuilt = luigi.worker.load_task(task.task_module, task.task_family, params)
    assert rebuilt.task_id == task.task_id
    assert rebuilt.param_kwargs == task.param_kwargs


@pytest.mark.parametrize(
    "value",
    [pytest.param(("a", "b"), id="tuple"), pytest.param(None, id="None"), pytest.param(7, id="int")],
)
def test_check_dispatchable_refuses_a_value_a_plain_parameter_cannot_carry(value: Any) -> None:
    # Given a task whose plain luigi.Parameter holds something that is not a string
    with pytest.warns(UserWarning):  # Luigi itself warns about the non-string value
        task = unit_tasks.PlainParameter(value=value)

    # When it is checked / Then it is refused, naming the task and the parameter
    with pytest.raises(DispatchRefused) as refused:
        check_dispatchable(task)
    assert task.task_id in str(refused.value)
    assert "'value'" in str(refused.value)


def test_check_dispatchable_accepts_a_string_in_a_plain_parameter() -> None:
    # Given a task whose plain parameter holds a string
    task = unit_tasks.PlainParameter(value="a b")

    # When it is checked / Then it may travel
    assert check_dispatchable(task) == {"value": "a b"}


def test_check_dispatchable_refuses_a_private_parameter() -> None:
    # Given a task with a PRIVATE parameter
    task = unit_tasks.PrivateParameter(token="s3cret")

    # When it is checked / Then it is refused, naming the task and the parameter, without the secret
    with pytest.raises(DispatchRefused) as refused:
        check_dispatchable(task)
    assert task.task_id in str(refused.value)
    assert "'token'" in str(refused.value)
    assert "PRIVATE" in str(refused.value)
    assert "s3cret" not in str(refused.value)


def test_check_dispatchable_refuses_a_class_defined_inside_a_function() -> None:
    # Given a task class defined inside this test function
    class DefinedInsideATestFunction(luigi.Task):
        task_namespace = "test_message"

    task = DefinedInsideATestFunction()

    # When it is checked / Then it is refused: a worker cannot import it
    with pytest.raises(DispatchRefused, match="inside a function") as refused:
        check_dispatchable(task)
    assert "test_message.DefinedInsideATestFunction" in str(refused.value)


def test_check_dispatchable_refuses_a_class_defined_in_main() -> None:
    # Given a task class that says it comes from __main__ (a script run with `python pipeline.py`)
    class DefinedInAScript(luigi.Task):
        task_namespace = "test_message"

    DefinedInAScript.__module__ = "__main__"
    task = DefinedInAScript()

    # When it is checked / Then it is refused: a worker cannot import __main__
    with pytest.raises(DispatchRefused, match="__main__") as refused:
        check_dispatchable(task)
    assert "test_message.DefinedInAScript" in str(refused.value)
