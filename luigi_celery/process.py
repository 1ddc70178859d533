"""What Luigi's worker holds for a task it runs: a process-like object, and the result queue.

:class:`CeleryTaskProcess` is what Luigi thinks runs a task: it publishes one
Celery message and returns; the outcome comes back on the :class:`ResultQueue`
that stands in for the worker's ``_task_result_queue``.
``tests/test_luigi_contract.py`` lists every attribute Luigi reads from them.
"""

from __future__ import annotations

import functools
import logging
import queue
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import luigi
import luigi.worker
from luigi.event import Event

from luigi_celery import message as m

if TYPE_CHECKING:
    from luigi_celery.sender import Sender

logger = logging.getLogger(__name__)


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

    def __init__(self, before_wait: Callable[[], None] = lambda: None) -> None:
        self._items: queue.Queue[Any] = queue.Queue()
        # Called when get() is about to wait: the sender publishes the batch Luigi's loop built up.
        self.before_wait = before_wait

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
        check_unfulfilled_deps: bool = True,
        check_complete_on_run: bool = False,
        cache_task_completion: bool = False,
        answer: Callable[[str, Any], None] | None = None,
    ) -> None:
        """``answer(message_id, response)`` hands a response to a message from the scheduler to
        the scheduler; None for a task that does not accept messages."""
        self.task = task
        self.status_reporter = status_reporter
        self.worker_timeout = worker_timeout
        # Luigi's [worker] settings as they are when Luigi starts the task, travelling with it
        self.check_unfulfilled_deps = check_unfulfilled_deps
        self.check_complete_on_run = check_complete_on_run
        self.cache_task_completion = cache_task_completion
        self._sender = sender
        self._results = results
        self._on_failed = on_failed
        self._on_running = on_running
        self._finished = False
        self._answer = answer
        self._relayed: set[str] = set()  # the ids of the scheduler's messages sent on to the task

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

    def relay(self, message_id: str, content: Any, payload: dict[str, Any]) -> None:
        """Send a message from the scheduler on to the running task (Luigi's keep-alive thread
        calls this); as Luigi's worker, drop it when the task does not accept messages."""
        if self._answer is not None:
            self._relayed.add(message_id)
            self._sender.relay(self, message_id, content, payload)

    # Flight callbacks: called from the watcher thread (or from run() on a refusal).

    def on_result(self, result: m.ResultMessage) -> None:
        self._finished = True
        if result.status == m.FAILED:
            self._on_failed(self.task.task_id, result)
        if result.event == "timeout":
            self._results.call_soon(functools.partial(self.task.trigger_event, Event.TIMEOUT, self.task, result.expl))
        self._results.put(result.luigi_tuple())

    def on_status(self, status: m.StatusMessage) -> None:
        if status.field == "scheduler_message_response":
            message_id, response = status.value["message_id"], status.value["response"]
            if self._answer is not None and message_id in self._relayed:  # (a message we relayed)
                self._results.call_soon(functools.partial(self._answer, message_id, response))
            return
        if status.field in ("started", "retry_in"):  # a worker runs it now / it waits in a queue again
            self._on_running(self.task.task_id, status.field == "started")
            return
        apply = getattr(self.status_reporter, _REPORTER_METHODS[status.field])
        self._results.call_soon(functools.partial(apply, status.value))
