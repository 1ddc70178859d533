"""Luigi's own scheduler, worker, task and parameter tests, run against FastScheduler, with
``Task.get_params`` remembered (params.py) and with the dispatcher's worker loop
(``dispatch.BatchedLoop``) in place of Luigi's, as in a dispatcher.

Luigi's wheel does not ship its tests: ``scripts/setup test`` fetches the sdist of the
installed Luigi once (into ``.cache/``, which git ignores; ``tests/luigi_suite/fetch.py``),
and this runs the files that exercise the scheduler, with ``luigi.scheduler.Scheduler``
replaced by FastScheduler.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.luigi_suite.fetch import fetched
from tests.luigi_suite.fetch import tests_folder as luigi_tests_folder  # (not collected as a test)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
SUITES = [
    "scheduler_api_test.py",
    "scheduler_test.py",
    "worker_scheduler_com_test.py",
    "worker_test.py",
    "worker_keep_alive_test.py",
    "priority_test.py",
    "execution_summary_test.py",
    "task_running_resources_test.py",
    # what a task's parameters are, and everything built on them
    "task_test.py",
    "parameter_test.py",
    "instance_test.py",
    "task_register_test.py",
    "clone_test.py",
]
# These fail on Luigi's own scheduler here too.
FAILING_WITHOUT_US = [
    # must finish within 4 s: Luigi skips it on GitHub Actions, and it fails here under load
    "task_running_resources_test.py::ConcurrentRunningResourcesTest::test_tasks_parallel",
    "scheduler_test.py::SchedulerIoTest::test_datadog_metrics_collector",  # needs the datadog package
    "scheduler_test.py::SchedulerIoTest::test_has_task_history",  # Luigi's history and SQLAlchemy 2
    # imports a module by a path that only Luigi's own tox layout provides
    "worker_test.py::DynamicDependenciesWithMultipleWorkersTest::test_dynamic_dependencies_other_module",
]


def luigi_tests() -> Path:
    """Luigi's test directory for the installed version, fetched by ``scripts/setup test``."""
    tests = luigi_tests_folder()
    assert fetched(), f"Luigi's own tests are not in {tests}: run scripts/setup test (scripts/test does)"
    return tests


def test_luigis_own_scheduler_tests_pass_against_fast_scheduler(tmp_path: Path) -> None:
    tests = luigi_tests()
    calls, batched = tmp_path / "fast-calls", tmp_path / "batched-tasks"
    config = tests.parent / "pytest.ini"  # not ours: Luigi's tests use markers ours would refuse
    config.write_text("[pytest]\n")
    deselect = [arg for test in FAILING_WITHOUT_US for arg in ("--deselect", f"test/{test}")]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-c", str(config), "-p", "no:cacheprovider",
         "-p", "tests.luigi_suite.fast_scheduler", "-p", "tests.luigi_suite.param_cache",
         "-p", "tests.luigi_suite.batched_loop",
         "-W", "ignore", "--timeout", "120", *deselect, *(f"test/{suite}" for suite in SUITES)],
        cwd=tests.parent, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT), "LUIGI_CELERY_FAST_CALLS": str(calls),
             "LUIGI_CELERY_BATCHED_TASKS": str(batched)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:]
    # The fast path answered a good part of it, not only Luigi's own method
    assert int(calls.read_text()) > 1000
    # and the dispatcher's loop handed out tasks in batches, not only one by one
    assert int(batched.read_text()) > 0
