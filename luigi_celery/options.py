"""Per-task options: how a Luigi task class asks to be run on Celery.

Options are attributes on the task class (``celery_queue = "gpu"``) or keys in
the luigi config section ``[luigi_celery.task.FamilyName]``; the class
attribute wins.  They are read here and nowhere else, and an unknown
``celery_*`` name is an error that names the valid ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import luigi

from luigi_celery.errors import ConfigError

CONFIG_SECTION_PREFIX = "luigi_celery.task."


def _queue(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError("must be a non-empty queue name without spaces")
    return value


def _priority(value: Any) -> int:
    # int("7") from the config, 7 from the class; never a bool, never a truncated 3.7
    if isinstance(value, bool) or not isinstance(value, int | str) or not 0 <= int(value) <= 9:
        raise ValueError("must be an integer from 0 to 9")
    return int(value)


# option name -> parser (accepts the class attribute's value or the config's string)
OPTIONS: dict[str, Callable[[Any], Any]] = {
    "celery_queue": _queue,
    "celery_priority": _priority,
}


@dataclass(frozen=True)
class TaskOptions:
    """The options of one task family, resolved."""

    queue: str | None = None
    priority: int | None = None


def _config_values(family: str) -> dict[str, str]:
    config = luigi.configuration.get_config()
    section = CONFIG_SECTION_PREFIX + family
    if not config.has_section(section):
        return {}
    return dict(config.items(section))


def _check_known(names: set[str], where: str) -> None:
    unknown = sorted(n for n in names if n.startswith("celery_") and n not in OPTIONS)
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
    _check_known({n for n in from_config if n.startswith("celery_")}, f"[{CONFIG_SECTION_PREFIX}{family}]")

    values: dict[str, Any] = {}
    for name, parse in OPTIONS.items():
        raw = getattr(task_cls, name, None)
        source = f"{family}.{name}"
        if raw is None and name in from_config:
            raw, source = from_config[name], f"[{CONFIG_SECTION_PREFIX}{family}] {name}"
        if raw is None:
            continue
        try:
            values[name.removeprefix("celery_")] = parse(raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid {source} = {raw!r}: {e}") from e
    return TaskOptions(**values)
