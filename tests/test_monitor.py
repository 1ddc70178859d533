"""The monitor's verdicts: which tasks are lost, which waited for a queue nobody serves."""

from __future__ import annotations

from luigi_celery import message as m
from luigi_celery.monitor import Monitor, Tracked, judge


def tracked(name: str = "T", queue: str = "q", waiting_since: float = 0.0) -> Tracked:
    msg = m.TaskMessage(task_id=name, module="x", family="X", params={}, attempt=1, run_id="r", reply_to="r")
    return Tracked(flight=None, msg=msg, queue=queue, publish_options={}, waiting_since=waiting_since,
                   celery_ids=[msg.celery_id])  # fmt: skip


def test_a_started_task_whose_lock_is_gone_is_lost_after_the_grace():
    t = tracked()
    assert judge([t], locks=[True], started=[True], now=10, grace=5, queue_timeout=None).lost == []
    assert judge([t], locks=[False], started=[True], now=20, grace=5, queue_timeout=None).lost == []  # grace starts
    assert judge([t], locks=[False], started=[True], now=24, grace=5, queue_timeout=None).lost == []
    assert judge([t], locks=[False], started=[True], now=25, grace=5, queue_timeout=None).lost == [t]


def test_a_beating_lock_resets_the_grace():
    t = tracked()
    judge([t], locks=[False], started=[True], now=20, grace=5, queue_timeout=None)
    judge([t], locks=[True], started=[True], now=22, grace=5, queue_timeout=None)
    assert judge([t], locks=[False], started=[True], now=26, grace=5, queue_timeout=None).lost == []


def test_a_task_never_started_is_not_lost_but_may_have_waited_too_long():
    t = tracked(waiting_since=0)
    verdicts = judge([t], locks=[False], started=[False], now=100, grace=5, queue_timeout=60)
    assert verdicts.lost == [] and verdicts.waited_too_long == [t]
    assert judge([t], locks=[False], started=[False], now=50, grace=5, queue_timeout=60).waited_too_long == []
    assert judge([t], locks=[False], started=[False], now=100, grace=5, queue_timeout=None).waited_too_long == []


def test_a_task_a_worker_promised_to_start_is_lost_if_it_has_not_once_the_hold_is_over():
    # Given a worker that holds a never-started task for a 3 s countdown (its rate slot)
    t = tracked(waiting_since=0)
    t.hold_until = 10.0
    assert judge([t], locks=[False], started=[False], now=9, grace=5, queue_timeout=None).lost == []
    # When the hold is over and the task neither started nor holds a lock (the worker lost it)
    assert judge([t], locks=[False], started=[False], now=11, grace=5, queue_timeout=None).lost == []
    # Then, after the grace, it is lost: published again, not left to the queue timeout
    assert judge([t], locks=[False], started=[False], now=16, grace=5, queue_timeout=None).lost == [t]


def test_a_held_task_that_starts_is_not_lost():
    t = tracked(waiting_since=0)
    t.hold_until = 10.0
    judge([t], locks=[False], started=[False], now=11, grace=5, queue_timeout=None)
    assert judge([t], locks=[True], started=[True], now=16, grace=5, queue_timeout=None).lost == []


def _monitor(consumed, failed, store=None, republished=None):
    return Monitor("r", store, lambda: [], (republished if republished is not None else []).append,
                   lambda t, why: failed.append((t, why)), lambda: consumed, queue_timeout=60)  # fmt: skip


def test_waiting_on_a_queue_a_worker_consumes_is_only_a_busy_pool():
    failed: list = []
    busy, orphan = tracked("A", queue="served", waiting_since=0), tracked("B", queue="lonely", waiting_since=0)
    _monitor({"served"}, failed)._handle_waiting([busy, orphan])
    assert [t for t, _ in failed] == [orphan]
    assert "no worker consumes queue 'lonely'" in failed[0][1] and "not picked up within 60 s" in failed[0][1]
    assert busy.waiting_since > 0  # its clock starts again


def test_when_the_workers_cannot_be_asked_nothing_is_failed():
    failed: list = []
    _monitor(None, failed)._handle_waiting([tracked(queue="lonely")])
    assert failed == []


def test_with_a_store_a_task_waiting_on_a_served_queue_is_published_again():
    # (a worker may have died holding it before it started; the run lock makes a copy harmless)
    from luigi_celery.store import MemoryStore

    failed: list = []
    republished: list = []
    waiting = tracked("A", queue="served", waiting_since=0)
    _monitor({"served"}, failed, store=MemoryStore(), republished=republished)._handle_waiting([waiting])
    assert republished == [waiting] and failed == []
