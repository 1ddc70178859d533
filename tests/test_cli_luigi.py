"""``luigi-celery run`` reads Luigi's command line as Luigi does: its help, and one line for a mistake."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e

PIPELINE = ("--module", "tests.pipelines")


def test_help_for_a_task_is_luigis_with_luigi_celerys_flags_added():
    # When a user asks for a task's help, as with `luigi --module M Task --help`
    result = run_cli("run", *PIPELINE, "Slow", "--help")
    # Then Luigi's help shows the task's parameters, then luigi-celery's own flags; nothing runs
    assert result.returncode == 0, result.stdout[-2000:]
    assert result.stdout.startswith("usage: luigi-celery run [luigi-celery options]")
    assert "--seconds SECONDS" in result.stdout and "--n N" in result.stdout
    assert "luigi-celery options:" in result.stdout and "--broker URL" in result.stdout
    assert "--workers" not in result.stdout.split("luigi-celery options:")[0]  # Luigi shows it with --help-all
    assert "embedded" not in result.stdout
    # and --help-all shows every task's and every option's flags, as Luigi's does
    everything = run_cli("run", *PIPELINE, "Slow", "--help-all")
    assert everything.returncode == 0
    assert "--workers CORE_WORKERS" in everything.stdout and "--Fails-out" in everything.stdout
    assert "--queue-timeout SECONDS" in everything.stdout


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        pytest.param(("Slwo", "--n", "1"), "no task named 'Slwo'; did you mean Slow?", id="misspelled task"),
        pytest.param(("NoSuchThing",), "no task named 'NoSuchThing' (is --module right?)", id="unknown task"),
        pytest.param(
            ("--brokr", "redis://127.0.0.1:6379/11", "Slow", "--n", "1"),
            "unrecognized argument --brokr; did you mean --broker?", id="misspelled own flag",
        ),
        pytest.param(("Slow", "--n", "1", "--bogus", "3"), "unrecognized argument --bogus", id="unknown flag"),
        pytest.param(
            ("Slow", "--n", "x"), "invalid value for --n: 'x' (invalid literal for int() with base 10: 'x')",
            id="bad value",
        ),
        pytest.param(
            ("Slow", "--n", "1", "--workers", "many"),
            "invalid value for --workers: 'many' (invalid literal for int() with base 10: 'many')", id="bad option",
        ),
        pytest.param(("Slow", "--out", "o"), "Slow[args=(), kwargs={'out': 'o'}]: requires the 'n' parameter to be set",
                     id="missing"),
        pytest.param((), "no task given: luigi-celery run --module MODULE TASK [--param VALUE ...]", id="no task"),
    ],
)
def test_a_mistake_on_the_command_line_is_one_line_and_exit_2(tmp_path, argv, line):
    result = run_cli("run", *PIPELINE, *argv, cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:]
    assert result.stdout.strip() == f"luigi-celery run: error: {line}"
    assert list(tmp_path.iterdir()) == []  # nothing ran


def test_an_embedded_failure_shows_its_traceback_once_and_no_root_warning(tmp_path):
    # When a task fails on the embedded default (CI runs as root, where Celery warns)
    result = run_cli("run", *PIPELINE, "Fails", "--out", str(tmp_path))
    assert result.returncode == 30, result.stdout[-3000:]
    # Then the worker's line says it failed, the traceback comes once (after the summary),
    # and Celery's warning about root does not land in the middle of the log
    assert "failed    Fails(" in result.stdout
    assert result.stdout.count("Traceback (most recent call last)") == 1
    assert result.stdout.index("Traceback") > result.stdout.index("===== Luigi Execution Summary =====")
    assert "SecurityWarning" not in result.stdout and "superuser privileges" not in result.stdout
