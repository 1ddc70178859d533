"""The contract with Luigi's private worker API, checked two ways.

1. Statically: every attribute Luigi's ``Worker`` reads from a task-process
   object, found by walking the source of the installed Luigi, must be exactly
   the set we implement.  A Luigi upgrade that reads a new attribute (or stops
   reading one) fails here, not at 3 a.m.
2. At run time: a real Luigi run through :class:`CeleryWorker` calls our hook
   for every task, reads only contract attributes, and takes its results from
   our result queue.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import queue
import textwrap
import threading
import time
from typing import ClassVar, cast

import luigi
import luigi.interface
import luigi.rpc
import luigi.scheduler
import luigi.server
import luigi.worker
import pytest
from luigi.event import Event

from luigi_celery import message as m
from luigi_celery.dispatch import CeleryWorker, CeleryWorkerSchedulerFactory, nothing_to_run
from luigi_celery.process import CeleryTaskProcess, ResultQueue
from luigi_celery.scheduler import FastScheduler
from luigi_celery.sender import Sender

# Every attribute Luigi reads from the object _create_task_process returns.
CONTRACT = {
    "task",
    "use_multiprocessing",
    "run",
    "start",
    "is_alive",
    "exitcode",
    "timeout_time",
    "worker_timeout",
    "terminate",
    "status_reporter",
}

# The private Worker attributes luigi_celery.dispatch relies on.
PRIVATE_WORKER_API = (
    "_create_task_process", "_task_result_queue", "_scheduled_tasks", "_running_tasks", "_config", "_add_task",
    "_task_completion_cache", "_id", "_add", "_validate_task", "_log_unexpected_error", "_email_unexpected_error",
    "_first_task", "add_succeeded",
    # BatchedLoop's
    "_sleeper", "_add_worker", "_get_work", "_run_task", "_handle_next_task", "_log_remote_tasks", "_keep_alive",
    "_start_phasing_out", "_stop_requesting_work", "_idle_since", "_get_work_task_id", "_get_work_response_history",
    "_handle_task_load_error", "_batch_running_tasks", "_assistant", "host", "run_succeeded",
)  # fmt: skip

# CeleryWorker._add_with follows Luigi's Worker.add of this source (Luigi 3.8.1); re-read it when this changes.
LUIGI_WORKER_ADD_SHA256 = "df29ac40ebe34f10d133dce143aec059c99b05b3776795fc8078aa3967214707"
# BatchedLoop follows Luigi's Worker.run and the end of its _get_work, and counts on each result
# _handle_next_task handles ending one running task: re-read them when one of these changes.
LUIGI_LOOP_SHA256 = {
    "run": "004754fa292849502afe669ff326d9a09122c96dfe38544865ac4682ade63f0f",
    "_get_work": "d04681f9e82da91cd0263ad5f6e244b3d2a2ade07e0d8a4366af088056b3990e",
    "_handle_next_task": "5ecc3643b1084c451967d562ed66823d2adecfa4d077b2b69b2059e74d19baf5",
}


def _process_attribute_reads(cls: type) -> set[str]:
    """Attributes read from task-process objects anywhere in ``cls``'s methods.

    A name is a task process when it is assigned from ``self._create_task_process(...)``
    or ``self._running_tasks[...]``, or is the loop variable over
    ``self._running_tasks.values()`` / ``.items()`` (the second element).
    """
    found: set[str] = set()
    for _, func in inspect.getmembers(cls, inspect.isfunction):
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                source = ast.unparse(node.value)
                if source.startswith(("self._create_task_process(", "self._running_tasks[")):
                    names.add(node.targets[0].id)
            if isinstance(node, ast.For):
                source = ast.unparse(node.iter)
                if source == "self._running_tasks.values()" and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
                if source == "self._running_tasks.items()" and isinstance(node.target, ast.Tuple):
                    names.add(ast.unparse(node.target.elts[1]))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names:
                found.add(node.attr)
    return found


def test_luigi_reads_exactly_the_contract_attributes_from_a_task_process():
    # Given the installed Luigi's Worker source
    # When we list what it reads from task-process objects
    reads = _process_attribute_reads(luigi.worker.Worker)
    # Then it is exactly our contract: a new or dropped attribute needs a look at dispatch.py
    assert reads == CONTRACT


def test_our_task_process_implements_every_contract_attribute():
    missing = {name for name in CONTRACT if not hasattr(CeleryTaskProcess, name)}
    # exitcode, task, status_reporter and worker_timeout are set per instance or are properties
    assert missing <= {"task", "status_reporter", "worker_timeout"}
    process = CeleryTaskProcess(
        luigi.Task(),
        sender=None,  # type: ignore[arg-type]
        results=ResultQueue(),
        status_reporter=None,  # type: ignore[arg-type]
        worker_timeout=None,
        on_failed=lambda *a: None,
    )
    assert all(hasattr(process, name) for name in CONTRACT)
    assert process.use_multiprocessing is False  # Luigi must call run() in its loop, never fork
    assert process.timeout_time is None and process.exitcode is None and process.is_alive()


def test_the_private_worker_api_we_use_still_exists():
    worker = luigi.worker.Worker()
    for name in PRIVATE_WORKER_API:
        assert hasattr(worker, name), name
    assert hasattr(luigi.interface, "_WorkerSchedulerFactory")
    assert inspect.signature(luigi.interface._run).parameters.get("worker_scheduler_factory") is not None
    assert list(inspect.signature(luigi.worker.Worker._create_task_process).parameters) == ["self", "task"]
    # what the dispatcher hands Luigi's own TaskProcess, for tasks with nothing to run
    taken = inspect.signature(luigi.worker.TaskProcess).parameters
    assert {"check_unfulfilled_deps", "check_complete_on_run", "task_completion_cache"} <= set(taken)
    assert list(taken)[:4] == ["task", "worker_id", "result_queue", "status_reporter"]
    # the loop the parallel complete() checks copy, and the function they call
    assert hashlib.sha256(inspect.getsource(luigi.worker.Worker.add).encode()).hexdigest() == LUIGI_WORKER_ADD_SHA256
    for name, digest in LUIGI_LOOP_SHA256.items():
        assert hashlib.sha256(inspect.getsource(getattr(luigi.worker.Worker, name)).encode()).hexdigest() == digest
    assert list(inspect.signature(luigi.worker.check_complete).parameters) == ["task", "out_queue", "completion_cache"]
    # the scheduler's messages for a running task, which CeleryWorker relays (Luigi calls it by name)
    relay = inspect.signature(luigi.worker.Worker.dispatch_scheduler_message).parameters
    assert list(relay) == ["self", "task_id", "message_id", "content", "kwargs"]
    assert CeleryWorker.dispatch_scheduler_message.is_rpc_message_callback


def test_the_task_process_seam_the_worker_overrides_still_exists():
    # luigi_celery.taskprocess runs Luigi's TaskProcess in a worker and overrides how it turns
    # a run() exception into an explanation: Luigi's run() must still call that method, with
    # the exception, and the task process must still take what the worker passes it
    from luigi_celery.taskprocess import _WorkerTaskProcess

    assert list(inspect.signature(luigi.worker.TaskProcess._handle_run_exception).parameters) == ["self", "ex"]
    assert "self._handle_run_exception(ex)" in inspect.getsource(luigi.worker.TaskProcess.run)
    assert "_handle_run_exception" in vars(_WorkerTaskProcess)
    taken = inspect.signature(luigi.worker.TaskProcess).parameters
    assert list(taken)[:4] == ["task", "worker_id", "result_queue", "status_reporter"]
    assert {"check_unfulfilled_deps", "check_complete_on_run"} <= set(taken)


def test_the_command_line_parser_we_read_still_exists():
    # luigi_celery.commandline checks a run's command line with the parser Luigi builds
    from luigi.cmdline_parser import CmdlineParser

    assert list(inspect.signature(CmdlineParser._build_parser).parameters) == ["root_task", "help_all"]
    parser = CmdlineParser._build_parser(root_task="ContractLeaf")
    assert "--n" in parser._option_string_actions and "--ContractLeaf-n" in parser._option_string_actions
    assert callable(luigi.parameter.Parameter._parser_global_dest)


# The scheduler's internals luigi_celery.scheduler relies on.
PRIVATE_SCHEDULER_API = (
    "_state", "_config", "_paused", "_resources", "_update_worker", "_update_priority", "_rank", "_schedulable",
    "_reset_orphaned_batch_running_tasks", "_update_task_history", "_task_history",
)  # fmt: skip
PRIVATE_STATE_API = ("_tasks", "_status_tasks", "_active_workers", "_task_batchers", "_remove_workers_from_tasks",
                     "_metrics_collector")  # fmt: skip


def test_the_private_scheduler_api_we_use_still_exists():
    sch = luigi.scheduler.Scheduler()
    for name in PRIVATE_SCHEDULER_API:
        assert hasattr(sch, name), name
    for name in PRIVATE_STATE_API:
        assert hasattr(sch._state, name), name
    # FastScheduler overrides these by name: a rename in Luigi would bypass it silently
    for name in ("add_task", "get_work", "count_pending", "prune", "load", "_update_priority"):
        assert callable(getattr(luigi.scheduler.Scheduler, name)), name
    for name in ("set_status", "get_worker", "get_task", "inactivate_tasks"):
        assert callable(getattr(luigi.scheduler.SimpleTaskState, name)), name
    assert list(inspect.signature(luigi.scheduler.SimpleTaskState.get_task).parameters) == [
        "self", "task_id", "default", "setdefault"]  # fmt: skip
    # the scheduler server: the state it writes as JSON, the clock it stands in for, luigid's app
    source = inspect.getsource(luigi.scheduler)
    assert "\nimport time\n" in source and "datetime.now" not in source  # every reading goes through time.time
    assert "\nimport uuid\n" in source and "random" not in source  # its only other source of chance
    assert "self._email_batcher.add" in source  # (a replaying standby silences it, and the task history)
    assert luigi.scheduler.RetryPolicy._fields == ("retry_count", "disable_hard_timeout", "disable_window")
    assert isinstance(luigi.scheduler.Worker("w").tasks, set)  # (FastScheduler's workers keep an OrderedSet)
    assert callable(luigi.server.RPCHandler._handle_cors) and list(luigi.server.RPC_METHODS) == list(
        luigi.scheduler.RPC_METHODS)  # fmt: skip
    assert "self._cors_config = cors()" in inspect.getsource(luigi.server.RPCHandler.__init__)
    assert list(inspect.signature(luigi.server.app).parameters) == ["scheduler"]


def test_the_private_rpc_client_api_the_failover_scheduler_uses_still_exists():
    # luigi_celery.scheduler_client overrides RemoteScheduler._fetch and reads what it sets up
    assert list(inspect.signature(luigi.rpc.RemoteScheduler._fetch).parameters) == ["self", "url_suffix", "body"]
    assert "self._fetch(url, body)" in inspect.getsource(luigi.rpc.RemoteScheduler._request)
    client = luigi.rpc.RemoteScheduler("http://127.0.0.1:1")
    for name in ("_fetcher", "_url", "_connect_timeout", "_rpc_retry_attempts", "_rpc_retry_wait"):
        assert hasattr(client, name), name
    assert hasattr(client._fetcher, "raises") and callable(client._fetcher.fetch)
    assert callable(luigi.rpc._urljoin)
    assert list(inspect.signature(luigi.interface._WorkerSchedulerFactory.create_remote_scheduler).parameters) == [
        "self", "url"]  # fmt: skip


# --- at run time -------------------------------------------------------------


class ContractLeaf(luigi.Task):
    n = luigi.IntParameter()
    done: ClassVar[set[str]] = set()  # task ids "run" by the in-memory sender

    def complete(self):
        return self.task_id in self.done

    def run(self):  # never called: the sender stands in for a worker
        raise AssertionError("ran in the dispatcher")


class ContractRoot(luigi.WrapperTask):
    def requires(self):
        return [ContractLeaf(n=i) for i in range(3)]


class InstantSender:
    """Replies DONE from another thread, like the watcher does, without a broker."""

    def __init__(self):
        self.sent = []
        self.results = ResultQueue(before_wait=self.flush)

    def send(self, flight):
        self.sent.append(flight.task.task_id)
        ContractLeaf.done.add(flight.task.task_id)
        result = m.ResultMessage(celery_id="x", task_id=flight.task.task_id, status=m.DONE)
        threading.Thread(target=flight.on_result, args=(result,)).start()

    def revoke(self, flight):
        pass

    def close(self):
        pass

    def flush(self):
        """Nothing is held back: send() answers at once."""

    def waiting(self):
        return 0


class RecordingProcess(CeleryTaskProcess):
    reads: set[str] = set()

    def __getattribute__(self, name):
        if not name.startswith("_") and name not in ("on_result", "on_status"):
            RecordingProcess.reads.add(name)
        return super().__getattribute__(name)


class RecordingWorker(CeleryWorker):
    hook_calls = 0

    def _create_task_process(self, task):
        RecordingWorker.hook_calls += 1
        real = super()._create_task_process(task)
        if isinstance(real, CeleryTaskProcess):  # not Luigi's own, for tasks with nothing to run
            real.__class__ = RecordingProcess
        return real


@pytest.fixture
def recording_factory():
    sender = InstantSender()
    factory = CeleryWorkerSchedulerFactory(cast(Sender, sender))
    factory.create_worker = lambda scheduler, worker_processes, assistant=False: RecordingWorker(  # type: ignore[method-assign]
        scheduler=scheduler, worker_processes=worker_processes, assistant=assistant, sender=cast(Sender, sender)
    )
    ContractLeaf.done.clear()
    RecordingProcess.reads.clear()
    RecordingWorker.hook_calls = 0
    return factory, sender


def test_luigi_calls_our_hook_for_every_task_and_reads_only_the_contract(recording_factory):
    factory, sender = recording_factory
    # When Luigi runs a small DAG with our worker, two tasks in flight
    result = luigi.build(
        [ContractRoot()], worker_scheduler_factory=factory, local_scheduler=True, workers=2, detailed_summary=True
    )
    # Then every leaf went through our hook and our sender, and the run succeeded
    leaves = {ContractLeaf(n=i).task_id for i in range(3)}
    assert leaves <= set(sender.sent)
    assert RecordingWorker.hook_calls == len(sender.sent) + 1  # the wrapper finished here
    assert result.status == luigi.LuigiStatusCode.SUCCESS
    # and Luigi read nothing from our process objects outside the contract
    assert RecordingProcess.reads <= CONTRACT, RecordingProcess.reads - CONTRACT
    assert {"run", "is_alive", "use_multiprocessing"} <= RecordingProcess.reads


class HoldingSender(InstantSender):
    """The first task sent waits on purpose (as for a rate slot) until every other one was sent,
    or until ``patience`` runs out."""

    def __init__(self, total: int, patience: float = 5.0):
        super().__init__()
        self.total, self.patience = total, patience
        self.held = None
        self.released_because = None

    def waiting(self):
        return 1 if self.held is not None else 0

    def send(self, flight):
        if self.held is None and not self.sent:
            self.sent.append(flight.task.task_id)
            self.held = flight
            threading.Timer(self.patience, self._release, ("patience ran out",)).start()
            return
        super().send(flight)
        if len(self.sent) == self.total:
            self._release("all were sent")

    def _release(self, why):
        held, self.held = self.held, None
        if held is not None:
            self.released_because = why
            InstantSender.send(self, held)
            self.sent.pop()  # counted once, when it was held


def test_a_task_that_waits_on_purpose_does_not_take_one_of_luigis_slots():
    # Given one slot (--workers 1) and a first task that waits for its rate slot
    sender = HoldingSender(total=3)
    factory = CeleryWorkerSchedulerFactory(cast(Sender, sender))
    ContractLeaf.done.clear()
    # When Luigi runs three tasks
    result = luigi.build([ContractRoot()], worker_scheduler_factory=factory, local_scheduler=True, workers=1)
    # Then it sent the other two while the first one waited (Luigi re-reads worker_processes)
    assert sender.released_because == "all were sent"
    assert result is True


def test_a_wrapper_is_finished_in_the_dispatcher_with_luigis_events(recording_factory):
    factory, sender = recording_factory
    seen = []

    class EventfulRoot(ContractRoot):
        """ContractRoot with handlers of its own: handlers stay on the class they are added to."""

    for event in (Event.START, Event.SUCCESS):
        EventfulRoot.event_handler(event)(lambda task, event=event: seen.append((event, task.task_id, os.getpid())))
    # When Luigi runs leaves under a wrapper
    result = luigi.build([EventfulRoot()], worker_scheduler_factory=factory, local_scheduler=True, workers=2,
                         detailed_summary=True)  # fmt: skip
    # Then the leaves went to the sender, the wrapper did not, and it succeeded here, with its events
    root = EventfulRoot().task_id
    assert root not in sender.sent and len(sender.sent) == 3
    assert result.status == luigi.LuigiStatusCode.SUCCESS
    assert seen == [(Event.START, root, os.getpid()), (Event.SUCCESS, root, os.getpid())]


def test_only_tasks_that_keep_luigis_empty_run_are_finished_here():
    class Overrides(luigi.WrapperTask):
        def run(self):
            print("something")

    assert nothing_to_run(ContractRoot()) and nothing_to_run(luigi.Task())
    assert not nothing_to_run(ContractLeaf(n=1)) and not nothing_to_run(Overrides())
    assert not nothing_to_run(luigi.ExternalTask())


def test_wake_makes_a_waiting_get_give_up_at_once():
    results = ResultQueue()
    threading.Timer(0.1, results.wake).start()
    began = time.monotonic()
    with pytest.raises(queue.Empty):
        results.get(timeout=10)
    assert time.monotonic() - began < 5
    # and results queued after it are still handed out
    results.put(("id", "DONE", "", [], []))
    assert results.get(timeout=1)[0] == "id"


class SlowCheck(luigi.Task):
    """A leaf whose complete() takes a while (a remote store), and counts how many run at once."""

    n = luigi.IntParameter()
    fails = luigi.BoolParameter(default=False)
    running = 0
    most = 0
    lock = threading.Lock()

    def complete(self):
        with SlowCheck.lock:
            SlowCheck.running += 1
            SlowCheck.most = max(SlowCheck.most, SlowCheck.running)
        time.sleep(0.05)
        with SlowCheck.lock:
            SlowCheck.running -= 1
        if self.fails:
            raise OSError("the store is down")
        return self.task_id in ContractLeaf.done

    def run(self):
        raise AssertionError("ran in the dispatcher")


class SlowRoot(luigi.WrapperTask):
    broken = luigi.BoolParameter(default=False)

    def requires(self):
        return [SlowCheck(n=i, fails=self.broken and i == 3) for i in range(12)]


def _resolve(complete_checks, root):
    sender = InstantSender()
    factory = CeleryWorkerSchedulerFactory(cast(Sender, sender), complete_checks=complete_checks)
    ContractLeaf.done.clear()
    SlowCheck.most = 0
    result = luigi.build([root], worker_scheduler_factory=factory, local_scheduler=True, workers=2,
                         detailed_summary=True)  # fmt: skip
    return result, sorted(sender.sent), SlowCheck.most


def test_complete_checks_run_at_once_only_when_asked():
    # Given twelve leaves whose complete() is slow
    # When Luigi resolves the DAG as it does, and with four checks at a time
    alone, sent_alone, most_alone = _resolve(1, SlowRoot())
    together, sent_together, most_together = _resolve(4, SlowRoot())
    # Then Luigi's way checks one at a time, the other up to four at once
    assert most_alone == 1
    assert 1 < most_together <= 4
    # and both send the same tasks and end the same way
    assert sent_alone == sent_together and len(sent_together) == 12
    assert alone.status == together.status == luigi.LuigiStatusCode.SUCCESS


def test_a_complete_check_that_raises_ends_the_same_with_checks_at_once():
    alone, sent_alone, _ = _resolve(1, SlowRoot(broken=True))
    together, sent_together, _ = _resolve(4, SlowRoot(broken=True))
    # Luigi's scheduling error for the broken leaf, the other eleven run, in both
    assert alone.status == together.status == luigi.LuigiStatusCode.SCHEDULING_FAILED
    assert sent_alone == sent_together and len(sent_together) == 11


def test_luigis_worker_checks_are_read_when_luigi_starts_each_task():
    # Given a worker whose [worker] checks change after it was built (as Luigi's own tests do)
    seen = []

    class RecordingSender(InstantSender):
        def send(self, flight):
            seen.append((flight.check_unfulfilled_deps, flight.check_complete_on_run, flight.cache_task_completion))
            super().send(flight)

    sender = RecordingSender()
    ContractLeaf.done.clear()
    worker = CeleryWorker(scheduler=luigi.scheduler.Scheduler(), worker_processes=1, sender=sender)  # type: ignore[arg-type]
    with worker:
        worker._config.check_unfulfilled_deps = False
        worker._config.check_complete_on_run = True
        worker._config.cache_task_completion = True
        worker.add(ContractLeaf(n=7))
        worker.run()
    # Then the task went out with the checks as they were when Luigi started it
    assert seen == [(False, True, True)]


class ListeningLeaf(ContractLeaf):
    accepts_messages = True


class RelayingSender(InstantSender):
    """As a task is sent, the scheduler has a message for it (Luigi's keep-alive thread hands it
    to the worker); what is relayed to the task's worker is kept, and each is answered twice:
    once as itself, once as a message nobody sent."""

    def __init__(self, worker_of):
        super().__init__()
        self.worker_of = worker_of  # () -> the CeleryWorker (made after this sender)
        self.relayed = []

    def send(self, flight):
        self.worker_of()._handle_rpc_message({"name": "dispatch_scheduler_message", "kwargs": {
            "task_id": flight.task.task_id, "message_id": "m-1", "content": "pause"}})  # fmt: skip
        super().send(flight)

    def relay(self, flight, message_id, content, payload):
        self.relayed.append((message_id, content, payload))
        for answered in (message_id, "m-forged"):
            value = {"message_id": answered, "response": f"{content}d"}
            flight.on_status(m.StatusMessage("x", flight.task.task_id, "scheduler_message_response", value))


def _run_with_a_message(task, scheduler):
    ContractLeaf.done.clear()
    made: list[CeleryWorker] = []
    sender = RelayingSender(lambda: made[0])
    worker = CeleryWorker(scheduler=scheduler, worker_processes=1, sender=sender)  # type: ignore[arg-type]
    made.append(worker)
    with worker:
        worker.add(task)
        worker.run()
    return sender.relayed


def test_a_message_from_the_scheduler_is_relayed_and_only_its_own_response_reaches_the_scheduler():
    # Given a dispatcher running a task that accepts messages, whose worker answers any message
    # it is relayed, and also answers a message nobody sent
    scheduler = luigi.scheduler.Scheduler(send_messages=True)
    task = ListeningLeaf(n=8)
    relayed = _run_with_a_message(task, scheduler)
    # Then the message went on to the worker, and the response to it reached the scheduler
    assert relayed == [("m-1", "pause", {})]
    assert scheduler.get_scheduler_message_response(task.task_id, "m-1") == {"response": "paused"}
    # but not one to a message the scheduler never sent
    assert scheduler.get_scheduler_message_response(task.task_id, "m-forged") == {"response": None}


def test_a_task_that_does_not_accept_messages_is_relayed_none():
    relayed = _run_with_a_message(ContractLeaf(n=9), luigi.scheduler.Scheduler(send_messages=True))
    assert relayed == []  # (as Luigi's worker puts nothing on a queue such a task does not have)


class BurstSender(InstantSender):
    """Replies to the tasks in flight all at once, when ``slots`` of them are (or the run is at its end)."""

    def __init__(self, slots: int, total: int):
        super().__init__()
        self.slots, self.total = slots, total
        self.in_flight: list = []
        self.most_in_flight = 0

    def send(self, flight):
        self.sent.append(flight.task.task_id)
        self.in_flight.append(flight)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        if len(self.in_flight) == self.slots or len(self.sent) == self.total:
            burst, self.in_flight = self.in_flight, []
            threading.Thread(target=self._reply, args=(burst,)).start()

    def _reply(self, burst):
        for flight in burst:
            ContractLeaf.done.add(flight.task.task_id)
            flight.on_result(m.ResultMessage(celery_id="x", task_id=flight.task.task_id, status=m.DONE))


class WideRoot(luigi.WrapperTask):
    def requires(self):
        return [ContractLeaf(n=i) for i in range(12)]


def test_the_loop_hands_out_a_task_for_each_free_slot_in_one_call_and_keeps_the_cap(monkeypatch):
    # Given four slots, and replies that come four at a time
    sender = BurstSender(slots=4, total=12)
    factory = CeleryWorkerSchedulerFactory(cast(Sender, sender))
    calls: list[int] = []
    own = FastScheduler.get_work_many

    def counted(self, limit, **kwargs):
        replies = own(self, limit, **kwargs)
        calls.append(len([r for r in replies if r["task_id"] is not None]))
        return replies

    monkeypatch.setattr(FastScheduler, "get_work_many", counted)
    ContractLeaf.done.clear()
    # When Luigi runs twelve tasks
    result = luigi.build([WideRoot()], worker_scheduler_factory=factory, local_scheduler=True, workers=4)
    # Then all ran, never more than four at once, and each burst of four results was
    # answered by four tasks handed out in one call
    assert result is True and len(sender.sent) == 12
    assert sender.most_in_flight == 4
    assert calls.count(4) >= 3 and sum(calls) >= 12
