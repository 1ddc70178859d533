"""The coordination store's contract, run against the in-memory twin and real Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from luigi_celery import message as m
from luigi_celery.runlock import _Heartbeats, run_lock
from luigi_celery.store import MemoryStore, died_here, owner_here, redis_store_url
from luigi_celery.store_redis import RedisStore
from tests.conftest import REDIS_URL


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.broker)])
def store(request):
    if request.param == "memory":
        return MemoryStore()
    request.getfixturevalue("brokers")  # fails, never skips, without Redis
    return RedisStore(REDIS_URL)


@pytest.fixture
def ids():
    tag = uuid.uuid4().hex[:8]
    return f"Task_{tag}", f"run-{tag}"


def test_one_owner_at_a_time(store, ids):
    task_id, run_id = ids
    assert store.acquire(task_id, "a", 5, run_id, "c1").holder is None
    # Then a second taker is told who holds it, and takes nothing
    assert store.acquire(task_id, "b", 5, run_id, "c2").holder == "a"
    locks, started = store.status(run_id, [task_id], ["c1", "c2"])
    assert locks == [True] and started == [True, False]


def test_nothing_a_dispatcher_sent_is_taken_once_it_has_ended_its_session(store, ids):
    task_id, run_id = ids
    session, other = uuid.uuid4().hex, uuid.uuid4().hex
    # When the dispatcher of one session ends it
    store.end_session(session)
    # Then its messages get no lock and no start mark, and say why
    assert store.acquire(task_id, "a", 5, run_id, "c1", session) == (None, False, True)
    assert store.status(run_id, [task_id], ["c1"]) == ([False], [False])
    # while another session's (a run of the same pipeline started again), or one with no session, run
    assert store.acquire(task_id, "b", 5, run_id, "c1", other) == (None, False, False)
    store.release(task_id, "b")
    assert store.acquire(task_id, "c", 5, run_id, "c2") == (None, False, False)


def test_only_the_owner_refreshes_or_releases(store, ids):
    task_id, run_id = ids
    store.acquire(task_id, "a", 5, run_id, "c1")
    assert store.refresh(task_id, "b", 5) is False
    store.release(task_id, "b")
    assert store.acquire(task_id, "b", 5, run_id, "c2").holder == "a"
    assert store.refresh(task_id, "a", 5) is True
    store.release(task_id, "a")
    assert store.acquire(task_id, "b", 5, run_id, "c2").holder is None


def test_a_lock_without_heartbeat_expires_but_the_start_mark_stays(store, ids):
    task_id, run_id = ids
    store.acquire(task_id, "a", 0.3, run_id, "c1")
    time.sleep(0.5)
    assert store.refresh(task_id, "a", 5) is False
    assert store.status(run_id, [task_id], ["c1"]) == ([False], [True])
    assert store.acquire(task_id, "b", 5, run_id, "c2").holder is None


def test_a_live_owner_takes_back_a_lock_and_start_mark_the_store_lost(store, ids):
    # Given a lock whose owner still runs the task, lost by the store with the run's start marks
    task_id, run_id = ids
    store.acquire(task_id, "a", 0.3, run_id, "c1")
    store.forget_run(run_id)
    time.sleep(0.5)
    assert store.refresh(task_id, "a", 5) is False
    # When the owner takes it again
    assert store.retake(task_id, "a", 5, run_id, "c1") is None
    # Then it holds the lock, its heartbeat keeps it, the attempt is marked started,
    # and another delivery of the task does not run
    assert store.refresh(task_id, "a", 5) is True
    assert store.status(run_id, [task_id], ["c1"]) == ([True], [True])
    assert store.acquire(task_id, "b", 5, run_id, "c2").holder == "a"


def test_a_lock_someone_else_took_meanwhile_is_not_taken_back(store, ids):
    # Given a lock the store lost, which another attempt then took
    task_id, run_id = ids
    store.acquire(task_id, "a", 0.3, run_id, "c1")
    time.sleep(0.5)
    assert store.acquire(task_id, "b", 5, run_id, "c2").holder is None
    # When the first owner tries to take it again
    holder = store.retake(task_id, "a", 5, run_id, "c1")
    # Then it is told who holds it, and the lock stays the other's
    assert holder == "b"
    assert store.refresh(task_id, "a", 5) is False and store.refresh(task_id, "b", 5) is True


def test_a_heartbeat_keeps_a_lock_alive(store, ids):
    task_id, run_id = ids
    store.acquire(task_id, "a", 0.4, run_id, "c1")
    for _ in range(4):
        time.sleep(0.2)
        assert store.refresh(task_id, "a", 0.4)
    assert store.status(run_id, [task_id], [])[0] == [True]


def test_a_repeat_of_the_same_celery_id_is_seen_as_one(store, ids):
    task_id, run_id = ids
    assert store.acquire(task_id, "a", 5, run_id, "c1").seen_before is False
    store.release(task_id, "a")
    # When the same Celery id comes again (redelivered), it is a repeat; another id is not
    assert store.acquire(task_id, "b", 5, run_id, "c1") == (None, True, False)
    store.release(task_id, "b")
    assert store.acquire(task_id, "c", 5, run_id, "c2") == (None, False, False)
    assert store.started(run_id) == ["c1", "c2"]
    store.forget_run(run_id)
    assert store.started(run_id) == []


def test_one_dispatcher_per_run(store, ids):
    _, run_id = ids
    assert store.claim_run(run_id, "d1", 5) is None
    assert store.claim_run(run_id, "d2", 5) == "d1"
    assert store.refresh_run(run_id, "d2", 5) is False and store.refresh_run(run_id, "d1", 5) is True
    store.release_run(run_id, "d1")
    assert store.claim_run(run_id, "d2", 5) is None


def test_the_store_defaults_to_a_redis_broker():
    assert redis_store_url("redis://h:6379/1", None) == "redis://h:6379/1"
    assert redis_store_url("amqp://h//", None) is None
    assert redis_store_url("amqp://h//", "redis://s/2") == "redis://s/2"


def _msg(task_id: str, run_id: str, attempt: int = 1) -> m.TaskMessage:
    return m.TaskMessage(
        task_id=task_id, module="x", family="X", params={}, attempt=attempt, run_id=run_id, reply_to="r"
    )


def test_run_lock_lets_one_delivery_run_and_keeps_the_lock_beating(ids):
    task_id, run_id = ids
    store = MemoryStore()
    with run_lock(store, _msg(task_id, run_id), ttl=0.3) as lease:
        assert lease.holder is None
        with run_lock(store, _msg(task_id, run_id, attempt=2), ttl=0.3) as second:
            assert second.holder is not None  # a duplicate does not run
        time.sleep(0.6)  # twice the TTL: only the heartbeat keeps it
        assert store.status(run_id, [task_id], [])[0] == [True]
    assert store.status(run_id, [task_id], [])[0] == [False]  # released at the end


def test_a_running_task_takes_its_lock_again_when_the_store_lost_it(ids, caplog):
    # Given a task running under its lock (a beat every 0.05 s)
    task_id, run_id = ids
    store, msg = MemoryStore(), _msg(task_id, run_id)
    with run_lock(store, msg, ttl=0.3):
        # When the store loses the lock and the run's start marks (restarted empty, flushed)
        store.release(task_id, owner_here(msg.celery_id))
        store.forget_run(run_id)
        time.sleep(0.2)
        # Then the heartbeat has taken the lock again, marked the attempt started, and said so
        assert store.status(run_id, [task_id], [msg.celery_id]) == ([True], [True])
        assert store.acquire(task_id, "another", 5, run_id, "c2").holder == owner_here(msg.celery_id)
        assert f"took the run lock of {task_id} again" in caplog.text
        time.sleep(0.4)  # and keeps it beating
        assert store.status(run_id, [task_id], [])[0] == [True]
    assert store.status(run_id, [task_id], [])[0] == [False]


def test_a_running_task_whose_lock_another_worker_took_does_not_take_it_back(ids, caplog):
    # Given a task running under its lock
    task_id, run_id = ids
    store, msg = MemoryStore(), _msg(task_id, run_id)
    with run_lock(store, msg, ttl=0.3):
        # When the store loses the lock and another attempt takes it before the next beat
        store.release(task_id, owner_here(msg.celery_id))
        store.acquire(task_id, "another", 5, run_id, "c2")
        time.sleep(0.2)
        # Then the heartbeat leaves it to the other, and says the task may run twice
        assert store.acquire(task_id, "third", 5, run_id, "c3").holder == "another"
        assert f"lost the run lock of {task_id}: another worker may start it (another holds it)" in caplog.text
    assert store.acquire(task_id, "third", 5, run_id, "c3").holder == "another"  # its lock, not released by us


def test_a_lock_taken_again_as_its_task_ends_is_let_go(ids):
    # Given a heartbeat that finds the lock gone, and a task that ends just as it takes it again
    task_id, run_id = ids
    beats = _Heartbeats()

    class EndsWhileRetaking(MemoryStore):
        def refresh(self, task_id: str, owner: str, ttl: float) -> bool:
            return False

        def retake(self, task_id: str, owner: str, ttl: float, run_id: str, celery_id: str) -> str | None:
            beats.drop(self, task_id)  # the task ended and let go (a no-op release: the lock was gone)
            return super().retake(task_id, owner, ttl, run_id, celery_id)

    store = EndsWhileRetaking()
    beats.hold(store, task_id, "a", 0.3, run_id, "c1")
    time.sleep(0.2)
    # Then the lock it took again is released, not left to block the task for a TTL
    assert store.status(run_id, [task_id], [])[0] == [False]


@pytest.mark.e2e  # it starts a process, only to have the pid of a dead one
def test_a_lock_left_by_a_dead_process_of_this_host_is_taken_over(ids):
    task_id, run_id = ids
    store = MemoryStore()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.acquire(task_id, f"{task_id}.x.1|{socket.gethostname()}|{dead.pid}", 60, run_id, "c1")
    assert died_here(f"a|b|c|{socket.gethostname()}|{dead.pid}")
    with run_lock(store, _msg(task_id, run_id, attempt=2), ttl=5) as lease:
        assert lease.holder is None
    # but a live holder, or one on another host, is left alone
    assert not died_here(f"c|{socket.gethostname()}|{os.getpid()}")
    assert not died_here(f"c|another-host|{dead.pid}")


@pytest.mark.broker
def test_a_store_call_rides_out_a_short_redis_outage(own_redis, ids):
    # Given Redis down, and back two seconds later
    import threading

    task_id, run_id = ids
    store = RedisStore(own_redis.url)
    own_redis.stop()
    threading.Timer(2.0, own_redis.start).start()
    # When a worker asks for a run lock meanwhile
    started = time.monotonic()
    lease = store.acquire(task_id, "a", 5, run_id, "c1")
    # Then the call waits for Redis instead of failing the task
    assert lease.holder is None
    assert 1.5 < time.monotonic() - started < 20
