"""The exceptions luigi-celery raises.

Everything derives from :class:`LuigiCeleryError`, so a caller can catch one
type.  Errors from kombu, redis or Celery are wrapped at the boundary
(``raise ... from e``): users never have to catch a kombu type.  Two are not
errors of luigi-celery's, and so not LuigiCeleryErrors: :class:`LuigiTaskFailed`
is for Celery's record of a task, and :class:`Interrupted` is a stop, not an error.
"""

from __future__ import annotations

import signal


class LuigiCeleryError(Exception):
    """Root of every error luigi-celery raises."""


class ConfigError(LuigiCeleryError):
    """A setting, flag or per-task option is missing or invalid."""


class BrokerUnavailable(LuigiCeleryError):
    """The broker could not be reached (the URL in the message has its password hidden)."""


class MessageError(LuigiCeleryError):
    """A message on the broker is not a valid luigi-celery message."""


class RefusedCompression(MessageError):
    """A compressed message: luigi-celery never compresses, and does not inflate what it did not send."""


class DispatchRefused(LuigiCeleryError):
    """A Luigi task cannot travel to a remote worker (it could not be rebuilt there).

    Raised before anything is sent; the message names the task and the reason.
    """


class TaskNotAllowed(LuigiCeleryError):
    """A message asks a worker to run a task from a module outside its allowlist."""


class RunAlreadyActive(LuigiCeleryError):
    """Another live dispatcher is running the same pipeline (same root task and queue)."""


class LuigiTaskFailed(Exception):
    """Raised after a FAILED reply has gone to the dispatcher, so that Celery, and
    Flower with it, record a task Luigi calls FAILED as a FAILURE, with Luigi's
    explanation. The dispatcher never sees it: it reads the reply."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM on the dispatcher (a BaseException, like KeyboardInterrupt, so
    nothing on the way catches it as an ordinary error)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum
