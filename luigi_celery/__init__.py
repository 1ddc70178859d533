"""luigi-celery: run unmodified Luigi pipelines on an elastic pool of Celery workers."""

from luigi_celery.errors import (
    BrokerUnavailable,
    ConfigError,
    DispatchRefused,
    LuigiCeleryError,
    MessageError,
    TaskNotAllowed,
)
from luigi_celery.settings import Settings, load_settings

__version__ = "0.1.0"

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "DispatchRefused",
    "LuigiCeleryError",
    "MessageError",
    "Settings",
    "TaskNotAllowed",
    "load_settings",
]
