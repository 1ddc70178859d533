"""Prometheus metrics: exact counts from the dispatcher, and from a prefork worker whose
pool processes are replaced after every task."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
import urllib.request

import psutil
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from luigi_celery.metrics import DispatcherMetrics
from tests.conftest import BIN, REDIS_URL, ROOT, clean_env, free_port, run_cli, start_worker

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample on ``/metrics`` at ``port``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name`` over every sample whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.mark.e2e
def test_a_prefork_worker_counts_every_attempt_even_as_its_processes_are_replaced(fresh_pool, tmp_path):
    # Given a worker whose two pool processes are each replaced after one task, serving metrics
    port = free_port()
    pool = fresh_pool(REDIS_URL, count=0)
    worker = start_worker(
        REDIS_URL, pool.queue, tmp_path, extra=("--metrics-port", str(port), "--max-tasks-per-child", "1")
    )
    pool.workers.append(worker)
    # When a run makes three successes, one failure, and one success after two retries
    result = pool.run("--module", "tests.pipelines", "MixedOutcomes", "--out", str(tmp_path), "--workers", "4")
    assert result.returncode == 30, result.stdout[-3000:]
    # Then the worker's numbers are exactly those, summed over every process it ever had
    samples = scrape(port)
    assert total(samples, "luigi_celery_runs_total", outcome="DONE") == 4
    assert total(samples, "luigi_celery_runs_total", outcome="FAILED") == 1
    assert total(samples, "luigi_celery_runs_total", outcome="retry") == 2
    assert total(samples, "luigi_celery_retries_total", family="Flaky") == 2
    assert total(samples, "luigi_celery_task_duration_seconds_count") == 7
    # (every delivery was timed in the queue: a retry from the end of its countdown, so not its backoff)
    assert total(samples, "luigi_celery_queue_wait_seconds_count") == 7
    assert 0 <= total(samples, "luigi_celery_queue_wait_seconds_sum") < 7 * 1.0
    assert total(samples, "luigi_celery_runs_total", family="Slow", queue=pool.queue) == 3
    # and the depth of the queue it consumes, empty now
    assert samples[("luigi_celery_queue_depth", (("queue", pool.queue),))] == 0
    # and its pool size, two processes (read again if a replacement was under way)
    deadline = time.monotonic() + 10
    while samples[("luigi_celery_worker_pool_processes", ())] != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        samples = scrape(port)
    assert samples[("luigi_celery_worker_pool_processes", ())] == 2
    # (and the processes were replaced: the tasks ran in more than the two processes a pool starts with)
    assert len(set(re.findall(r"\[pid (\d+)\] Worker", worker.output()))) > 2


def start_slow_run(pool, out, port: int, count: int, seconds: float) -> subprocess.Popen:
    """A run of ``count`` tasks of ``seconds`` serving its metrics on ``port``, in the background."""
    return subprocess.Popen(
        pool.command("--module", "tests.pipelines", "ManySlow", "--count", str(count), "--seconds", str(seconds),
                     "--out", str(out), "--workers", "2", "--metrics-port", str(port)),
        cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.e2e
def test_the_dispatcher_serves_its_metrics_during_a_run(redis_pool, tmp_path):
    port = free_port()
    run = start_slow_run(redis_pool, tmp_path, port, count=2, seconds=3)
    try:
        deadline, samples = time.time() + 30, {}
        while time.time() < deadline:
            try:
                samples = scrape(port)
            except OSError:
                samples = {}
            if total(samples, "luigi_celery_dispatched_total", family="Slow") == 2:
                break
            time.sleep(0.1)
        assert total(samples, "luigi_celery_dispatched_total", family="Slow", queue=redis_pool.queue) == 2
        assert total(samples, "luigi_celery_in_flight") == 2
        assert ("luigi_celery_queue_depth", (("queue", redis_pool.queue),)) in samples
    finally:
        # Go on scraping, as Prometheus does: a dispatcher scraped once waits for a scrape after
        # the run (up to 60 s when it saw only one and cannot tell the interval).
        deadline = time.time() + 60
        while run.poll() is None and time.time() < deadline:
            with contextlib.suppress(OSError):
                scrape(port)
            time.sleep(0.5)
        output, _ = run.communicate(timeout=30)
    assert run.returncode == 0, output[-3000:]


@pytest.mark.e2e
def test_a_metrics_port_in_use_is_one_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("run", "--metrics-port", str(port), "--module", "tests.pipelines", "Succeeds",
                         "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 2
    assert f"luigi-celery run: error: cannot serve metrics on port {port}" in result.stdout


@pytest.mark.e2e
def test_an_embedded_run_serves_the_dispatchers_metrics_and_its_pool_leaves_the_port_alone(tmp_path):
    # Given the metrics port in the environment, which the embedded worker child inherits
    env = clean_env(LUIGI_CELERY_METRICS_PORT=str(free_port()))
    result = run_cli("run", "--module", "tests.pipelines", "Succeeds", "--out", str(tmp_path), env=env)
    # Then the run works: only the dispatcher took the port
    assert result.returncode == 0, result.stdout[-3000:]


def test_at_the_end_the_dispatcher_waits_for_one_more_scrape_only_when_it_is_scraped():
    metrics = DispatcherMetrics()
    # Nobody scrapes it: a run ends at once
    began = time.monotonic()
    assert metrics.final_scrape(limit=5) is False
    assert time.monotonic() - began < 0.1
    # Scraped every 0.3 s: it waits for the next scrape after the end
    generate_latest(metrics.registry)
    time.sleep(0.3)
    generate_latest(metrics.registry)
    threading.Timer(0.5, generate_latest, [metrics.registry]).start()
    began = time.monotonic()
    assert metrics.final_scrape(limit=5) is True
    assert 0.5 <= time.monotonic() - began < 1.5
    # and when that scrape does not come, it gives up after about two intervals, not the limit
    began = time.monotonic()
    assert metrics.final_scrape(limit=5) is False
    assert time.monotonic() - began < 3


def test_a_scrape_seen_once_or_long_ago_is_not_a_scraper_and_0_waits_for_none(caplog):
    metrics = DispatcherMetrics()
    # Given one scrape (a curl by hand)
    generate_latest(metrics.registry)
    # Then the end of the run waits for nothing, and says nothing about waiting
    began = time.monotonic()
    with caplog.at_level("INFO", logger="luigi_celery"):
        assert metrics.final_scrape(limit=60) is False
    assert time.monotonic() - began < 0.1
    assert "waiting" not in caplog.text
    # Given two scrapes 0.1 s apart, and then none for 1.5 s (over two intervals and a second)
    generate_latest(metrics.registry)
    time.sleep(1.5)
    # Then the scraper is gone: no wait
    began = time.monotonic()
    assert metrics.final_scrape(limit=60) is False
    assert time.monotonic() - began < 0.1
    # Given a scraper at work, and a final wait of 0
    generate_latest(metrics.registry)
    generate_latest(metrics.registry)
    began = time.monotonic()
    # Then no wait either
    assert metrics.final_scrape(limit=0) is False
    assert time.monotonic() - began < 0.1


@pytest.mark.e2e
def test_a_dispatcher_scraped_once_by_hand_ends_with_its_run(redis_pool, tmp_path):
    # Given a run serving its metrics, scraped once while it runs (a curl, not Prometheus)
    port = free_port()
    run = start_slow_run(redis_pool, tmp_path, port, count=1, seconds=2)
    deadline, samples = time.time() + 30, Samples()
    while not total(samples, "luigi_celery_dispatched_total") and time.time() < deadline:
        time.sleep(0.1)
        with contextlib.suppress(OSError):
            samples = scrape(port)
    assert total(samples, "luigi_celery_dispatched_total") == 1
    # When the run ends / Then the dispatcher exits with it: it does not wait for another scrape
    output, _ = run.communicate(timeout=20)
    assert run.returncode == 0, output[-3000:]
    assert "waiting up to" not in output


@pytest.mark.e2e
def test_the_final_wait_is_a_flag_and_a_setting():
    bad = run_cli("run", "--metrics-final-wait", "-1", "--module", "examples.sales", "Report")
    assert bad.returncode == 2
    assert "argument --metrics-final-wait: must be a number, 0 or more, got '-1'" in bad.stdout
    from luigi_celery.settings import load_settings

    assert load_settings(env={"LUIGI_CELERY_METRICS_FINAL_WAIT": "0"}, use_luigi_config=False).metrics_final_wait == 0
    assert load_settings(env={}, use_luigi_config=False).metrics_final_wait == 60


def listening_addresses(port: int) -> set[str]:
    """The local addresses something listens on at ``port`` (psutil reads them for any process)."""
    return {c.laddr.ip for c in psutil.net_connections(kind="tcp") if c.status == "LISTEN" and c.laddr.port == port}


def another_address() -> str | None:
    """An IPv4 address of this machine that is not a loopback one, if it has one."""
    found = {a.address for nics in psutil.net_if_addrs().values() for a in nics if a.family == socket.AF_INET}
    return next((address for address in sorted(found) if not address.startswith("127.")), None)


def answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
        return True
    return False


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("extra", "bound"), [((), "127.0.0.1"), (("--metrics-address", "0.0.0.0"), "0.0.0.0")], ids=["default", "0.0.0.0"]
)
def test_a_workers_metrics_are_served_to_this_machine_only_unless_an_address_is_given(
    fresh_pool, tmp_path, extra, bound
):
    # Given a worker serving metrics, with the default address or --metrics-address 0.0.0.0
    port = free_port()
    pool = fresh_pool(REDIS_URL, count=0)
    pool.workers.append(start_worker(REDIS_URL, pool.queue, tmp_path, extra=("--metrics-port", str(port), *extra)))

    # Then it listens on that address alone, answers on 127.0.0.1, and on the machine's other
    # address only when told to
    assert listening_addresses(port) == {bound}
    assert answers("127.0.0.1", port)
    other = another_address()
    if other is not None:
        assert answers(other, port) is (bound == "0.0.0.0")


@pytest.mark.e2e
def test_a_dispatchers_metrics_address_comes_from_the_environment_too(tmp_path):
    # Given an embedded run serving its metrics, with LUIGI_CELERY_METRICS_ADDRESS and without
    for env, bound in (({}, "127.0.0.1"), ({"LUIGI_CELERY_METRICS_ADDRESS": "0.0.0.0"}, "0.0.0.0")):
        port = free_port()
        run = subprocess.Popen(
            [str(BIN / "luigi-celery"), "run", "--module", "tests.pipelines", "ManySlow", "--count", "1",
             "--seconds", "3", "--out", str(tmp_path / bound), "--metrics-port", str(port)],
            cwd=ROOT, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            # When it runs
            deadline = time.monotonic() + 30
            while not listening_addresses(port) and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            # Then its metrics port listens on that address
            assert listening_addresses(port) == {bound}
        finally:
            output, _ = run.communicate(timeout=60)
        assert run.returncode == 0, output[-3000:]


@pytest.mark.e2e
def test_the_metrics_address_is_a_flag_and_a_setting_and_must_be_an_ip_address():
    bad = run_cli("worker", "--metrics-address", "everywhere", "--include", "examples")
    assert bad.returncode == 2
    assert "argument --metrics-address: must be an IP address such as 127.0.0.1 or 0.0.0.0, got 'everywhere'" in (
        bad.stdout
    )
    from luigi_celery.settings import load_settings

    assert load_settings(env={}, use_luigi_config=False).metrics_address == "127.0.0.1"
    assert load_settings(env={"LUIGI_CELERY_METRICS_ADDRESS": "::"}, use_luigi_config=False).metrics_address == "::"
