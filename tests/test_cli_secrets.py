"""Secrets and the command line: no password in what the CLI prints."""

from __future__ import annotations

import pytest

from luigi_celery import cli
from luigi_celery.errors import LuigiCeleryError
from tests.conftest import run_cli


def pieces(password: str) -> set[str]:
    """Every 3 characters in a row of ``password``: a longer piece holds one of them."""
    return {password[i : i + 3] for i in range(len(password) - 2)}


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
