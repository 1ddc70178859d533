"""Unit tests for the worker side, in-process and without a broker.

run_task_message rebuilds a task from its message and runs it through Luigi's
TaskProcess; ``publish`` is a plain function that records what would have gone
to the dispatcher's reply queue.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path
from typing import Any

import luigi
import pytest

from luigi_celery import message as m
from luigi_celery.allowlist import module_allowed
from luigi_celery.taskprocess import run_task_message
from tests import unit_tasks

ALLOWED = ("tests.unit_tasks",)
REPLY_TO = "luigi_celery.replies.run-1"


class Replies:
    """A publish function that keeps what it is given, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, reply_to: str, payload: dict[str, Any]) -> None:
        self.sent.append((reply_to, payload))

    def statuses(self) -> list[m.StatusMessage]:
        """The status updates sent, read back as the dispatcher reads them."""
        updates = [m.parse_reply(json.loads(json.dumps(payload))) for _, payload in self.sent]
        assert all(isinstance(u, m.StatusMessage) for u in updates)
        return updates  # type: ignore[return-value]


@pytest.fixture
def replies() -> Replies:
    return Replies()


def message_for(task: luigi.Task, **changes: Any) -> m.TaskMessage:
    """The message a dispatcher would publish for ``task``."""
    msg = m.TaskMessage(
        task_id=task.task_id,
        module=task.task_module,
        family=task.task_family,
        params=task.to_str_params(),
        attempt=1,
        run_id="run-1",
        reply_to=REPLY_TO,
        check_unfulfilled_deps=True,
        check_complete_on_run=False,
    )
    return dataclasses.replace(msg, **changes)


def run(msg: m.TaskMessage, publish: Replies, allowed: tuple[str, ...] = ALLOWED) -> m.ResultMessage:
    """Run ``msg`` as a worker would; the result must be a valid reply, as it is published as one."""
    result = run_task_message(msg, allowed, publish)
    assert m.parse_reply(json.loads(json.dumps(result.to_dict()))) == result
    assert result.celery_id == msg.celery_id
    assert result.task_id == msg.task_id
    assert result.host == socket.gethostname()
    return result


# --- a task that runs -----------------------------------------------------------------


def test_a_task_that_writes_its_output_is_done(tmp_path: Path, replies: Replies) -> None:
    # Given a task that writes its output
    task = unit_tasks.WritesOutput(root=str(tmp_path))

    # When a worker runs its message
    result = run(message_for(task), replies)

    # Then it is DONE, with nothing missing and no event, and its output exists
    assert result.status == m.DONE
    assert result.expl == ""
    assert result.missing == []
    assert result.new_deps == []
    assert result.event is None
    assert (tmp_path / "out.txt").read_text() == "done"


def test_status_updates_made_inside_run_are_published_to_the_reply_queue(tmp_path: Path, replies: Replies) -> None:
    # Given a task that sets a status message, a progress percentage and a tracking URL in run()
    task = unit_tasks.WritesOutput(root=str(tmp_path))
    msg = message_for(task)

    # When a worker runs it
    run(msg, replies)

    # Then each update went to the run's reply queue, as a status message of this attempt
    assert [reply_to for reply_to, _ in replies.sent] == [REPLY_TO] * 3
    assert [(u.field, u.value) for u in replies.statuses()] == [
        ("status_message", "half way"),
        ("progress_percentage", 50),
        ("tracking_url", "http://tracker.example/1"),
    ]
    assert {(u.celery_id, u.task_id) for u in replies.statuses()} == {(msg.celery_id, task.task_id)}


def test_a_status_update_that_cannot_be_published_does_not_fail_the_task(tmp_path: Path) -> None:
    # Given a reply queue that cannot be reached
    def broken_publish(reply_to: str, payload: dict[str, Any]) -> None:
        raise ConnectionError("reply queue gone")

    task = unit_tasks.WritesOutput(root=str(tmp_path), name="unreachable")

    # When a worker runs a task that sends status updates
    result = run_task_message(message_for(task), ALLOWED, broken_publish)

    # Then the task still ran and is DONE
    assert result.status == m.DONE
    assert (tmp_path / "unreachable.txt").exists()


def test_on_success_runs_after_a_successful_run(tmp_path: Path, replies: Replies) -> None:
    # Given a task whose on_success leaves a mark
    task = unit_tasks.CustomSuccess(root=str(tmp_path))

    # When a worker runs it
    result = run(message_for(task), replies)

    # Then it is DONE and on_success ran
    assert result.status == m.DONE
    assert (tmp_path / "on_success_called").exists()


def test_a_task_that_does_not_complete_fails_when_completeness_is_checked_on_run(
    tmp_path: Path, replies: Replies
) -> None:
    # Given a task that runs but never writes its output, and a dispatcher with check_complete_on_run
    task = unit_tasks.NeverWrites(root=str(tmp_path))

    # When a worker runs it with and without that setting
    checked = run(message_for(task, check_complete_on_run=True), replies)
    unchecked = run(message_for(task, check_complete_on_run=False), replies)

    # Then only the checked run fails, as under stock Luigi
    assert checked.status == m.FAILED
    assert "complete() is still returning false" in checked.expl
    assert unchecked.status == m.DONE


# --- a task that fails ----------------------------------------------------------------


def test_a_task_that_raises_fails_with_the_traceback(replies: Replies) -> None:
    # Given a task whose run() raises ValueError("boom")
    task = unit_tasks.Boom()

    # When a worker runs it
    result = run(message_for(task), replies)

    # Then it FAILED, and the explanation is Luigi's: the exception and its traceback
    assert result.status == m.FAILED
    assert "ValueError" in result.expl
    assert "boom" in result.expl
    assert "Traceback (most recent call last)" in result.expl
    assert result.event is None


def test_a_custom_on_failure_writes_the_explanation(replies: Replies) -> None:
    # Given a task whose on_failure returns its own explanation
    task = unit_tasks.CustomFailure()

    # When a worker runs it
    result = run(message_for(task), replies)

    # Then the explanation is exactly what on_failure returned
    assert result.status == m.FAILED
    assert result.expl == "custom: disk full"


def test_an_explanation_that_is_not_a_string_is_sent_as_text(replies: Replies) -> None:
    # Given a task whose on_failure returns the exception object, not a string
    task = unit_tasks.FailureReturnsNonText()

    # When a worker runs it
    result = run(message_for(task), replies)

    # Then the explanation is the exception's text (a reply carries only strings)
    assert result.status == m.FAILED
    assert result.expl == "disk full"


def test_a_task_whose_on_failure_raises_still_fails_cleanly(replies: Replies) -> None:
    # Given a task whose run() raises and whose on_failure raises too
    task = unit_tasks.FailureHandlerRaises()

    # When a worker runs it
    result = run_task_message(message_for(task), ALLOWED, replies)

    # Then it is reported FAILED rather than escaping the worker's code
    assert result.status == m.FAILED


# --- dependencies -----------------------------------------------------------------------


def test_a_dynamic_dependency_that_is_not_complete_makes_the_task_pending(tmp_path: Path, replies: Replies) -> None:
    # Given a task that yields a dynamic dependency whose output does not exist
    task = unit_tasks.DynamicParent(root=str(tmp_path))
    child = unit_tasks.DynamicChild(root=str(tmp_path), n=1)

    # When a worker runs it
    result = run(message_for(task), replies)

    # Then it is PENDING on that dependency, named as (module, family, str params)
    assert result.status == m.PENDING
    assert result.new_deps == [("tests.unit_tasks", "unit_tasks.DynamicChild", child.to_str_params())]
    assert result.new_deps == [(child.task_module, child.task_family, {"root": str(tmp_path), "n": "1"})]
    assert not (tmp_path / "parent.txt").exists()


def test_a_dynamic_dependency_that_is_complete_lets_the_task_finish(tmp_path: Path, replies: Replies) -> None:
    # Given a task whose dynamic dependency is already complete
    (tmp_path / "child-1.txt").write_text("")
    task = unit_tasks.DynamicParent(root=str(tmp_path))

    # When a worker runs it
    result = run(message_for(task), replies)

    # Then it runs to the end and is DONE
    assert result.status == m.DONE
    assert result.new_deps == []
    assert (tmp_path / "parent.txt").exists()


def test_the_completion_cache_spares_checks_within_one_dispatcher_session(tmp_path: Path, replies: Replies) -> None:
    # Given a dynamic dependency that counts its complete() checks, run in session 1 with
    # [worker] cache_task_completion on (as Luigi's worker, its run fills the cache)
    child = unit_tasks.CountsChecks(root=str(tmp_path))
    parent = unit_tasks.YieldsCounted(root=str(tmp_path))
    cached = {"cache_task_completion": True, "session": "session-1"}
    assert run(message_for(child, **cached), replies).status == m.DONE
    checks = child.checks()
    # When its parent resumes in the same session, with the cache on
    assert run(message_for(parent, **cached), replies).status == m.DONE
    # Then the dependency is not checked again
    assert child.checks() == checks
    # But it is with the cache off, and in another session (its cache may not hold there)
    run(message_for(parent, cache_task_completion=False, session="session-1"), replies)
    assert child.checks() == checks + 1
    run(message_for(parent, cache_task_completion=True, session="session-2"), replies)
    assert child.checks() == checks + 2


def test_a_worker_keeps_the_completion_caches_of_a_few_sessions_each_bounded(monkeypatch) -> None:
    from luigi_celery import taskprocess

    monkeypatch.setattr(taskprocess, "_completion_caches", type(taskprocess._completion_caches)())
    monkeypatch.setattr(taskprocess, "COMPLETION_CACHE_SIZE", 2)
    task = unit_tasks.PlainParameter(value="a")
    caches = [taskprocess.completion_cache(message_for(task, cache_task_completion=True, session=f"s{n}"))
              for n in range(taskprocess.COMPLETION_CACHE_SESSIONS + 1)]  # fmt: skip
    assert len(taskprocess._completion_caches) == taskprocess.COMPLETION_CACHE_SESSIONS
    assert "s0" not in taskprocess._completion_caches  # the oldest went
    cache = caches[-1]
    assert cache is not None
    for task_id in ("t1", "t2", "t3"):
        cache[task_id] = True
    assert sorted(cache) == ["t1", "t2"]  # full: the third is checked each time
    assert taskprocess.completion_cache(message_for(task, session="s9")) is None  # (the cache is off)


def test_a_dependency_missing_at_run_time_fails_the_task(tmp_path: Path, replies: Replies) -> None:
    # Given a task whose (external) dependency has no output
    task = unit_tasks.NeedsExternalData(root=str(tmp_path))
    dep = unit_tasks.ExternalData(root=str(tmp_path))

    # When a worker runs it with the unfulfilled-deps check on
    result = run(message_for(task, check_unfulfilled_deps=True), replies)

    # Then it FAILED without running, naming the missing dependency
    assert result.status == m.FAILED
    assert "Unfulfilled" in result.expl
    assert len(result.missing) == 1
    assert result.missing[0].startswith(dep.task_id)
    assert not (tmp_path / "needs_external.txt").exists()


def test_a_missing_dependency_is_not_checked_when_the_dispatcher_says_so(tmp_path: Path, replies: Replies) -> None:
    # Given a task whose dependency has no output, and a dispatcher with check_unfulfilled_deps off
    task = unit_tasks.NeedsExternalData(root=str(tmp_path))

    # When a worker runs it
    result = run(message_for(task, check_unfulfilled_deps=False), replies)

    # Then it runs anyway
    assert result.status == m.DONE
    assert (tmp_path / "needs_external.txt").exists()


def test_an_external_task_whose_data_exists_is_done(tmp_path: Path, replies: Replies) -> None:
    # Given an external task whose output exists
    (tmp_path / "external.txt").write_text("")
    task = unit_tasks.ExternalData(root=str(tmp_path))

    # When a worker runs it
    result = run(message_for(task), replies)

    # Then it is DONE
    assert result.status == m.DONE


def test_an_external_task_whose_data_is_missing_fails(tmp_path: Path, replies: Replies) -> None:
    # Given an external task whose output does not exist
    task = unit_tasks.ExternalData(root=str(tmp_path))

    # When a worker runs it
    result = run(message_for(task), replies)

    # Then it FAILED, as Luigi says of missing external data
    assert result.status == m.FAILED
    assert "external data dependency" in result.expl


# --- messages a worker must not run -------------------------------------------------------


def test_a_task_from_a_module_outside_the_allowlist_is_not_run(tmp_path: Path, replies: Replies) -> None:
    # Given a worker that allows another module only
    task = unit_tasks.WritesOutput(root=str(tmp_path), name="not-allowed")

    # When it gets a message for a task of tests.unit_tasks
    result = run(message_for(task), replies, allowed=("examples.sales",))

    # Then it FAILED, pointing at the allowlist, and nothing ran
    assert result.status == m.FAILED
    assert "allowlist" in result.expl
    assert "tests.unit_tasks" in result.expl
    assert replies.sent == []
    assert not (tmp_path / "not-allowed.txt").exists()


def test_an_empty_allowlist_runs_nothing(tmp_path: Path, replies: Replies) -> None:
    # Given a worker without any allowed module
    task = unit_tasks.WritesOutput(root=str(tmp_path), name="empty-allowlist")

    # When it gets a message / Then it FAILED, and nothing ran
    result = run(message_for(task), replies, allowed=())
    assert result.status == m.FAILED
    assert "allowlist" in result.expl
    assert not (tmp_path / "empty-allowlist.txt").exists()


def test_a_package_in_the_allowlist_allows_its_modules(tmp_path: Path, replies: Replies) -> None:
    # Given a worker that allows the package "tests"
    task = unit_tasks.WritesOutput(root=str(tmp_path), name="by-package")

    # When it gets a message for a task of tests.unit_tasks
    result = run(message_for(task), replies, allowed=("tests",))

    # Then the task runs
    assert result.status == m.DONE
    assert (tmp_path / "by-package.txt").exists()


@pytest.mark.parametrize(
    ("module", "allowed", "expected"),
    [
        ("tests.unit_tasks", ("tests.unit_tasks",), True),
        ("tests.unit_tasks", ("tests",), True),
        ("tests.unit_tasks", ("other", "tests"), True),
        ("a.b.c", ("a",), True),
        ("tests.unit_tasks", ("tests.unit",), False),
        ("tests", ("tests.unit_tasks",), False),
        ("tests_evil", ("tests",), False),
        ("tests.unit_tasks", ("tests.",), False),
        ("tests.unit_tasks", (), False),
        ("tests.unit_tasks", ("",), False),
    ],
)
def test_module_allowed_matches_whole_module_names_only(module: str, allowed: tuple[str, ...], expected: bool) -> None:
    # Given an allowlist / When a module is looked up / Then only it and its submodules are allowed
    assert module_allowed(module, allowed) is expected


def test_an_unknown_family_in_an_allowed_module_fails(replies: Replies) -> None:
    # Given a message for a family the allowed module does not define
    msg = message_for(unit_tasks.Boom(), family="unit_tasks.NoSuchTask")

    # When a worker runs it / Then it FAILED, naming the family
    result = run(msg, replies)
    assert result.status == m.FAILED
    assert "unit_tasks.NoSuchTask" in result.expl


def test_a_module_that_cannot_be_imported_fails(replies: Replies) -> None:
    # Given a message for an allowed module that does not exist on this worker
    msg = message_for(unit_tasks.Boom(), module="tests.unit_tasks_not_deployed")

    # When a worker allowing the whole package runs it / Then it FAILED, saying it cannot import it
    result = run(msg, replies, allowed=("tests",))
    assert result.status == m.FAILED
    assert "cannot import" in result.expl
    assert "tests.unit_tasks_not_deployed" in result.expl


def test_a_family_from_another_module_than_the_message_says_fails(tmp_path: Path, replies: Replies) -> None:
    # Given a message that names the allowed module "tests" but a family defined in tests.unit_tasks
    task = unit_tasks.WritesOutput(root=str(tmp_path), name="wrong-module")
    msg = message_for(task, module="tests")

    # When a worker allowing only "tests" itself runs it / Then it FAILED and nothing ran
    result = run(msg, replies, allowed=("tests",))
    assert result.status == m.FAILED
    assert "tests.unit_tasks" in result.expl
    assert not (tmp_path / "wrong-module.txt").exists()


def test_params_that_do_not_parse_fail(replies: Replies) -> None:
    # Given a message whose IntParameter is "abc"
    msg = message_for(unit_tasks.TakesInt(n=1), params={"n": "abc"})

    # When a worker runs it / Then it FAILED, saying it cannot rebuild the task
    result = run(msg, replies)
    assert result.status == m.FAILED
    assert "cannot rebuild" in result.expl
    assert "abc" in result.expl


def test_a_message_whose_task_id_does_not_match_the_rebuilt_task_fails(tmp_path: Path, replies: Replies) -> None:
    # Given a message whose params rebuild a different task than its task_id names
    task = unit_tasks.WritesOutput(root=str(tmp_path), name="a")
    msg = message_for(task, params={"root": str(tmp_path), "name": "b"})

    # When a worker runs it / Then it FAILED: worker and dispatcher code differ, and nothing ran
    result = run(msg, replies)
    assert result.status == m.FAILED
    assert "differ" in result.expl
    assert not (tmp_path / "a.txt").exists()
    assert not (tmp_path / "b.txt").exists()


# --- a task that runs out of time -----------------------------------------------------------


def test_a_soft_time_limit_is_reported_as_a_timeout_without_on_failure(tmp_path: Path, replies: Replies) -> None:
    # Given a task whose run() is interrupted by Celery's soft time limit, with worker_timeout 5
    task = unit_tasks.TimesOut(root=str(tmp_path))

    # When a worker runs it
    result = run(message_for(task, worker_timeout=5), replies)

    # Then it FAILED with event "timeout" and Luigi's own words, and on_failure was not called
    assert result.status == m.FAILED
    assert result.event == "timeout"
    assert result.expl == f"Task {task.task_id} timed out after 5 seconds and was terminated."
    assert not (tmp_path / "on_failure_called").exists()
