"""The monitor's verdicts: which tasks are lost, which waited for a queue nobody serves."""

from __future__ import annotations

import time

from luigi_celery import message as m
from luigi_celery.monitor import Monitor, Tracked, judge
from luigi_celery.store import MemoryStore


def tracked(name: str = "T", queue: str = "q", waiting_since: float = 0.0) -> Tracked:
    msg = m.TaskMessage(task_id=name, module="x", family="X", params={}, attempt=1, run_id="r", reply_to="r")
    return Tracked(flight=None, msg=msg,  # type: ignore[arg-type]  # the monitor never reads it
                   queue=queue, publish_options={}, waiting_since=waiting_since,
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


def test_after_the_store_came_back_nothing_is_lost_or_waited_too_long_until_it_settled():
    # Given a started task whose lock is gone, and one never started, waiting since long
    gone, waiting = tracked("A"), tracked("B", waiting_since=0)
    judge([gone], locks=[False], started=[True], now=20, grace=5, queue_timeout=None)
    # When the store came back at 25 and settles until 36 (a lease and a check)
    settling = judge([gone, waiting], locks=[False, False], started=[True, False], now=30, grace=5,
                     queue_timeout=10, settle_until=36)  # fmt: skip
    # Then there are no verdicts meanwhile
    assert settling.lost == [] and settling.waited_too_long == []
    # but once it has settled, a lock still gone is lost at once, and the waiting task waited too long
    settled = judge([gone, waiting], locks=[False, False], started=[True, False], now=36, grace=5,
                    queue_timeout=10, settle_until=36)  # fmt: skip
    assert settled.lost == [gone] and settled.waited_too_long == [waiting]


def test_a_lock_taken_again_while_the_store_settles_is_not_lost():
    # Given a started task whose lock the store lost at 20, and a store settling until 31
    t = tracked()
    judge([t], locks=[False], started=[True], now=20, grace=5, queue_timeout=None, settle_until=31)
    # When its worker has not taken the lock again by the next check, but has by the one after
    assert judge([t], locks=[False], started=[False], now=25, grace=5, queue_timeout=None, settle_until=31).lost == []
    judge([t], locks=[True], started=[True], now=28, grace=5, queue_timeout=None, settle_until=31)
    # Then it is not lost once the store has settled
    assert judge([t], locks=[True], started=[True], now=31, grace=5, queue_timeout=None).lost == []
    assert t.lock_gone_since is None


class AwayThenBack(MemoryStore):
    """A store that cannot be reached for its first ``away`` status calls."""

    def __init__(self, away: int) -> None:
        super().__init__()
        self.away = away
        self.back_at: float | None = None

    def status(self, run_id, task_ids, celery_ids):
        if self.away:
            self.away -= 1
            raise ConnectionError("store away")
        if self.back_at is None:
            self.back_at = time.monotonic()
        return super().status(run_id, task_ids, celery_ids)


def test_after_an_outage_the_monitor_waits_a_full_lease_before_calling_a_task_lost():
    # Given a task that started and whose lock was gone before the store went away
    gone = tracked()
    gone.started, gone.lock_gone_since = True, time.monotonic() - 60
    store, republished = AwayThenBack(away=2), []
    monitor = Monitor("r", store, lambda: [gone], lambda t: republished.append(time.monotonic()),
                      lambda t, why: None, lambda: set(), queue_timeout=None, interval=0.05, lease=1.0)  # fmt: skip
    # When the store is away for two checks, then answers
    monitor.start()
    try:
        deadline = time.monotonic() + 10
        while not republished and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        monitor.stop()
    # Then the task whose lock is still gone is published again, but not before a lease has passed
    # since the store answered (its worker may be taking the lock again)
    assert republished and store.back_at is not None
    assert republished[0] - store.back_at >= 1.0


def test_a_monitor_told_the_store_lost_its_data_waits_a_lease_and_a_check_before_calling_a_task_lost():
    # Given a started task whose lock is gone
    gone = tracked()
    gone.started, gone.lock_gone_since = True, time.monotonic() - 60
    republished: list = []
    monitor = Monitor("r", MemoryStore(), lambda: [gone], republished.append, lambda t, why: None,
                      lambda: set(), queue_timeout=None, interval=0.2, lease=1.0)  # fmt: skip
    # When the dispatcher tells the monitor the store lost its data (its claim vanished)
    monitor.settle()
    # Then the task is not lost for the lease and one check interval
    monitor.check()
    time.sleep(1.0)
    monitor.check()
    assert republished == []
    time.sleep(0.3)
    monitor.check()
    assert republished == [gone]


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
