"""luigi-celery's settings: one frozen object, built once.

Precedence, highest first: command-line flags, environment variables
``LUIGI_CELERY_*``, the luigi config section ``[luigi_celery]``, defaults.

A setting that may hold a password (:data:`SECRET_SETTINGS`) can also come from
a file named by ``LUIGI_CELERY_<NAME>_FILE``, as Docker and Kubernetes mount
secrets: a command line is visible to every user of the machine (``ps``), a
process's environment and a file of mode 0600 are not.  Setting both the
variable and its ``_FILE`` is an error, rather than a silent choice between two
passwords.
Nothing is read at import time; :func:`load_settings` is called by the CLI
(or by ``luigi_celery.app`` when Celery asks for its module-level app).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from luigi_celery.errors import ConfigError
from luigi_celery.redaction import redact

ENV_PREFIX = "LUIGI_CELERY_"
CONFIG_SECTION = "luigi_celery"

DEFAULT_QUEUE = "luigi"
# How long `luigi-celery run` and `check` try to reach the broker before giving up.
DEFAULT_CONNECT_TIMEOUT = 10.0
# A hard time limit is this much longer than the soft one (Luigi's worker_timeout),
# so the task gets a chance to report "timed out" itself before it is killed.
HARD_TIME_LIMIT_GRACE = 10.0
# How often the embedded worker polls its folder for messages.
EMBEDDED_POLLING_INTERVAL = 0.01
# A task's run lock expires this long after its worker's last heartbeat; the
# dispatcher publishes the task again soon after (so: "within about a minute").
DEFAULT_LOCK_TTL = 30.0
# A task no worker has started after this long fails, if no worker consumes its queue.
DEFAULT_QUEUE_TIMEOUT = 300.0
# The dispatcher rides out a broker outage this long (reconnecting, retrying to publish)
# before it fails the tasks in flight with the reason.
DEFAULT_OUTAGE_TOLERANCE = 60.0
# At the end of a run the dispatcher waits at most this long for Prometheus to scrape its final numbers.
DEFAULT_METRICS_FINAL_WAIT = 60.0
# Metrics are served to this machine only unless told otherwise (the container image says 0.0.0.0).
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
# Redis hands an unacknowledged message to another worker after this long; it
# must exceed the longest task (a dead worker's task is recovered through its
# run lock well before).
DEFAULT_VISIBILITY_TIMEOUT = 12 * 3600.0


_SECRET_KEYS = ("password", "secret", "token")


def _redact_options(value: Any) -> Any:
    """``value`` with any nested key that names a secret masked."""
    if isinstance(value, Mapping):
        return {
            k: "****" if any(s in str(k).lower() for s in _SECRET_KEYS) else _redact_options(v)
            for k, v in value.items()
        }
    return value


@dataclass(frozen=True)
class Settings:
    """Everything luigi-celery needs to know, in one place.

    ``broker_url`` None means the embedded default: a ``filesystem://``
    broker in ``embedded_dir`` and a worker process started by the dispatcher.
    """

    broker_url: str | None = None
    # Coordination store (run locks); defaults to the broker when it is Redis.
    redis_url: str | None = None
    # Optional Celery result backend, for other tools (Flower, inspection); the
    # dispatcher reads results from its own reply queue and never needs it.
    result_backend: str | None = None
    # Modules a worker may import tasks from (the allowlist).
    task_modules: tuple[str, ...] = ()
    # The Celery queue tasks go to unless a task says `celery_queue`.
    queue: str = DEFAULT_QUEUE
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    lock_ttl: float = DEFAULT_LOCK_TTL
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT
    outage_tolerance: float = DEFAULT_OUTAGE_TOLERANCE
    # complete() checks run at once (threads) while Luigi resolves the DAG; 1 is Luigi's one at a time.
    complete_checks: int = 1
    # RabbitMQ's management API, for the unacknowledged part of the queue depth
    # (default: http://<broker user>:<password>@<broker host>:15672/).
    rabbitmq_api_url: str | None = None
    # Serve Prometheus metrics on this port (`run`: the dispatcher's; `worker`: the worker's).
    metrics_port: int | None = None
    # ... on this address: 127.0.0.1 (this machine only), or 0.0.0.0 for every interface.
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    # At the end of a run, wait at most this long for one more scrape (0: don't wait).
    metrics_final_wait: float = DEFAULT_METRICS_FINAL_WAIT
    # Where the embedded broker keeps its messages (a fresh temporary folder when None).
    embedded_dir: str | None = None
    broker_transport_options: Mapping[str, Any] = field(default_factory=dict)
    # A secret shared by dispatchers and workers: when set, every task message and reply
    # carries an HMAC of it, and what does not verify is refused.
    secret: str | None = None

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["broker_url"] = redact(self.broker_url) if self.broker_url else None
        shown["result_backend"] = redact(self.result_backend) if self.result_backend else None
        shown["redis_url"] = redact(self.redis_url) if self.redis_url else None
        shown["rabbitmq_api_url"] = redact(self.rabbitmq_api_url) if self.rabbitmq_api_url else None
        shown["broker_transport_options"] = _redact_options(self.broker_transport_options)
        shown["secret"] = "****" if self.secret else None
        inner = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"Settings({inner})"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# name -> parser from a string (env var or luigi config value)
def _modules(value: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in value.split(",") if m.strip())


# The validators below serve flags, environment variables, the luigi config and per-task
# options (options.py), so they take a task class's attribute (a number, never a bool) as well
# as text. Their ValueError says what is wanted ("must be ..."); the caller, who knows where
# the value came from, shows it.
def _number(value: str | float, fits: Callable[[float], bool], wanted: str) -> float:
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and fits(number)):
        raise ValueError(f"must be {wanted}")
    return number


def _whole_number(value: str | int, fits: Callable[[int], bool], wanted: str) -> int:
    try:
        # (never a truncated 3.7, nor True)
        number = int(value) if isinstance(value, str | int) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not fits(number):
        raise ValueError(f"must be {wanted}")
    return number


def positive_number(value: str | float) -> float:
    """A finite number above 0 (seconds, mostly)."""
    return _number(value, lambda n: n > 0, "a positive number")


def non_negative_number(value: str | float) -> float:
    """A finite number, 0 or more (a wait that may be switched off)."""
    return _number(value, lambda n: n >= 0, "a number, 0 or more")


def positive_int(value: str | int) -> int:
    """A whole number above 0."""
    return _whole_number(value, lambda n: n > 0, "a positive whole number")


def non_negative_int(value: str | int) -> int:
    """A whole number, 0 or more (a count that may be none)."""
    return _whole_number(value, lambda n: n >= 0, "a whole number, 0 or more")


def port_number(value: str | int) -> int:
    """A TCP port."""
    return _whole_number(value, lambda n: 0 < n < 65536, "a port number from 1 to 65535")


def listen_address(value: str) -> str:
    """An IP address to listen on (IPv4 or IPv6)."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError("must be an IP address such as 127.0.0.1 or 0.0.0.0") from None


def queue_name(value: object) -> str:
    """A Celery queue name: a string, not empty, without spaces."""
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError("must be a name without spaces")
    return value


# The settings that may hold a password: hidden when shown, and readable from a file (LUIGI_CELERY_<NAME>_FILE).
SECRET_SETTINGS = ("broker_url", "result_backend", "redis_url", "rabbitmq_api_url", "secret")

_PARSERS: dict[str, Callable[[str], Any]] = {
    "broker_url": str,
    "redis_url": str,
    "result_backend": str,
    "task_modules": _modules,
    "queue": queue_name,
    "connect_timeout": positive_number,
    "lock_ttl": positive_number,
    "queue_timeout": positive_number,
    "visibility_timeout": positive_number,
    "outage_tolerance": positive_number,
    "complete_checks": positive_int,
    "metrics_port": port_number,
    "metrics_address": listen_address,
    "metrics_final_wait": non_negative_number,
    "rabbitmq_api_url": str,
    "embedded_dir": str,
    "secret": str,
}


def _from_luigi_config() -> dict[str, str]:
    import luigi.configuration

    config = luigi.configuration.get_config()
    if not config.has_section(CONFIG_SECTION):
        return {}
    return {name: config.get(CONFIG_SECTION, name) for name in _PARSERS if config.has_option(CONFIG_SECTION, name)}


def _read_secret_file(variable: str, path: str) -> str:
    """The content of the file ``variable`` names, without its trailing newline; an error
    names the variable and the path, never the content."""
    try:
        with open(path, encoding="utf-8") as file:
            value = file.read().rstrip("\r\n")
    except OSError as e:
        raise ConfigError(f"cannot read {variable} {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read {variable} {path}: not UTF-8 text") from e
    if not value:
        raise ConfigError(f"{variable} names an empty file: {path}")
    return value


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    values = {}
    for name in _PARSERS:
        key = ENV_PREFIX + name.upper()
        file_key = key + "_FILE"
        if name in SECRET_SETTINGS and env.get(file_key):
            if env.get(key):
                raise ConfigError(f"both {key} and {file_key} are set: set one of them")
            values[name] = _read_secret_file(file_key, env[file_key])
        elif env.get(key):
            values[name] = env[key]
    return values


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    use_luigi_config: bool = True,
) -> Settings:
    """Build the settings from flags (``overrides``), env, luigi config and defaults.

    ``overrides`` holds already-typed values (from argparse); None values are
    ignored so an absent flag does not hide the environment.
    """
    env = os.environ if env is None else env
    raw: dict[str, str] = {}
    if use_luigi_config:
        raw.update(_from_luigi_config())
    raw.update(_from_env(env))

    values: dict[str, Any] = {}
    for name, text in raw.items():
        try:
            values[name] = _PARSERS[name](text)
        except ValueError as e:
            raise ConfigError(f"invalid {name}: {e}, got {text!r}") from e
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    return Settings(**values)
