"""Prometheus metrics, named ``luigi_celery_*``, for the dispatcher and for workers.

Labels are the task family, the queue and a status or outcome, never task
parameters (their number has no bound).

The dispatcher counts what it sends and what comes back, and serves its own
registry.  A worker counts where tasks run: in the pool processes, so under
Celery's prefork pool the numbers live in prometheus_client's multiprocess
files (``PROMETHEUS_MULTIPROC_DIR``), one per process, and the worker's main
process serves their sum.  A replaced child's file stays, so nothing it
counted is lost, and nothing is counted twice.  prometheus_client chooses
that mode when it is first imported, so :func:`prepare_worker_metrics` must
run before anything imports it (the CLI calls it first thing).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from luigi_celery.hooks import DispatchHook, Hold, Run, RunHook

if TYPE_CHECKING:
    from luigi_celery.monitor import Tracked

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds: from no-op tasks to hour-long ones.
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


def prepare_worker_metrics() -> str:
    """Give this worker (and its pool processes) a folder for multiprocess metrics.

    A folder of our own goes when the worker exits (pool processes leave with
    ``os._exit``, so only the main process removes it)."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        folder = tempfile.mkdtemp(prefix="luigi-celery-metrics-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ[MULTIPROC_ENV] = folder
    return folder


@contextmanager
def hook(what: str) -> Iterator[None]:
    """A metric that fails to record is logged; it never breaks a task or a run."""
    try:
        yield
    except Exception:
        logger.exception("could not record %s", what)


# After the last scrape has collected everything, its response still has to be written.
RESPONSE_WRITE_TIME = 0.2


class _Scrapes:
    """Notes when each scrape of a registry started, once it has collected every metric."""

    def __init__(self) -> None:
        self.started: list[float] = []  # the last two
        self.seen = threading.Condition()

    def done(self, started: float) -> None:
        with self.seen:
            self.started = [*self.started[-1:], started]
            self.seen.notify_all()

    def wait_for_one_after(self, moment: float, timeout: float) -> bool:
        with self.seen:
            return self.seen.wait_for(lambda: bool(self.started) and self.started[-1] > moment, timeout)


class DispatcherMetrics(DispatchHook):
    """What ``luigi-celery run`` sends and hears back: counted at the dispatcher's hook moments."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        scrapes = self._scrapes = _Scrapes()

        class Registry(CollectorRegistry):
            def collect(self) -> Iterator[Any]:
                started = time.monotonic()
                yield from super().collect()
                scrapes.done(started)

        self.registry = Registry()
        self.dispatched = Counter(
            "luigi_celery_dispatched", "Task messages published (each attempt)", ["family", "queue"],
            registry=self.registry,
        )  # fmt: skip
        self.completed = Counter(
            "luigi_celery_completed", "Results the dispatcher received, by Luigi status (DONE, FAILED, PENDING)",
            ["family", "queue", "status"], registry=self.registry,
        )  # fmt: skip
        self.in_flight = Gauge("luigi_celery_in_flight", "Tasks sent and not yet answered", registry=self.registry)

    def published(self, tracked: Tracked) -> None:
        self.dispatched.labels(**labels(tracked.msg.family, tracked.queue)).inc()

    def answered(self, family: str, queue: str, status: str) -> None:
        self.completed.labels(**labels(family, queue), status=status).inc()

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        self.in_flight.set_function(count)

    def watch_queues(self, collector: Any) -> None:
        """Add ``luigi_celery_queue_depth`` (a :class:`luigi_celery.queues.QueueDepthCollector`)."""
        self.registry.register(collector)

    def serve(self, port: int, address: str) -> None:
        """Serve ``/metrics`` on ``address``:``port`` (127.0.0.1: to this machine only), from a thread."""
        from prometheus_client import start_http_server

        start_http_server(port, addr=address, registry=self.registry)

    def final_scrape(self, limit: float) -> bool:
        """Wait for one more scrape, so the run's final numbers reach Prometheus; True if it came.

        Only a scraper is waited for: something that scraped at least twice, and
        recently for its interval (a ``curl`` now and then is not one). The wait is
        then about one scrape interval (two, at most ``limit``); otherwise, and with
        ``limit`` 0, the run ends at once.
        """
        times = list(self._scrapes.started)
        if limit <= 0 or len(times) < 2:
            return False
        interval = times[-1] - times[-2]
        timeout = min(limit, 2 * interval + 1)
        if time.monotonic() - times[-1] > timeout:
            return False  # it stopped scraping: the next scrape is not coming
        logger.info("waiting up to %.0f s for Prometheus to scrape the run's final metrics", timeout)
        if not self._scrapes.wait_for_one_after(time.monotonic(), timeout):
            return False
        time.sleep(RESPONSE_WRITE_TIME)
        return True


class WorkerMetrics(RunHook):
    """What the tasks of a worker did: counted at the worker's hook moments, in its pool processes."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        # Values go to the multiprocess files; this registry is never served.
        registry = CollectorRegistry()
        labels = ["family", "queue"]
        self.runs = Counter(
            "luigi_celery_runs", "Attempts finished on workers, by outcome (DONE, FAILED, PENDING, retry, duplicate)",
            [*labels, "outcome"], registry=registry,
        )  # fmt: skip
        self.retries = Counter(
            "luigi_celery_retries", "Retries scheduled after a retryable error", labels, registry=registry
        )
        self.duration = Histogram(
            "luigi_celery_task_duration_seconds", "Time an attempt took on its worker", labels,
            buckets=DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "luigi_celery_queue_wait_seconds",
            "Time from publishing (or the end of a countdown) to a worker taking the task",
            labels, buckets=DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.rate_limit_wait = Histogram(
            "luigi_celery_rate_limit_wait_seconds",
            "Countdowns tasks were sent back with, to wait for their rate-limit slot",
            labels, buckets=DURATION_BUCKETS, registry=registry,
        )  # fmt: skip

    def received(self, run: Run) -> None:
        # (the dispatcher's wall clock: one ahead of ours reads as 0)
        if run.msg.sent_at is not None:
            self.queue_wait.labels(**labels(run.msg.family, run.queue)).observe(max(0.0, time.time() - run.msg.sent_at))

    def held(self, run: Run, hold: Hold) -> None:
        if hold.why == "rate":
            self.rate_limit_wait.labels(**labels(run.msg.family, run.queue)).observe(hold.seconds)

    def finished(self, run: Run, outcome: str, began: float | None) -> None:
        family = labels(run.msg.family, run.queue)
        self.runs.labels(**family, outcome=outcome).inc()
        if outcome == "retry":
            self.retries.labels(**family).inc()
        if began is not None:
            self.duration.labels(**family).observe(time.monotonic() - began)

    @staticmethod
    def serve(port: int, address: str, *collectors: Any) -> None:
        """Serve, on ``address``:``port``, the sum over every process of this worker, and ``collectors``
        read in the main process at each scrape (the queue depth, the pool size); call in the main process."""
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        for collector in collectors:
            registry.register(collector)
        start_http_server(port, addr=address, registry=registry)


class PoolProcessesCollector:
    """``luigi_celery_worker_pool_processes``: how many pool processes this worker has now.

    It moves with ``--autoscale``; ``count()`` of it is the number of workers
    online, ``sum()`` the slots they offer.  The worker is found through
    Celery's ``worker_init`` signal, and its pool is read at each scrape.
    """

    def __init__(self) -> None:
        from celery import signals

        self._worker: Any = None
        signals.worker_init.connect(self._found, weak=False)

    def _found(self, sender: Any = None, **_: Any) -> None:
        self._worker = sender

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        gauge = GaugeMetricFamily(
            "luigi_celery_worker_pool_processes", "Pool processes this worker has now (moves with --autoscale)"
        )
        pool = getattr(self._worker, "pool", None)
        if pool is not None:  # (not before the pool starts)
            info = pool.info
            gauge.add_metric([], len(info["processes"]) if "processes" in info else info.get("max-concurrency", 0))
        yield gauge


def labels(family: str, queue: str | None) -> dict[str, Any]:
    return {"family": family, "queue": queue or ""}
