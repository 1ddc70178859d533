"""The Luigi seam: a Luigi worker whose "processes" are Celery messages.

This is the only module of the dispatcher that touches Luigi's private API
(on a worker, ``taskprocess.py`` is the only one):
``Worker._create_task_process``, ``Worker._task_result_queue``, ``Worker._task_completion_cache``,
``Worker._scheduled_tasks``, ``Worker._add_task``, ``Worker._add``, ``Worker._validate_task``,
``interface._WorkerSchedulerFactory``,
``interface._run`` and ``execution_summary._summary_dict/_root_task``.
``tests/test_luigi_contract.py`` lists every attribute Luigi reads from
:class:`CeleryTaskProcess`, so a Luigi upgrade fails there, loudly.

Luigi keeps doing everything else: resolving the DAG, asking its scheduler
for work, keeping ``--workers`` tasks in flight, handling results, dynamic
dependencies, the execution summary. Tasks with nothing to run (a
WrapperTask) run here, in Luigi's own ``TaskProcess``, as under ``luigi
--workers 1``. (The local scheduler's internals are touched in
``scheduler.py`` only.)
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import luigi
import luigi.execution_summary
import luigi.interface
import luigi.retcodes
import luigi.worker
from luigi.cmdline_parser import CmdlineParser
from luigi.event import Event
from luigi.setup_logging import InterfaceLogging

from luigi_celery import message as m
from luigi_celery.errors import LuigiCeleryError
from luigi_celery.progress import ProgressView
from luigi_celery.scheduler import FastScheduler
from luigi_celery.sender import Sender

logger = logging.getLogger(__name__)

# luigi-celery's exit codes, set through Luigi's own [retcode] section (the
# values Luigi's docs recommend) unless the user set them: Luigi's built-in
# defaults exit 0 when a task failed.
RETCODE_DEFAULTS = {
    "already_running": 10,
    "missing_data": 20,
    "not_run": 25,
    "task_failed": 30,
    "scheduling_error": 35,
    "unhandled_exception": 40,
}

# status field of a reply -> the method of Luigi's TaskStatusReporter that applies it
_REPORTER_METHODS = {
    "status_message": "update_status_message",
    "progress_percentage": "update_progress_percentage",
    "tracking_url": "update_tracking_url",
    "decrease_running_resources": "decrease_running_resources",
}


class ResultQueue:
    """Stands in for the worker's ``_task_result_queue``.

    The watcher thread puts Luigi's result tuples here, and also callables
    (status updates, events) that must run in Luigi's main thread: ``get()``
    runs those as it meets them, so the scheduler is only ever called from
    the thread Luigi calls it from.  :meth:`wake` makes a waiting ``get()``
    give up at once, as if it had timed out, so Luigi's loop looks again at
    how many tasks it may send.
    """

    _WAKE = object()

    def __init__(self) -> None:
        self._items: queue.Queue[Any] = queue.Queue()
        # Called when get() is about to wait: the sender publishes the batch Luigi's loop built up.
        self.before_wait: Callable[[], None] = lambda: None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._items.put(item)

    def call_soon(self, fn: Callable[[], Any]) -> None:
        self._items.put(fn)

    def wake(self) -> None:
        self._items.put(self._WAKE)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                item = self._items.get_nowait()
            except queue.Empty:
                if not block:
                    raise
                self.before_wait()
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                item = self._items.get(timeout=remaining)
            if item is self._WAKE:
                raise queue.Empty  # Luigi's worker treats it as a timeout and returns to its loop
            if not callable(item):
                return item
            try:
                item()
            except Exception:
                logger.exception("a status update failed")

    def close(self) -> None:
        """Luigi's Worker.__exit__ closes the queue; there is nothing to release."""


class CeleryTaskProcess:
    """What Luigi thinks is the process running one task: really one Celery message.

    ``run()`` (Luigi calls it in its main loop, since ``use_multiprocessing``
    is False) publishes and returns at once; the outcome arrives later on the
    result queue, put there by the watcher thread.
    """

    use_multiprocessing = False
    # Celery enforces worker_timeout (soft + hard time limit) on the worker, so
    # Luigi's own timer stays off: time spent queued must not count.
    timeout_time = None

    def __init__(
        self,
        task: luigi.Task,
        sender: Sender,
        results: ResultQueue,
        status_reporter: luigi.worker.TaskStatusReporter,
        worker_timeout: float | None,
        on_failed: Callable[[str, m.ResultMessage], None],
        on_running: Callable[[str, bool], None] = lambda task_id, running: None,
    ) -> None:
        self.task = task
        self.status_reporter = status_reporter
        self.worker_timeout = worker_timeout
        self._sender = sender
        self._results = results
        self._on_failed = on_failed
        self._on_running = on_running
        self._finished = False

    @property
    def exitcode(self) -> int | None:
        # Failures arrive as result tuples, never as an exit code, so Luigi's
        # "died unexpectedly" path never fires twice for one task.
        return None

    def run(self) -> None:
        self._sender.send(self)

    start = run

    def is_alive(self) -> bool:
        return not self._finished

    def terminate(self) -> None:
        self._sender.revoke(self)

    # Flight callbacks: called from the watcher thread (or from run() on a refusal).

    def on_result(self, result: m.ResultMessage) -> None:
        self._finished = True
        if result.status == m.FAILED:
            self._on_failed(self.task.task_id, result)
        if result.event == "timeout":
            self._results.call_soon(functools.partial(self.task.trigger_event, Event.TIMEOUT, self.task, result.expl))
        self._results.put(result.luigi_tuple())

    def on_status(self, status: m.StatusMessage) -> None:
        if status.field in ("started", "retry_in"):  # a worker runs it now / it waits in a queue again
            self._on_running(self.task.task_id, status.field == "started")
            return
        apply = getattr(self.status_reporter, _REPORTER_METHODS[status.field])
        self._results.call_soon(functools.partial(apply, status.value))


class CeleryWorker(luigi.worker.Worker):
    """A Luigi worker that dispatches every task it is given to Celery.

    ``--workers N`` keeps N tasks in flight, not counting tasks that wait on
    purpose (for their rate-limit slot, or a retry's backoff): those must not
    keep unrelated tasks from being sent.  Luigi's loop reads
    ``worker_processes`` each time it decides whether to ask for more work,
    so that attribute is N plus the tasks waiting right now.
    """

    slots: int  # N: Luigi's --workers

    def __init__(
        self,
        scheduler: Any = None,
        worker_id: str | None = None,
        worker_processes: int = 1,
        assistant: bool = False,
        *,
        sender: Sender,
        on_start: Callable[[set[str]], None] | None = None,
        progress: ProgressView | None = None,
        complete_checks: int = 1,
        **kwargs: Any,
    ) -> None:
        self.complete_checks = complete_checks
        self._sender = sender  # before Luigi's __init__, which sets worker_processes
        self._progress = progress  # before Luigi's __init__, which may report tasks
        super().__init__(scheduler, worker_id, worker_processes, assistant, **kwargs)
        self._task_result_queue.close()  # the multiprocessing queue Luigi made: not needed
        self._task_result_queue = ResultQueue()
        sender.wake = self._task_result_queue.wake
        self._task_result_queue.before_wait = sender.flush
        self._on_start = on_start
        sender.check_unfulfilled_deps = self._config.check_unfulfilled_deps
        sender.check_complete_on_run = self._config.check_complete_on_run
        # task id -> the last failed result, for the CLI to print after the summary
        self.failures: dict[str, m.ResultMessage] = {}

    @property
    def worker_processes(self) -> int:
        return self.slots + self._sender.waiting()

    @worker_processes.setter
    def worker_processes(self, n: int) -> None:
        self.slots = int(n)  # set by Luigi's __init__, and by its set_worker_processes message

    def add(self, task: luigi.Task, multiprocess: bool = False, processes: int = 0) -> bool:
        if multiprocess or self.complete_checks <= 1:
            return bool(super().add(task, multiprocess, processes))  # Luigi's own: one at a time, or processes
        with concurrent.futures.ThreadPoolExecutor(self.complete_checks, "luigi-celery-complete") as pool:
            try:
                return self._add_with(task, pool)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    def _add_with(self, task: luigi.Task, pool: concurrent.futures.Executor) -> bool:
        """Luigi's ``Worker.add`` with its complete() checks run in ``pool``, as Luigi runs them in
        a process pool with ``--parallel-scheduling``: every other step stays in this thread.
        (``test_luigi_contract`` pins the Luigi source this follows.)"""
        if self._first_task is None and hasattr(task, "task_id"):
            self._first_task = task.task_id
        self.add_succeeded = True
        results: queue.SimpleQueue[tuple[luigi.Task, Any]] = queue.SimpleQueue()

        def check(task: luigi.Task) -> None:
            luigi.worker.check_complete(task, results, self._task_completion_cache)

        self._validate_task(task)
        pool.submit(check, task)
        waiting = 1
        try:
            seen = {task.task_id}
            while waiting:
                item, is_complete = results.get()
                waiting -= 1
                for dep in self._add(item, is_complete):
                    if dep.task_id not in seen:
                        self._validate_task(dep)
                        seen.add(dep.task_id)
                        pool.submit(check, dep)
                        waiting += 1
        except (KeyboardInterrupt, luigi.worker.TaskException):
            raise
        except Exception as ex:
            self.add_succeeded = False
            formatted_traceback = traceback.format_exc()
            self._log_unexpected_error(task)
            task.trigger_event(Event.BROKEN_TASK, task, ex)
            self._email_unexpected_error(task, formatted_traceback)
            raise
        return self.add_succeeded

    def _add_task(self, *args: Any, **kwargs: Any) -> None:
        # Every status the worker tells the scheduler (scheduled, done, failed, ...) goes through here.
        super()._add_task(*args, **kwargs)
        if self._progress is not None:
            self._progress.progress.reported(kwargs["task_id"], kwargs["status"])

    def _create_task_process(self, task: luigi.Task) -> CeleryTaskProcess | luigi.worker.TaskProcess:
        reporter = luigi.worker.TaskStatusReporter(self._scheduler, task.task_id, self._id, None)
        if nothing_to_run(task):
            self._running(task.task_id, True)  # it runs here, now
            return self._in_process(task, reporter)
        self._running(task.task_id, False)  # queued, until a worker says it runs it
        timeout = task.worker_timeout if task.worker_timeout is not None else self._config.timeout
        return CeleryTaskProcess(
            task, self._sender, self._task_result_queue, reporter, timeout or None, self._record_failure,
            self._running,
        )  # fmt: skip

    def _running(self, task_id: str, running: bool) -> None:
        """Progress: ``task_id`` runs now (True) or waits in a queue (False)."""
        if self._progress is not None:
            if running:
                self._progress.progress.started(task_id)
            else:
                self._progress.progress.queued(task_id)

    def _in_process(self, task: luigi.Task, reporter: luigi.worker.TaskStatusReporter) -> luigi.worker.TaskProcess:
        """Luigi's own task process, run here as ``luigi --workers 1`` runs it: no broker round trip.

        Its checks, events, ``on_success`` and result are Luigi's; its result goes on the
        same queue as the replies from Celery."""
        process = luigi.worker.TaskProcess(
            task,
            self._id,
            self._task_result_queue,
            reporter,
            check_unfulfilled_deps=self._config.check_unfulfilled_deps,
            check_complete_on_run=self._config.check_complete_on_run,
            task_completion_cache=self._task_completion_cache,
        )
        process.use_multiprocessing = False  # a worker_timeout would make Luigi fork: nothing runs to time out
        process.timeout_time = None
        return process

    def _record_failure(self, task_id: str, result: m.ResultMessage) -> None:
        self.failures[task_id] = result

    def run(self) -> bool:
        if self._on_start is not None:
            self._on_start({t.task_module for t in self._scheduled_tasks.values()})
        if self._progress is not None:
            self._progress.start()
        try:
            return bool(super().run())
        finally:
            if self._progress is not None:
                self._progress.stop()  # before Luigi prints its summary

    def __exit__(self, type_: Any, value: Any, traceback: Any) -> bool:
        try:
            return bool(super().__exit__(type_, value, traceback))
        finally:
            self._sender.close()


class CeleryWorkerSchedulerFactory(luigi.interface._WorkerSchedulerFactory):
    """Makes Luigi build a :class:`CeleryWorker` instead of its own worker.

    ``on_worker`` is called with the worker count before the worker exists
    (the CLI starts the sender and, embedded, the worker pool there).
    """

    def __init__(
        self,
        sender: Sender,
        on_worker: Callable[[int], None] | None = None,
        on_start: Callable[[set[str]], None] | None = None,
        progress: ProgressView | None = None,
        complete_checks: int = 1,
    ) -> None:
        self.sender = sender
        self.on_worker = on_worker
        self.on_start = on_start
        self.progress = progress
        self.complete_checks = complete_checks
        self.worker: CeleryWorker | None = None

    def create_local_scheduler(self) -> FastScheduler:
        # Luigi's own local scheduler, as Luigi builds it, with a get_work that does not grow with the DAG
        return FastScheduler(prune_on_get_work=True, record_task_history=False)

    def create_worker(self, scheduler: Any, worker_processes: int, assistant: bool = False) -> CeleryWorker:
        if self.on_worker is not None:
            self.on_worker(worker_processes)
        self.worker = CeleryWorker(
            scheduler=scheduler,
            worker_processes=worker_processes,
            assistant=assistant,
            sender=self.sender,
            on_start=self.on_start,
            progress=self.progress,
            complete_checks=self.complete_checks,
        )
        return self.worker


def nothing_to_run(task: luigi.Task) -> bool:
    """True for a task that keeps Luigi's empty ``run()``, as a WrapperTask does.

    The dispatcher finishes those itself: sending them to a worker would cost a
    broker round trip (and a worker's slot) for nothing."""
    return type(task).run is luigi.Task.run


def root_task_id(argv: list[str]) -> str | None:
    """The id of the task Luigi's command line ``argv`` names, or None if it names none."""
    try:
        with CmdlineParser.global_instance(argv) as parser:
            return str(parser.get_task_obj().task_id)
    except (Exception, SystemExit):  # Luigi reports a bad command line itself, later
        return None


def failed_task_ids(worker: luigi.worker.Worker) -> set[str]:
    """Ids of the tasks Luigi's execution summary lists as failed."""
    return {task.task_id for task in luigi.execution_summary._summary_dict(worker).get("failed", ())}


def apply_retcode_defaults() -> None:
    """Give Luigi's [retcode] section luigi-celery's defaults, keeping any the user set."""
    config = luigi.configuration.get_config()
    if not config.has_section("retcode"):
        config.add_section("retcode")
    for name, code in RETCODE_DEFAULTS.items():
        if not config.has_option("retcode", name):
            config.set("retcode", name, str(code))


def run_with_retcodes(argv: list[str], factory: CeleryWorkerSchedulerFactory) -> int:
    """Luigi's ``run_with_retcodes``, with our worker factory; returns the exit code.

    Errors of luigi-celery itself (an unreachable broker, a bad setting) are
    raised, so the CLI can print them as one line.
    """
    apply_retcode_defaults()
    with CmdlineParser.global_instance(argv):
        retcodes = luigi.retcodes.retcode()
    try:
        worker = luigi.interface._run(argv, worker_scheduler_factory=factory).worker
    except luigi.interface.PidLockAlreadyTakenExit:
        return int(retcodes.already_running)
    except LuigiCeleryError:
        raise
    except Exception:
        InterfaceLogging.setup(luigi.interface.core())
        logging.getLogger("luigi-interface").exception("Uncaught exception in luigi")
        return int(retcodes.unhandled_exception)

    with CmdlineParser.global_instance(argv):
        task_sets = luigi.execution_summary._summary_dict(worker)
        root_task = luigi.execution_summary._root_task(worker)
    found = {name for name, tasks in task_sets.items() if tasks}
    code = max(
        retcodes.missing_data * ("still_pending_ext" in found),
        retcodes.task_failed * ("failed" in found),
        retcodes.already_running * ("run_by_other_worker" in found),
        retcodes.scheduling_error * ("scheduling_error" in found),
        retcodes.not_run * ("not_run" in found),
    )
    if code == 0 and root_task not in task_sets["completed"] and root_task not in task_sets["already_done"]:
        return int(retcodes.not_run)
    return int(code)
