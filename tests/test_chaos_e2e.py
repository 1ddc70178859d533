"""Chaos: a 200-task run while workers are killed outright and replaced, every few seconds.

A run cut off by a kill never reaches SUCCESS, so "nothing lost, nothing run
twice except what was cut off" reads: every task has its output and exactly
one SUCCESS; any other START of it was a run a kill cut off.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, start_worker
from tests.test_faults_e2e import events

pytestmark = pytest.mark.e2e

TASKS = 200
KILL_EVERY = 3.0
CHAOS_FOR = 45.0  # seconds; the run itself is bounded by its own timeout below
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def test_a_run_survives_workers_killed_and_replaced_every_few_seconds(fresh_pool, tmp_path):
    # Given three workers, short run locks (recovery within seconds) and a 200-task run
    pool = fresh_pool(REDIS_URL, count=3, LUIGI_CELERY_LOCK_TTL="6")
    out = tmp_path / "out"
    run = pool.start("--module", "tests.pipelines", "ManySlow", "--count", str(TASKS), "--seconds", "0.5",
                     "--out", str(out), "--workers", "12", "--queue-timeout", "15")  # fmt: skip
    rng = random.Random(20261121)
    kills: list[str] = []
    stop = threading.Event()

    def chaos() -> None:
        # When, every few seconds, a random worker is killed (main process and pool) and replaced
        deadline = time.time() + CHAOS_FOR
        while not stop.wait(KILL_EVERY) and time.time() < deadline and run.poll() is None:
            victim = rng.choice(pool.workers)
            os.killpg(victim.process.pid, signal.SIGKILL)
            victim.process.wait()
            kills.append(victim.name)
            fresh = start_worker(pool.broker, pool.queue, tmp_path, env=pool.env)
            pool.workers[pool.workers.index(victim)] = fresh

    killer = threading.Thread(target=chaos)
    killer.start()
    try:
        output, _ = run.communicate(timeout=420)
    finally:
        stop.set()
        killer.join()

    # Then the run completes with every output
    assert run.returncode == 0, output[-3000:]
    assert len(list(out.glob("Slow_*.txt"))) == TASKS
    # and every task succeeded exactly once; the only repeats are runs a kill cut off
    seen = events(out)
    successes = collections.Counter(task for event, task, _ in seen if event == "SUCCESS")
    starts = collections.Counter(task for event, task, _ in seen if event == "START")
    slow = {task for task in starts if task.startswith("Slow_")}
    assert len(slow) == TASKS and all(successes[t] == 1 for t in slow), successes.most_common(3)
    cut_off = sum(starts[t] - 1 for t in slow)
    assert len(kills) >= 5 and cut_off >= 1  # the chaos really cut runs off

    ARTIFACTS.mkdir(exist_ok=True)
    lost = TASKS - len(list(out.glob("Slow_*.txt")))
    twice = sum(1 for t in slow if successes[t] > 1)
    figures = f"tasks={TASKS} kills={len(kills)} cut_off_reruns={cut_off} lost={lost} succeeded_twice={twice}\n"
    (ARTIFACTS / "chaos.txt").write_text(figures)
    print(figures)
