"""The hook moments: every policy hears each one, and one that fails breaks nothing."""

from __future__ import annotations

import pytest

from luigi_celery import message as m
from luigi_celery.hooks import DispatchHook, Hold, Run, RunHook, first_hold, hold_for, tell, tell_answered


class Broken(RunHook, DispatchHook):
    def finished(self, run, outcome, began):
        raise RuntimeError("a metric store that is down")

    def answered(self, family, queue, status):
        raise RuntimeError("a metric store that is down")


class Recording(RunHook, DispatchHook):
    def __init__(self):
        self.heard = []

    def finished(self, run, outcome, began):
        self.heard.append(outcome)

    def answered(self, family, queue, status):
        self.heard.append(status)


def test_a_hook_that_fails_is_logged_and_the_others_still_hear(caplog):
    recording = Recording()
    run = Run(m.TaskMessage(task_id="t", module="x", family="T", params={}, attempt=1, run_id="r", reply_to="q"), "q")
    # When the first of two hooks fails at an observing moment, on either side
    tell([Broken(), recording], "finished", run, m.DONE, None)
    tell_answered([Broken(), recording], "T", "q", m.FAILED)
    # Then the second heard both, and each failure is one logged error naming the hook
    assert recording.heard == [m.DONE, m.FAILED]
    assert caplog.text.count("Broken failed") == 2


def test_the_first_hold_wins_and_a_dispatch_hold_is_the_longest_asked_for():
    msg = m.TaskMessage(task_id="t", module="x", family="T", params={}, attempt=1, run_id="r", reply_to="q")
    rate, retry = Hold(2.0, msg, "rate"), Hold(9.0, msg, "retry")
    assert first_hold([None, rate, retry]) is rate and first_hold([None, None]) is None

    class Wait(DispatchHook):
        def __init__(self, seconds):
            self.seconds = seconds

        def before_publish(self, tracked):
            return self.seconds

    assert hold_for([Wait(0.5), DispatchHook(), Wait(3.0)], object()) == 3.0  # type: ignore[arg-type]
    assert hold_for([], object()) == 0.0  # type: ignore[arg-type]


def test_a_refusal_before_publish_is_not_swallowed():
    from luigi_celery.errors import LuigiCeleryError

    class Refuses(DispatchHook):
        def before_publish(self, tracked):
            raise LuigiCeleryError("no slot")

    with pytest.raises(LuigiCeleryError, match="no slot"):
        hold_for([Refuses()], object())  # type: ignore[arg-type]
