"""A pytest plugin for Luigi's own tests: every ``Scheduler`` they build is a FastScheduler.

It also counts how often FastScheduler answered from its own bookkeeping, and writes
the count to the file named by ``LUIGI_CELERY_FAST_CALLS``, so the test that runs
Luigi's suite can tell that the fast path was exercised, not only the fallbacks.
"""

from __future__ import annotations

import luigi.scheduler

from luigi_celery.scheduler import FastScheduler
from tests.luigi_suite import report_count

luigi.scheduler.Scheduler = FastScheduler  # type: ignore[misc]  # before the test modules import it by name

_fast_calls = 0
_own_get_work = FastScheduler._get_work


def _counted_get_work(self, *args, **kwargs):
    global _fast_calls
    _fast_calls += 1
    return _own_get_work(self, *args, **kwargs)


FastScheduler._get_work = _counted_get_work  # type: ignore[method-assign]


def pytest_unconfigure(config):
    report_count("LUIGI_CELERY_FAST_CALLS", _fast_calls)
