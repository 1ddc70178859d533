"""A real Prometheus server scrapes a dispatcher and a prefork worker during a run; PromQL
afterwards gives exactly the run's numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, free_port, http_get, start_worker, wait_until

pytestmark = pytest.mark.e2e

SCRAPE_INTERVAL = "1s"


class Prometheus:
    def __init__(self, port: int) -> None:
        self.port = port

    def query(self, promql: str) -> float | None:
        """The value of an instant query that gives one number (None when it gives nothing)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        result = answer["data"]["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(tmp_path) -> Iterator:
    """Starts Debian's prometheus on loopback, scraping the given dispatcher and worker ports."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is missing: run scripts/services (scripts/test does)")
    started: list[subprocess.Popen] = []

    def start(dispatcher_port: int, worker_port: int) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        jobs = {"luigi_celery_dispatcher": dispatcher_port, "luigi_celery_worker": worker_port}
        config.write_text(
            json.dumps(  # (JSON is YAML)
                {
                    "global": {"scrape_interval": SCRAPE_INTERVAL},
                    "scrape_configs": [
                        {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                        for job, port in jobs.items()
                    ],
                }
            )
        )
        port, log = free_port(), tmp_path / "prometheus.log"
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log.open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        started.append(process)
        ready = lambda: http_get(f"http://127.0.0.1:{port}/-/ready", timeout=2)[0] == 200  # noqa: E731
        wait_until("prometheus", ready, timeout=30, process=process, log=log)
        return Prometheus(port)

    yield start
    for process in started:
        process.terminate()
        process.wait(30)


def _wait_until_up(prom: Prometheus, job: str) -> None:
    wait_until(f"Prometheus scraping {job}", lambda: prom.query(f'max(up{{job="{job}"}})') == 1, timeout=30)


def test_promql_after_a_run_gives_exactly_what_the_dispatcher_sent_and_the_worker_ran(
    fresh_pool, prometheus, tmp_path: Path
):
    # Given a prefork worker and a dispatcher to be, each on its metrics port, and Prometheus scraping both
    dispatcher_port, worker_port = free_port(), free_port()
    pool = fresh_pool(REDIS_URL, count=0)
    pool.workers.append(start_worker(REDIS_URL, pool.queue, tmp_path, extra=("--metrics-port", str(worker_port))))
    prom = prometheus(dispatcher_port, worker_port)
    _wait_until_up(prom, "luigi_celery_worker")
    # When a run of a few seconds makes four successes, one failure, and one success after two retries
    result = pool.run("--module", "tests.pipelines", "MixedOutcomesForAWhile", "--out", str(tmp_path),
                      "--workers", "4", "--metrics-port", str(dispatcher_port))  # fmt: skip
    assert result.returncode == 30, result.stdout[-3000:]
    time.sleep(2.5)  # two more scrapes of the worker

    # Then PromQL gives exactly those numbers. The dispatcher is gone, so its series are stale:
    # read the last value it reported (its final scrape came after the run ended).
    def dispatcher(expr: str) -> float | None:
        return prom.query(f"sum(last_over_time({expr}[5m]))")

    assert dispatcher('luigi_celery_dispatched_total{job="luigi_celery_dispatcher"}') == 6
    assert dispatcher('luigi_celery_completed_total{job="luigi_celery_dispatcher",status="DONE"}') == 5
    assert dispatcher('luigi_celery_completed_total{job="luigi_celery_dispatcher",status="FAILED"}') == 1
    assert dispatcher('luigi_celery_in_flight{job="luigi_celery_dispatcher"}') == 0
    worker = 'luigi_celery_runs_total{job="luigi_celery_worker",outcome="%s"}'
    assert prom.query(f"sum({worker % 'DONE'})") == 5
    assert prom.query(f"sum({worker % 'FAILED'})") == 1
    assert prom.query(f"sum({worker % 'retry'})") == 2
    assert prom.query('sum(luigi_celery_task_duration_seconds_count{job="luigi_celery_worker"})') == 8
    assert prom.query('count(luigi_celery_worker_pool_processes{job="luigi_celery_worker"})') == 1
