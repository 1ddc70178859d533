"""Luigi's behaviours, through real workers: each as under `luigi --workers N`.

The strongest check is a comparison: the same task run by stock Luigi and by
luigi-celery must end with the same exit code and the same execution summary.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import BIN, REDIS_URL, ROOT, clean_env, run_cli

pytestmark = pytest.mark.e2e

# Stock Luigi exits 0 on a failed task; give it luigi-celery's codes so they compare.
STOCK_RETCODES = ("--retcode-task-failed", "30", "--retcode-missing-data", "20", "--retcode-not-run", "25")
SUMMARY = re.compile(r"===== Luigi Execution Summary =====\n(.*?)\n===== Luigi Execution Summary =====", re.S)


def summary(output: str, out: Path) -> str:
    """The execution summary, with the run's output folder (it shows in task names) made neutral."""
    found = SUMMARY.search(output)
    assert found, output[-3000:]
    return found.group(1).strip().replace(str(out), "OUT")


def stock_luigi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "luigi"), *args, "--local-scheduler", "--workers", "2", *STOCK_RETCODES],
        cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )  # fmt: skip


def events(out: Path) -> list[tuple[str, str, int]]:
    lines = (out / "events.log").read_text().split()
    return [(lines[i], lines[i + 1], int(lines[i + 2])) for i in range(0, len(lines), 3)]


def worker_pids(pool) -> set[int]:
    return {int(pid) for pid in re.findall(r"\[pid (\d+)\] Worker", pool.logs())}


@pytest.mark.parametrize(
    "task, expected_code",
    [("Succeeds", 0), ("Fails", 30), ("CustomFailure", 30), ("DynamicParent", 0), ("NeedsMissingGate", 20)],
)
def test_same_exit_code_and_summary_as_stock_luigi(redis_pool, tmp_path, task, expected_code):
    # Given the same task, run once by stock Luigi and once by luigi-celery
    stock = stock_luigi("--module", "tests.pipelines", task, "--out", str(tmp_path / "stock"))
    ours = redis_pool.run("--module", "tests.pipelines", task, "--out", str(tmp_path / "ours"), "--workers", "2")
    # Then both end the same way
    assert (stock.returncode, ours.returncode) == (expected_code, expected_code), ours.stdout[-3000:]
    assert summary(ours.stdout, tmp_path / "ours") == summary(stock.stdout, tmp_path / "stock")


def test_dependency_missing_at_run_time_is_rescheduled_like_stock_luigi(redis_pool, tmp_path):
    # Given a gate file that exists when the DAG is resolved but is deleted before NeedsGate runs
    for side in ("stock", "ours"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "gate").write_text("open")
    stock = stock_luigi("--module", "tests.pipelines", "NeedsGate", "--out", str(tmp_path / "stock"))
    ours = redis_pool.run("--module", "tests.pipelines", "NeedsGate", "--out", str(tmp_path / "ours"), "--workers", "2")
    # Then the worker reports the missing dependency, Luigi re-adds the task and finds the gate missing
    assert "Unfulfilled dependency at run time" in redis_pool.logs()
    assert ours.returncode == stock.returncode != 0
    assert summary(ours.stdout, tmp_path / "ours") == summary(stock.stdout, tmp_path / "stock")


def test_a_failure_prints_the_remote_traceback(pool, tmp_path):
    result = pool.run("--module", "tests.pipelines", "Fails", "--out", str(tmp_path))
    assert result.returncode == 30
    printed = result.stdout.split("task(s) failed:", 1)[1]
    assert "Traceback" in printed and "ValueError: boom from Fails" in printed


def test_custom_on_failure_explanation_is_what_the_cli_prints(redis_pool, tmp_path):
    result = redis_pool.run("--module", "tests.pipelines", "CustomFailure", "--out", str(tmp_path))
    assert result.returncode == 30
    assert "custom failure explanation: KeyError('lost key')" in result.stdout


def test_events_and_on_success_run_in_the_worker_process(redis_pool, tmp_path):
    result = redis_pool.run("--module", "tests.pipelines", "Succeeds", "--out", str(tmp_path))
    assert result.returncode == 0
    assert (tmp_path / "on_success.txt").exists()
    seen = events(tmp_path)
    assert [e[0] for e in seen] == ["START", "SUCCESS"]
    assert {pid for _, _, pid in seen} <= worker_pids(redis_pool)


def test_dynamic_dependencies_run_then_the_parent_runs_again(pool, tmp_path):
    result = pool.run("--module", "tests.pipelines", "DynamicParent", "--out", str(tmp_path), "--workers", "3")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "4 ran successfully" in result.stdout
    parent = next(tmp_path.glob("DynamicParent_*.txt"))
    assert parent.read_text() == "child 0 + child 1 + child 2"
    starts = [task for event, task, _ in events(tmp_path) if event == "START"]
    assert sum(task.startswith("DynamicParent") for task in starts) == 2  # PENDING with new deps, then DONE


def test_worker_timeout_fails_the_task_as_timed_out(redis_pool, tmp_path):
    started = time.monotonic()
    result = redis_pool.run("--module", "tests.pipelines", "Sleeps", "--out", str(tmp_path))
    assert time.monotonic() - started < 30
    assert result.returncode == 30
    assert "timed out after 2 seconds and was terminated" in result.stdout
    # Like stock Luigi: TIMEOUT fires in the dispatcher, FAILURE nowhere
    seen = events(tmp_path)
    timeouts = [pid for event, _, pid in seen if event == "TIMEOUT"]
    assert len(timeouts) == 1 and timeouts[0] not in worker_pids(redis_pool)
    assert "FAILURE" not in [e[0] for e in seen]


def test_a_task_that_ignores_the_soft_limit_is_killed_at_the_hard_limit(redis_pool, tmp_path):
    started = time.monotonic()
    result = redis_pool.run("--module", "tests.pipelines", "IgnoresSoftLimit", "--out", str(tmp_path))
    assert time.monotonic() - started < 45
    assert result.returncode == 30
    assert "timed out after 1 seconds and was terminated" in result.stdout
    assert all(w.alive() for w in redis_pool.workers)


@pytest.mark.parametrize(
    "root, refused, words",
    [
        ("NeedsTuple", "TakesAnything", ["parameter 'value'", "('a', 'b')", "does not survive"]),
        ("NeedsLocal", "DefinedInAFunction", ["inside a function"]),
        ("HasPrivate", "HasPrivate", ["parameter 'secret' is PRIVATE"]),
    ],
)
def test_a_task_that_cannot_travel_is_refused_before_anything_is_sent(redis_pool, tmp_path, root, refused, words):
    result = redis_pool.run("--module", "tests.pipelines", root, "--out", str(tmp_path))
    assert result.returncode == 30
    refusal = [line for line in result.stdout.splitlines() if "refused to dispatch" in line]
    assert refusal and refused in refusal[0] and all(w in refusal[0] for w in words), refusal
    assert refused not in redis_pool.logs()  # nothing reached a worker
    # a private value never leaves the dispatcher (Luigi's own DEBUG lines there show it, as stock Luigi does)
    assert "hunter2" not in redis_pool.logs() + "\n".join(refusal)


def test_a_module_outside_the_allowlist_fails_that_task_and_the_worker_stays_up(pool, tmp_path):
    result = pool.run("--module", "tests.pipelines", "NeedsOtherModule", "--out", str(tmp_path))
    assert result.returncode == 30
    assert "module 'tests.pipelines_other' is not in this worker's allowlist" in result.stdout
    assert all(w.alive() for w in pool.workers)


def _luigid_api(url: str, method: str, **data) -> dict:
    query = urllib.parse.urlencode({"data": json.dumps(data)})
    with urllib.request.urlopen(f"{url}api/{method}?{query}", timeout=5) as response:
        return json.loads(response.read())["response"]


def test_status_progress_and_tracking_url_reach_luigid(redis_pool, luigid, tmp_path):
    # Given a task that reports from inside run() and waits for us
    process = subprocess.Popen(
        [str(BIN / "luigi-celery"), "run", "--broker", redis_pool.broker, "--queue", redis_pool.queue,
         "--module", "tests.pipelines", "Reports", "--out", str(tmp_path), "--scheduler-url", luigid],
        cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # When it runs, luigid sees what it reported on the worker
        deadline = time.time() + 30
        running: dict = {}
        while time.time() < deadline:
            running = _luigid_api(luigid, "task_list", status="RUNNING", upstream_status="")
            if running and next(iter(running.values())).get("status_message") == "halfway there":
                break
            time.sleep(0.2)
        ((task_id, task),) = running.items()
        assert task["tracking_url"] == "http://tracker.example/job/42"
        assert task["progress_percentage"] == 50
    finally:
        (tmp_path / "release").write_text("go")
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-3000:]
    # Then the last updates arrived too
    assert _luigid_api(luigid, "get_task_status_message", task_id=task_id)["statusMessage"] == "all done"
    assert _luigid_api(luigid, "get_task_progress_percentage", task_id=task_id)["progressPercentage"] == 100


@pytest.mark.parametrize("url", ["redis://:s3cret@127.0.0.1:1/0", "amqp://guest:s3cret@127.0.0.1:1//"])
def test_an_unreachable_broker_fails_fast_with_the_url_and_no_password(url, tmp_path):
    started = time.monotonic()
    result = run_cli("run", "--broker", url, "--module", "tests.pipelines", "Succeeds", "--out", str(tmp_path))
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("luigi-celery run: error: cannot reach the broker at ") and "127.0.0.1:1" in last
    assert "s3cret" not in result.stdout
    assert not list(tmp_path.iterdir())  # nothing ran


def test_an_unknown_module_is_one_line(tmp_path):
    result = run_cli("run", "--module", "no.such.pipeline", "Report")
    assert result.returncode == 2
    assert (
        result.stdout.strip()
        == "luigi-celery run: error: cannot import module 'no.such.pipeline': No module named 'no'"
    )


def test_check_sees_the_pool_and_reports_an_unreachable_broker(redis_pool):
    good = run_cli("check", "--broker", redis_pool.broker)
    assert good.returncode == 0 and all(w.name in good.stdout for w in redis_pool.workers)
    bad = run_cli("check", "--broker", "redis://127.0.0.1:1/0", "--timeout", "2")
    assert bad.returncode == 1 and "cannot reach the broker at redis://127.0.0.1:1/0" in bad.stdout


def test_check_of_one_worker_asks_only_that_worker(redis_pool):
    # (a container's health check: this worker must answer, not just any)
    one, other = redis_pool.workers
    name = f"{one.name}@{socket.gethostname()}"
    mine = run_cli("check", "--broker", redis_pool.broker, "--worker", name)
    assert mine.returncode == 0 and name in mine.stdout and other.name not in mine.stdout, mine.stdout
    gone = run_cli("check", "--broker", redis_pool.broker, "--worker", "nobody@nowhere", "--timeout", "2")
    assert gone.returncode == 1
    assert gone.stdout.strip().endswith("answers, but worker nobody@nowhere did not reply"), gone.stdout


def test_a_wrapper_task_runs_and_calls_on_success_like_stock_luigi(redis_pool, tmp_path):
    result = redis_pool.run("--module", "tests.pipelines", "WrapsSucceeds", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:]
    assert (tmp_path / "wrapper_on_success.txt").exists()


def test_a_task_that_raises_systemexit_or_keyboardinterrupt_fails_once_as_under_stock_luigi(redis_pool, tmp_path):
    # Given tasks whose run() raises SystemExit and KeyboardInterrupt, run by us; stock Luigi runs
    # the SystemExit one for reference (its KeyboardInterrupt child dies of it, and its worker may
    # start it again several times, or hang, before its run ends: no reference to compare with)
    stock = stock_luigi("--module", "tests.pipelines", "ExitsInRun", "--out", str(tmp_path / "stock"))
    began = time.monotonic()
    ours = redis_pool.run("--module", "tests.pipelines", "ExitsOrInterrupts", "--out", str(tmp_path / "ours"),
                          "--workers", "2", timeout=120)  # fmt: skip
    # Then we fail both, soon (not redelivered again and again), as stock Luigi fails its own
    assert (stock.returncode, ours.returncode) == (30, 30), ours.stdout[-3000:]
    assert "* 2 failed:" in summary(ours.stdout, tmp_path / "ours")
    assert "* 1 failed:" in summary(stock.stdout, tmp_path / "stock")
    assert time.monotonic() - began < 60
    # and each ran once, SystemExit with the events stock Luigi fires (on_failure: FAILURE), and
    # KeyboardInterrupt with none (Luigi's task process re-raises it, past on_failure)
    theirs = sorted((event, task) for event, task, _ in events(tmp_path / "stock"))
    ours_events = sorted((event, task) for event, task, _ in events(tmp_path / "ours"))
    exits = [(event, task) for event, task in ours_events if task.startswith("ExitsInRun")]
    assert exits == theirs
    assert [event for event, _ in exits] == ["FAILURE", "START"]
    assert [event for event, task in ours_events if task.startswith("InterruptsInRun")] == ["START"]


def test_a_worker_timeout_that_runs_out_before_run_starts_is_a_timeout(redis_pool, tmp_path):
    # Given a task whose 1 s worker_timeout runs out while its worker rebuilds it
    result = redis_pool.run("--module", "tests.pipelines", "SlowToRebuild", "--out", str(tmp_path), timeout=120)
    # Then it timed out, in Luigi's words, with Luigi's TIMEOUT event, and nothing ran
    assert result.returncode == 30, result.stdout[-3000:]
    assert "timed out after 1 seconds and was terminated" in result.stdout
    assert "SoftTimeLimitExceeded" not in result.stdout and "cannot rebuild" not in result.stdout
    assert [event for event, _, _ in events(tmp_path)] == ["TIMEOUT"]


def test_the_task_process_context_is_entered_around_run_as_under_stock_luigi(fresh_pool, tmp_path):
    # Given [worker] task_process_context in the luigi config of the dispatcher and of the workers
    config = tmp_path / "luigi.cfg"
    config.write_text("[worker]\ntask_process_context = tests.pipelines.RecordsContext\n")
    pool = fresh_pool(REDIS_URL, count=1, LUIGI_CONFIG_PATH=str(config))
    stock = subprocess.run(
        [str(BIN / "luigi"), "--module", "tests.pipelines", "InContext", "--out", str(tmp_path / "stock"),
         "--local-scheduler", "--workers", "2"],
        cwd=ROOT, env=clean_env(LUIGI_CONFIG_PATH=str(config)), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert stock.returncode == 0, stock.stderr[-3000:]
    # When luigi-celery runs the same wrapper (finished in the dispatcher) and its task (on a worker)
    ours = pool.run("--module", "tests.pipelines", "InContext", "--out", str(tmp_path / "ours"))
    assert ours.returncode == 0, ours.stdout[-3000:]
    # Then each was run inside the context, as under stock Luigi, and the task's run() within it
    theirs = [(event, task) for event, task, _ in events(tmp_path / "stock")]
    mine = [(event, task) for event, task, _ in events(tmp_path / "ours")]
    assert sorted(mine) == sorted(theirs)
    succeeds = [event for event, task in mine if task.startswith("Succeeds")]
    assert succeeds == ["ENTER", "START", "SUCCESS", "EXIT"]
    assert [event for event, task in mine if task.startswith("InContext")] == ["ENTER", "EXIT"]


def test_a_task_resumed_after_its_dynamic_dependencies_runs_run_again_as_under_stock_luigi(redis_pool, tmp_path):
    # Given a task whose output exists before it yields its dynamic dependency
    stock = stock_luigi("--module", "tests.pipelines", "WritesThenYields", "--out", str(tmp_path / "stock"))
    ours = redis_pool.run("--module", "tests.pipelines", "WritesThenYields", "--out", str(tmp_path / "ours"))
    assert (stock.returncode, ours.returncode) == (0, 0), ours.stdout[-3000:]
    # Then, sent again once the dependency is done, its run() is resumed (not skipped as complete)
    theirs = [(event, task) for event, task, _ in events(tmp_path / "stock")]
    assert [(event, task) for event, task, _ in events(tmp_path / "ours")] == theirs
    assert ("RESUMED", "WritesThenYields__99914b932b") in theirs


def test_the_completion_cache_of_the_dispatchers_config_spares_a_workers_checks(fresh_pool, brokers, tmp_path):
    # Given a dispatcher with [worker] cache_task_completion on, and one worker process
    config = tmp_path / "luigi.cfg"
    config.write_text("[worker]\ncache_task_completion = true\n")
    pool = fresh_pool(brokers["redis"], count=1, concurrency=1, LUIGI_CONFIG_PATH=str(config))
    # When a task yields a dynamic dependency, which then runs, and the task resumes
    ours = pool.run("--module", "tests.pipelines", "YieldsChecksLogged", "--out", str(tmp_path))
    assert ours.returncode == 0, ours.stdout[-3000:]
    # Then the worker checked the dependency once, before it ran: Luigi's cache knew it complete after
    mine = [event for event, task, _ in events(tmp_path) if task.startswith("ChecksLogged")]
    assert mine == ["CHECKED", "START", "SUCCESS"]


def test_a_task_that_accepts_messages_has_an_empty_queue_of_them_as_under_stock_luigi(redis_pool, tmp_path):
    # Given a task that accepts messages from the scheduler, and none sent (a local scheduler)
    stock = stock_luigi("--module", "tests.pipelines", "Listens", "--out", str(tmp_path / "stock"))
    ours = redis_pool.run("--module", "tests.pipelines", "Listens", "--out", str(tmp_path / "ours"))
    # Then its run() finds the queue empty and ends, under both
    assert (stock.returncode, ours.returncode) == (0, 0), ours.stdout[-3000:]
    assert [p.read_text() for p in (tmp_path / "ours").glob("Listens_*.txt")] == ["none"]


@pytest.mark.parametrize("broker", ["redis", "rabbitmq", "embedded"])
def test_a_message_from_luigid_reaches_the_running_task_and_its_response_comes_back(broker, luigid, request,
                                                                                    tmp_path):  # fmt: skip
    # Given a task listening for a message from luigid, on a remote worker (or the embedded one)
    pool = None if broker == "embedded" else request.getfixturevalue(f"{broker}_pool")
    args = ("--module", "tests.pipelines", "Listens", "--wait", "60", "--out", str(tmp_path), "--scheduler-url", luigid)
    process = subprocess.Popen(
        pool.command(*args) if pool else [str(BIN / "luigi-celery"), "run", *args],
        cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline, running = time.time() + 60, {}
        while time.time() < deadline and process.poll() is None:
            running = _luigid_api(luigid, "task_list", status="RUNNING", upstream_status="")
            if running and next(iter(running.values())).get("status_message") == "listening":
                break
            time.sleep(0.2)
        ((task_id, task),) = running.items()
        # When the visualiser sends it a message, as a user would
        sent = _luigid_api(luigid, "send_scheduler_message", worker=task["worker_running"], task=task_id,
                           content="stop now")  # fmt: skip
        # Then the task gets it, and its response reaches luigid
        response = None
        while response is None and time.time() < deadline:
            time.sleep(0.2)
            asked = {"task_id": task_id, "message_id": sent["message_id"]}
            response = _luigid_api(luigid, "get_scheduler_message_response", **asked)["response"]
        assert response == "got stop now"
    finally:
        if process.poll() is None:
            output, _ = process.communicate(timeout=90)
        else:
            output = process.stdout.read() if process.stdout else ""
    assert process.returncode == 0, output[-3000:]
    assert [p.read_text() for p in tmp_path.glob("Listens_*.txt")] == ["stop now"]


def test_the_embedded_default_runs_a_class_defined_inside_a_function_its_module_defines(tmp_path):
    # Given a task class made inside a function when its module is imported
    ours = run_cli("run", "--module", "tests.pipelines", "MadeByAFactory", "--out", str(tmp_path / "made"))
    # Then the embedded worker runs it
    assert ours.returncode == 0, ours.stdout[-3000:]
    assert list((tmp_path / "made").glob("MadeByAFactory_*.txt"))
    # and one made anew each time a task's requires() runs fails, saying how to fix it
    local = run_cli("run", "--module", "tests.pipelines", "NeedsLocal", "--out", str(tmp_path / "local"))
    assert local.returncode == 30, local.stdout[-3000:]
    assert "DefinedInAFunction" in local.stdout and "define it at module level" in local.stdout
