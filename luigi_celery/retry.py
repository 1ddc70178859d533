"""Retries with exponential backoff and full jitter, before Luigi hears of a failure.

A task class asks for them with ``max_retries`` (and ``retry_backoff``,
``retry_backoff_max``, ``retry_on``).  When ``run()`` raises one of the
``retry_on`` exceptions and retries remain, the worker does not report a
failure: it re-queues the task with a countdown of :func:`backoff_delay`
seconds (a Celery retry, so no pool process waits) and tells the dispatcher,
which shows "retry k/n in X s: <error>" as the task's status message.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

from luigi_celery.hooks import Hold, Run, RunHook

DEFAULT_BACKOFF = 1.0
DEFAULT_BACKOFF_MAX = 60.0


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``retry`` (1 for the first): full jitter.

    Uniform between 0 and ``min(cap, base * 2 ** (retry - 1))``: the expected
    wait doubles with each retry, and many tasks failing together spread out
    instead of retrying in lockstep.
    """
    if retry < 1:
        raise ValueError(f"retry numbers start at 1, got {retry}")
    ceiling = min(cap, base * 2 ** (retry - 1))
    return (rng or random).uniform(0, ceiling)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    backoff: float = DEFAULT_BACKOFF
    backoff_max: float = DEFAULT_BACKOFF_MAX
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def should_retry(self, error: BaseException, retries_done: int) -> bool:
        return retries_done < self.max_retries and isinstance(error, self.retry_on)

    def delay(self, retry: int) -> float:
        return backoff_delay(retry, self.backoff, self.backoff_max)


class Retries(RunHook):
    """Another attempt after a retryable error: the task goes back with its backoff as a countdown.

    Whether an error is worth it is the task's :class:`RetryPolicy`, asked where Luigi
    handles the error (taskprocess.py): Luigi hears of no failure then."""

    def on_run_error(self, run: Run, error: BaseException) -> Hold | None:
        policy = run.options.retry if run.options is not None else None
        if policy is None:
            return None
        failures = run.msg.failures + 1
        delay = policy.delay(failures)
        again = dataclasses.replace(run.msg, failures=failures, rate_slot=None, sent_at=time.time() + delay)
        return Hold(delay, again, "retry", f"retry {failures}/{policy.max_retries} in {delay:.1f} s: {error!r}")
