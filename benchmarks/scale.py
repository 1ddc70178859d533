"""How luigi-celery scales: throughput, linear cost, latency, CPU, memory, the embedded default.

    .venv/bin/python benchmarks/scale.py [--broker redis://127.0.0.1:6379/14]
        [--rabbitmq amqp://guest:guest@127.0.0.1:5672//] [--sizes 1000,3000,10000]
        [--layer-width 100] [--chain 300] [--sleepers 1000] [--repeat 1] [--inflight 8]
        [--only wide,layered,chain,sleep,embedded,startup,lc,lc-rabbitmq,raw,raw-rabbitmq,luigi,luigid]
        [--luigi-max 3000] [--keep]

Run it from anywhere; it runs everything from the repository root and starts and
stops every worker itself (killed on Ctrl-C and on errors too).  The DAGs are in
``benchmarks/dags.py``, the raw Celery baseline in ``benchmarks/raw_celery.py``,
what starts, times and stops the processes and prints the table in
``benchmarks/harness.py``; this file is what runs against what, and the goals.

What runs (``--only`` picks shapes and/or systems; none named means all):

- shapes: ``startup`` (a 1-task DAG: the fixed cost of one command), ``wide``
  (N no-op tasks under one wrapper, for each of ``--sizes``), ``layered``
  (``--layer-width`` tasks per layer, N / width layers, each task requiring
  two of the layer below), ``chain`` (``--chain`` tasks, each requiring the
  previous), ``sleep`` (``--sleepers`` tasks of 0.2 s over 32 slots),
  ``embedded`` (the wide DAG with no broker, at the smallest size and at the
  CPU sizes, below);
- systems: ``lc`` (``luigi-celery run`` over Redis, ``--broker``, against one
  ``luigi-celery worker --concurrency 2 --pool prefork``, or 32 for ``sleep``;
  the dispatcher keeps ``--inflight`` tasks in flight, 32 for ``sleep``: every
  shape, and ``embedded``), ``lc-rabbitmq`` (the same over RabbitMQ alone,
  ``--rabbitmq``, no coordination store: wide at the CPU sizes, chain),
  ``raw`` (raw Celery on Redis and the same kind of worker: wide, twice, with
  Celery's stock settings and with luigi-celery's delivery settings; chain;
  sleep), ``raw-rabbitmq`` (raw Celery on RabbitMQ: chain), ``luigi`` (stock
  ``luigi --workers 2 --local-scheduler``, 32 for ``sleep``; wide and layered
  only up to ``--luigi-max`` tasks, since its scheduler is quadratic, and wide
  at the smallest size for the embedded goal), ``luigid`` (``luigi-celery
  run`` as ``lc``, scheduling through a central ``luigid`` of its own instead
  of the local scheduler: wide, up to ``--luigi-max`` tasks).

The CPU sizes are the ``--sizes`` of at least 3,000, or the two largest when
none is.

Each worker is started once per group of runs, warmed up with a few tasks,
and checked up (``luigi-celery check --worker NAME``, or a ping) and idle
(nothing active, reserved or queued) before each timed run; its start-up is
never timed.  A luigi-celery or luigi run is timed from starting the command
to its exit (start-up, DAG resolution and summary included); a raw Celery run
from its first send to its last completion.  Every run gets a fresh ``tag``
(new task ids) and a fresh output folder, and every worker a queue of its
own; its outputs are counted afterwards.

Columns: ``shape``, ``N`` (tasks, the wrapper not counted), ``variant``,
``s`` (median wall-clock seconds of ``--repeat`` runs), ``tasks/s`` (N / s),
``RSS MB`` (peak resident memory of the dispatcher command, the largest of
its processes, from ``os.wait4``; largest over repeats), ``CPU s`` (the
command's user + system CPU seconds, its reaped children included: next to
``s``, whether the dispatcher itself is the bottleneck), ``ratio`` and
``goal`` (on the goal rows at the bottom: the number each goal of issue 13
asks for, and its target), ``status`` (``ok``; a failed run's exit code,
timeout or missing outputs; ``met`` / ``MISSED`` on goal rows, ``ref`` on a
row giving the same figure for a baseline, ``n/a`` when a run it needs
failed).  Logs of failed runs are kept and listed under the table.

The goal rows, numbered as the goals of issue 13 (each appears when the runs
it needs ran):

1. wide, largest N, Redis: luigi-celery's tasks/s / raw Celery's, >= 0.75
   against raw Celery's stock settings and >= 0.95 against raw Celery with
   luigi-celery's delivery settings;
2. wide, the largest N both ran (3,000 by default): the speed-up of
   luigi-celery over ``luigi --workers 2 --local-scheduler``, >= 10;
3. chain: luigi-celery's ms per hop / raw Celery's chain's, <= 1.25, on
   Redis and on RabbitMQ (``ref``: each one's ms per hop, and luigi's);
4. sleep: luigi-celery's time / raw Celery's, <= 1.05 (``ref``: each one's
   time / the ideal, N x 0.2 s / 32);
5. wide at the CPU sizes: the ``luigi-celery run`` command's CPU ms per task
   (``CPU s`` x 1000 / N), <= 0.4, over Redis, over RabbitMQ and embedded;
6. kept from before: t(largest N) / t(smallest N) of luigi-celery on Redis,
   wide and layered, <= 1.1 x largest / smallest (11 for 10,000 / 1,000); the
   dispatcher's peak RSS at the largest wide N, <= 250 MB; the embedded
   default's speed-up over ``luigi --workers 2`` at the smallest N, >= 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, from anywhere

from benchmarks.harness import BIN, Goal, Harness, Row, Worker, broker_label  # noqa: E402

SHAPES = ("startup", "wide", "layered", "chain", "sleep", "embedded")
SYSTEMS = ("lc", "lc-rabbitmq", "raw", "raw-rabbitmq", "luigi", "luigid", "lcsched")
DISPATCHERS = ("lc", "lc-rabbitmq", "luigid", "lcsched")  # luigi-celery over a broker: --inflight tasks in flight
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
SLEEP_SECONDS = 0.2
SLEEP_SLOTS = 32
CPU_SIZES_FROM = 3000  # goal 5 is about the dispatcher's cost per task at scale, not its start-up
# Goal 5's rows at each CPU size: (shape, system, where the dispatcher's tasks go).
CPU_ROWS = (("wide", "lc", "redis"), ("wide", "lc-rabbitmq", "rabbitmq"), ("embedded", "embedded", "embedded"))


def ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def goal(number: str, shape: str, size: int, what: str, value: float | None, op: str, limit: float) -> Goal:
    """A goal row: met when ``value`` is ``op`` (">=" or "<=") ``limit``."""
    met = None if value is None else value >= limit if op == ">=" else value <= limit
    return Goal(number, shape, size, what, value, f"{op} {limit:.3g}", met)


def ref(number: str, shape: str, size: int, what: str, value: float | None) -> Goal:
    """A reference row: the figure of a goal for a baseline, held to nothing."""
    return Goal(number, shape, size, what, value, "", None)


class Bench:
    """The comparisons: which DAG runs on which system, and the goals the numbers are held to."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.harness = Harness(args.broker, args.timeout)
        self.scheduler_url = ""  # the luigid of the luigid runs

    # --- what to run --------------------------------------------------------------

    def wants(self, shape: str, system: str) -> bool:
        only = self.args.only
        shapes = [s for s in only if s in SHAPES] or list(SHAPES)
        systems = [s for s in only if s in SYSTEMS] or list(SYSTEMS)
        return shape in shapes and system in systems

    def dag(self, shape: str, size: int, tag: str, out: Path) -> tuple[list[str], int]:
        """Luigi's command line for one DAG, and how many tasks it has (the wrapper not counted)."""
        common = ["--module", "benchmarks.dags"]
        params = ["--tag", tag, "--out", str(out)]
        if shape == "layered":
            width = self.args.layer_width
            return [*common, "Layered", *params, "--width", str(width), "--layers", str(size // width)], size
        if shape == "chain":
            return [*common, "Link", *params, "--k", str(size - 1)], size
        if shape == "sleep":
            return [*common, "Sleepers", *params, "--size", str(size), "--seconds", str(SLEEP_SECONDS)], size
        return [*common, "Wide", *params, "--size", str(size)], size

    def cpu_sizes(self) -> list[int]:
        """Goal 5's wide sizes: those of at least 3,000, else the two largest."""
        return [n for n in self.args.sizes if n >= CPU_SIZES_FROM] or self.args.sizes[-2:]

    def sizes_for(self, shape: str, system: str) -> list[int]:
        if shape == "startup":
            return [1]
        if shape == "chain":
            return [self.args.chain]
        if shape == "sleep":
            return [self.args.sleepers]
        if shape == "embedded":  # the smallest for goal 6, the CPU sizes for goal 5
            return sorted({min(self.args.sizes), *self.cpu_sizes()})
        if system == "lc-rabbitmq":  # goal 5 is all RabbitMQ's wide runs are for
            return self.cpu_sizes()
        sizes = list(self.args.sizes)
        if shape == "layered":  # whole layers
            width = self.args.layer_width
            sizes = [width * max(1, round(n / width)) for n in sizes]
        if system in ("luigi", "luigid"):
            sizes = [n for n in sizes if n <= self.args.luigi_max]
        return sizes

    # --- workers --------------------------------------------------------------------

    @contextmanager
    def worker(self, kind: str, concurrency: int, settings: str = "stock", broker: str = "") -> Iterator[Worker]:
        with self.harness.worker(kind, concurrency, settings, self.warm_up, broker) as worker:
            yield worker

    def warm_up(self, worker: Worker, concurrency: int) -> None:
        """A few untimed tasks, so no timed run pays for a pool process's first task."""
        tag, out, log = self.harness.fresh(f"warmup-{worker.kind}-{broker_label(worker.broker)}")
        if worker.kind == "lc":
            dag, _ = self.dag("wide", 2 * concurrency, tag, out)
            command = [*self.dispatcher(worker), *dag, "--workers", str(concurrency), "--local-scheduler"]
        else:
            command = self.raw_command(worker, 2 * concurrency)
        code, *_ = self.harness.execute(command, log)
        if code != 0:
            raise RuntimeError(f"warm-up on {worker.name} failed (exit {code}); see {log}")
        shutil.rmtree(out, ignore_errors=True)

    @staticmethod
    def dispatcher(worker: Worker) -> list[str]:
        return [str(BIN / "luigi-celery"), "run", "--broker", worker.broker, "--queue", worker.queue]

    def raw_command(self, worker: Worker, count: int, seconds: float = 0.0, as_chain: bool = False) -> list[str]:
        # The completion counter stays on Redis whatever the broker: one INCR costs the same for both.
        command = [sys.executable, "-m", "benchmarks.raw_celery", "--broker", worker.broker,
                   "--counter-url", self.args.broker, "--queue", worker.queue, "--count", str(count),
                   "--settings", worker.settings, "--timeout", str(self.args.timeout)]  # fmt: skip
        if seconds:
            command += ["--seconds", str(seconds)]
        if as_chain:
            command.append("--chain")
        return command

    # --- timed runs -----------------------------------------------------------------

    def measure(self, row: Row, command: list[str], worker: Worker | None, make: str) -> None:
        """Time ``command`` --repeat times into ``row``; ``make`` names the DAG (shape) it runs."""
        for _ in range(self.args.repeat):
            if worker is not None:
                self.harness.wait_ready(worker)
            tag, out, log = self.harness.fresh(f"{row.shape}-{row.system}-{row.size}")
            dag, tasks = self.dag(make, row.size, tag, out)
            if worker is not None:
                self.harness.lc_runs.append(([*dag, *self.dispatcher_tail(row)], worker.queue, worker.broker))
            code, seconds, rss, cpu, expired = self.harness.execute([*command, *dag, *self.dispatcher_tail(row)], log)
            outputs = len(list(out.glob("*.txt"))) if out.exists() else 0
            if expired:
                row.problems.append(f"timeout after {self.args.timeout:.0f} s ({log})")
            elif code != 0:
                row.problems.append(f"exit {code} ({log})")
            elif outputs != tasks:
                row.problems.append(f"{outputs}/{tasks} outputs ({log})")
            else:
                row.times.append(seconds)
                row.rss_mb.append(rss)
                row.cpu.append(cpu)
                shutil.rmtree(out, ignore_errors=True)
                if not self.args.keep:
                    log.unlink()
            self.harness.report(row, seconds)

    def dispatcher_tail(self, row: Row) -> list[str]:
        slots = SLEEP_SLOTS if row.shape == "sleep" else self.args.inflight if row.system in DISPATCHERS else 2
        if row.system in ("luigid", "lcsched"):
            return ["--workers", str(slots), "--scheduler-url", self.scheduler_url]
        return ["--workers", str(slots), "--local-scheduler"]

    def measure_raw(self, row: Row, worker: Worker, seconds: float = 0.0, as_chain: bool = False) -> None:
        for _ in range(self.args.repeat):
            self.harness.wait_ready(worker)
            _, _, log = self.harness.fresh(f"{row.shape}-{row.system}-{row.size}")
            code, wall, _, _, expired = self.harness.execute(self.raw_command(worker, row.size, seconds, as_chain), log)
            reported = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"seconds"')]
            if expired or code != 0 or not reported:
                row.problems.append(f"{'timeout' if expired else f'exit {code}'} ({log})")
            else:
                wall = float(reported[-1]["seconds"])
                row.times.append(wall)
                if not self.args.keep:
                    log.unlink()
            self.harness.report(row, wall)

    # --- the runs -----------------------------------------------------------------

    def run_all(self) -> None:
        # Each broker's luigi-celery runs next to its raw Celery runs: what they are compared with.
        self.run_luigi_celery()
        self.run_raw()
        self.run_rabbitmq()
        self.run_luigi()
        self.run_embedded()

    def run_luigi_celery(self) -> None:
        self.run_dispatcher("lc", self.args.broker, ("startup", "wide", "layered", "chain"))
        luigid_sizes = self.sizes_for("wide", "luigid") if self.wants("wide", "luigid") else []
        if luigid_sizes:
            with self.worker("lc", 2) as worker, self.harness.luigid() as url:
                self.scheduler_url = url
                for size in luigid_sizes:
                    variant = f"luigi-celery, redis, 1 worker x2, --workers {self.args.inflight}, luigid"
                    row = self.harness.row("wide", size, "luigid", variant)
                    self.measure(row, self.dispatcher(worker), worker, "wide")
        if self.wants("wide", "lcsched"):
            with self.worker("lc", 2) as worker, self.harness.scheduler_replicas(self.args.broker) as urls:
                self.scheduler_url = urls
                for size in self.sizes_for("wide", "lcsched"):
                    variant = f"luigi-celery, redis, 1 worker x2, --workers {self.args.inflight}, scheduler x2"
                    row = self.harness.row("wide", size, "lcsched", variant)
                    self.measure(row, self.dispatcher(worker), worker, "wide")
        if self.wants("sleep", "lc"):
            with self.worker("lc", SLEEP_SLOTS) as worker:
                variant = f"luigi-celery, redis, 1 worker x{SLEEP_SLOTS}, --workers {SLEEP_SLOTS}"
                row = self.harness.row("sleep", self.args.sleepers, "lc", variant)
                self.measure(row, self.dispatcher(worker), worker, "sleep")

    def run_dispatcher(self, system: str, broker: str, shapes: tuple[str, ...]) -> None:
        """``shapes`` by luigi-celery over ``broker``, against one worker x2."""
        shapes = tuple(s for s in shapes if self.wants(s, system))
        if not shapes:
            return
        with self.worker("lc", 2, broker=broker) as worker:
            for shape in shapes:
                for size in self.sizes_for(shape, system):
                    variant = f"luigi-celery, {broker_label(broker)}, 1 worker x2, --workers {self.args.inflight}"
                    self.measure(self.harness.row(shape, size, system, variant), self.dispatcher(worker), worker, shape)

    def run_raw(self) -> None:
        self.run_raw_x2("raw", self.args.broker, ("wide", "chain"))
        if self.wants("wide", "raw"):
            with self.worker("raw", 2, "luigi-celery") as worker:
                for size in self.sizes_for("wide", "raw"):
                    variant = "raw Celery, redis, 1 worker x2, luigi-celery settings"
                    self.measure_raw(self.harness.row("wide", size, "raw-lc", variant), worker)
        if self.wants("sleep", "raw"):
            with self.worker("raw", SLEEP_SLOTS) as worker:
                variant = f"raw Celery, redis, 1 worker x{SLEEP_SLOTS}"
                self.measure_raw(self.harness.row("sleep", self.args.sleepers, "raw", variant), worker, SLEEP_SECONDS)

    def run_raw_x2(self, system: str, broker: str, shapes: tuple[str, ...]) -> None:
        """``shapes`` by raw Celery (stock settings) over ``broker``, against one worker x2."""
        shapes = tuple(s for s in shapes if self.wants(s, system))
        if not shapes:
            return
        with self.worker("raw", 2, broker=broker) as worker:
            for shape in shapes:
                for size in self.sizes_for(shape, system):
                    row = self.harness.row(shape, size, system, f"raw Celery, {broker_label(broker)}, 1 worker x2")
                    self.measure_raw(row, worker, as_chain=shape == "chain")

    def run_rabbitmq(self) -> None:
        """Goal 3's chains and goal 5's wide runs over RabbitMQ."""
        self.run_dispatcher("lc-rabbitmq", self.args.rabbitmq, ("wide", "chain"))
        self.run_raw_x2("raw-rabbitmq", self.args.rabbitmq, ("chain",))

    def run_luigi(self) -> None:
        for shape in ("startup", "wide", "layered", "chain", "sleep"):
            sizes = self.sizes_for(shape, "luigi") if self.wants(shape, "luigi") else []
            if shape == "wide" and self.wants("embedded", "luigi") and min(self.args.sizes) not in sizes:
                sizes = [min(self.args.sizes), *sizes]  # goal 6 compares the embedded default with it
            for size in sizes:
                slots = SLEEP_SLOTS if shape == "sleep" else 2
                row = self.harness.row(shape, size, "luigi", f"luigi --workers {slots} --local-scheduler")
                self.measure(row, [str(BIN / "luigi")], None, shape)

    def run_embedded(self) -> None:
        for shape in ("startup", "embedded"):
            if self.wants(shape, "lc"):
                for size in self.sizes_for(shape, "embedded"):
                    row = self.harness.row(shape, size, "embedded", "luigi-celery, embedded, --workers 2")
                    self.measure(row, [str(BIN / "luigi-celery"), "run"], None, "wide")

    # --- goals -------------------------------------------------------------------

    def seconds(self, shape: str, size: int, system: str) -> float | None:
        return self.harness.seconds(shape, size, system)

    def ran(self, shape: str, size: int, *systems: str) -> bool:
        """Whether each of ``systems`` ran ``shape`` at ``size`` (well or not)."""
        return all(self.harness.find(shape, size, system) for system in systems)

    def goals(self) -> list[Goal]:
        """The goal rows of issue 13, numbered as its goals are."""
        return [*self.goal_1(), *self.goal_2(), *self.goal_3(), *self.goal_4(), *self.goal_5(), *self.goal_6(),
                *self.goal_14()]  # fmt: skip

    def goal_1(self) -> list[Goal]:
        """Throughput against raw Celery on Redis at the largest N, with either of its settings."""
        n, rows = max(self.args.sizes), []
        for raw, settings, limit in (("raw", "stock", 0.75), ("raw-lc", "luigi-celery's delivery", 0.95)):
            if self.ran("wide", n, "lc", raw):
                value = ratio(self.seconds("wide", n, raw), self.seconds("wide", n, "lc"))  # tasks/s, inverted
                what = f"tasks/s, luigi-celery / raw Celery with {settings} settings, redis"
                rows.append(goal("1", "wide", n, what, value, ">=", limit))
        return rows

    def goal_2(self) -> list[Goal]:
        """The speed-up over stock Luigi, at the largest N it ran."""
        both = [n for n in self.args.sizes if self.ran("wide", n, "lc", "luigi")]
        if not both:
            return []
        n = max(both)
        value = ratio(self.seconds("wide", n, "luigi"), self.seconds("wide", n, "lc"))
        return [goal("2", "wide", n, "speed-up, luigi-celery (redis) vs luigi --workers 2", value, ">=", 10)]

    def goal_3(self) -> list[Goal]:
        """Latency along a chain, against raw Celery's chain on the same broker."""
        k, rows = self.args.chain, []

        def per_hop(system: str) -> float | None:
            seconds = self.seconds("chain", k, system)
            return seconds * 1000 / k if seconds is not None else None

        if self.ran("chain", k, "luigi"):
            rows.append(ref("3", "chain", k, "ms per hop, luigi --workers 2", per_hop("luigi")))
        for lc, raw, broker in (("lc", "raw", "redis"), ("lc-rabbitmq", "raw-rabbitmq", "rabbitmq")):
            for system, name in ((lc, "luigi-celery"), (raw, "raw Celery chain")):
                if self.ran("chain", k, system):
                    rows.append(ref("3", "chain", k, f"ms per hop, {name}, {broker}", per_hop(system)))
            if self.ran("chain", k, lc, raw):
                value = ratio(per_hop(lc), per_hop(raw))
                rows.append(
                    goal("3", "chain", k, f"ms per hop, luigi-celery / raw Celery, {broker}", value, "<=", 1.25)
                )
        return rows

    def goal_4(self) -> list[Goal]:
        """Slow tasks over many slots: no more than raw Celery's time."""
        n, rows = self.args.sleepers, []
        ideal = n * SLEEP_SECONDS / SLEEP_SLOTS
        for system, name in (("lc", "luigi-celery"), ("raw", "raw Celery"), ("luigi", "luigi")):
            if self.ran("sleep", n, system):
                value = ratio(self.seconds("sleep", n, system), ideal)
                rows.append(ref("4", "sleep", n, f"time / ideal {ideal:.2f} s, {name}", value))
        if self.ran("sleep", n, "lc", "raw"):
            value = ratio(self.seconds("sleep", n, "lc"), self.seconds("sleep", n, "raw"))
            rows.append(goal("4", "sleep", n, "time, luigi-celery / raw Celery, redis", value, "<=", 1.05))
        return rows

    def goal_5(self) -> list[Goal]:
        """The dispatcher's CPU per task, on each broker and embedded."""
        rows = []
        for n in self.cpu_sizes():
            for shape, system, where in CPU_ROWS:
                row = self.harness.find(shape, n, system)
                if row:
                    value = statistics.median(row.cpu) * 1000 / n if row.cpu and not row.problems else None
                    rows.append(goal("5", shape, n, f"CPU ms per task, luigi-celery run, {where}", value, "<=", 0.4))
        return rows

    def goal_6(self) -> list[Goal]:
        """Kept from before: linear cost, bounded memory, a fast embedded default."""
        rows = []
        for shape in ("wide", "layered"):
            sizes = self.sizes_for(shape, "lc")
            hi, lo = max(sizes), min(sizes)
            if hi > lo and self.ran(shape, hi, "lc") and self.ran(shape, lo, "lc"):
                value = ratio(self.seconds(shape, hi, "lc"), self.seconds(shape, lo, "lc"))
                rows.append(goal("6", shape, hi, f"t({hi}) / t({lo}), luigi-celery, redis", value, "<=", 1.1 * hi / lo))
        big = max(self.args.sizes)
        row = self.harness.find("wide", big, "lc")
        if row:
            value = max(row.rss_mb) if row.rss_mb and not row.problems else None
            rows.append(goal("6", "wide", big, "dispatcher peak RSS MB, luigi-celery, redis", value, "<=", 250))
        small = min(self.args.sizes)
        if self.ran("embedded", small, "embedded") and self.ran("wide", small, "luigi"):
            value = ratio(self.seconds("wide", small, "luigi"), self.seconds("embedded", small, "embedded"))
            rows.append(goal("6", "embedded", small, "speed-up, embedded vs luigi --workers 2", value, ">=", 2))
        return rows


    def goal_14(self) -> list[Goal]:
        """Issue 14's first goal: the central scheduler (two replicas, state on Redis) against
        the local one, and its linear cost; luigid's figure beside it."""
        rows = []
        for system, name in (("luigid", "luigid"), ("lcsched", "luigi-celery scheduler")):
            for n in self.args.sizes:
                if self.ran("wide", n, "lc", system):
                    value = ratio(self.seconds("wide", n, system), self.seconds("wide", n, "lc"))
                    what = f"time, through {name} / local scheduler"
                    limit = 1.3
                    rows.append(goal("14", "wide", n, what, value, "<=", limit) if system == "lcsched" and n == 3000
                                else ref("14", "wide", n, what, value))  # fmt: skip
        hi, lo = max(self.args.sizes), min(self.args.sizes)
        if hi > lo and self.ran("wide", hi, "lcsched") and self.ran("wide", lo, "lcsched"):
            value = ratio(self.seconds("wide", hi, "lcsched"), self.seconds("wide", lo, "lcsched"))
            what = f"t({hi}) / t({lo}), through luigi-celery scheduler"
            rows.append(goal("14", "wide", hi, what, value, "<=", 1.1 * hi / lo))
        return rows


def _sizes(text: str) -> list[int]:
    sizes = sorted({int(n) for n in text.split(",") if n.strip()})
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
    return sizes


def _only(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES + SYSTEMS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(SHAPES + SYSTEMS)}")
    return names


def make_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14", help="the Redis of every Redis variant")
    parser.add_argument("--rabbitmq", default=RABBITMQ, help="the RabbitMQ of lc-rabbitmq and raw-rabbitmq")
    parser.add_argument("--sizes", type=_sizes, default=[1000, 3000, 10000], help="N for wide and layered")
    parser.add_argument("--layer-width", type=int, default=100, help="tasks per layer of the layered DAG")
    parser.add_argument("--chain", type=int, default=300, help="tasks in the chain")
    parser.add_argument("--sleepers", type=int, default=1000, help=f"{SLEEP_SECONDS} s tasks over {SLEEP_SLOTS} slots")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant; the table shows the median")
    parser.add_argument("--inflight", type=int, default=8, help="luigi-celery run --workers against the x2 worker")
    parser.add_argument("--only", type=_only, default=[], help="comma-separated shapes and/or systems (default all)")
    parser.add_argument("--luigi-max", type=int, default=3000, help="largest wide/layered N stock luigi runs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a run is stopped and flagged")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs) even when all went well")
    return parser


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = make_argument_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop every worker on a kill too, not only on Ctrl-C
    bench = Bench(args)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"luigi-celery scale benchmark: brokers {args.broker} and {args.rabbitmq}, {os.cpu_count()} CPUs, "
          f"load {load}, Python {platform.python_version()}; work folder {bench.harness.work}",
          file=sys.stderr)  # fmt: skip
    interrupted = False
    try:
        bench.run_all()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every process this harness started", file=sys.stderr)
    except RuntimeError as e:  # a worker that would not start: no number would mean anything
        print(f"scale.py: {e}", file=sys.stderr)
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        bench.harness.procs.stop_all()
        bench.harness.clean_brokers()
    print()
    print(f"# {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}")
    print(f"# {os.cpu_count()} CPUs, load {load} at start, {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end")
    print(bench.harness.table(bench.goals()))
    if interrupted:
        print("\ninterrupted: the table holds the runs that finished")
    failed = interrupted or any(row.problems for row in bench.harness.rows)
    if failed or args.keep:
        print(f"\nwork folder kept: {bench.harness.work}")
    else:
        shutil.rmtree(bench.harness.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
