"""The worker side: run one Luigi task from a JSON message.

The task is rebuilt from (module, family, str params) and run through
Luigi's own :class:`luigi.worker.TaskProcess` logic in this process, so
dynamic dependencies, the missing-dependency check, events and
``on_success`` / ``on_failure`` behave exactly as under ``luigi --workers N``.
The outcome goes back to the dispatcher's reply queue as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import luigi.worker
from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from luigi.task_register import TaskClassException

from luigi_celery import message as m
from luigi_celery.errors import ConfigError, MessageError
from luigi_celery.metrics import Delivery, WorkerMetrics
from luigi_celery.options import task_options
from luigi_celery.ratelimit import LATENESS_ALLOWED, Limiter, Rate
from luigi_celery.results import publish_reply
from luigi_celery.retry import RetryPolicy
from luigi_celery.settings import DEFAULT_LOCK_TTL
from luigi_celery.store import Lease, Store, died_here, owner_here
from luigi_celery.timers import Timers

logger = logging.getLogger(__name__)

Publish = Callable[[str, dict[str, Any]], None]

# The heartbeat refreshes a run lock this many times per lock TTL.
HEARTBEATS_PER_TTL = 6
# A task still running after this long tells its dispatcher it has started (progress shows it
# running, not queued). Shorter tasks send nothing: their result says it all.
STARTED_NOTICE_AFTER = 0.2


def timeout_explanation(task_id: str, seconds: float | int | None) -> str:
    # The same words stock Luigi uses for a task it kills on worker_timeout.
    return f"Task {task_id} timed out after {seconds} seconds and was terminated."


class LuigiTaskFailed(Exception):
    """Raised after a FAILED reply has gone to the dispatcher, so that Celery, and
    Flower with it, record a task Luigi calls FAILED as a FAILURE, with Luigi's
    explanation. The dispatcher never sees it: it reads the reply."""


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


class RemoteStatusReporter:
    """Stands in for Luigi's TaskStatusReporter on a worker.

    ``set_status_message`` and friends inside ``run()`` end up here; each
    update is published to the dispatcher, which hands it to the scheduler.
    """

    scheduler_messages = None  # messages from the scheduler to a running task do not cross the broker

    def __init__(self, publish: Publish, msg: m.TaskMessage) -> None:
        self._publish = publish
        self._msg = msg

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


class _WorkerTaskProcess(luigi.worker.TaskProcess):
    """Luigi's TaskProcess, run in-process; reports a soft time limit as a timeout."""

    timed_out = False
    timeout_seconds: float | None = None
    retry: RetryPolicy | None = None
    failures = 0  # failed attempts before this one
    retry_error: BaseException | None = None

    def _handle_run_exception(self, ex: BaseException) -> str:
        if isinstance(ex, SystemExit):
            # The pool process is being shut down under the task (a signal to the
            # process): the task did not fail, it was cut off. Let the exit through,
            # so Celery treats it as a lost worker and requeues the message.
            raise ex
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


def _failed(msg: m.TaskMessage, expl: str) -> m.ResultMessage:
    return m.ResultMessage(
        celery_id=msg.celery_id, task_id=msg.task_id, status=m.FAILED, expl=expl, host=socket.gethostname()
    )


def _as_text(expl: Any) -> str:
    if expl is None:
        return ""
    return expl if isinstance(expl, str) else str(expl)


def rebuild(msg: m.TaskMessage, allowed: tuple[str, ...]) -> luigi.Task | m.ResultMessage:
    """The Luigi task ``msg`` names, or a FAILED result saying why it cannot be had here."""
    if not m.module_allowed(msg.module, allowed):
        logger.warning("refused %s: module %r is not in the allowlist", msg.celery_id, msg.module)
        return _failed(
            msg,
            f"module {msg.module!r} is not in this worker's allowlist ({', '.join(allowed) or 'empty'}); "
            "start the worker with --include MODULE or LUIGI_CELERY_TASK_MODULES",
        )
    try:
        task = luigi.worker.load_task(msg.module, msg.family, msg.params)
    except ImportError as e:
        return _failed(msg, f"cannot import module {msg.module!r} on worker {socket.gethostname()}: {e}")
    except TaskClassException as e:
        return _failed(msg, f"no task family {msg.family!r} in module {msg.module!r}: {e}")
    except Exception:
        return _failed(msg, f"cannot rebuild {msg.family} from its parameters:\n{traceback.format_exc()}")
    if task.task_module != msg.module:
        return _failed(msg, f"task family {msg.family!r} is defined in {task.task_module!r}, not in {msg.module!r}")
    if task.task_id != msg.task_id:
        return _failed(
            msg, f"the rebuilt task has id {task.task_id}, not {msg.task_id}: worker and dispatcher code differ"
        )
    return task


def run_task(
    task: luigi.Task,
    msg: m.TaskMessage,
    publish: Publish,
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
        task,
        msg.run_id,
        outcome,
        RemoteStatusReporter(publish, msg),
        check_unfulfilled_deps=msg.check_unfulfilled_deps,
        check_complete_on_run=msg.check_complete_on_run,
    )
    process.timeout_seconds = msg.worker_timeout
    process.retry, process.failures = retry, msg.failures
    try:
        process.run()
    except Exception:
        # The task's own on_failure (or an event handler) raised while Luigi handled
        # its failure: TaskProcess has put FAILED without an explanation, then re-raised.
        return _failed(msg, f"{msg.task_id} failed, and handling the failure raised:\n{traceback.format_exc()}"), None
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
    return run_task(task, msg, publish, skip_if_complete)[0]


def _already_complete(task: luigi.Task) -> bool:
    if task.run is None or task.run == NotImplemented:  # an external task
        return False  # its "run" is exactly this check, with Luigi's own explanation
    if type(task).complete is luigi.Task.complete and not luigi.task.flatten(task.output()):
        return False  # no outputs: Luigi's complete() is False (and warns, as the dispatcher already did)
    try:
        return bool(task.complete())
    except Exception:
        return False  # let the run itself meet (and report) the error


@dataclasses.dataclass
class _Held:
    """A run lock this process holds, and what it takes to take it again."""

    store: Store
    task_id: str
    owner: str
    ttl: float
    run_id: str
    celery_id: str
    due: float  # the next beat, on the monotonic clock


class _Heartbeats:
    """Keeps alive every run lock this process holds, from one thread.

    A thread per task cost as much as the lock itself; this one is started on
    first use in each process (a forked pool child starts its own).  A lock the
    store lost while its task runs (a restart without persistence, a flush) is
    taken again at the next beat, unless another worker took the task meanwhile.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[int, str], _Held] = {}  # by (store, task id)
        self._changed = threading.Condition()
        self._pid: int | None = None

    def hold(self, store: Store, task_id: str, owner: str, ttl: float, run_id: str, celery_id: str) -> None:
        with self._changed:
            due = time.monotonic() + ttl / HEARTBEATS_PER_TTL
            self._held[(id(store), task_id)] = _Held(store, task_id, owner, ttl, run_id, celery_id, due)
            if self._pid != os.getpid():  # first use in this process
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="luigi-celery-heartbeats", daemon=True).start()
            self._changed.notify()

    def drop(self, store: Store, task_id: str) -> None:
        with self._changed:
            self._held.pop((id(store), task_id), None)

    def _still_held(self, held: _Held) -> bool:
        """False once the task has ended and let its lock go (or a later one holds it)."""
        with self._changed:
            return self._held.get((id(held.store), held.task_id)) is held

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                due = [held for held in self._held.values() if held.due <= now]
                if not due:
                    soonest = min((held.due for held in self._held.values()), default=None)
                    self._changed.wait(None if soonest is None else soonest - now)
                    continue
                for held in due:
                    held.due = now + held.ttl / HEARTBEATS_PER_TTL
            for held in due:
                self._beat(held)

    def _beat(self, held: _Held) -> None:
        try:
            if held.store.refresh(held.task_id, held.owner, held.ttl) or not self._still_held(held):
                return
            holder = held.store.retake(held.task_id, held.owner, held.ttl, held.run_id, held.celery_id)
        except Exception as e:  # the store is away for a moment: try again next beat
            logger.warning("could not refresh the run lock of %s: %s", held.task_id, e)
            return
        if holder is None:
            if self._still_held(held):
                logger.warning(
                    "took the run lock of %s again: it had vanished from the coordination store (restarted "
                    "without its data, flushed, or away longer than the lock TTL) and no other worker had taken it",
                    held.task_id,
                )
                return
            try:  # the task ended while its lock was taken again: let it go
                held.store.release(held.task_id, held.owner)
            except Exception as e:  # it expires by itself
                logger.warning("could not release the run lock of %s: %s", held.task_id, e)
            return
        with self._changed:
            lost = self._held.get((id(held.store), held.task_id)) is held
            if lost:
                del self._held[(id(held.store), held.task_id)]
        if lost:
            logger.error("lost the run lock of %s: another worker may start it (%s holds it)", held.task_id, holder)


_heartbeats = _Heartbeats()


@contextlib.contextmanager
def run_lock(
    store: Store | None, msg: m.TaskMessage, ttl: float, run_over: Callable[[m.TaskMessage], bool] | None = None
) -> Iterator[Lease]:
    """Hold the run lock of ``msg``'s task while the block runs.

    Yields a :class:`Lease` whose ``holder`` is None when the lock is ours,
    whose ``seen_before`` says this very Celery id started before (a repeat),
    and whose ``ended`` says the dispatcher that sent it has closed its run, so
    it must not run at all.  Without a store (the embedded mode, RabbitMQ with
    no Redis configured) there is no lock: the broker's redelivery and the
    complete() check are the guard, and ``run_over`` (if given) tells whether
    the run is over.
    """
    if store is None:
        yield Lease(None, False, ended=run_over is not None and run_over(msg))
        return
    owner = owner_here(msg.celery_id)
    lease = store.acquire(msg.task_id, owner, ttl, msg.run_id, msg.celery_id, msg.session)
    if lease.ended:
        yield lease
        return
    if lease.holder is not None and died_here(lease.holder):
        # A process of this machine held it and is gone (a pool child killed, or
        # out of memory): take over now instead of waiting for the lock to expire.
        logger.warning("taking over %s from %s, which died", msg.task_id, lease.holder)
        store.release(msg.task_id, lease.holder)
        lease = store.acquire(msg.task_id, owner, ttl, msg.run_id, msg.celery_id, msg.session)
    if lease.holder is not None:
        logger.warning("not running %s: it is already running as %s", msg.celery_id, lease.holder)
        yield lease
        return
    _heartbeats.hold(store, msg.task_id, owner, ttl, msg.run_id, msg.celery_id)
    try:
        yield lease
    finally:
        _heartbeats.drop(store, msg.task_id)
        try:
            store.release(msg.task_id, owner)
        except Exception as e:  # it expires by itself
            logger.warning("could not release the run lock of %s: %s", msg.task_id, e)


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
        if isinstance(exc, TimeLimitExceeded):
            seconds = kwargs["message"].get("worker_timeout")
            result = dataclasses.replace(_failed(msg, timeout_explanation(msg.task_id, seconds)), event="timeout")
        else:
            result = _failed(msg, f"luigi-celery failed to run {msg.task_id}: {exc!r}\n{einfo}")
        try:
            publish_reply(self.app, msg.reply_to, m.sign(result.to_dict(), self.secret))
        except Exception:
            logger.exception("could not report the failure of %s", msg.task_id)


def _rate_gate(limiter: Limiter, key: str, rate: Rate, slot: float | None) -> tuple[float, float]:
    """(seconds to wait, the slot to wait for); (0, slot) means start now.

    A task that comes with a slot starts if it is on time; one that comes late
    (a busy pool, a slow broker) or with no slot takes the next free one.
    """
    if slot is not None and limiter.late_by(slot) <= LATENESS_ALLOWED * rate.interval:
        return 0.0, slot
    return limiter.reserve(key, rate)


_timers = Timers()


def _started(publish: Publish, msg: m.TaskMessage) -> None:
    RemoteStatusReporter(publish, msg).send("started", socket.gethostname())


def _hold(publish: Publish, msg: m.TaskMessage, seconds: float) -> None:
    """Tell the dispatcher this task waits ``seconds`` on purpose (a retry, a rate limit):
    it is not lost, and it does not count against the run's ``--workers`` meanwhile."""
    RemoteStatusReporter(publish, msg).send("retry_in", seconds)


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
        publish_reply(app, reply_to, m.sign(payload, secret))

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
        try:
            m.verify(kwargs.get("message"), secret)
        except MessageError as e:
            # Whoever sent it does not know the secret: its reply_to is not to be trusted either.
            raise Reject(f"rejected message: {e}", requeue=False) from e
        try:
            if args or set(kwargs) != {"message"}:
                raise MessageError("expected exactly one keyword argument, 'message'")
            msg = m.TaskMessage.from_dict(kwargs["message"])
        except MessageError as e:
            partial = _partial_message(kwargs)
            if partial is not None:
                publish(partial.reply_to, _failed(partial, f"malformed task message: {e}").to_dict())
            # Celery logs the rejection, once, with this reason.
            raise Reject(f"rejected malformed message: {e}", requeue=False) from e
        delivery = Delivery(metrics, msg.family, (self.request.delivery_info or {}).get("routing_key"))
        delivery.queued(msg.sent_at)
        task = rebuild(msg, allowed)
        if isinstance(task, m.ResultMessage):
            publish(msg.reply_to, task.to_dict())
            delivery.finished(m.FAILED)
            return _ended(task)
        try:
            options = task_options(type(task))
        except ConfigError as e:
            failed = _failed(msg, f"bad options on {msg.family}: {e}")
            publish(msg.reply_to, failed.to_dict())
            delivery.finished(m.FAILED)
            return _ended(failed)

        if options.rate is not None and limiter is not None:
            wait, slot = _rate_gate(limiter, options.rate_key, options.rate, msg.rate_slot)
            if wait > 0:
                # Its slot is later: back to the broker with that countdown, holding the slot.
                # The worker keeps it in memory, not in a pool process, and other tasks go on.
                _hold(publish, msg, wait)
                delivery.rate_limited(wait)
                reserved = dataclasses.replace(msg, rate_slot=slot, sent_at=time.time() + wait)
                held = {"message": m.sign(reserved.to_dict(), secret)}
                raise self.retry(countdown=wait, max_retries=None, kwargs=held)

        with run_lock(store, msg, lock_ttl, run_over) as lease:
            if lease.ended:
                # Its dispatcher was interrupted, or ended its run, while this waited in a queue.
                logger.warning("dropped %s unrun: the dispatcher that sent it has ended its run", msg.celery_id)
                delivery.finished("dropped")
                return f"dropped: the run of {msg.task_id} is over"
            if lease.holder is not None:
                delivery.finished("duplicate")
                return f"duplicate: {msg.task_id} is already running as {lease.holder}"
            # A repeat delivery (a later attempt, a redelivered message, an id seen
            # started before) may find its work done: then it answers DONE, not runs.
            # A first delivery always runs, as under stock Luigi (a wrapper task is
            # complete when dispatched, yet Luigi runs it and fires its events).
            redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
            repeat = lease.seen_before or msg.attempt > 1 or redelivered or msg.failures > 0
            began = time.monotonic()
            notice = _timers.call_later(STARTED_NOTICE_AFTER, functools.partial(_started, publish, msg))
            try:
                result, retry_error = run_task(task, msg, publish, skip_if_complete=repeat, retry=options.retry)
            finally:
                _timers.cancel(notice)
            if retry_error is None:
                # Reply before the lock goes: a dispatcher that sees the lock gone finds the reply.
                publish(msg.reply_to, result.to_dict())
                delivery.finished(result.status, began)
                return _ended(result)
        delivery.finished("retry", began)
        assert options.retry is not None
        failures = msg.failures + 1
        delay = options.retry.delay(failures)
        text = f"retry {failures}/{options.retry.max_retries} in {delay:.1f} s: {retry_error!r}"
        logger.warning("%s: %s", msg.task_id, text)
        RemoteStatusReporter(publish, msg).update_status_message(text)
        _hold(publish, msg, delay)
        again = dataclasses.replace(msg, failures=failures, rate_slot=None, sent_at=time.time() + delay)
        raise self.retry(countdown=delay, max_retries=None, kwargs={"message": m.sign(again.to_dict(), secret)})

    return execute
