"""Small Luigi tasks for the unit tests.

They live at module level in an importable module, as a worker needs them to.
Their families carry the namespace ``unit_tasks``, so they never clash with
the task families of other test modules in Luigi's global registry.

Every task that touches the file system takes ``root``, an insignificant
parameter: the tests pass their ``tmp_path`` there, it travels with the
task's str params, and it does not change the task id.
"""

from __future__ import annotations

import os

import luigi
from celery.exceptions import SoftTimeLimitExceeded
from luigi.parameter import ParameterVisibility

luigi.namespace("unit_tasks", scope=__name__)


def _target(root: str, name: str) -> luigi.LocalTarget:
    return luigi.LocalTarget(os.path.join(root, name))


def _touch(root: str, name: str, text: str = "") -> None:
    with open(os.path.join(root, name), "w") as f:
        f.write(text)


# --- tasks for check_dispatchable ---------------------------------------------


class EveryParameterKind(luigi.Task):
    """Parameters of every type that survives the string round trip."""

    day = luigi.DateParameter()
    count = luigi.IntParameter()
    names = luigi.ListParameter()
    options = luigi.DictParameter()
    maybe = luigi.OptionalParameter(default=None)
    note = luigi.Parameter(significant=False, default="not part of the id")


class PlainParameter(luigi.Task):
    """A plain luigi.Parameter: only strings survive the trip."""

    value = luigi.Parameter()


class PrivateParameter(luigi.Task):
    """A parameter luigi-celery must never put on the broker."""

    token = luigi.Parameter(visibility=ParameterVisibility.PRIVATE)


# --- tasks for run_task_message -------------------------------------------------


class WritesOutput(luigi.Task):
    """Writes its output and reports its progress from inside run()."""

    root = luigi.Parameter(significant=False)
    name = luigi.Parameter(default="out")

    def output(self) -> luigi.LocalTarget:
        return _target(self.root, f"{self.name}.txt")

    def run(self) -> None:
        self.set_status_message("half way")
        self.set_progress_percentage(50)
        self.set_tracking_url("http://tracker.example/1")
        with self.output().open("w") as f:
            f.write("done")


class NeverWrites(luigi.Task):
    """Runs without error but never produces its output."""

    root = luigi.Parameter(significant=False)

    def output(self) -> luigi.LocalTarget:
        return _target(self.root, "never.txt")

    def run(self) -> None:
        pass


class Boom(luigi.Task):
    """Fails with a plain exception; Luigi's default on_failure explains it."""

    def run(self) -> None:
        raise ValueError("boom")


class CustomFailure(luigi.Task):
    """Fails, and its own on_failure writes the explanation."""

    def run(self) -> None:
        raise RuntimeError("disk full")

    def on_failure(self, exception: BaseException) -> str:
        return f"custom: {exception}"


class CustomSuccess(luigi.Task):
    """Succeeds, and its on_success leaves a mark the test can see."""

    root = luigi.Parameter(significant=False)

    def output(self) -> luigi.LocalTarget:
        return _target(self.root, "custom_success.txt")

    def run(self) -> None:
        _touch(self.root, "custom_success.txt")

    def on_success(self) -> None:
        _touch(self.root, "on_success_called")


class DynamicChild(luigi.Task):
    """The dynamic dependency of DynamicParent."""

    root = luigi.Parameter(significant=False)
    n = luigi.IntParameter()

    def output(self) -> luigi.LocalTarget:
        return _target(self.root, f"child-{self.n}.txt")

    def run(self) -> None:
        _touch(self.root, f"child-{self.n}.txt")


class DynamicParent(luigi.Task):
    """Yields a dynamic dependency from run(), as Luigi allows."""

    root = luigi.Parameter(significant=False)

    def output(self) -> luigi.LocalTarget:
        return _target(self.root, "parent.txt")

    def run(self):
        yield DynamicChild(root=self.root, n=1)
        _touch(self.root, "parent.txt")


class CountsChecks(luigi.Task):
    """A dynamic dependency that counts its complete() checks in root/checks.txt."""

    root = luigi.Parameter(significant=False)

    def output(self) -> luigi.LocalTarget:
        return _target(self.root, "counted.txt")

    def complete(self) -> bool:
        with open(os.path.join(self.root, "checks.txt"), "a") as f:
            f.write("checked\n")
        return super().complete()

    def run(self) -> None:
        _touch(self.root, "counted.txt")

    def checks(self) -> int:
        path = os.path.join(self.root, "checks.txt")
        return len(open(path).read().split()) if os.path.exists(path) else 0


class YieldsCounted(luigi.Task):
    root = luigi.Parameter(significant=False)

    def run(self):
        yield CountsChecks(root=self.root)


class ExternalData(luigi.ExternalTask):
    """Data made outside the pipeline: complete when root/external.txt exists."""

    root = luigi.Parameter(significant=False)

    def output(self) -> luigi.LocalTarget:
        return _target(self.root, "external.txt")


class NeedsExternalData(luigi.Task):
    """Requires ExternalData; writes its own output when it runs."""

    root = luigi.Parameter(significant=False)

    def requires(self) -> ExternalData:
        return ExternalData(root=self.root)

    def output(self) -> luigi.LocalTarget:
        return _target(self.root, "needs_external.txt")

    def run(self) -> None:
        _touch(self.root, "needs_external.txt")


class TakesInt(luigi.Task):
    """An IntParameter, so a message can carry params that do not parse."""

    n = luigi.IntParameter()


class TimesOut(luigi.Task):
    """Behaves as a task does when Celery's soft time limit strikes inside run()."""

    root = luigi.Parameter(significant=False)

    def run(self) -> None:
        raise SoftTimeLimitExceeded()

    def on_failure(self, exception: BaseException) -> str:
        _touch(self.root, "on_failure_called")
        return "on_failure must not be called on a timeout"


class FailureHandlerRaises(luigi.Task):
    """Fails, and its on_failure fails too (a bug in the user's own handler)."""

    def run(self) -> None:
        raise ValueError("first problem")

    def on_failure(self, exception: BaseException) -> str:
        raise RuntimeError("on_failure broke")


class FailureReturnsNonText(luigi.Task):
    """Fails, and its on_failure returns the exception itself rather than a string."""

    def run(self) -> None:
        raise RuntimeError("disk full")

    def on_failure(self, exception: BaseException) -> BaseException:
        return exception
