"""The command line: what it parses itself, what it hands to Luigi, and embedded runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from luigi_celery import __version__
from luigi_celery.cli import _events_refused, flower_arguments, make_argument_parser
from luigi_celery.errors import LuigiCeleryError
from tests.conftest import BIN, REDIS_URL, ROOT, clean_env, run_cli


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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_an_embedded_run_that_fails_before_its_pool_starts_leaves_no_broker_folder(tmp_path):
    # Given no broker (the embedded default), temporary folders made under tmp_path
    env = clean_env(TMPDIR=str(tmp_path))
    # When the run fails before any task is scheduled (no such task)
    result = run_cli("run", "--module", "examples.sales", "NoSuchTask", env=env)
    assert result.returncode != 0, result.stdout[-2000:]
    # Then the embedded broker's folder went with it
    assert not list(tmp_path.glob("luigi-celery-embedded-*"))


def test_include_takes_modules_comma_separated_one_by_one_or_both():
    # Celery's help says "COMMA SEPARATED LIST", and LUIGI_CELERY_TASK_MODULES is comma-separated
    args, rest = parse("worker", "--include", "a.b, c,", "d", "--include", "e,,f", "--concurrency", "4")
    assert args.include == ["a.b", "c", "d", "e", "f"]
    assert rest == ["--concurrency", "4"]


@pytest.mark.e2e
def test_an_include_that_cannot_be_imported_is_one_line():
    # Given a worker allowed a module that does not exist, beside one that does
    result = run_cli("worker", "--broker", REDIS_URL, "--include", "examples.sales,no_such_module_here")
    # Then it says so in one line and exits 2, before Celery starts
    assert result.returncode == 2, result.stdout[-3000:]
    assert result.stdout.strip() == (
        "luigi-celery worker: error: cannot import module 'no_such_module_here': No module named 'no_such_module_here'"
    )


@pytest.mark.e2e
def test_worker_and_flower_help_need_no_broker():
    # Given no LUIGI_CELERY_* setting at all (run_cli's clean_env)
    worker = run_cli("worker", "--help", timeout=60)
    # Then `worker --help` shows our flags, then Celery's
    assert worker.returncode == 0, worker.stdout[-3000:]
    for flag in ("--broker", "--include", "--metrics-port", "--concurrency", "--autoscale"):
        assert flag in worker.stdout, flag
    assert worker.stdout.index("--include") < worker.stdout.index("--concurrency")
    flower = run_cli("flower", "-h", timeout=60)
    # And `flower --help` shows our flags, then Flower's
    assert flower.returncode == 0, flower.stdout[-3000:]
    for flag in ("--broker", "--result-backend", "--basic-auth", "--port", "--broker-api"):
        assert flag in flower.stdout, flag


@pytest.mark.e2e
def test_flower_help_with_a_broker_connects_to_nothing():
    # Given a broker URL whose port is a socket of the test's own, counting connections
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        broker = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
        # When Flower's help is asked for
        result = run_cli("flower", "--broker", broker, "--help", timeout=30)
        # Then it is printed, and nothing (no enable_events broadcast) reached the broker
        assert result.returncode == 0, result.stdout[-3000:]
        assert "--basic-auth" in result.stdout
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.e2e
def test_check_queue_may_be_given_more_than_once_and_comma_separated():
    args, _ = parse("check", "--queue", "a, b", "--queue", "c")
    assert args.queues == ["a", "b", "c"]
    bad = run_cli("check", "--queue", "two words")
    assert bad.returncode == 2 and "argument --queue: must be a name without spaces, got 'two words'" in bad.stdout


@pytest.mark.e2e
def test_check_finds_a_worker_consuming_each_queue_named(pool):
    # Given a pool consuming its own queue
    # When check asks for that queue / Then some worker consumes it
    served = run_cli("check", "--broker", pool.broker, "--queue", pool.queue, "--timeout", "2")
    assert served.returncode == 0, served.stdout
    assert pool.queue in served.stdout
    # When it asks for that queue and one nobody consumes / Then it fails, naming that one only
    unserved = run_cli(
        "check", "--broker", pool.broker, "--queue", pool.queue, "--queue", "nobody-consumes-this", "--timeout", "2"
    )
    assert unserved.returncode == 1, unserved.stdout
    assert "no worker consumes queue nobody-consumes-this" in unserved.stdout
    assert pool.queue not in unserved.stdout.split("no worker consumes", 1)[1]


@pytest.mark.e2e
def test_check_with_no_broker_says_the_embedded_default_needs_no_server():
    result = run_cli("check")
    assert result.returncode == 0, result.stdout
    assert "embedded default needs no server" in result.stdout


@pytest.mark.e2e
def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"luigi-celery {__version__}" == "luigi-celery 0.1.0"


@pytest.mark.e2e
def test_a_bad_number_names_the_flag_and_the_value_and_no_function():
    cases = [
        ("run", "--queue-timeout", "abc", "--module", "examples.sales", "Report"),
        ("run", "--connect-timeout", "nan", "--module", "examples.sales", "Report"),
        ("check", "--timeout", "abc"),
        ("check", "--timeout", "-1"),
    ]
    for command, flag, value, *rest in cases:
        result = run_cli(command, flag, value, *rest)
        assert result.returncode == 2
        assert f"luigi-celery {command}: error: argument {flag}: must be a positive number, got {value!r}" in (
            result.stdout
        ), result.stdout


@pytest.mark.e2e
def test_the_top_level_help_is_plain_text():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "``" not in result.stdout
    for command in ("run", "worker", "flower", "check", "--version"):
        assert command in result.stdout
