"""Flower against a real pool: every task under its Luigi task id and its Luigi outcome,
basic auth, and the tasks page in a real (headless) browser during a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, RABBITMQ_URL, REDIS_URL, ROOT, clean_env, free_port, http_get, wait_until
from tests.pipelines import Fails, Flaky, ManySlow, MixedOutcomes

pytestmark = pytest.mark.e2e

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
# As root, in a closed network: no sandbox, and nothing that calls out at start.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,900", "--virtual-time-budget=5000",
)  # fmt: skip


@dataclass
class Flower:
    port: int
    process: subprocess.Popen
    log: Path
    auth: str | None

    def url(self, path: str, with_credentials: bool = False) -> str:
        credentials = f"{self.auth}@" if with_credentials and self.auth else ""
        return f"http://{credentials}127.0.0.1:{self.port}{path}"

    def get(self, path: str, auth: str | None = "own") -> tuple[int | None, bytes]:
        """(status, body) of a GET; ``auth`` "own" sends the Flower's credentials, None sends none."""
        return http_get(self.url(path), self.auth if auth == "own" else auth)

    def tasks(self) -> dict[str, set[str]]:
        """Luigi task id (the name Flower shows) -> the states of the Celery tasks of that name."""
        status, body = self.get("/api/tasks")
        assert status == 200, body[:300]
        states: dict[str, set[str]] = {}
        for task in json.loads(body).values():
            states.setdefault(task["name"], set()).add(task["state"])
        return states

    def wait_for(self, expected: dict[str, set[str]], timeout: float = 30) -> dict[str, set[str]]:
        """Flower's view of the tasks ``expected`` names, once it matches (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.tasks()
            mine = {name: seen.get(name, set()) for name in expected}
            if mine == expected or time.monotonic() > deadline:
                return mine
            time.sleep(0.5)


@pytest.fixture
def flower(brokers, tmp_path) -> Iterator:
    started: list[Flower] = []

    def start(broker: str, worker_names: list[str], auth: str | None = None) -> Flower:
        port, log = free_port(), tmp_path / f"flower-{len(started)}.log"
        args = ["--port", str(port), "--address", "127.0.0.1", *(["--basic-auth", auth] if auth else [])]
        process = subprocess.Popen(
            [str(BIN / "luigi-celery"), "flower", "--broker", broker, *args],
            cwd=ROOT, env=clean_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        flower = Flower(port, process, log, auth)
        started.append(flower)

        # Ready when it answers and sees the pool's workers (so it is on the broker, events included)
        def sees_the_workers() -> bool:
            status, body = flower.get("/api/workers?refresh=1")
            return status == 200 and all(any(n in w for w in json.loads(body)) for n in worker_names)

        wait_until("Flower seeing the workers", sees_the_workers, process=process, log=log)
        return flower

    yield start
    for flower in started:
        if flower.process.poll() is None:
            os.killpg(flower.process.pid, signal.SIGTERM)
            flower.process.wait(15)


def test_flower_lists_every_luigi_task_id_with_its_final_state_and_refuses_strangers(fresh_pool, flower, tmp_path):
    # Given a pool, and Flower with basic auth watching it
    pool = fresh_pool(REDIS_URL)
    watching = flower(REDIS_URL, [w.name for w in pool.workers], auth="ops:s3cret")
    # When a run makes three successes, one failure, and one success after two retries
    result = pool.run("--module", "tests.pipelines", "MixedOutcomes", "--out", str(tmp_path), "--workers", "4")
    assert result.returncode == 30, result.stdout[-3000:]
    # Then Flower lists each task under its Luigi task id, in the state Luigi gave it
    expected = {
        task.task_id: {"FAILURE" if isinstance(task, Fails) else "SUCCESS"}
        for task in MixedOutcomes(out=str(tmp_path)).requires()
    }
    assert watching.wait_for(expected) == expected
    # (the failure says why, in Luigi's words; the retried task went through RETRY to SUCCESS)
    _, body = watching.get("/api/tasks?state=FAILURE")
    failed = [t for t in json.loads(body).values() if t["name"] == Fails(out=str(tmp_path)).task_id]
    assert failed and all("boom from Fails" in t["exception"] for t in failed)
    flaky_id = Flaky(out=str(tmp_path)).task_id
    _, body = watching.get("/api/tasks")
    assert any(t["name"] == flaky_id and t["retries"] == 2 for t in json.loads(body).values())
    # and without credentials, or with wrong ones, nothing is shown
    assert watching.get("/api/tasks", auth=None)[0] == 401
    assert watching.get("/api/tasks", auth="ops:guess")[0] == 401
    assert watching.get("/tasks", auth=None)[0] == 401


def test_the_tasks_page_in_a_real_browser_shows_the_luigi_task_ids_during_a_run(fresh_pool, flower, tmp_path):
    assert os.access(CHROMIUM, os.X_OK), "Debian's chromium is missing: run scripts/services (scripts/test does)"
    # Given a pool on RabbitMQ, Flower with basic auth, and a run of three 8-second tasks
    pool = fresh_pool(RABBITMQ_URL)
    watching = flower(RABBITMQ_URL, [w.name for w in pool.workers], auth="ops:s3cret")
    run = pool.start("--module", "tests.pipelines", "ManySlow", "--count", "3", "--seconds", "8",
                     "--out", str(tmp_path), "--workers", "3")  # fmt: skip
    try:
        ids = [task.task_id for task in ManySlow(out=str(tmp_path), count=3, seconds=8.0).requires()]
        running = {task_id: {"STARTED"} for task_id in ids}
        assert watching.wait_for(running) == running
        # When a headless Chromium loads the tasks page while they run
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "flower-tasks-during-a-run.png"
        shot.unlink(missing_ok=True)
        page = watching.url("/tasks", with_credentials=True)
        profile = tmp_path / "chromium-profile"
        browse = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*browse, "--dump-dom", page], capture_output=True, text=True, timeout=60)
        subprocess.run([*browse, f"--screenshot={shot}", page], capture_output=True, timeout=60, check=True)
        # Then the page, as the browser built it, shows every running task by its Luigi task id
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert all(task_id in dom.stdout for task_id in ids), dom.stdout[-3000:]
        assert shot.stat().st_size > 10_000  # a rendered page, kept as a test artifact
    finally:
        output, _ = run.communicate(timeout=120)
    assert run.returncode == 0, output[-3000:]
