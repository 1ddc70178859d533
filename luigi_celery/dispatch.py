"""The Luigi seam: a Luigi worker whose "processes" are Celery messages.

This is the only module of the dispatcher that touches Luigi's private API
(on a worker, ``taskprocess.py`` is the only one):
``Worker._create_task_process``, ``Worker._task_result_queue``, ``Worker._task_completion_cache``,
``Worker._scheduled_tasks``, ``Worker._add_task``, ``Worker._add``, ``Worker._validate_task``,
the loop's (``Worker.run``, ``_get_work``, ``_run_task``, ``_handle_next_task`` and what they
keep: see ``BatchedLoop``),
``interface._WorkerSchedulerFactory``,
``interface._run`` and ``execution_summary._summary_dict/_root_task``.
``tests/test_luigi_contract.py`` lists every attribute Luigi reads from
the process-like :class:`~luigi_celery.process.CeleryTaskProcess` this worker
hands it, so a Luigi upgrade fails there, loudly.

Luigi keeps doing everything else: resolving the DAG, asking its scheduler
for work (in batches: ``BatchedLoop``), keeping ``--workers`` tasks in flight,
handling results, dynamic dependencies, the execution summary. Tasks with nothing to run (a
WrapperTask) run here, in Luigi's own ``TaskProcess``, as under ``luigi
--workers 1``. (The local scheduler's internals are touched in
``scheduler.py`` only.)
"""

from __future__ import annotations

import concurrent.futures
import datetime
import functools
import logging
import queue
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
from luigi_celery.process import CeleryTaskProcess
from luigi_celery.progress import ProgressView
from luigi_celery.scheduler import FastScheduler
from luigi_celery.scheduler_client import FailoverScheduler, scheduler_urls
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

class BatchedLoop(luigi.worker.Worker):
    """Luigi's worker loop (``Worker.run``), with work handed out in batches.

    Luigi's loop asks its scheduler for one task, starts it and asks again, and between two
    asks handles one result: with N tasks in flight, once a task ends, every later round
    of the loop hands out one task. Here, every result that has come is handled before the
    loop asks again, and a scheduler that can (``FastScheduler.get_work_many``, the local
    one) hands out a task for every free slot in one call. Each task is still started
    by Luigi's ``_run_task`` and each result handled by its ``_handle_next_task``; a
    scheduler that cannot (a luigid) is asked through Luigi's own ``_get_work``.

    Luigi's own worker, keep-alive, priority, resource and execution-summary tests run
    with this loop in place of Luigi's (``tests/test_luigi_scheduler_suite.py``), and
    ``test_luigi_contract.py`` pins the Luigi code it follows.
    """

    def run(self) -> bool:
        logger.info("Running Worker with %d processes", self.worker_processes)
        sleeper = self._sleeper()
        self.run_succeeded = True
        self._add_worker()
        while True:
            if len(self._running_tasks) >= self.worker_processes > 0:
                logger.debug("%d running tasks, waiting for next task to finish", len(self._running_tasks))
                while len(self._running_tasks) >= self.worker_processes > 0:
                    self._handle_results()
            responses = self._get_work_batch()
            last = responses[-1]
            if last.worker_state == luigi.worker.WORKER_STATE_DISABLED:
                self._start_phasing_out()
            handed_out = [r.task_id for r in responses if r.task_id is not None]
            if handed_out:
                logger.debug("Pending tasks: %s", last.n_pending_tasks)
                for task_id in handed_out:
                    self._run_task(task_id)
                continue
            if not self._stop_requesting_work:
                self._log_remote_tasks(last)
            if len(self._running_tasks) == 0:
                self._idle_since = self._idle_since or datetime.datetime.now()
                if self._keep_alive(last):
                    next(sleeper)
                    continue
                break
            self._handle_results()
        while len(self._running_tasks):
            logger.debug("Shut down Worker, %d more tasks to go", len(self._running_tasks))
            self._handle_results()
        return bool(self.run_succeeded)

    def _handle_results(self) -> None:
        """Luigi's ``_handle_next_task`` (which waits up to ``wait_interval`` for one result),
        then again for each result that has come meanwhile, without waiting."""
        running = len(self._running_tasks)
        self._handle_next_task()
        waits = self._config.wait_interval
        try:
            self._config.wait_interval = 0
            while self._running_tasks and len(self._running_tasks) < running:  # (each result ends one task)
                running = len(self._running_tasks)
                self._handle_next_task()
        finally:
            self._config.wait_interval = waits

    def _get_work_batch(self) -> list[luigi.worker.GetWorkResponse]:
        """What the scheduler hands out for the free slots: one response per task, the last
        one possibly with no task (Luigi's ``_get_work``, once per task, where it cannot)."""
        free = self.worker_processes - len(self._running_tasks)
        get_work_many = getattr(self._scheduler, "get_work_many", None)
        if get_work_many is None or free <= 1 or self._stop_requesting_work:
            return [self._get_work()]
        logger.debug("Asking scheduler for work...")
        replies = get_work_many(
            free, worker=self._id, host=self.host, assistant=self._assistant, current_tasks=list(self._running_tasks)
        )
        return [self._work_response(reply) for reply in replies]

    def _work_response(self, r: dict[str, Any]) -> luigi.worker.GetWorkResponse:
        """Luigi's ``_get_work`` from the scheduler's reply ``r`` on (its code)."""
        running_tasks = r["running_tasks"]
        task_id = self._get_work_task_id(r)
        self._get_work_response_history.append({"task_id": task_id, "running_tasks": running_tasks})
        if task_id is not None and task_id not in self._scheduled_tasks:
            logger.info("Did not schedule %s, will load it dynamically", task_id)
            try:
                self._scheduled_tasks[task_id] = luigi.worker.load_task(
                    module=r.get("task_module"), task_name=r["task_family"], params_str=r["task_params"]
                )
            except luigi.worker.TaskClassException as ex:
                self._handle_task_load_error(ex, [task_id])
                task_id = None
                self.run_succeeded = False
        if task_id is not None and "batch_task_ids" in r:
            batch_tasks = filter(None, [self._scheduled_tasks.get(batch_id) for batch_id in r["batch_task_ids"]])
            self._batch_running_tasks[task_id] = batch_tasks
        return luigi.worker.GetWorkResponse(
            task_id=task_id,
            running_tasks=running_tasks,
            n_pending_tasks=r["n_pending_tasks"],
            n_unique_pending=r["n_unique_pending"],
            n_pending_last_scheduled=r.get("n_pending_last_scheduled", 0),
            worker_state=r.get("worker_state", luigi.worker.WORKER_STATE_ACTIVE),
        )


class CeleryWorker(BatchedLoop):
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
        self._task_result_queue = sender.results
        self._on_start = on_start
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
        if nothing_to_run(task):
            self._running(task.task_id, True)  # it runs here, now
            messages: queue.Queue[Any] | None = queue.Queue() if task.accepts_messages else None
            reporter = luigi.worker.TaskStatusReporter(self._scheduler, task.task_id, self._id, messages)
            return self._in_process(task, reporter)
        self._running(task.task_id, False)  # queued, until a worker says it runs it
        reporter = luigi.worker.TaskStatusReporter(self._scheduler, task.task_id, self._id, None)
        timeout = task.worker_timeout if task.worker_timeout is not None else self._config.timeout
        answer = None  # how a response to a message from the scheduler reaches it (dispatch_scheduler_message)
        if task.accepts_messages:
            answer = functools.partial(self._scheduler.add_scheduler_message_response, task.task_id)
        return CeleryTaskProcess(
            task, self._sender, self._task_result_queue, reporter, timeout or None, self._record_failure,
            self._running, self._config.check_unfulfilled_deps, self._config.check_complete_on_run,
            self._config.cache_task_completion, answer=answer,
        )  # fmt: skip

    @luigi.worker.rpc_message_callback
    def dispatch_scheduler_message(self, task_id: str, message_id: str, content: Any, **kwargs: Any) -> None:
        """A message from the scheduler for a running task (Luigi's keep-alive thread calls this):
        relayed to the worker that runs it; a task run here gets it as under Luigi."""
        process = self._running_tasks.get(str(task_id))
        if isinstance(process, CeleryTaskProcess):
            process.relay(str(message_id), content, kwargs)
        else:
            super().dispatch_scheduler_message(task_id, message_id, content, **kwargs)

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
        process = luigi.worker.ContextManagedTaskProcess(
            self._config.task_process_context,  # ([worker] task_process_context, entered around run())
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

    def create_remote_scheduler(self, url: str) -> FailoverScheduler:
        # Luigi's RemoteScheduler, over each replica named (URL1,URL2,...), with backoff
        return FailoverScheduler(scheduler_urls(url))

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
