"""Scheduler replicas sharing one state on a real Redis: the lease, the fenced log, the snapshot.

Two or three :class:`Replica` objects in this process play the replicas (the server
processes, with kill -9, are in test_scheduler_server_e2e.py). Each test has keys of
its own, on the tests' own Redis db.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

import pytest

from luigi_celery.scheduler import FastScheduler, install_clock
from luigi_celery.scheduler_journal import Fenced, RedisJournal
from luigi_celery.scheduler_server import NotLeading, Replica
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.broker

install_clock()


@pytest.fixture
def prefix(brokers) -> Iterator[str]:
    name = f"lc-test-scheduler:{uuid.uuid4().hex[:10]}"
    yield name
    journal = RedisJournal(REDIS_URL, name, "cleanup", 1)
    journal.forget()


def replica(prefix: str, name: str, lease: float = 30) -> Replica:
    return Replica(FastScheduler(record_task_history=False), RedisJournal(REDIS_URL, prefix, name, lease))


def drive(leader: Replica, seed: int, steps: int = 300) -> None:
    """A random history of a pipeline's calls: adds with dependencies, work handed out, results."""
    rng = random.Random(seed)
    ids: list[str] = []
    running: list[str] = []
    for _ in range(steps):
        roll = rng.random()
        if roll < 0.35 or not ids:
            task_id = f"T{len(ids)}"
            deps = rng.sample(ids, k=min(len(ids), rng.choice([0, 1, 2]))) + [f"T{len(ids) + 1}"] * rng.choice([0, 1])
            worker, priority = rng.choice(["w1", "w1", "w2"]), rng.choice([0, 0, 5])
            leader.call("add_task", {"worker": worker, "task_id": task_id, "deps": deps, "priority": priority,
                                     "family": "F", "params": {"n": task_id}})  # fmt: skip
            ids.append(task_id)
        elif roll < 0.7:
            reply = leader.call("get_work", {"worker": "w1", "current_tasks": list(running)})
            if reply["task_id"]:
                running.append(reply["task_id"])
        elif roll < 0.95 and running:
            task_id = running.pop(rng.randrange(len(running)))
            status = rng.choice(["DONE", "DONE", "FAILED"])
            leader.call("add_task", {"worker": "w1", "task_id": task_id, "status": status})
        else:
            leader.call("task_list", {"status": "", "upstream_status": ""})  # a read that prunes first


def take_over(standby: Replica) -> None:
    assert standby.take_over()
    assert standby.leading


def test_one_replica_leads_a_term_at_a_time_and_only_it_renews_and_releases(prefix):
    first, second = RedisJournal(REDIS_URL, prefix, "a", 30), RedisJournal(REDIS_URL, prefix, "b", 30)

    assert first.acquire() == 1
    assert second.acquire() is None  # held
    assert second.renew() is False
    assert first.renew() is True
    second.release()  # not its lease: nothing happens
    assert first.leader() == "1 a"
    first.release()
    assert second.acquire() == 2  # a new term
    assert first.renew() is False and first.owner is None


def test_a_leader_whose_lease_ran_out_cannot_write_even_before_another_takes_over(prefix):
    journal = RedisJournal(REDIS_URL, prefix, "a", 30)
    journal.acquire()
    journal.append({"m": "ping", "a": {"worker": "w"}, "t": 1.0})
    journal.redis.pexpire(journal.keys["lease"], 1)  # (as if the leader had hung past its lease)
    journal.redis.delete(journal.keys["lease"])

    with pytest.raises(Fenced):
        journal.append({"m": "ping", "a": {"worker": "w"}, "t": 2.0})
    with pytest.raises(Fenced):
        journal.save_snapshot({}, 1, "0")
    assert [entry.seq for entry in journal.read_after("0")] == [1]


def test_a_standby_replaying_the_log_holds_the_leaders_state_and_refuses_calls(prefix):
    leader, standby = replica(prefix, "a"), replica(prefix, "b")
    take_over(leader)
    drive(leader, seed=1)

    standby.catch_up()

    assert standby.applied_seq == leader.applied_seq > 150
    assert standby.scheduler.state_json() == leader.scheduler.state_json()
    for method, arguments in (("get_work", {"worker": "w1"}), ("task_list", {"status": "", "upstream_status": ""}),
                              ("fetch_error", {"task_id": "T1"})):  # fmt: skip
        with pytest.raises(NotLeading):
            standby.call(method, arguments)


def test_a_replica_started_later_rebuilds_the_state_from_the_snapshot_and_the_log_after_it(prefix):
    leader = replica(prefix, "a")
    take_over(leader)
    drive(leader, seed=2, steps=200)
    leader.snapshot_if_due(force=True)
    drive(leader, seed=3, steps=100)
    journal = leader.journal
    assert journal is not None
    assert journal.read_after("0")[0].seq > 1  # the log before the snapshot is gone

    late = replica(prefix, "c")
    late.load()
    late.catch_up()

    assert late.scheduler.state_json() == leader.scheduler.state_json()


def test_a_standby_left_behind_by_a_snapshot_reloads_it(prefix):
    leader, standby = replica(prefix, "a"), replica(prefix, "b")
    take_over(leader)
    drive(leader, seed=4, steps=50)
    standby.catch_up()
    drive(leader, seed=5, steps=100)
    leader.snapshot_if_due(force=True)  # trims what the standby has not read yet
    drive(leader, seed=6, steps=20)

    standby.catch_up()

    assert standby.scheduler.state_json() == leader.scheduler.state_json()


def test_a_leader_that_comes_back_after_a_takeover_is_fenced_and_follows_the_new_one(prefix):
    old, new = replica(prefix, "a"), replica(prefix, "b")
    take_over(old)
    drive(old, seed=7, steps=100)
    assert old.journal is not None
    old.journal.redis.delete(old.journal.keys["lease"])  # its lease ran out while it was paused
    take_over(new)
    drive(new, seed=8, steps=100)

    with pytest.raises(NotLeading):
        old.call("add_task", {"worker": "w1", "task_id": "late", "family": "F"})
    assert not old.leading
    old.catch_up()

    assert old.scheduler.state_json() == new.scheduler.state_json()
    assert new.scheduler._state.get_task("late") is None


def test_a_call_the_method_does_not_take_is_refused_before_it_is_logged(prefix):
    leader = replica(prefix, "a")
    take_over(leader)
    from luigi_celery.scheduler_server import BadCall

    with pytest.raises(BadCall, match="add_worker.*info"):
        leader.call("add_worker", {"worker": "w"})
    assert leader.applied_seq == 0


def test_a_message_id_the_leader_made_is_the_one_the_standby_holds(prefix):
    leader, standby = replica(prefix, "a"), replica(prefix, "b")
    take_over(leader)
    leader.call("add_task", {"worker": "w1", "task_id": "A", "family": "F"})
    leader.call("get_work", {"worker": "w1"})
    sent = leader.call("send_scheduler_message", {"worker": "w1", "task": "A", "content": "hello"})

    standby.catch_up()

    (message,) = standby.scheduler._state.get_worker("w1").rpc_messages
    assert sent["message_id"] and message["kwargs"]["message_id"] == sent["message_id"]
