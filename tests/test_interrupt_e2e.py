"""A run interrupted with Ctrl-C stays interrupted: what it left on a queue never runs.

Celery's revoke is a broadcast to the workers online at that moment, kept in their memory;
a worker started later must learn it from the run's own record (the coordination store, or
on RabbitMQ alone the dispatcher's deleted reply queue).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis
from kombu import Connection

from tests.conftest import BIN, RABBITMQ_URL, REDIS_URL, ROOT, clean_env, start_worker, wait_until
from tests.test_faults_e2e import events, first_start, outputs, starts

pytestmark = pytest.mark.e2e

SETUPS = {
    "redis": (REDIS_URL, {}),
    "rabbitmq": (RABBITMQ_URL, {}),
    "rabbitmq-with-store": (RABBITMQ_URL, {"LUIGI_CELERY_REDIS_URL": REDIS_URL}),
}


def waiting(broker: str, queue: str) -> int:
    """How many messages wait in ``queue`` (Redis: every priority list of it)."""
    if broker.startswith("redis"):
        client = redis.Redis.from_url(broker)
        return sum(int(client.llen(key)) for key in client.keys(queue + "*"))
    with Connection(broker) as conn:
        try:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except Exception:
            return 0


@pytest.mark.parametrize("setup", list(SETUPS))
def test_what_an_interrupted_run_left_queued_is_dropped_by_a_worker_started_later(brokers, tmp_path, setup):
    broker, env = SETUPS[setup]
    queue = f"lc-test-{uuid.uuid4().hex[:10]}"
    # Given a run of two tasks on a queue no worker serves yet
    run = subprocess.Popen(
        [str(BIN / "luigi-celery"), "run", "--broker", broker, "--queue", queue, "--module", "tests.pipelines",
         "ManySlow", "--count", "2", "--seconds", "0.1", "--out", str(tmp_path), "--workers", "2"],
        cwd=ROOT, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_until("both tasks on the queue", lambda: waiting(broker, queue) == 2, timeout=60, process=run)
    # When it is interrupted: its two messages are still on the queue (no worker heard the revoke)
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=30)
    assert run.returncode == 130, output[-3000:]
    assert "revoked 2 task(s) in flight" in output
    assert waiting(broker, queue) == 2
    # and a worker starts afterwards
    worker = start_worker(broker, queue, tmp_path, concurrency=2, env=env)
    try:
        wait_until("the worker took both messages", lambda: waiting(broker, queue) == 0, timeout=30)
        wait_until("both dropped", lambda: worker.output().count("dropped ") >= 2, timeout=30, log=worker.log)
        time.sleep(1)
        # Then it drops them unrun, and says so
        assert starts(tmp_path) == {} and outputs(tmp_path) == []
        assert worker.output().count("the dispatcher that sent it has ended its run") == 2
        # and the same pipeline run again runs in full
        again = subprocess.run(
            [str(BIN / "luigi-celery"), "run", "--broker", broker, "--queue", queue, "--module", "tests.pipelines",
             "ManySlow", "--count", "2", "--seconds", "0.1", "--out", str(tmp_path), "--workers", "2"],
            cwd=ROOT, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
        )  # fmt: skip
        assert again.returncode == 0, again.stdout[-3000:]
        assert len(outputs(tmp_path)) == 2
    finally:
        worker.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_interrupted_embedded_run_leaves_nothing_that_could_run_later(tmp_path: Path):
    # Given an embedded run (no broker) of three long tasks on two worker processes
    run = subprocess.Popen(
        [str(BIN / "luigi-celery"), "run", "--module", "tests.pipelines", "ManySlow", "--count", "3",
         "--seconds", "30", "--out", str(tmp_path), "--workers", "2"],
        cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    first_start(tmp_path)
    time.sleep(1)
    # When it is interrupted
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=30)
    assert run.returncode == 130, output[-3000:]
    # Then its worker processes are gone, its broker folder with them, and nothing it sent ever finishes
    pids = {pid for event, _, pid in events(tmp_path) if event == "START"}
    wait_until("the pool gone", lambda: not any(_alive(pid) for pid in pids), timeout=10)
    folder = output.split("filesystem broker in ", 1)[1].split(")", 1)[0]
    assert not Path(folder).exists()
    time.sleep(2)
    assert sum(starts(tmp_path).values()) <= 2 and outputs(tmp_path) == []
