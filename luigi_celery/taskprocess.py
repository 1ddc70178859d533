"""The Luigi seam on the worker: rebuild a task and run it through Luigi's own TaskProcess.

The task is rebuilt from (module, family, str params) and run through
:class:`luigi.worker.TaskProcess` in this process, so dynamic dependencies, the
missing-dependency check, events and ``on_success`` / ``on_failure`` behave
exactly as under ``luigi --workers N``. This is the only module of the worker
side that touches Luigi's private API (``TaskProcess._handle_run_exception``);
``tests/test_luigi_contract.py`` pins it.
"""

from __future__ import annotations

import collections
import functools
import logging
import socket
import traceback
from collections.abc import Callable
from typing import Any

import billiard.common
import luigi.worker
from celery.exceptions import SoftTimeLimitExceeded
from luigi.task_register import TaskClassException

from luigi_celery import message as m
from luigi_celery.allowlist import module_allowed
from luigi_celery.retry import RetryPolicy

logger = logging.getLogger(__name__)

Publish = Callable[[str, dict[str, Any]], None]


def timeout_explanation(task_id: str, seconds: float | int | None) -> str:
    # The same words stock Luigi uses for a task it kills on worker_timeout.
    return f"Task {task_id} timed out after {seconds} seconds and was terminated."


class RemoteStatusReporter:
    """Stands in for Luigi's TaskStatusReporter on a worker.

    ``set_status_message`` and friends inside ``run()`` end up here; each
    update is published to the dispatcher, which hands it to the scheduler.
    ``scheduler_messages`` is what the task reads messages from the scheduler
    from: an inbox.Inbox for a task that accepts messages, else None (as Luigi's).
    """

    def __init__(self, publish: Publish, msg: m.TaskMessage, scheduler_messages: Any = None) -> None:
        self._publish = publish
        self._msg = msg
        self.scheduler_messages = scheduler_messages

    def send(self, field: str, value: Any) -> None:
        update = m.StatusMessage(celery_id=self._msg.celery_id, task_id=self._msg.task_id, field=field, value=value)
        try:
            self._publish(self._msg.reply_to, update.to_dict())
        except Exception as e:  # a lost status update must not fail the task
            logger.warning("could not send %s of %s: %s", field, self._msg.task_id, e)

    def update_tracking_url(self, tracking_url: str) -> None:
        self.send("tracking_url", tracking_url)

    def update_status_message(self, message: str) -> None:
        self.send("status_message", message)

    def update_progress_percentage(self, percentage: float) -> None:
        self.send("progress_percentage", percentage)

    def decrease_running_resources(self, decrease_resources: dict[str, int]) -> None:
        self.send("decrease_running_resources", decrease_resources)


class _OneResult:
    """The result queue TaskProcess.run() puts its one tuple on."""

    def __init__(self) -> None:
        self.item: tuple[Any, ...] | None = None

    def put(self, item: tuple[Any, ...]) -> None:
        self.item = item


class _WorkerTaskProcess(luigi.worker.ContextManagedTaskProcess):
    """Luigi's task process, run in this pool process: it enters the worker's ``[worker]
    task_process_context`` around ``run()`` as Luigi does, and reports a soft time limit as a timeout."""

    timed_out = False
    timeout_seconds: float | None = None
    retry: RetryPolicy | None = None
    failures = 0  # failed attempts before this one
    retry_error: BaseException | None = None

    def _handle_run_exception(self, ex: BaseException) -> str:
        if isinstance(ex, SystemExit) and shutting_down():
            # The pool process is being shut down under the task (a signal to the
            # process): the task did not fail, it was cut off. Let the exit through,
            # so Celery treats it as a lost worker and requeues the message.
            raise ex
        # (a SystemExit the task raised itself is its failure, as under Luigi's own worker)
        if self.retry is not None and isinstance(ex, Exception) and self.retry.should_retry(ex, self.failures):
            # Another attempt will come: Luigi hears of no failure, so no on_failure, no FAILURE event.
            self.retry_error = ex
            return "".join(traceback.format_exception(ex))
        if isinstance(ex, SoftTimeLimitExceeded):
            # Stock Luigi kills a timed-out process: no on_failure, no FAILURE event;
            # the dispatcher fires TIMEOUT, as Luigi's worker does.
            self.timed_out = True
            return timeout_explanation(self.task.task_id, self.timeout_seconds)
        result: str = super()._handle_run_exception(ex)
        return result


@functools.cache
def _worker_config() -> luigi.worker.worker:
    """This process's luigi ``[worker]`` section, read once, as Luigi's worker reads it once when
    it starts (building it costs about 0.35 ms: too much to pay for every task)."""
    return luigi.worker.worker()


class _CompletionCache(dict[str, bool]):
    """Luigi's completion cache for one dispatcher's session: the tasks seen complete.

    Full at :data:`COMPLETION_CACHE_SIZE` entries: later ones are checked each time."""

    def __setitem__(self, task_id: str, complete: bool) -> None:
        if len(self) < COMPLETION_CACHE_SIZE or task_id in self:
            super().__setitem__(task_id, complete)


COMPLETION_CACHE_SIZE = 100_000
# A pool process keeps the caches of this many sessions (the most recent ones).
COMPLETION_CACHE_SESSIONS = 4
_completion_caches: collections.OrderedDict[str, _CompletionCache] = collections.OrderedDict()


def completion_cache(msg: m.TaskMessage) -> dict[str, bool] | None:
    """The completion cache for ``msg``'s task, when its dispatcher has ``[worker]
    cache_task_completion`` on: one per dispatcher session, as Luigi's worker keeps one for its
    run (a cache kept across sessions would call a task complete after its output was removed)."""
    if not msg.cache_task_completion or msg.session is None:
        return None
    cache = _completion_caches.pop(msg.session, None)
    _completion_caches[msg.session] = cache = cache if cache is not None else _CompletionCache()
    while len(_completion_caches) > COMPLETION_CACHE_SESSIONS:
        _completion_caches.popitem(last=False)
    return cache


def shutting_down() -> bool:
    """True once this pool process's own terminate handler has fired (billiard raises SystemExit
    from it): an exit then is the pool's, not the task's."""
    fired = getattr(billiard.common, "terminate_handler_fired", None)
    return bool(fired()) if fired is not None else False


def failed_result(msg: m.TaskMessage, expl: str) -> m.ResultMessage:
    return m.ResultMessage(
        celery_id=msg.celery_id, task_id=msg.task_id, status=m.FAILED, expl=expl, host=socket.gethostname()
    )


def _as_text(expl: Any) -> str:
    if expl is None:
        return ""
    return expl if isinstance(expl, str) else str(expl)


def rebuild(msg: m.TaskMessage, allowed: tuple[str, ...]) -> luigi.Task | m.ResultMessage:
    """The Luigi task ``msg`` names, or a FAILED result saying why it cannot be had here."""
    if not module_allowed(msg.module, allowed):
        logger.warning("refused %s: module %r is not in the allowlist", msg.celery_id, msg.module)
        return failed_result(
            msg,
            f"module {msg.module!r} is not in this worker's allowlist ({', '.join(allowed) or 'empty'}); "
            "start the worker with --include MODULE or LUIGI_CELERY_TASK_MODULES",
        )
    try:
        task = luigi.worker.load_task(msg.module, msg.family, msg.params)
    except ImportError as e:
        return failed_result(msg, f"cannot import module {msg.module!r} on worker {socket.gethostname()}: {e}")
    except SoftTimeLimitExceeded:
        raise  # its worker_timeout ran out while it was being rebuilt: a timeout, not a bad task
    except TaskClassException as e:
        hint = (
            "; a class defined inside a function exists only once that function ran: importing its "
            "module must define it, or move it to module level"
        )
        return failed_result(msg, f"no task family {msg.family!r} in module {msg.module!r}: {e}{hint}")
    except Exception:
        return failed_result(msg, f"cannot rebuild {msg.family} from its parameters:\n{traceback.format_exc()}")
    if task.task_module != msg.module:
        where = f"task family {msg.family!r} is defined in {task.task_module!r}, not in {msg.module!r}"
        return failed_result(msg, where)
    if task.task_id != msg.task_id:
        return failed_result(
            msg, f"the rebuilt task has id {task.task_id}, not {msg.task_id}: worker and dispatcher code differ"
        )
    return task


def run_task(
    task: luigi.Task,
    msg: m.TaskMessage,
    reporter: RemoteStatusReporter,
    skip_if_complete: bool = False,
    retry: RetryPolicy | None = None,
) -> tuple[m.ResultMessage, BaseException | None]:
    """Run ``task`` through Luigi's TaskProcess; return how it ended, and the error to retry on, if any.

    When ``retry`` says the error is worth another attempt, the failure hooks do
    not fire (Luigi has not heard of a failure) and the caller re-queues the task.
    """
    if skip_if_complete and _already_complete(task):
        # A redelivered or re-published message for work that is done: answer, don't redo.
        logger.info("%s is already complete; not run again", msg.task_id)
        return m.ResultMessage(
            celery_id=msg.celery_id,
            task_id=msg.task_id,
            status=m.DONE,
            expl="already complete",
            host=socket.gethostname(),
        ), None

    outcome = _OneResult()
    process = _WorkerTaskProcess(
        _worker_config().task_process_context,  # this worker's luigi [worker] config
        task,
        msg.run_id,
        outcome,
        reporter,
        check_unfulfilled_deps=msg.check_unfulfilled_deps,
        check_complete_on_run=msg.check_complete_on_run,
        task_completion_cache=completion_cache(msg),
    )
    process.timeout_seconds = msg.worker_timeout
    process.retry, process.failures = retry, msg.failures
    try:
        process.run()
    except KeyboardInterrupt:
        if shutting_down():
            raise  # cut off, not failed: Celery requeues it
        # The task's own: Luigi lets it end the task's process, which it then reports FAILED
        # (TaskProcess has put that result already), without on_failure or a FAILURE event.
        expl = f"{msg.task_id} raised KeyboardInterrupt in run():\n{traceback.format_exc()}"
        return failed_result(msg, expl), None
    except Exception:
        # The task's own on_failure (or an event handler) raised while Luigi handled
        # its failure: TaskProcess has put FAILED without an explanation, then re-raised.
        expl = f"{msg.task_id} failed, and handling the failure raised:\n{traceback.format_exc()}"
        return failed_result(msg, expl), None
    assert outcome.item is not None, "TaskProcess.run() always puts a result"
    _, status, expl, missing, new_deps = outcome.item
    expl = _as_text(expl)
    if status == m.FAILED and retry is not None and process.retry_error is None:
        expl = f"{msg.task_id} failed after {msg.failures + 1} attempt(s):\n{expl}"
    result = m.ResultMessage(
        celery_id=msg.celery_id,
        task_id=msg.task_id,
        status=status,
        expl=expl,
        missing=list(missing or ()),
        new_deps=[(module, family, dict(params)) for module, family, params in new_deps or ()],
        event="timeout" if process.timed_out else None,
        host=socket.gethostname(),
    )
    return result, process.retry_error


def run_task_message(
    msg: m.TaskMessage, allowed: tuple[str, ...], publish: Publish, skip_if_complete: bool = False
) -> m.ResultMessage:
    """Rebuild and run the task ``msg`` names; return how it ended. Never raises for the task's own errors."""
    task = rebuild(msg, allowed)
    if isinstance(task, m.ResultMessage):
        return task
    return run_task(task, msg, RemoteStatusReporter(publish, msg), skip_if_complete)[0]


def _already_complete(task: luigi.Task) -> bool:
    if task.run is None or task.run == NotImplemented:  # an external task
        return False  # its "run" is exactly this check, with Luigi's own explanation
    if type(task).complete is luigi.Task.complete and not luigi.task.flatten(task.output()):
        return False  # no outputs: Luigi's complete() is False (and warns, as the dispatcher already did)
    try:
        return bool(task.complete())
    except SoftTimeLimitExceeded:
        raise
    except Exception:
        return False  # let the run itself meet (and report) the error
