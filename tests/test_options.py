"""Unit tests for luigi_celery.options: per-task options from the class and the luigi config."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import luigi
import luigi.configuration
import pytest

from luigi_celery.errors import ConfigError
from luigi_celery.options import CONFIG_SECTION_PREFIX, TaskOptions, task_options

VALID_OPTIONS = "valid options: celery_priority, celery_queue"


class OptionsTask(luigi.Task):
    """Base of this module's tasks: their own namespace keeps them apart in Luigi's registry."""

    task_namespace = "test_options"


class NoOptions(OptionsTask):
    pass


class QueueAndPriority(OptionsTask):
    celery_queue = "gpu"
    celery_priority = 7


class PriorityZero(OptionsTask):
    celery_priority = 0


class InheritsQueue(QueueAndPriority):
    pass


class OnlyInConfig(OptionsTask):
    pass


class ClassAndConfig(OptionsTask):
    celery_queue = "gpu"


class MisspelledOption(OptionsTask):
    celery_queues = "gpu"


class InheritsMisspelling(MisspelledOption):
    pass


class BadConfig(OptionsTask):
    pass


@pytest.fixture
def set_task_config() -> Iterator[Callable[..., None]]:
    """Write a [luigi_celery.task.<family>] section; removed afterwards."""
    config = luigi.configuration.get_config()
    added: list[str] = []

    def set_config(task_cls: type[luigi.Task], **options: str) -> None:
        section = CONFIG_SECTION_PREFIX + task_cls.get_task_family()
        assert not config.has_section(section), f"{section} already exists"
        config.add_section(section)
        added.append(section)
        for name, value in options.items():
            config.set(section, name, value)

    try:
        yield set_config
    finally:
        for section in added:
            config.remove_section(section)


@pytest.fixture(autouse=True)
def fresh_options_cache() -> Iterator[None]:
    """task_options is cached per class: start and end every test with an empty cache."""
    task_options.cache_clear()
    yield
    task_options.cache_clear()


def test_a_task_without_options_gets_none() -> None:
    # Given a task class that sets no celery_* option, and no config for it
    # When its options are resolved / Then it has neither queue nor priority
    assert task_options(NoOptions) == TaskOptions(queue=None, priority=None)


def test_options_are_read_from_the_task_class() -> None:
    # Given a task class with celery_queue and celery_priority
    # When its options are resolved
    options = task_options(QueueAndPriority)

    # Then both are taken from the class
    assert options == TaskOptions(queue="gpu", priority=7)


def test_a_priority_of_zero_is_kept() -> None:
    # Given a task class asking for priority 0 (a falsy value)
    # When its options are resolved / Then priority is 0, not "unset"
    assert task_options(PriorityZero).priority == 0


def test_options_are_inherited_from_a_base_task_class() -> None:
    # Given a task class whose base class sets the options
    # When its options are resolved / Then it has its base's options
    assert task_options(InheritsQueue) == TaskOptions(queue="gpu", priority=7)


def test_options_are_read_from_the_luigi_config(set_task_config: Callable[..., None]) -> None:
    # Given a [luigi_celery.task.<family>] section
    set_task_config(OnlyInConfig, celery_queue="io", celery_priority="3")

    # When the options are resolved
    options = task_options(OnlyInConfig)

    # Then they come from the config, the priority parsed to an int
    assert options == TaskOptions(queue="io", priority=3)


def test_the_class_attribute_wins_over_the_luigi_config(set_task_config: Callable[..., None]) -> None:
    # Given a queue on the class and another in the config, and a priority only in the config
    set_task_config(ClassAndConfig, celery_queue="cpu", celery_priority="2")

    # When the options are resolved
    options = task_options(ClassAndConfig)

    # Then the class's queue wins and the config's priority fills in
    assert options == TaskOptions(queue="gpu", priority=2)


def test_options_are_resolved_once_per_class() -> None:
    # Given a task class whose options were resolved
    first = task_options(QueueAndPriority)

    # When they are asked for again / Then the same answer comes back (cached)
    assert task_options(QueueAndPriority) is first


def test_an_unknown_option_on_the_class_is_refused_naming_the_valid_ones() -> None:
    # Given a task class with a misspelled celery_* attribute
    # When its options are resolved / Then a ConfigError names the bad option, the class and the valid ones
    with pytest.raises(ConfigError) as refused:
        task_options(MisspelledOption)
    assert "celery_queues" in str(refused.value)
    assert "test_options.MisspelledOption" in str(refused.value)
    assert VALID_OPTIONS in str(refused.value)


def test_an_unknown_option_inherited_from_a_base_class_is_refused() -> None:
    # Given a task class whose base class has a misspelled celery_* attribute
    # When its options are resolved / Then a ConfigError names the bad option
    with pytest.raises(ConfigError, match="celery_queues"):
        task_options(InheritsMisspelling)


def test_an_unknown_option_in_the_config_is_refused_naming_the_valid_ones(
    set_task_config: Callable[..., None],
) -> None:
    # Given a config section with an unknown celery_* key
    set_task_config(BadConfig, celery_retries="3")

    # When the options are resolved / Then a ConfigError names the bad key, the section and the valid ones
    with pytest.raises(ConfigError) as refused:
        task_options(BadConfig)
    assert "celery_retries" in str(refused.value)
    assert "[luigi_celery.task.test_options.BadConfig]" in str(refused.value)
    assert VALID_OPTIONS in str(refused.value)


def _task_class(request: pytest.FixtureRequest, **attributes: Any) -> type[luigi.Task]:
    """A task class made for one test, named after it, so no two tests share a family."""
    name = re.sub(r"\W", "_", request.node.name)
    return type(name, (OptionsTask,), {"__module__": __name__, **attributes})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("celery_priority", 12, id="priority 12"),
        pytest.param("celery_priority", -1, id="priority -1"),
        pytest.param("celery_priority", True, id="priority True"),
        pytest.param("celery_priority", "high", id="priority high"),
        pytest.param("celery_priority", [1], id="priority list"),
        pytest.param("celery_queue", "a b", id="queue with a space"),
        pytest.param("celery_queue", "", id="empty queue"),
        pytest.param("celery_queue", 5, id="queue not a string"),
        pytest.param("celery_queue", ["gpu"], id="queue in a list"),
    ],
)
def test_an_invalid_option_on_the_class_is_refused(request: pytest.FixtureRequest, name: str, value: Any) -> None:
    # Given a task class with an invalid option value
    task_cls = _task_class(request, **{name: value})

    # When its options are resolved / Then a ConfigError names the option and the value
    with pytest.raises(ConfigError, match=name) as refused:
        task_options(task_cls)
    assert repr(value) in str(refused.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        pytest.param("celery_priority", "12", id="priority 12"),
        pytest.param("celery_priority", "high", id="priority high"),
        pytest.param("celery_priority", "2.5", id="priority 2.5"),
        pytest.param("celery_queue", "a b", id="queue with a space"),
    ],
)
def test_an_invalid_option_in_the_config_is_refused(
    request: pytest.FixtureRequest, set_task_config: Callable[..., None], name: str, text: str
) -> None:
    # Given a config section with an invalid option value
    task_cls = _task_class(request)
    set_task_config(task_cls, **{name: text})

    # When the options are resolved / Then a ConfigError names the section, the option and the value
    with pytest.raises(ConfigError, match=name) as refused:
        task_options(task_cls)
    assert CONFIG_SECTION_PREFIX in str(refused.value)
    assert repr(text) in str(refused.value)


def test_a_fractional_priority_on_the_class_is_refused(request: pytest.FixtureRequest) -> None:
    # Given a task class with a fractional priority
    task_cls = _task_class(request, celery_priority=3.7)

    # When its options are resolved / Then it is refused rather than rounded down
    with pytest.raises(ConfigError, match="celery_priority"):
        task_options(task_cls)


# --- rate limits and retries ---------------------------------------------------------


def test_rate_limit_and_retry_options_from_the_class(request: pytest.FixtureRequest) -> None:
    from luigi_celery.ratelimit import Rate
    from luigi_celery.retry import RetryPolicy

    task_cls = _task_class(
        request, rate_limit="20/s", rate_limit_burst=2, rate_limit_key="api", max_retries=3,
        retry_backoff=0.5, retry_backoff_max=4, retry_on=(ConnectionError, TimeoutError),
    )  # fmt: skip
    options = task_options(task_cls)
    assert options.rate == Rate(20, 1.0, 2) and options.rate_key == "api"
    assert options.retry == RetryPolicy(3, 0.5, 4.0, (ConnectionError, TimeoutError))


def test_a_rate_limit_without_a_key_counts_against_its_family(request: pytest.FixtureRequest) -> None:
    task_cls = _task_class(request, rate_limit="600/m")
    assert task_options(task_cls).rate_key == task_cls.get_task_family()


def test_retry_options_from_the_config_import_the_exception_names(
    request: pytest.FixtureRequest, set_task_config
) -> None:
    task_cls = _task_class(request)
    set_task_config(task_cls, max_retries="2", retry_on="builtins.ConnectionError, socket.timeout")
    retry = task_options(task_cls).retry
    assert retry is not None and retry.retry_on == (ConnectionError, socket.timeout)


@pytest.mark.parametrize(
    "attributes, words",
    [
        ({"rate_limit": "20 per second"}, "not a rate"),
        ({"rate_limit": "20/s", "rate_limit_burst": -1}, "rate_limit_burst"),
        ({"rate_limit_key": "api"}, "without rate_limit"),
        ({"max_retries": 2, "retry_on": ValueError("not a class")}, "retry_on"),
        ({"max_retries": 2, "retry_backoff": 0}, "retry_backoff"),
    ],
)
def test_bad_rate_or_retry_options_are_refused(request: pytest.FixtureRequest, attributes, words) -> None:
    task_cls = _task_class(request, **attributes)
    with pytest.raises(ConfigError, match=words):
        task_options(task_cls)


def test_an_unknown_key_in_the_config_section_is_refused(request: pytest.FixtureRequest, set_task_config) -> None:
    task_cls = _task_class(request)
    set_task_config(task_cls, rate_limt="20/s")
    with pytest.raises(ConfigError, match="rate_limt"):
        task_options(task_cls)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("retry_backoff", float("nan"), id="backoff nan"),
        pytest.param("retry_backoff_max", float("inf"), id="backoff max inf"),
        pytest.param("retry_backoff", True, id="backoff True"),
        pytest.param("max_retries", 2.5, id="retries 2.5"),
        pytest.param("rate_limit_burst", "2.5", id="burst '2.5'"),
    ],
)
def test_a_retry_or_burst_option_is_checked_as_a_setting_is(
    request: pytest.FixtureRequest, name: str, value: Any
) -> None:
    # Given a number a setting would refuse (not finite, a bool, or not whole)
    task_cls = _task_class(request, **{"rate_limit": "1/s", "max_retries": 1, name: value})

    # When the options are resolved / Then it is refused in the words settings.py uses
    with pytest.raises(ConfigError, match=f"{name} = .*: must be a"):
        task_options(task_cls)
