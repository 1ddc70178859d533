"""The DAG shapes ``benchmarks/scale.py`` times, as plain Luigi tasks.

Every task takes ``tag`` (significant: a fresh tag per run gives every task a
new id, so a second run never finds tasks complete, run locks taken or a
dispatcher's run id in use) and ``out`` (the folder outputs go to; not
significant, so it does not change task ids).  Every task but the wrappers
writes one small ``LocalTarget``, so ``complete()`` is a real file check, as
in a real pipeline.

Shapes (the root task is what the command line names):

- ``Wide --size N``: a wrapper requiring N independent no-op tasks.
- ``Layered --width W --layers L``: L layers of W tasks; each task of layer
  k > 0 requires tasks i and i+1 (mod W) of layer k-1; the wrapper requires
  the last layer.  W x L tasks.
- ``Link --k N-1``: a chain of N tasks, each requiring the previous one.
- ``Sleepers --size N --seconds S``: a wrapper requiring N independent tasks
  that each sleep S seconds.

Workers import this module as ``benchmarks.dags`` (run them from the
repository root, ``--include benchmarks.dags``).
"""

from __future__ import annotations

import time
from pathlib import Path

import luigi


class BenchTask(luigi.Task):
    tag = luigi.Parameter()
    out = luigi.Parameter(significant=False)

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(Path(self.out, f"{self.task_id}.txt")))

    def run(self) -> None:
        with self.output().open("w") as f:
            f.write("done\n")


class Noop(BenchTask):
    i = luigi.IntParameter()


class Wide(luigi.WrapperTask):
    tag = luigi.Parameter()
    out = luigi.Parameter(significant=False)
    size = luigi.IntParameter()

    def requires(self) -> list[Noop]:
        return [Noop(tag=self.tag, out=self.out, i=i) for i in range(self.size)]


class Node(BenchTask):
    width = luigi.IntParameter()
    layer = luigi.IntParameter()
    i = luigi.IntParameter()

    def requires(self) -> list[Node]:
        if self.layer == 0:
            return []
        below = {self.i, (self.i + 1) % self.width}  # one task when the width is 1
        return [Node(tag=self.tag, out=self.out, width=self.width, layer=self.layer - 1, i=j) for j in sorted(below)]


class Layered(luigi.WrapperTask):
    tag = luigi.Parameter()
    out = luigi.Parameter(significant=False)
    width = luigi.IntParameter()
    layers = luigi.IntParameter()

    def requires(self) -> list[Node]:
        top = self.layers - 1
        return [Node(tag=self.tag, out=self.out, width=self.width, layer=top, i=i) for i in range(self.width)]


class Link(BenchTask):
    k = luigi.IntParameter()

    def requires(self) -> list[Link]:
        return [Link(tag=self.tag, out=self.out, k=self.k - 1)] if self.k > 0 else []


class Sleep(BenchTask):
    i = luigi.IntParameter()
    seconds = luigi.FloatParameter()

    def run(self) -> None:
        time.sleep(self.seconds)
        super().run()


class Sleepers(luigi.WrapperTask):
    tag = luigi.Parameter()
    out = luigi.Parameter(significant=False)
    size = luigi.IntParameter()
    seconds = luigi.FloatParameter(default=0.2)

    def requires(self) -> list[Sleep]:
        return [Sleep(tag=self.tag, out=self.out, i=i, seconds=self.seconds) for i in range(self.size)]
