"""The moments of a task's trip, for the policies that act on them (dramatiq's middleware, in small).

A policy (rate limits, retries, metrics) subclasses :class:`DispatchHook` (the
dispatcher's side) or :class:`RunHook` (a worker's) and overrides the moments it
needs; the others do nothing. Every hook is called at each moment, in the order
it was given. ``before_publish``, ``before_run`` and ``on_run_error`` may hold a
task back; the other moments only observe, and a hook that fails there is
logged, never allowed to break a task or a run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from luigi_celery.message import TaskMessage
    from luigi_celery.monitor import Tracked
    from luigi_celery.options import TaskOptions

logger = logging.getLogger(__name__)


class DispatchHook:
    """No-op moments; a policy overrides some."""

    def before_publish(self, tracked: Tracked) -> float:
        """Before a task's first attempt goes out: return how many seconds to hold it (0: now).

        May change ``tracked.msg`` (what the message carries). Raising
        :class:`~luigi_celery.errors.LuigiCeleryError` fails the task with its text.
        """
        return 0.0

    def published(self, tracked: Tracked) -> None:
        """An attempt of ``tracked`` has gone to the broker."""

    def answered(self, family: str, queue: str, status: str) -> None:
        """The run knows how a task ended: its reply came, or the dispatcher failed it itself."""


def hold_for(hooks: Sequence[DispatchHook], tracked: Tracked) -> float:
    """The longest hold any hook asks for ``tracked``."""
    return max((hook.before_publish(tracked) for hook in hooks), default=0.0)


def tell_published(hooks: Sequence[DispatchHook], tracked: Tracked) -> None:
    for hook in hooks:
        try:
            hook.published(tracked)
        except Exception:
            logger.exception("%s failed on a published task", type(hook).__name__)


def tell_answered(hooks: Sequence[DispatchHook], family: str, queue: str, status: str) -> None:
    for hook in hooks:
        try:
            hook.answered(family, queue, status)
        except Exception:
            logger.exception("%s failed on an answer", type(hook).__name__)


@dataclass
class Run:
    """One delivery of a task on a worker, as the hooks see it."""

    msg: TaskMessage
    queue: str | None  # the queue it came from
    options: TaskOptions | None = None  # its family's options, once the task is rebuilt


@dataclass(frozen=True)
class Hold:
    """Send the task back to the broker, as ``msg``, to start in ``seconds`` (a countdown, not a sleep)."""

    seconds: float
    msg: TaskMessage
    why: str  # "rate" (its rate-limit slot) or "retry" (a retry's backoff)
    text: str = ""  # what the task's status message says meanwhile (none when empty)


class RunHook:
    """No-op moments of one delivery on a worker; a policy overrides some."""

    def received(self, run: Run) -> None:
        """The task reached a worker (before anything is checked)."""

    def before_run(self, run: Run) -> Hold | None:
        """About to take the run lock and run: a Hold sends it back instead."""
        return None

    def on_run_error(self, run: Run, error: BaseException) -> Hold | None:
        """``run()`` raised an error worth another attempt: the Hold that attempt comes with."""
        return None

    def held(self, run: Run, hold: Hold) -> None:
        """The task goes back to the broker with ``hold``."""

    def finished(self, run: Run, outcome: str, began: float | None) -> None:
        """The delivery ended: a Luigi status, ``retry``, ``duplicate`` or ``dropped``; ``began`` is
        when it started to run (the monotonic clock), None when it did not run."""


def first_hold(holds: Sequence[Hold | None]) -> Hold | None:
    return next((hold for hold in holds if hold is not None), None)


def tell(hooks: Sequence[RunHook], moment: str, *args: object) -> None:
    """Call ``moment`` on every hook; one that fails is logged and the others go on."""
    for hook in hooks:
        try:
            getattr(hook, moment)(*args)
        except Exception:
            logger.exception("%s failed at %s", type(hook).__name__, moment)
