"""A pytest plugin for Luigi's own tests: every ``Worker`` runs the dispatcher's loop
(``dispatch.BatchedLoop``) in place of Luigi's ``Worker.run``.

It counts the tasks handed out by calls of ``get_work_many`` that handed out more than
one, and writes the count to the file named by ``LUIGI_CELERY_BATCHED_TASKS``, so the
test that runs Luigi's suite can tell that batches were exercised.
"""

from __future__ import annotations

import luigi.worker

from luigi_celery.dispatch import BatchedLoop
from luigi_celery.scheduler import FastScheduler
from tests.luigi_suite import report_count

for _name in ("run", "_handle_results", "_get_work_batch", "_work_response"):
    setattr(luigi.worker.Worker, _name, vars(BatchedLoop)[_name])

_batched_tasks = 0
_own_get_work_many = FastScheduler.get_work_many


def _counted_get_work_many(self, *args, **kwargs):
    global _batched_tasks
    replies = _own_get_work_many(self, *args, **kwargs)
    handed_out = [reply for reply in replies if reply["task_id"] is not None]
    if len(handed_out) > 1:
        _batched_tasks += len(handed_out)
    return replies


FastScheduler.get_work_many = _counted_get_work_many  # type: ignore[method-assign]


def pytest_unconfigure(config):
    report_count("LUIGI_CELERY_BATCHED_TASKS", _batched_tasks)
