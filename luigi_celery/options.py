"""Per-task options: how a Luigi task class asks to be run on Celery.

Options are attributes on the task class (``celery_queue = "gpu"``) or keys in
the luigi config section ``[luigi_celery.task.FamilyName]``; the class
attribute wins.  They are read here and nowhere else, and an unknown
``celery_*`` name is an error that names the valid ones.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import luigi

from luigi_celery.errors import ConfigError
from luigi_celery.ratelimit import Rate
from luigi_celery.retry import DEFAULT_BACKOFF, DEFAULT_BACKOFF_MAX, RetryPolicy
from luigi_celery.settings import non_negative_int, positive_number, queue_name

CONFIG_SECTION_PREFIX = "luigi_celery.task."


def _priority(value: Any) -> int:
    # int("7") from the config, 7 from the class; never a bool, never a truncated 3.7
    if isinstance(value, bool) or not isinstance(value, int | str) or not 0 <= int(value) <= 9:
        raise ValueError("must be an integer from 0 to 9")
    return int(value)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty name")
    return value.strip()


def _rate(value: Any) -> str:
    Rate.parse(value)  # raises ValueError naming the form
    return str(value)


def _exception_types(value: Any) -> tuple[type[BaseException], ...]:
    """A tuple of exception classes, or (from the config) their dotted names, comma-separated."""
    if isinstance(value, type):
        value = (value,)
    if isinstance(value, str):
        value = tuple(_import_exception(name.strip()) for name in value.split(",") if name.strip())
    if not value or not all(isinstance(t, type) and issubclass(t, BaseException) for t in value):
        raise ValueError("must be exception classes (in the config: dotted names, comma-separated)")
    return tuple(value)


def _import_exception(dotted: str) -> type[BaseException]:
    module, _, name = dotted.rpartition(".")
    try:
        found = getattr(importlib.import_module(module or "builtins"), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {dotted!r}") from e
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise ValueError(f"{dotted!r} is not an exception class")
    return found


# option name -> parser (accepts the class attribute's value or the config's string); the
# checks an option shares with a setting are settings.py's
OPTIONS: dict[str, Callable[[Any], Any]] = {
    "celery_queue": queue_name,
    "celery_priority": _priority,
    "rate_limit": _rate,
    "rate_limit_burst": non_negative_int,
    "rate_limit_key": _name,
    "max_retries": non_negative_int,
    "retry_backoff": positive_number,
    "retry_backoff_max": positive_number,
    "retry_on": _exception_types,
}


@dataclass(frozen=True)
class TaskOptions:
    """The options of one task family, resolved."""

    queue: str | None = None
    priority: int | None = None
    # The global start rate, and the budget it counts against (the family unless shared).
    rate: Rate | None = None
    rate_key: str = ""
    retry: RetryPolicy | None = None


def _config_values(family: str) -> dict[str, str]:
    config = luigi.configuration.get_config()
    section = CONFIG_SECTION_PREFIX + family
    if not config.has_section(section):
        return {}
    return dict(config.items(section))


def _check_known(names: set[str], where: str, every_name: bool = False) -> None:
    # A class has many attributes, so only celery_* names are ours there; a config section is all ours.
    unknown = sorted(n for n in names if (every_name or n.startswith("celery_")) and n not in OPTIONS)
    if unknown:
        raise ConfigError(
            f"unknown option {', '.join(unknown)} on {where}; valid options: {', '.join(sorted(OPTIONS))}"
        )


@functools.cache
def task_options(task_cls: type[luigi.Task]) -> TaskOptions:
    """Resolve the options of ``task_cls`` (cached: classes do not change during a run)."""
    family = task_cls.get_task_family()
    _check_known({n for n in dir(task_cls)}, f"task class {family}")
    from_config = _config_values(family)
    _check_known(set(from_config), f"[{CONFIG_SECTION_PREFIX}{family}]", every_name=True)

    values: dict[str, Any] = {}
    for name, parse in OPTIONS.items():
        raw = getattr(task_cls, name, None)
        source = f"{family}.{name}"
        if raw is None and name in from_config:
            raw, source = from_config[name], f"[{CONFIG_SECTION_PREFIX}{family}] {name}"
        if raw is None:
            continue
        try:
            values[name] = parse(raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid {source} = {raw!r}: {e}") from e
    return _resolve(family, values)


def _resolve(family: str, values: dict[str, Any]) -> TaskOptions:
    rate = None
    if "rate_limit" in values:
        rate = Rate.parse(values["rate_limit"], values.get("rate_limit_burst", 0))
    elif "rate_limit_burst" in values or "rate_limit_key" in values:
        raise ConfigError(f"{family} sets rate_limit_burst or rate_limit_key without rate_limit")
    retry = None
    if values.get("max_retries"):
        retry = RetryPolicy(
            max_retries=values["max_retries"],
            backoff=values.get("retry_backoff", DEFAULT_BACKOFF),
            backoff_max=values.get("retry_backoff_max", DEFAULT_BACKOFF_MAX),
            retry_on=values.get("retry_on", (Exception,)),
        )
    return TaskOptions(
        queue=values.get("celery_queue"),
        priority=values.get("celery_priority"),
        rate=rate,
        rate_key=values.get("rate_limit_key", family) if rate else "",
        retry=retry,
    )
