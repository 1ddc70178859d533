"""Tasks the end-to-end tests run through real workers, one behaviour each.

Every task takes ``out`` (a folder, insignificant so it does not change task
ids) and appends what happened to ``out/events.log`` as ``EVENT task_id pid``,
so a test can see which process ran what.
"""

import os
import time
from pathlib import Path

import luigi
from celery.exceptions import SoftTimeLimitExceeded
from luigi.parameter import ParameterVisibility


class OutTask(luigi.Task):
    out = luigi.Parameter(significant=False)

    def target(self, name: str) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(Path(self.out, name)))

    def output(self):
        return self.target(f"{self.task_id}.txt")

    def write(self, text: str = "done") -> None:
        with self.output().open("w") as f:
            f.write(text)


def _log_event(out: str, event: str, task_id: str) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)  # the first event may come before any output
    with open(Path(out, "events.log"), "a") as f:
        f.write(f"{event} {task_id} {os.getpid()}\n")


@OutTask.event_handler(luigi.Event.START)
def _on_start(task):
    _log_event(task.out, "START", task.task_id)


@OutTask.event_handler(luigi.Event.SUCCESS)
def _on_success(task):
    _log_event(task.out, "SUCCESS", task.task_id)


@OutTask.event_handler(luigi.Event.FAILURE)
def _on_failure(task, exception):
    _log_event(task.out, "FAILURE", task.task_id)


@OutTask.event_handler(luigi.Event.TIMEOUT)
def _on_timeout(task, error_msg):
    _log_event(task.out, "TIMEOUT", task.task_id)


class Succeeds(OutTask):
    def run(self):
        self.write()

    def on_success(self):
        Path(self.out, "on_success.txt").write_text(self.task_id)
        return "finished well"


class Fails(OutTask):
    def run(self):
        raise ValueError("boom from Fails")


class CustomFailure(OutTask):
    def run(self):
        raise KeyError("lost key")

    def on_failure(self, exception):
        return f"custom failure explanation: {exception!r}"


class DynamicChild(OutTask):
    n = luigi.IntParameter()

    def run(self):
        self.write(f"child {self.n}")


class DynamicParent(OutTask):
    def run(self):
        children = yield [DynamicChild(out=self.out, n=n) for n in range(3)]
        texts = [c.open().read() for c in children]
        self.write(" + ".join(texts))


class Gate(luigi.ExternalTask):
    out = luigi.Parameter(significant=False)

    def output(self):
        return luigi.LocalTarget(str(Path(self.out, "gate")))


class RemovesGate(OutTask):
    """Deletes the gate file, so a task needing the gate finds it gone at run time."""

    def run(self):
        os.remove(Path(self.out, "gate"))
        self.write()


class NeedsGate(OutTask):
    def requires(self):
        return [RemovesGate(out=self.out), Gate(out=self.out)]

    def run(self):
        self.write()


class NeedsMissingGate(OutTask):
    def requires(self):
        return Gate(out=self.out)

    def run(self):
        self.write()


class Reports(OutTask):
    """Reports status, progress and a tracking URL from inside run().

    Luigi clears the tracking URL once a task is DONE, so the task waits (up to
    30 s) for the test to create ``out/release`` after it has seen the URL.
    """

    def run(self):
        self.set_tracking_url("http://tracker.example/job/42")
        self.set_progress_percentage(50)
        self.set_status_message("halfway there")
        deadline = time.time() + 30
        while not Path(self.out, "release").exists() and time.time() < deadline:
            time.sleep(0.1)
        self.set_progress_percentage(100)
        self.set_status_message("all done")
        self.write()


class Sleeps(OutTask):
    worker_timeout = 2

    def run(self):
        time.sleep(60)
        self.write()


class IgnoresSoftLimit(OutTask):
    """Swallows the soft time limit, so only the hard limit can stop it."""

    worker_timeout = 1

    def run(self):
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                time.sleep(0.2)
            except SoftTimeLimitExceeded:
                pass
        self.write()


class TakesAnything(OutTask):
    value = luigi.Parameter()

    def run(self):
        self.write(str(self.value))


class NeedsTuple(luigi.WrapperTask):
    out = luigi.Parameter(significant=False)

    def requires(self):
        return TakesAnything(out=self.out, value=("a", "b"))


class HasPrivate(OutTask):
    secret = luigi.Parameter(default="hunter2", visibility=ParameterVisibility.PRIVATE)

    def run(self):
        self.write()


def make_local_task():
    class DefinedInAFunction(OutTask):
        def run(self):
            self.write()

    return DefinedInAFunction


class NeedsLocal(luigi.WrapperTask):
    out = luigi.Parameter(significant=False)

    def requires(self):
        return make_local_task()(out=self.out)


class NeedsOtherModule(luigi.WrapperTask):
    out = luigi.Parameter(significant=False)

    def requires(self):
        from tests.pipelines_other import Elsewhere

        return Elsewhere(out=self.out)


class Overlaps(OutTask):
    """Sleeps a second, recording when it ran, so a test can see tasks run side by side."""

    n = luigi.IntParameter()

    def run(self):
        started = time.time()
        time.sleep(1)
        self.write(f"{started} {time.time()} {os.getpid()}")


class ThreeAtOnce(luigi.WrapperTask):
    out = luigi.Parameter(significant=False)

    def requires(self):
        return [Overlaps(out=self.out, n=n) for n in range(3)]


class SleepsLong(OutTask):
    """Runs long enough for a test to kill what runs it."""

    def run(self):
        _log_event(self.out, "RUNNING", self.task_id)
        time.sleep(120)
        self.write()


class Slow(OutTask):
    """Takes ``seconds``; its START events count how often it began."""

    n = luigi.IntParameter()
    seconds = luigi.FloatParameter(default=3.0)

    def run(self):
        time.sleep(self.seconds)
        self.write(f"slow {self.n}")


class ManySlow(luigi.WrapperTask):
    out = luigi.Parameter(significant=False)
    count = luigi.IntParameter(default=4)
    seconds = luigi.FloatParameter(default=3.0)

    def requires(self):
        return [Slow(out=self.out, n=n, seconds=self.seconds) for n in range(self.count)]


class Unserved(OutTask):
    """Goes to a queue no test worker consumes."""

    celery_queue = os.environ.get("LC_TEST_UNSERVED_QUEUE", "lc-test-nobody-serves-this")

    def run(self):
        self.write()


class WrapsSucceeds(luigi.WrapperTask):
    """Complete as soon as its requirement is; stock Luigi still runs it and calls on_success."""

    out = luigi.Parameter(significant=False)

    def requires(self):
        return Succeeds(out=self.out)

    def on_success(self):
        Path(self.out, "wrapper_on_success.txt").write_text(self.task_id)


class StartsAt(OutTask):
    """Writes the moment its run() began, for rate measurements."""

    n = luigi.IntParameter()

    def run(self):
        began = time.time()
        self.write(repr(began))


class Limited(StartsAt):
    rate_limit = "20/s"


class LimitedBatch(luigi.WrapperTask):
    out = luigi.Parameter(significant=False)
    first = luigi.IntParameter()
    count = luigi.IntParameter()

    def requires(self):
        return [Limited(out=self.out, n=n) for n in range(self.first, self.first + self.count)]


class SharedA(StartsAt):
    rate_limit = "10/s"
    rate_limit_key = "lc-test-one-api"


class SharedB(StartsAt):
    rate_limit = "10/s"
    rate_limit_key = "lc-test-one-api"


class Unlimited(StartsAt):
    pass


class SharedAndUnlimited(luigi.WrapperTask):
    out = luigi.Parameter(significant=False)

    def requires(self):
        tasks = []
        for n in range(30):
            tasks += [SharedA(out=self.out, n=n), SharedB(out=self.out, n=n), Unlimited(out=self.out, n=n)]
        return tasks


class Flaky(OutTask):
    """Fails with a retryable error ``fail_times`` times, then succeeds; logs each attempt's time."""

    fail_times = luigi.IntParameter(default=2)
    max_retries = 3
    retry_backoff = 0.5
    retry_backoff_max = 4
    retry_on = (ConnectionError,)

    def run(self):
        attempts = Path(self.out, f"{self.task_id}.attempts")
        with attempts.open("a") as f:
            f.write(f"{time.time()}\n")
        tried = len(attempts.read_text().split())
        if tried <= self.fail_times:
            raise ConnectionError(f"flaky, attempt {tried}")
        self.write(f"attempt {tried}")

    def on_failure(self, exception):
        Path(self.out, "on_failure_calls").open("a").write("1\n")
        return super().on_failure(exception)


class FailsOtherwise(Flaky):
    """A ValueError is not in retry_on: it must fail at once."""

    def run(self):
        Path(self.out, f"{self.task_id}.attempts").open("a").write(f"{time.time()}\n")
        raise ValueError("not retryable")


class MixedOutcomes(luigi.WrapperTask):
    """Three quick successes, one failure, and a task that succeeds on its third attempt."""

    out = luigi.Parameter(significant=False)

    def requires(self):
        return [Slow(out=self.out, n=n, seconds=0.05) for n in range(3)] + [Fails(out=self.out), Flaky(out=self.out)]


class MixedOutcomesForAWhile(MixedOutcomes):
    """MixedOutcomes, and a success that takes 3 s: a run long enough to be scraped a few times."""

    def requires(self):
        return [*super().requires(), Slow(out=self.out, n=3, seconds=3.0)]


class ExitsInRun(OutTask):
    """Its own sys.exit() in run(): Luigi's worker reports it FAILED, with on_failure."""

    def run(self):
        raise SystemExit(3)


class InterruptsInRun(OutTask):
    """Its own KeyboardInterrupt in run(): Luigi's worker reports it FAILED, without on_failure."""

    def run(self):
        raise KeyboardInterrupt


class ExitsOrInterrupts(luigi.WrapperTask):
    out = luigi.Parameter(significant=False)

    def requires(self):
        return [ExitsInRun(out=self.out), InterruptsInRun(out=self.out)]


class SlowToRebuild(OutTask):
    """Its worker_timeout runs out while a Celery worker rebuilds it, before run() starts."""

    worker_timeout = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import multiprocessing

        if multiprocessing.current_process().name.startswith("ForkPoolWorker"):  # (on a worker only)
            time.sleep(4)

    def run(self):
        self.write()


class RecordsContext:
    """A [worker] task_process_context: says when it is entered and left around run()."""

    def __init__(self, process):
        self.task = process.task

    def __enter__(self):
        _log_event(self.task.out, "ENTER", self.task.task_id)

    def __exit__(self, *exc):
        _log_event(self.task.out, "EXIT", self.task.task_id)


class InContext(luigi.WrapperTask):
    """A wrapper (run by the dispatcher) around a task a worker runs, both inside the context."""

    out = luigi.Parameter(significant=False)

    def requires(self):
        return Succeeds(out=self.out)


class WritesThenYields(OutTask):
    """Complete before its dynamic dependency is done: Luigi still runs run() again to resume it."""

    def run(self):
        self.write("early")
        yield Succeeds(out=str(Path(self.out, "dep")))
        _log_event(self.out, "RESUMED", self.task_id)


def _on_a_worker() -> bool:
    import multiprocessing

    return multiprocessing.current_process().name.startswith("ForkPoolWorker")


class ChecksLogged(OutTask):
    """Logs each complete() check made on a worker as CHECKED."""

    def complete(self):
        if _on_a_worker():
            _log_event(self.out, "CHECKED", self.task_id)
        return super().complete()

    def run(self):
        self.write()


class YieldsChecksLogged(OutTask):
    def run(self):
        yield ChecksLogged(out=self.out)
        self.write()


class Listens(OutTask):
    """Accepts messages from the scheduler: waits up to ``wait`` seconds for one, answers it, and
    writes what it got ("none" without one). Luigi sets ``scheduler_messages`` while run() runs."""

    accepts_messages = True
    wait = luigi.FloatParameter(default=0.0, significant=False)

    def run(self):
        self.set_status_message("listening")
        got, deadline = "none", time.time() + self.wait
        while True:
            messages = self.scheduler_messages  # type: ignore[attr-defined]
            if not messages.empty():
                message = messages.get()
                message.respond(f"got {message}")
                got = str(message)
                break
            if time.time() >= deadline:
                break
            time.sleep(0.1)
        self.write(got)


def make_task_class():
    class MadeByAFactory(OutTask):
        def run(self):
            self.write()

    return MadeByAFactory


# Defined inside a function, and by importing this module: a worker on this machine finds it.
MadeByAFactory = make_task_class()
