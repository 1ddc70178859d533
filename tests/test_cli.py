"""The command line: what it parses itself, what it hands to Luigi, and embedded runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from luigi_celery.cli import _events_refused, flower_arguments, make_argument_parser
from luigi_celery.errors import LuigiCeleryError
from tests.conftest import BIN, ROOT, clean_env, run_cli


def parse(*argv: str):
    return make_argument_parser().parse_known_args(list(argv))


def test_run_takes_only_its_own_flags_and_never_abbreviations():
    # Given task parameters that start like luigi-celery's flags
    args, rest = parse("run", "--broker", "redis://h/0", "--module", "m", "T", "--brok", "x", "--queue-size", "3")
    # Then only the exact flag is ours; the rest goes to Luigi untouched, in order
    assert args.broker_url == "redis://h/0"
    assert rest == ["--module", "m", "T", "--brok", "x", "--queue-size", "3"]


def test_worker_hands_celery_options_through():
    args, rest = parse("worker", "--include", "a.b", "c", "--concurrency", "4", "-Q", "gpu", "--autoscale", "8,2")
    assert args.include == ["a.b", "c"]
    assert rest == ["--concurrency", "4", "-Q", "gpu", "--autoscale", "8,2"]


def test_bad_flags_are_one_clear_error():
    bad_queue = run_cli("run", "--queue", "a b", "--module", "examples.sales", "Report")
    assert bad_queue.returncode == 2 and "argument --queue: must be a name without spaces" in bad_queue.stdout
    no_modules = run_cli("worker", "--broker", "redis://127.0.0.1:6379/11")
    assert no_modules.returncode == 2
    assert no_modules.stdout.strip() == (
        "luigi-celery worker: error: no task modules allowed: pass --include MODULE or set LUIGI_CELERY_TASK_MODULES"
    )
    bad_port = run_cli("worker", "--metrics-port", "99999", "--include", "examples")
    assert bad_port.returncode == 2 and "argument --metrics-port: must be a port number" in bad_port.stdout
    no_transport = run_cli("worker", "--broker", "foo://u:secret@host/0", "--include", "examples")
    assert no_transport.returncode == 2
    assert no_transport.stdout.strip() == (
        "luigi-celery worker: error: unsupported broker URL foo://u:****@host/0: 'No such transport: foo'"
    )
    no_checks = run_cli("run", "--complete-checks", "0", "--module", "examples.sales", "Report")
    assert (
        no_checks.returncode == 2 and "argument --complete-checks: must be a positive whole number" in no_checks.stdout
    )
    extra = run_cli("check", "--bogus")
    assert extra.returncode == 2 and "unrecognized arguments: --bogus" in extra.stdout


def test_flower_options_take_their_value_either_way_and_a_wrong_one_is_one_line():
    # Flower's parser (tornado's) wants --name=value; ours takes --name value as well
    assert flower_arguments(["--port", "5556", "--basic-auth=u:p", "--persistent", "--address", "127.0.0.1"]) == [
        "--port=5556", "--basic-auth=u:p", "--persistent", "--address=127.0.0.1"
    ]  # fmt: skip
    with pytest.raises(LuigiCeleryError, match="unknown Flower option --prot"):
        flower_arguments(["--prot", "5556"])
    with pytest.raises(LuigiCeleryError, match="Flower option --port needs a value"):
        flower_arguments(["--port"])
    unknown = run_cli("flower", "--broker", "redis://127.0.0.1:6379/11", "--prot", "5556")
    assert unknown.returncode == 2
    assert unknown.stdout.strip() == (
        "luigi-celery flower: error: unknown Flower option --prot (see luigi-celery flower --help)"
    )


def test_embedded_tasks_run_in_worker_processes_side_by_side(tmp_path):
    # Given no broker, three one-second tasks and --workers 3
    process = subprocess.Popen(
        [str(BIN / "luigi-celery"), "run", "--module", "tests.pipelines", "ThreeAtOnce", "--out", str(tmp_path),
         "--workers", "3"],
        cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    runs = [tuple(map(float, p.read_text().split())) for p in tmp_path.glob("Overlaps_*.txt")]
    assert len(runs) == 3
    # Then none ran in the dispatcher, each had its own process, and they overlapped in time
    pids = {int(pid) for _, _, pid in runs}
    assert process.pid not in pids and len(pids) == 3
    latest_start = max(start for start, _, _ in runs)
    earliest_end = min(end for _, end, _ in runs)
    assert latest_start < earliest_end  # all three were running at that moment


def test_a_dead_embedded_pool_fails_the_run_instead_of_hanging(tmp_path):
    # Given an embedded run with a long task in flight
    process = subprocess.Popen(
        [str(BIN / "luigi-celery"), "run", "--module", "tests.pipelines", "SleepsLong", "--out", str(tmp_path)],
        cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 60
    while not (tmp_path / "events.log").exists() or "RUNNING" not in (tmp_path / "events.log").read_text():
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.1)
    # When the pool dies under it
    pool = subprocess.run(
        ["pgrep", "-P", str(process.pid), "-f", "luigi_celery worker"], capture_output=True, text=True
    )
    pool_pid = int(pool.stdout.split()[0])
    os.killpg(pool_pid, signal.SIGKILL)
    killed = time.time()
    # Then the run ends soon, failed, saying why
    output, _ = process.communicate(timeout=60)
    assert time.time() - killed < 15
    assert process.returncode == 30
    assert "the embedded Celery worker exited" in output


def test_the_queues_a_worker_consumes_are_read_from_its_celery_flags():
    from luigi_celery.cli import _consumed_queues

    assert _consumed_queues(["-Q", "gpu,cpu", "--concurrency", "2"]) == ["gpu", "cpu"]
    assert _consumed_queues(["--queues=a", "--queues", "b"]) == ["a", "b"]
    assert _consumed_queues(["--concurrency", "2"]) == []


def test_flower_turns_the_workers_task_events_on_unless_told_not_to():
    assert not _events_refused(flower_arguments(["--port", "5556"]))
    assert not _events_refused(flower_arguments(["--enable_events=True"]))
    assert _events_refused(flower_arguments(["--enable_events=False"]))
    assert _events_refused(flower_arguments(["--enable-events=false"]))


def test_an_embedded_run_that_fails_before_its_pool_starts_leaves_no_broker_folder(tmp_path):
    # Given no broker (the embedded default), temporary folders made under tmp_path
    env = clean_env(TMPDIR=str(tmp_path))
    # When the run fails before any task is scheduled (no such task)
    result = run_cli("run", "--module", "examples.sales", "NoSuchTask", env=env)
    assert result.returncode != 0, result.stdout[-2000:]
    # Then the embedded broker's folder went with it
    assert not list(tmp_path.glob("luigi-celery-embedded-*"))
