"""Unit tests for luigi_celery.settings: where each setting comes from, and what is refused."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import luigi.configuration
import pytest

from luigi_celery.errors import ConfigError
from luigi_celery.settings import (
    CONFIG_SECTION,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_QUEUE,
    Settings,
    load_settings,
    redact,
)

NO_ENV: dict[str, str] = {}


@pytest.fixture
def luigi_config() -> Iterator[luigi.configuration.LuigiConfigParser]:
    """Luigi's config with an empty [luigi_celery] section; put back as it was afterwards."""
    config = luigi.configuration.get_config()
    saved = dict(config.items(CONFIG_SECTION, raw=True)) if config.has_section(CONFIG_SECTION) else None
    config.remove_section(CONFIG_SECTION)
    config.add_section(CONFIG_SECTION)
    try:
        yield config
    finally:
        config.remove_section(CONFIG_SECTION)
        if saved is not None:
            config.add_section(CONFIG_SECTION)
            for key, value in saved.items():
                config.set(CONFIG_SECTION, key, value)


@pytest.fixture
def no_luigi_config() -> Iterator[None]:
    """No [luigi_celery] section at all while the test runs."""
    config = luigi.configuration.get_config()
    saved = dict(config.items(CONFIG_SECTION, raw=True)) if config.has_section(CONFIG_SECTION) else None
    config.remove_section(CONFIG_SECTION)
    try:
        yield
    finally:
        if saved is not None:
            config.add_section(CONFIG_SECTION)
            for key, value in saved.items():
                config.set(CONFIG_SECTION, key, value)


# --- where each setting comes from ------------------------------------------------


def test_without_config_env_or_flags_every_setting_has_its_default(no_luigi_config: None) -> None:
    # Given no [luigi_celery] section, no LUIGI_CELERY_* variables and no flags
    # When the settings are loaded
    settings = load_settings(env=NO_ENV)

    # Then every setting has its default, and the broker is the embedded one
    assert settings == Settings()
    assert settings.broker_url is None
    assert settings.result_backend is None
    assert settings.task_modules == ()
    assert settings.queue == DEFAULT_QUEUE == "luigi"
    assert settings.connect_timeout == DEFAULT_CONNECT_TIMEOUT
    assert settings.embedded_dir is None
    assert settings.embedded is True


def test_the_luigi_config_section_sets_every_setting(
    luigi_config: luigi.configuration.LuigiConfigParser,
) -> None:
    # Given a [luigi_celery] section with every setting
    luigi_config.set(CONFIG_SECTION, "broker_url", "redis://config:6379/0")
    luigi_config.set(CONFIG_SECTION, "result_backend", "redis://config:6379/1")
    luigi_config.set(CONFIG_SECTION, "task_modules", "pipelines.sales, pipelines.stock")
    luigi_config.set(CONFIG_SECTION, "queue", "from-config")
    luigi_config.set(CONFIG_SECTION, "connect_timeout", "2.5")
    luigi_config.set(CONFIG_SECTION, "embedded_dir", "/var/lib/from-config")
    luigi_config.set(CONFIG_SECTION, "metrics_address", "0.0.0.0")

    # When the settings are loaded without env or flags
    settings = load_settings(env=NO_ENV)

    # Then they come from the config, parsed
    assert settings == Settings(
        broker_url="redis://config:6379/0",
        result_backend="redis://config:6379/1",
        task_modules=("pipelines.sales", "pipelines.stock"),
        queue="from-config",
        connect_timeout=2.5,
        embedded_dir="/var/lib/from-config",
        metrics_address="0.0.0.0",
    )
    assert settings.embedded is False


def test_the_environment_wins_over_the_luigi_config(
    luigi_config: luigi.configuration.LuigiConfigParser,
) -> None:
    # Given a setting in both the luigi config and the environment, and one only in the config
    luigi_config.set(CONFIG_SECTION, "broker_url", "redis://config:6379/0")
    luigi_config.set(CONFIG_SECTION, "queue", "from-config")
    luigi_config.set(CONFIG_SECTION, "connect_timeout", "2.5")
    env = {
        "LUIGI_CELERY_BROKER_URL": "amqp://env//",
        "LUIGI_CELERY_QUEUE": "from-env",
        "LUIGI_CELERY_TASK_MODULES": "a.b,c",
    }

    # When the settings are loaded
    settings = load_settings(env=env)

    # Then the environment wins where it speaks, and the config fills in the rest
    assert settings.broker_url == "amqp://env//"
    assert settings.queue == "from-env"
    assert settings.task_modules == ("a.b", "c")
    assert settings.connect_timeout == 2.5


def test_every_setting_can_come_from_the_environment(no_luigi_config: None) -> None:
    # Given every LUIGI_CELERY_* variable
    env = {
        "LUIGI_CELERY_BROKER_URL": "redis://env:6379/0",
        "LUIGI_CELERY_RESULT_BACKEND": "redis://env:6379/1",
        "LUIGI_CELERY_TASK_MODULES": " a.b , c,, d.e ",
        "LUIGI_CELERY_QUEUE": "from-env",
        "LUIGI_CELERY_CONNECT_TIMEOUT": "3",
        "LUIGI_CELERY_COMPLETE_CHECKS": "8",
        "LUIGI_CELERY_EMBEDDED_DIR": "/tmp/from-env",
        "LUIGI_CELERY_METRICS_ADDRESS": " ::1 ",
    }

    # When the settings are loaded
    settings = load_settings(env=env)

    # Then each is parsed from its string
    assert settings == Settings(
        broker_url="redis://env:6379/0",
        result_backend="redis://env:6379/1",
        task_modules=("a.b", "c", "d.e"),
        queue="from-env",
        connect_timeout=3.0,
        complete_checks=8,
        embedded_dir="/tmp/from-env",
        metrics_address="::1",
    )


def test_the_process_environment_is_read_when_no_env_is_given(
    no_luigi_config: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given LUIGI_CELERY_QUEUE in the process environment
    monkeypatch.setenv("LUIGI_CELERY_QUEUE", "from-os-environ")

    # When the settings are loaded without an explicit env
    settings = load_settings()

    # Then the process environment is used
    assert settings.queue == "from-os-environ"


def test_an_empty_environment_variable_does_not_hide_the_config(
    luigi_config: luigi.configuration.LuigiConfigParser,
) -> None:
    # Given a queue in the config and an empty LUIGI_CELERY_QUEUE
    luigi_config.set(CONFIG_SECTION, "queue", "from-config")

    # When the settings are loaded
    settings = load_settings(env={"LUIGI_CELERY_QUEUE": ""})

    # Then the config's queue is used
    assert settings.queue == "from-config"


def test_flags_win_over_the_environment_and_the_config(
    luigi_config: luigi.configuration.LuigiConfigParser,
) -> None:
    # Given a broker and a queue in the config, in the environment and in the flags
    luigi_config.set(CONFIG_SECTION, "broker_url", "redis://config:6379/0")
    luigi_config.set(CONFIG_SECTION, "queue", "from-config")
    env = {"LUIGI_CELERY_BROKER_URL": "redis://env:6379/0", "LUIGI_CELERY_QUEUE": "from-env"}
    flags = {"broker_url": "redis://flag:6379/0", "queue": "from-flag", "task_modules": ("x.y",)}

    # When the settings are loaded
    settings = load_settings(flags, env=env)

    # Then the flags win
    assert settings.broker_url == "redis://flag:6379/0"
    assert settings.queue == "from-flag"
    assert settings.task_modules == ("x.y",)


def test_an_absent_flag_does_not_hide_the_environment(no_luigi_config: None) -> None:
    # Given flags that were not given (None), and the same settings in the environment
    env = {"LUIGI_CELERY_BROKER_URL": "redis://env:6379/0", "LUIGI_CELERY_CONNECT_TIMEOUT": "4"}
    flags = {"broker_url": None, "result_backend": None, "queue": None, "connect_timeout": None}

    # When the settings are loaded
    settings = load_settings(flags, env=env)

    # Then the environment's values are kept, and the rest are defaults
    assert settings.broker_url == "redis://env:6379/0"
    assert settings.connect_timeout == 4.0
    assert settings.result_backend is None
    assert settings.queue == DEFAULT_QUEUE


def test_the_luigi_config_can_be_left_out(luigi_config: luigi.configuration.LuigiConfigParser) -> None:
    # Given a broker in the luigi config
    luigi_config.set(CONFIG_SECTION, "broker_url", "redis://config:6379/0")

    # When the settings are loaded without the luigi config
    settings = load_settings(env=NO_ENV, use_luigi_config=False)

    # Then the config is not read
    assert settings.broker_url is None


# --- secrets from files ------------------------------------------------------------


def test_every_setting_that_may_hold_a_password_can_come_from_a_file(no_luigi_config: None, tmp_path) -> None:
    # Given each secret in a file of its own, as Docker and Kubernetes mount secrets (a trailing newline too)
    values = {
        "broker_url": "amqp://u:p@ss/w@broker//",
        "result_backend": "redis://:pw@backend:6379/1",
        "redis_url": "redis://:pw@store:6379/2",
        "rabbitmq_api_url": "http://u:pw@api:15672/",
        "secret": " s3cr3t with spaces ",
    }
    env = {}
    for name, value in values.items():
        (tmp_path / name).write_text(value + "\n")
        env[f"LUIGI_CELERY_{name.upper()}_FILE"] = str(tmp_path / name)

    # When the settings are loaded
    settings = load_settings(env=env)

    # Then each is the file's content, without the newline
    assert {name: getattr(settings, name) for name in values} == values
    # and a flag still wins over the file
    assert load_settings({"broker_url": "redis://flag/0"}, env=env).broker_url == "redis://flag/0"


def test_a_variable_and_its_file_both_set_is_an_error_naming_both(no_luigi_config: None, tmp_path) -> None:
    # Given the broker URL in the environment and in a file
    (tmp_path / "url").write_text("redis://:from-file@h/0")
    env = {"LUIGI_CELERY_BROKER_URL": "redis://:from-env@h/0", "LUIGI_CELERY_BROKER_URL_FILE": str(tmp_path / "url")}

    # When the settings are loaded / Then neither is chosen silently
    with pytest.raises(ConfigError) as refused:
        load_settings(env=env)
    assert str(refused.value) == (
        "both LUIGI_CELERY_BROKER_URL and LUIGI_CELERY_BROKER_URL_FILE are set: set one of them"
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(None, "No such file or directory", id="missing"),
        pytest.param(b"hunter2\xff\n", "not UTF-8 text", id="not text"),
        pytest.param(b"\n", "names an empty file", id="empty"),
    ],
)
def test_a_secret_file_that_cannot_be_read_is_one_line_naming_the_variable_and_the_path(
    no_luigi_config: None, tmp_path, content: bytes | None, reason: str
) -> None:
    # Given LUIGI_CELERY_SECRET_FILE naming a file that is missing, not text, or empty
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)

    # When the settings are loaded
    with pytest.raises(ConfigError) as refused:
        load_settings(env={"LUIGI_CELERY_SECRET_FILE": str(path)})

    # Then the error names the variable, the path and the reason, in one line, and not the content
    message = str(refused.value)
    assert "LUIGI_CELERY_SECRET_FILE" in message and str(path) in message and reason in message
    assert "\n" not in message and "hunter2" not in message


# --- what is refused ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("connect_timeout", "soon"),
        ("connect_timeout", "0"),
        ("connect_timeout", "-1"),
        ("connect_timeout", "nan"),
        ("lock_ttl", "inf"),
        ("queue", "two words"),
        ("queue", "tab\there"),
        ("metrics_port", "70000"),
        ("metrics_port", "http"),
        ("metrics_address", "localhost"),
        ("metrics_address", "10.0.0.0/8"),
        ("outage_tolerance", "0"),
        ("complete_checks", "0"),
        ("complete_checks", "2.5"),
    ],
)
def test_an_invalid_environment_variable_is_refused_by_name(no_luigi_config: None, name: str, text: str) -> None:
    # Given an invalid LUIGI_CELERY_* value
    env = {"LUIGI_CELERY_" + name.upper(): text}

    # When the settings are loaded / Then a ConfigError names the setting and the value
    with pytest.raises(ConfigError, match=name) as refused:
        load_settings(env=env)
    assert repr(text) in str(refused.value)


@pytest.mark.parametrize(("name", "text"), [("connect_timeout", "never"), ("queue", "a b")])
def test_an_invalid_config_value_is_refused_by_name(
    luigi_config: luigi.configuration.LuigiConfigParser, name: str, text: str
) -> None:
    # Given an invalid value in the [luigi_celery] section
    luigi_config.set(CONFIG_SECTION, name, text)

    # When the settings are loaded / Then a ConfigError names the setting
    with pytest.raises(ConfigError, match=name):
        load_settings(env=NO_ENV)


def test_a_valid_environment_value_hides_an_invalid_config_value(
    luigi_config: luigi.configuration.LuigiConfigParser,
) -> None:
    # Given an invalid queue in the config and a valid one in the environment
    luigi_config.set(CONFIG_SECTION, "queue", "a b")

    # When the settings are loaded
    settings = load_settings(env={"LUIGI_CELERY_QUEUE": "fine"})

    # Then the environment's queue is used and nothing is refused
    assert settings.queue == "fine"


# --- hiding passwords ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:secret@host:6379/0", "redis://:****@host:6379/0"),
        ("amqp://user:secret@host//", "amqp://user:****@host//"),
        ("rediss://user:secret@host:6380/2", "rediss://user:****@host:6380/2"),
    ],
)
def test_redact_hides_the_password(url: str, shown: str) -> None:
    # Given a broker URL with a password
    # When it is redacted
    text = redact(url)

    # Then the password is gone and the rest is still there
    assert "secret" not in text
    assert text == shown


@pytest.mark.parametrize("url", [None, ""])
def test_redact_shows_a_missing_url_as_none(url: str | None) -> None:
    # Given no URL / When it is redacted / Then it reads <none>
    assert redact(url) == "<none>"


def test_redact_leaves_a_url_without_a_password_readable() -> None:
    # Given a URL without a password / When it is redacted / Then host and path are still there
    assert "host:5672" in redact("amqp://guest@host:5672//")


def test_redact_hides_every_password_of_a_failover_list() -> None:
    # Given a failover list of two brokers, as Celery accepts in broker_url
    url = "amqp://user:secret@host1//;amqp://user:secret@host2//"

    # When it is redacted / Then no password is shown
    assert "secret" not in redact(url)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("sentinel://:secret@h1:26379;sentinel://:secret@h2:26379", id="sentinel list"),
        pytest.param("redis://:secret@host:port/0", id="bad port"),
    ],
)
def test_redact_never_raises(url: str) -> None:
    # Given a broker URL kombu's parser cannot take apart
    # When it is redacted (as in an error message about that very URL)
    text = redact(url)

    # Then it comes back without the password, and without raising
    assert "secret" not in text


def test_the_repr_of_the_settings_never_shows_a_password() -> None:
    # Given settings with passwords in the broker and the result backend URLs
    settings = Settings(broker_url="redis://:hunter2@host:6379/0", result_backend="amqp://user:hunter2@host//")

    # When they are shown (in a log line, a traceback, a debugger)
    text = repr(settings)

    # Then neither password appears, but the hosts do
    assert "hunter2" not in text
    assert "redis://:****@host:6379/0" in text
    assert "amqp://user:****@host//" in text
    assert str(settings) == text


def test_the_repr_of_the_settings_hides_the_message_secret() -> None:
    assert "s3cr3t" not in repr(Settings(secret="s3cr3t"))
    assert "secret='****'" in repr(Settings(secret="s3cr3t"))


def test_the_repr_of_embedded_settings_shows_no_broker() -> None:
    # Given the default (embedded) settings / When they are shown / Then the broker reads None
    assert "broker_url=None" in repr(Settings())


def test_the_repr_of_the_settings_hides_a_password_in_the_transport_options() -> None:
    # Given Redis Sentinel settings whose password is a transport option, as Celery documents it
    settings = Settings(
        broker_url="sentinel://h1:26379",
        broker_transport_options={"master_name": "main", "sentinel_kwargs": {"password": "hunter2"}},
    )

    # When they are shown / Then the password does not appear
    assert "hunter2" not in repr(settings)


# --- the object itself ----------------------------------------------------------------


def test_settings_with_a_broker_url_are_not_embedded() -> None:
    # Given settings with and without a broker URL / Then only the latter are embedded
    assert Settings().embedded is True
    assert Settings(broker_url="redis://host:6379/0").embedded is False


def test_settings_are_frozen_and_replace_makes_a_changed_copy() -> None:
    # Given settings
    settings = Settings(queue="a")

    # When one is replaced
    changed = settings.replace(queue="b")

    # Then the copy has the new value and the original is untouched and cannot be changed
    assert changed.queue == "b"
    assert settings.queue == "a"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.queue = "c"  # type: ignore[misc]
