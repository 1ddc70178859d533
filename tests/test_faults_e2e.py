"""Nothing lost, nothing run twice: real workers killed, duplicates sent, queues left unserved.

Every task appends START to ``events.log`` when its run() begins, so a test
counts exactly how often each task started.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from kombu import Connection

from luigi_celery import message as m
from luigi_celery.app import make_app
from luigi_celery.monitor import CHECK_INTERVAL
from luigi_celery.results import reply_queue, reply_queue_name
from luigi_celery.settings import Settings
from tests.conftest import RABBITMQ_URL, REDIS_URL, ROOT, clean_env, wait_until
from tests.pipelines import Slow

pytestmark = pytest.mark.e2e

SLOW = ("--module", "tests.pipelines", "ManySlow")


def events(out: Path) -> list[tuple[str, str, int]]:
    path = out / "events.log"
    if not path.exists():
        return []
    lines = [line.split() for line in path.read_text().splitlines()]
    return [(event, task, int(pid)) for event, task, pid in (w for w in lines if len(w) == 3)]


def starts(out: Path) -> collections.Counter[str]:
    return collections.Counter(task for event, task, _ in events(out) if event == "START")


def first_start(out: Path, timeout: float = 60) -> tuple[str, int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        begun = [(task, pid) for event, task, pid in events(out) if event == "START"]
        if begun:
            return begun[0]
        time.sleep(0.05)
    raise AssertionError("no task started")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("Slow_*.txt"))


@pytest.mark.parametrize("broker", [REDIS_URL, RABBITMQ_URL], ids=["redis", "rabbitmq"])
def test_a_killed_pool_process_does_not_lose_its_task(fresh_pool, tmp_path, broker):
    # Given four 3-second tasks over two workers
    pool = fresh_pool(broker)
    run = pool.start(*SLOW, "--out", str(tmp_path), "--count", "4", "--seconds", "3", "--workers", "4")
    # When the pool process running the first task is killed
    killed_task, pid = first_start(tmp_path)
    os.kill(pid, signal.SIGKILL)
    output, _ = run.communicate(timeout=150)
    # Then the run completes, the killed task ran again, every other task once
    assert run.returncode == 0, output[-3000:]
    assert len(outputs(tmp_path)) == 4
    counts = starts(tmp_path)
    assert counts.pop(killed_task) == 2
    assert set(counts.values()) == {1}


def test_a_whole_worker_killed_mid_run_is_recovered_within_two_minutes(fresh_pool, tmp_path):
    # Given default settings and two workers running four 8-second tasks
    pool = fresh_pool(REDIS_URL)
    run = pool.start(*SLOW, "--out", str(tmp_path), "--count", "4", "--seconds", "8", "--workers", "4")
    _, pid = first_start(tmp_path)
    time.sleep(0.5)  # let the others start too
    victim = pool.worker_of(pid)
    victim_pids = {p for event, _, p in events(tmp_path) if event == "START" and f"[pid {p}]" in victim.output()}
    # When that worker, main process and pool, is killed
    os.killpg(victim.process.pid, signal.SIGKILL)
    killed_at = time.time()
    output, _ = run.communicate(timeout=180)
    # Then the run still completes within two minutes, the cut-off tasks ran again, nothing else did
    assert run.returncode == 0, output[-3000:]
    assert time.time() - killed_at < 120
    assert len(outputs(tmp_path)) == 4
    cut_off = {task for event, task, p in events(tmp_path) if event == "START" and p in victim_pids}
    assert cut_off
    assert all(count == (2 if task in cut_off else 1) for task, count in starts(tmp_path).items())


def _publish_twice_and_read(pool, out: Path, delay: float) -> list[dict]:
    """Publish one Slow task's message, then the very same message again ``delay`` s later."""
    app = make_app(Settings(broker_url=pool.broker, queue=pool.queue))
    reply_to = reply_queue_name(f"dup-{uuid.uuid4().hex[:8]}")
    task = Slow(out=str(out), n=7, seconds=3.0)
    msg = m.TaskMessage(task_id=task.task_id, module=task.task_module, family=task.task_family,
                        params=task.to_str_params(), attempt=1, run_id=f"dup-{uuid.uuid4().hex[:6]}",
                        reply_to=reply_to)  # fmt: skip
    replies = []
    with Connection(pool.broker) as conn:
        queue = reply_queue(reply_to)(conn.default_channel)
        queue.declare()
        for _ in range(2):
            app.send_task(m.TASK_NAME, kwargs={"message": msg.to_dict()}, task_id=msg.celery_id, queue=pool.queue)
            time.sleep(delay)
        deadline = time.time() + 10
        while time.time() < deadline:
            message = queue.get(no_ack=True, accept=["json"])
            if message is None:
                time.sleep(0.1)
                continue
            reply = message.decode()
            if reply["kind"] == "result":
                replies.append(reply)
        queue.delete()
    return replies


def test_a_duplicate_of_a_running_task_does_not_run_it_again(fresh_pool, tmp_path):
    pool = fresh_pool(REDIS_URL)
    # When the same message arrives twice while the task runs (two workers, one each)
    replies = _publish_twice_and_read(pool, tmp_path, delay=0.5)
    # Then it ran once, and only the run that happened replied
    assert sum(starts(tmp_path).values()) == 1
    assert [r["status"] for r in replies] == ["DONE"] and replies[0]["expl"] != "already complete"
    assert "is already running as" in "".join(w.output() for w in pool.workers)


def test_a_duplicate_of_a_finished_task_answers_done_without_running(fresh_pool, tmp_path):
    pool = fresh_pool(REDIS_URL)
    replies = _publish_twice_and_read(pool, tmp_path, delay=4.5)
    assert sum(starts(tmp_path).values()) == 1
    assert [(r["status"], r["expl"]) for r in replies][1] == ("DONE", "already complete")


def test_a_queue_no_worker_serves_fails_the_task_naming_the_queue(pool, tmp_path):
    # Given a task whose queue no worker consumes (the pool serves only its own queue)
    queue = f"lc-test-unserved-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    run = subprocess.run(
        pool.command("--module", "tests.pipelines", "Unserved", "--out", str(tmp_path), "--queue-timeout", "2"),
        cwd=ROOT, env=clean_env(LC_TEST_UNSERVED_QUEUE=queue), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # Then it fails soon after the timeout, saying which queue nobody serves
    assert time.monotonic() - started < 30
    assert run.returncode == 30
    assert f"was not picked up within 2 s: no worker consumes queue '{queue}'" in run.stdout + run.stderr
    with Connection(pool.broker) as conn:  # the message nobody took
        conn.default_channel.queue_delete(queue)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupting_the_dispatcher_revokes_what_it_sent(fresh_pool, tmp_path, signum):
    # Given six 20-second tasks in flight on four pool processes (two wait in the queue)
    pool = fresh_pool(REDIS_URL)
    run = pool.start(*SLOW, "--out", str(tmp_path), "--count", "6", "--seconds", "20", "--workers", "6")
    first_start(tmp_path)
    time.sleep(1)
    # When the dispatcher is interrupted
    run.send_signal(signum)
    output, _ = run.communicate(timeout=30)
    # Then it says what it revoked and exits with 128 + the signal
    assert run.returncode == 128 + signum, output[-3000:]
    assert "revoked 6 task(s) in flight: Slow_" in output
    # and nothing it sent runs on: the processes running its tasks were terminated,
    # the queued tasks never start
    running = {pid for event, _, pid in events(tmp_path) if event == "START"}
    begun = sum(starts(tmp_path).values())
    deadline = time.time() + 10
    while any(_alive(pid) for pid in running) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in running)
    time.sleep(3)
    assert sum(starts(tmp_path).values()) == begun <= 4
    assert outputs(tmp_path) == []
    # while the workers stay up and serve the next run
    assert all(w.alive() for w in pool.workers)
    again = pool.run("--module", "tests.pipelines", "Succeeds", "--out", str(tmp_path / "after"))
    assert again.returncode == 0, again.stdout[-2000:]


def test_a_worker_told_to_stop_finishes_its_task_first(fresh_pool, tmp_path):
    # Given a task running on one of two workers
    pool = fresh_pool(REDIS_URL)
    run = pool.start(*SLOW, "--out", str(tmp_path), "--count", "2", "--seconds", "4", "--workers", "2")
    _, pid = first_start(tmp_path)
    # When that worker's main process gets SIGTERM (as Kubernetes sends on scale-in): a warm shutdown
    victim = pool.worker_of(pid)
    os.kill(victim.process.pid, signal.SIGTERM)
    output, _ = run.communicate(timeout=120)
    # Then its task finishes, the run completes, and nothing ran twice
    assert run.returncode == 0, output[-3000:]
    assert len(outputs(tmp_path)) == 2 and set(starts(tmp_path).values()) == {1}
    victim.process.wait(30)


def test_a_task_cut_off_by_a_signal_to_its_pool_process_runs_again(fresh_pool, tmp_path):
    # Given a task running on one of two workers
    pool = fresh_pool(REDIS_URL)
    run = pool.start(*SLOW, "--out", str(tmp_path), "--count", "2", "--seconds", "4", "--workers", "2")
    cut_task, pid = first_start(tmp_path)
    # When SIGTERM reaches every process of that worker, its pool processes too
    # (`pkill celery`, systemd's default KillMode): the task is cut off, not failed
    victim = pool.worker_of(pid)
    os.killpg(victim.process.pid, signal.SIGTERM)
    output, _ = run.communicate(timeout=120)
    # Then it runs again on the other worker and the run completes
    assert run.returncode == 0, output[-3000:]
    assert len(outputs(tmp_path)) == 2
    assert starts(tmp_path)[cut_task] == 2


def test_a_dispatcher_killed_and_started_again_adopts_its_work(fresh_pool, tmp_path):
    # Given a run of six 3-second tasks, two at a time
    pool = fresh_pool(REDIS_URL)
    args = (*SLOW, "--out", str(tmp_path), "--count", "6", "--seconds", "3", "--workers", "2")
    first = pool.start(*args)
    first_start(tmp_path)
    time.sleep(0.5)
    # When the dispatcher is killed outright while tasks run, and started again
    first.kill()
    first.wait()
    again = pool.run(*args, timeout=180)
    # Then the run completes, and no task ran twice (the running ones were adopted, not re-sent)
    assert again.returncode == 0, again.stdout[-3000:]
    assert len(outputs(tmp_path)) == 6
    assert set(starts(tmp_path).values()) == {1}, starts(tmp_path)
    assert "were started by an earlier dispatcher" in again.stdout
    # and the started ones were not even sent again (no worker saw a duplicate)
    logs = pool.logs()
    assert "is already running as" not in logs and "not run again" not in logs


def test_a_second_dispatcher_of_the_same_pipeline_is_refused(fresh_pool, tmp_path):
    pool = fresh_pool(REDIS_URL)
    args = (*SLOW, "--out", str(tmp_path), "--count", "2", "--seconds", "4", "--workers", "2")
    first = pool.start(*args)
    first_start(tmp_path)
    # (--no-lock: skip Luigi's own same-machine pid lock, as a dispatcher on another machine would)
    second = pool.run(*args, "--no-lock")
    assert second.returncode == 10
    assert "this pipeline is already being run by dispatcher|" in second.stdout
    output, _ = first.communicate(timeout=60)
    assert first.returncode == 0, output[-2000:]


def test_a_redis_restart_mid_run_loses_nothing(own_redis, fresh_pool, tmp_path):
    # Given a run over a Redis of the test's own
    pool = fresh_pool(own_redis.url)
    run = pool.start(*SLOW, "--out", str(tmp_path), "--count", "6", "--seconds", "2", "--workers", "3")
    first_start(tmp_path)
    # When Redis goes away for three seconds and comes back
    own_redis.restart(down_for=3)
    output, _ = run.communicate(timeout=240)
    # Then the run completes, every task ran, and none ran twice
    assert run.returncode == 0, output[-3000:]
    assert len(outputs(tmp_path)) == 6
    assert set(starts(tmp_path).values()) == {1}, starts(tmp_path)


@pytest.mark.parametrize(
    "loss",
    [
        # wiped once the dispatcher has seen the tasks start: without their locks they look lost
        "flushed-after-a-check",
        # restarted empty before the dispatcher saw them start: without their start marks they look
        # queued, and a short queue timeout publishes them again
        "restarted-empty-at-once",
    ],
)
def test_a_store_that_loses_its_data_mid_run_runs_nothing_twice(own_redis, fresh_pool, tmp_path, loss):
    # Given two 20-second tasks running on a pool with processes to spare (two workers, four
    # processes), over a coordination store of the test's own, with 6-second run locks
    pool = fresh_pool(REDIS_URL, LUIGI_CELERY_REDIS_URL=own_redis.url, LUIGI_CELERY_LOCK_TTL="6")
    run = pool.start(*SLOW, "--out", str(tmp_path), "--count", "2", "--seconds", "20", "--workers", "2",
                     "--queue-timeout", "5")  # fmt: skip
    wait_until("both tasks started", lambda: len(starts(tmp_path)) == 2, timeout=60, process=run)
    # When the store loses every key while they run
    if loss == "flushed-after-a-check":
        time.sleep(CHECK_INTERVAL + 1)
        own_redis.flushall()
    else:
        own_redis.restart(down_for=2, keep_data=False)
    output, _ = run.communicate(timeout=120)
    # Then the run completes with every output, and each task started exactly once: the live
    # workers took their locks again, the dispatcher its claim, and nothing was published again
    # to the processes to spare
    assert run.returncode == 0, output[-3000:]
    assert len(outputs(tmp_path)) == 2
    assert sorted(starts(tmp_path).values()) == [1, 1], starts(tmp_path)
    assert pool.logs().count("took the run lock of Slow_") == 2, pool.logs()[-3000:]
    assert "took the claim on run" in output and "publishing it again" not in output, output[-3000:]


def test_a_broker_gone_for_good_fails_the_run_with_the_reason(own_redis, fresh_pool, tmp_path):
    # Given a run over a Redis of the test's own, whose dispatcher rides out 3 s of outage
    pool = fresh_pool(own_redis.url, LUIGI_CELERY_OUTAGE_TOLERANCE="3")
    run = pool.start(*SLOW, "--out", str(tmp_path), "--count", "6", "--seconds", "4", "--workers", "2")
    first_start(tmp_path)
    # When Redis goes away and does not come back
    own_redis.stop()
    began = time.monotonic()
    output, _ = run.communicate(timeout=120)
    # Then the run ends soon after the tolerance, as failed, saying why
    assert run.returncode == 30, output[-3000:]
    assert time.monotonic() - began < 25  # tolerance, then at most 5 s closing in the store that is gone
    assert f"lost the broker at {own_redis.url} for more than 3 s" in output


def test_rabbitmq_closing_every_connection_mid_run_loses_nothing(fresh_pool, tmp_path):
    # Given a run over RabbitMQ, with Redis as the coordination store
    pool = fresh_pool(RABBITMQ_URL, LUIGI_CELERY_REDIS_URL=REDIS_URL)
    run = pool.start(*SLOW, "--out", str(tmp_path), "--count", "6", "--seconds", "2", "--workers", "3")
    first_start(tmp_path)
    # When RabbitMQ closes every client connection (dispatcher's and workers')
    closed = subprocess.run(["rabbitmqctl", "close_all_connections", "test"], capture_output=True, text=True)
    assert closed.returncode == 0, closed.stderr
    output, _ = run.communicate(timeout=240)
    # Then the run completes, every task ran, and none ran twice
    assert run.returncode == 0, output[-3000:]
    assert len(outputs(tmp_path)) == 6
    assert set(starts(tmp_path).values()) == {1}, starts(tmp_path)
