"""The moments of a task's trip through the dispatcher, for the policies that act on them.

A policy (rate limits, metrics, ...) subclasses :class:`DispatchHook` and
overrides the moments it needs; the others do nothing. The sender calls every
hook at each moment, in the order run.py gave them. ``before_publish`` may hold
a task back or refuse it; the other moments only observe, and a hook that fails
there is logged, never allowed to break a run (dramatiq's middleware, in small).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from luigi_celery.monitor import Tracked

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
