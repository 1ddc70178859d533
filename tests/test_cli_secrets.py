"""Secrets and the command line: no password in what the CLI prints."""

from __future__ import annotations

import socket

import pytest

from luigi_celery import cli
from luigi_celery.errors import LuigiCeleryError
from tests.conftest import RABBITMQ_URL, REDIS_URL, clean_env, run_cli, start_worker

WARNING = (
    "warning: the password in --broker is visible to other users in ps; "
    "set LUIGI_CELERY_BROKER_URL or LUIGI_CELERY_BROKER_URL_FILE instead"
)


def pieces(password: str) -> set[str]:
    """Every 3 characters in a row of ``password``: a longer piece holds one of them."""
    return {password[i : i + 3] for i in range(len(password) - 2)}


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("url", "password"),
    [
        pytest.param("redis://:Zq9k/Xv7w@127.0.0.1:6379/0", "Zq9k/Xv7w", id="redis, / in the password"),
        pytest.param("amqp://guest:Kp@Qw8/Rt5@127.0.0.1:5672//", "Kp@Qw8/Rt5", id="amqp, @ and / in the password"),
        pytest.param("redis://:Jm3@Vb8n@127.0.0.1:6379/11", "Jm3@Vb8n", id="redis, @ in the password"),
        pytest.param("redis://127.0.0.1:6379/11?password=Hx4pTz9", "Hx4pTz9", id="redis, ?password="),
    ],
)
def test_check_shows_no_piece_of_a_password_kombu_cannot_read_in_one_line(url: str, password: str) -> None:
    # Given a broker URL with a password that trips kombu's parser (or that it reads wrongly)
    # When the pool is checked with it, for a worker that is not there
    result = run_cli("check", "--broker", url, "--worker", "nobody@nowhere", "--timeout", "1", timeout=60)

    # Then it fails in one line, and no piece of the password longer than two characters is in it
    assert result.returncode in (1, 2), result.stdout
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
    assert result.stdout.startswith("luigi-celery check: "), result.stdout
    assert not {piece for piece in pieces(password) if piece in result.stdout}, result.stdout


def test_the_error_line_is_scrubbed_of_every_configured_password_and_the_secret(monkeypatch, capsys) -> None:
    # Given a broker password and a message secret in the environment, and a failure whose
    # message quotes both (as a library's words might)
    monkeypatch.setenv("LUIGI_CELERY_BROKER_URL", "redis://:Wd8-Lq2-Pz5@127.0.0.1:6379/11")
    monkeypatch.setenv("LUIGI_CELERY_SECRET", "Sx7-Ty3-Ku9")

    def fail(_args: object) -> int:
        raise LuigiCeleryError("refused Wd8-Lq2-Pz5 and Fg4-Hj6 (signed with Sx7-Ty3-Ku9)")

    monkeypatch.setattr(cli, "cmd_check", fail)

    # When the command fails
    code = cli.main(["check", "--redis-url", "redis://:Fg4-Hj6@127.0.0.1:6379/11"])

    # Then the error line shows neither the password nor the secret
    assert code == cli.EXIT_PROBLEM
    assert capsys.readouterr().err == "luigi-celery check: error: refused **** and **** (signed with ****)\n"


# --- passwords off the command line ------------------------------------------------


@pytest.mark.e2e
def test_check_reads_the_broker_url_from_a_file(brokers, tmp_path) -> None:
    # Given the broker URL in a file, named by LUIGI_CELERY_BROKER_URL_FILE (with a trailing newline)
    (tmp_path / "broker-url").write_text(REDIS_URL + "\n")
    env = clean_env(LUIGI_CELERY_BROKER_URL_FILE=str(tmp_path / "broker-url"))

    # When the pool is checked, for a worker that is not there
    result = run_cli("check", "--worker", "nobody@nowhere", "--timeout", "1", env=env)

    # Then the broker from the file answers
    assert result.stdout == (
        f"luigi-celery check: broker {REDIS_URL} answers, but worker nobody@nowhere did not reply\n"
    ), result.stdout


@pytest.mark.e2e
def test_a_worker_and_check_with_the_password_in_a_file_work_and_warn_of_nothing(fresh_pool, tmp_path) -> None:
    # Given RabbitMQ's URL, password and all, in a file only its owner reads
    secret = tmp_path / "broker-url"
    secret.write_text(RABBITMQ_URL + "\n")
    secret.chmod(0o600)
    env = {"LUIGI_CELERY_BROKER_URL_FILE": str(secret)}

    # When a worker is started with no --broker, the URL in the file
    pool = fresh_pool(RABBITMQ_URL, count=0)
    worker = start_worker(None, pool.queue, tmp_path, env=env)
    pool.workers.append(worker)

    # Then it runs and says nothing about ps, and check (reading the same file) finds it by name
    found = run_cli("check", "--worker", f"{worker.name}@{socket.gethostname()}", "--queue", pool.queue,
                    "--timeout", "5", env=clean_env(**env))  # fmt: skip
    assert found.returncode == 0, found.stdout
    assert "visible to other users" not in worker.output()
    assert "guest:guest" not in found.stdout


@pytest.mark.e2e
def test_a_password_in_a_flag_is_warned_of_once_and_the_worker_still_runs(fresh_pool) -> None:
    # Given a worker started with the password in --broker (RabbitMQ's guest:guest)
    pool = fresh_pool(RABBITMQ_URL, count=1)

    # Then it runs, and says once that other users see the password, and where to put it instead
    output = pool.workers[0].output()
    assert output.count(WARNING) == 1, output[:2000]
    assert f"luigi-celery worker: {WARNING}" in output


def test_the_warning_names_each_flag_with_a_password(capsys) -> None:
    # Given a result backend and a store with passwords on the command line, and a broker without
    args, _ = cli.make_argument_parser().parse_known_args(
        [
            "worker",
            "--broker",
            "redis://h/0",
            "--result-backend",
            "redis://:pw@h/1",
            "--redis-url",
            "redis://h/2?password=pw",
        ]
    )

    # When the worker warns of them
    cli._warn_of_passwords_in_flags(args)

    # Then one line names both flags and their variables
    assert capsys.readouterr().err == (
        "luigi-celery worker: warning: the passwords in --result-backend, --redis-url are visible to other users "
        "in ps; set LUIGI_CELERY_RESULT_BACKEND or LUIGI_CELERY_RESULT_BACKEND_FILE, "
        "LUIGI_CELERY_REDIS_URL or LUIGI_CELERY_REDIS_URL_FILE instead\n"
    )


@pytest.mark.e2e
def test_a_run_whose_broker_url_is_wrong_says_only_that_without_the_warning() -> None:
    # Given a password in --broker that kombu cannot split
    # When a run starts with it
    result = run_cli("run", "--broker", "redis://:Zq9k/Xv7w@127.0.0.1:6379/11", "--module", "tests.pipelines",
                     "Succeeds", "--out", "/nonexistent")  # fmt: skip

    # Then it fails in one line, which says what to do (the warning would come once the settings are good)
    assert result.returncode == 2
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
    assert "must be percent-encoded" in result.stdout
