"""The worker side: the Celery task that runs one Luigi task from a JSON message.

A pipeline of steps, each in a module of its own: check the message (guard.py
has refused what must not reach here), rebuild the task (taskprocess.py), wait
for its rate-limit slot (ratelimit.py), take its run lock (runlock.py), run it
through Luigi's own TaskProcess (taskprocess.py), retry with backoff
(retry.py), reply (results.py), and count what happened (metrics.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError

from luigi_celery import message as m
from luigi_celery import signing
from luigi_celery.errors import ConfigError, LuigiTaskFailed, MessageError
from luigi_celery.hooks import Hold, Run, RunHook, first_hold, tell
from luigi_celery.inbox import inbox_for
from luigi_celery.metrics import WorkerMetrics
from luigi_celery.options import task_options
from luigi_celery.ratelimit import Limiter, RateGate
from luigi_celery.results import publish_reply
from luigi_celery.retry import Retries, RetryPolicy
from luigi_celery.runlock import run_lock
from luigi_celery.settings import DEFAULT_LOCK_TTL
from luigi_celery.store import Store
from luigi_celery.taskprocess import (
    Publish,
    RemoteStatusReporter,
    failed_result,
    rebuild,
    run_task,
    timeout_explanation,
)
from luigi_celery.timers import Timers

logger = logging.getLogger(__name__)

# A task still running after this long tells its dispatcher it has started (progress shows it
# running, not queued). Shorter tasks send nothing: their result says it all.
STARTED_NOTICE_AFTER = 0.2


def _partial_message(kwargs: dict[str, Any]) -> m.TaskMessage | None:
    """Best effort: enough of a malformed message to tell its dispatcher, if it has one."""
    data = kwargs.get("message")
    if not isinstance(data, dict):
        return None
    fields = ("task_id", "reply_to", "run_id")
    if not all(isinstance(data.get(f), str) for f in fields):
        return None
    attempt = data.get("attempt")
    token = data.get("token")
    return m.TaskMessage(
        task_id=data["task_id"],
        module=str(data.get("module")),
        family=str(data.get("family")),
        params={},
        attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) and attempt > 0 else 1,
        run_id=data["run_id"],
        reply_to=data["reply_to"],
        # (a reply without the attempt's own token is dropped by its dispatcher: nothing to echo, nothing to hear)
        token=token if isinstance(token, str) else "",
    )


class ExecuteTask(Task):
    """Base class of the execute task: replies FAILED when a time limit kills it."""

    # Celery's own retry limit is off: a rate-limit re-queue is not a failure, and failures are
    # counted in the message against the Luigi task's max_retries. (``retry(max_retries=None)``
    # alone means "the task's default", 3, and a task re-queued for its slot a 4th time failed.)
    max_retries = None
    # Each message is checked in the worker's main process before a pool process sees it.
    Strategy = "luigi_celery.guard:strategy"
    # Signs the replies on_failure sends (set by register_execute).
    secret: str | None = None

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # Runs in the worker's main process on a hard time limit, and in the child
        # for an exception that escaped execute(); either way the dispatcher must hear.
        msg = _partial_message(kwargs if isinstance(kwargs, dict) else {})
        if isinstance(exc, LuigiTaskFailed):
            return  # the dispatcher has its FAILED reply already
        if msg is None or isinstance(exc, WorkerLostError | SystemExit | KeyboardInterrupt):
            return  # a lost worker's message is requeued: it will run and reply
        if isinstance(exc, TimeLimitExceeded | SoftTimeLimitExceeded):
            # (a soft limit that ran out before run() began: while the task was rebuilt, or its
            # run lock taken; Luigi says a task that runs out of time timed out, and fires TIMEOUT)
            seconds = kwargs["message"].get("worker_timeout")
            result = dataclasses.replace(failed_result(msg, timeout_explanation(msg.task_id, seconds)), event="timeout")
        else:
            result = failed_result(msg, f"luigi-celery failed to run {msg.task_id}: {exc!r}\n{einfo}")
        try:
            publish_reply(self.app, msg.reply_to, signing.sign(result.to_dict(), self.secret))
        except Exception:
            logger.exception("could not report the failure of %s", msg.task_id)


# The explanation a FAILURE carries into Celery's events (Flower) is cut to this many characters.
FAILURE_TEXT_LIMIT = 4000


def _ended(result: m.ResultMessage) -> str:
    """What the execute task returns for ``result``, which has been published: a FAILED one raises.

    The dispatcher reads the reply, not this: it is what Flower shows as the result, and
    Celery reprs it twice a task (the log line, the succeeded event), so it is kept short."""
    if result.status == m.FAILED:
        text = result.expl or f"{result.task_id} failed"
        raise LuigiTaskFailed(text if len(text) <= FAILURE_TEXT_LIMIT else "..." + text[-FAILURE_TEXT_LIMIT:])
    if result.new_deps:
        return f"{result.status}: {len(result.new_deps)} new dependencies"
    return result.status


_timers = Timers()


def _started(publish: Publish, msg: m.TaskMessage) -> None:
    RemoteStatusReporter(publish, msg).send("started", socket.gethostname())


def _hold(publish: Publish, msg: m.TaskMessage, seconds: float) -> None:
    """Tell the dispatcher this task waits ``seconds`` on purpose (a retry, a rate limit):
    it is not lost, and it does not count against the run's ``--workers`` meanwhile."""
    RemoteStatusReporter(publish, msg).send("retry_in", seconds)


def _message(kwargs: dict[str, Any], args: tuple[Any, ...], secret: str | None, publish: Publish) -> m.TaskMessage:
    """The task message of an execute call; a Celery Reject (not requeued) when there is none."""
    try:
        signing.verify(kwargs.get("message"), secret)
    except MessageError as e:
        # Whoever sent it does not know the secret: its reply_to is not to be trusted either.
        raise Reject(f"rejected message: {e}", requeue=False) from e
    try:
        if args or set(kwargs) != {"message"}:
            raise MessageError("expected exactly one keyword argument, 'message'")
        return m.TaskMessage.from_dict(kwargs["message"])
    except MessageError as e:
        partial = _partial_message(kwargs)
        if partial is not None:
            publish(partial.reply_to, failed_result(partial, f"malformed task message: {e}").to_dict())
        # Celery logs the rejection, once, with this reason.
        raise Reject(f"rejected malformed message: {e}", requeue=False) from e


def _answer(
    publish: Publish, hooks: list[RunHook], run: Run, result: m.ResultMessage, began: float | None = None
) -> str:
    publish(run.msg.reply_to, result.to_dict())
    tell(hooks, "finished", run, result.status, began)
    return _ended(result)


def _send_back(task: Task, publish: Publish, hooks: list[RunHook], run: Run, hold: Hold) -> BaseException:
    """The Celery retry that sends the task back with ``hold``: the caller raises it."""
    if hold.text:
        RemoteStatusReporter(publish, run.msg).update_status_message(hold.text)
    _hold(publish, run.msg, hold.seconds)
    tell(hooks, "held", run, hold)
    again = {"message": signing.sign(hold.msg.to_dict(), task.secret)}
    return task.retry(countdown=hold.seconds, max_retries=None, kwargs=again)  # (raises it, as Celery does)


def _run(
    app: Celery,
    task: Any,
    msg: m.TaskMessage,
    publish: Publish,
    secret: str | None,
    repeat: bool,
    retry: RetryPolicy | None,
) -> tuple[m.ResultMessage, BaseException | None]:
    """Run the task (see taskprocess.run_task), telling its dispatcher once it has run a moment,
    with its inbox of messages from the scheduler open while it runs, if it accepts them."""
    reporter = RemoteStatusReporter(publish, msg)
    notice = _timers.call_later(STARTED_NOTICE_AFTER, functools.partial(_started, publish, msg))
    try:
        with inbox_for(app, task, msg, reporter.send, secret) as inbox:
            reporter.scheduler_messages = inbox
            return run_task(task, msg, reporter, skip_if_complete=repeat, retry=retry)
    finally:
        _timers.cancel(notice)


def register_execute(
    app: Celery,
    allowed: tuple[str, ...],
    store: Store | None = None,
    lock_ttl: float = DEFAULT_LOCK_TTL,
    limiter: Limiter | None = None,
    metrics: WorkerMetrics | None = None,
    run_over: Callable[[m.TaskMessage], bool] | None = None,
    secret: str | None = None,
) -> Task:
    """Add the execute task to ``app``.

    ``allowed`` is the module allowlist, ``store`` holds run locks, ``limiter``
    enforces rate limits where tasks start (None: the dispatcher paces instead),
    ``metrics`` counts what the tasks did (None: nothing is counted),
    ``run_over`` tells, where there is no store, whether a message's run is over,
    ``secret`` (if any) signs replies and must have signed every message.
    """

    def publish(reply_to: str, payload: dict[str, Any]) -> None:
        publish_reply(app, reply_to, signing.sign(payload, secret))

    # The policies, at the moments of each delivery: metrics see all, the rate limit may hold a
    # task back before it runs, retries after a retryable error.
    hooks: list[RunHook] = [*([metrics] if metrics is not None else []), *([RateGate(limiter)] if limiter else [])]
    hooks.append(Retries())

    @app.task(
        name=m.TASK_NAME,
        # Not Celery's default "shared" task: that registers this closure in every app made later
        # in the process, and each later app would run the first app's allowlist, store and limiter.
        shared=False,
        bind=True,
        base=ExecuteTask,
        acks_late=True,
        reject_on_worker_lost=True,
        throws=(LuigiTaskFailed,),  # an expected outcome: Celery logs it without its own traceback
        secret=secret,
    )
    def execute(self: Task, *args: Any, **kwargs: Any) -> str:
        msg = _message(kwargs, args, secret, publish)
        run = Run(msg, (self.request.delivery_info or {}).get("routing_key"))
        tell(hooks, "received", run)
        task = rebuild(msg, allowed)
        if isinstance(task, m.ResultMessage):
            return _answer(publish, hooks, run, task)
        try:
            run.options = task_options(type(task))
        except ConfigError as e:
            return _answer(publish, hooks, run, failed_result(msg, f"bad options on {msg.family}: {e}"))
        hold = first_hold([hook.before_run(run) for hook in hooks])
        if hold is not None:
            raise _send_back(self, publish, hooks, run, hold)

        with run_lock(store, msg, lock_ttl, run_over) as lease:
            if lease.ended:
                # Its dispatcher was interrupted, or ended its run, while this waited in a queue.
                logger.warning("dropped %s unrun: the dispatcher that sent it has ended its run", msg.celery_id)
                tell(hooks, "finished", run, "dropped", None)
                return f"dropped: the run of {msg.task_id} is over"
            if lease.holder is not None:
                tell(hooks, "finished", run, "duplicate", None)
                return f"duplicate: {msg.task_id} is already running as {lease.holder}"
            # A repeat delivery (published again for a lost worker, a redelivered message,
            # an id seen started before, a retry) may find its work done: then it answers
            # DONE, not runs. Whatever Luigi sends always runs, as under stock Luigi: a
            # wrapper task is complete when dispatched, yet Luigi runs it and fires its
            # events; a task resumed after its dynamic dependencies runs run() again.
            redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
            repeat = lease.seen_before or msg.republished or redelivered or msg.failures > 0
            began = time.monotonic()
            result, retry_error = _run(self.app, task, msg, publish, secret, repeat, run.options.retry)
            if retry_error is None:
                # Reply before the lock goes: a dispatcher that sees the lock gone finds the reply.
                return _answer(publish, hooks, run, result, began)
        tell(hooks, "finished", run, "retry", began)
        retry = first_hold([hook.on_run_error(run, retry_error) for hook in hooks])
        assert retry is not None, "run_task retries only when the task's retry policy says so"
        logger.warning("%s: %s", msg.task_id, retry.text)
        raise _send_back(self, publish, hooks, run, retry)

    return execute
