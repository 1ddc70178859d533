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

from tests.conftest import REDIS_URL
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


# Luigi's tests of luigid's HTTP API and of its RPC client, through luigi-celery scheduler's app.
SERVER_SUITES = ["rpc_test.py", "server_test.py", "scheduler_message_test.py", "remote_scheduler_test.py"]
FAILING_WITHOUT_US_ON_THE_SERVER = [
    "_ServerTest",  # an abstract base pytest collects (Luigi ran these under nose)
    "UNIXServerTest",  # needs requests-unixsocket
    "test_404",  # Luigi's client retries a 404 for 60 s: past the time limit, with luigid too
]


def test_luigis_own_server_and_rpc_tests_pass_against_our_scheduler_with_a_replayed_log(tmp_path: Path) -> None:
    """Each app Luigi's tests build logs every call to a Redis journal; after each test a
    standby replays the log and must end in the leader's state (tests/luigi_suite/our_server.py)."""
    tests = luigi_tests()
    replays = tmp_path / "replays"
    config = tests.parent / "pytest.ini"
    config.write_text("[pytest]\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-c", str(config), "-p", "no:cacheprovider",
         "-p", "tests.luigi_suite.fast_scheduler", "-p", "tests.luigi_suite.our_server",
         "-W", "ignore", "--timeout", "120", "-k", " and ".join(f"not {n}" for n in FAILING_WITHOUT_US_ON_THE_SERVER),
         *(f"test/{suite}" for suite in SERVER_SUITES)],
        cwd=tests.parent, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "LUIGI_CELERY_SERVER_STATE_URL": REDIS_URL,
             "LUIGI_CELERY_SERVER_REPLAYS": str(replays)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:]
    assert int(replays.read_text()) > 200  # Luigi's API tests, each with a standby compared
