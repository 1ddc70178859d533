"""How luigi-celery scales: throughput, linear cost, latency, memory, the embedded default.

    .venv/bin/python benchmarks/scale.py [--broker redis://127.0.0.1:6379/14] [--sizes 1000,3000,10000]
        [--layer-width 100] [--chain 300] [--sleepers 1000] [--repeat 1] [--inflight 8]
        [--only wide,layered,chain,sleep,embedded,startup,lc,raw,luigi,luigid] [--luigi-max 3000] [--keep]

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
  ``embedded`` (the wide DAG at the smallest size, no broker);
- systems: ``lc`` (``luigi-celery run`` over the broker, against one
  ``luigi-celery worker --concurrency 2 --pool prefork``, or 32 for ``sleep``;
  the dispatcher keeps ``--inflight`` tasks in flight, 32 for ``sleep``),
  ``raw`` (raw Celery on the same broker and the same kind of worker: wide,
  chain, sleep), ``luigi`` (stock ``luigi --workers 2 --local-scheduler``, 32
  for ``sleep``; wide and layered only up to ``--luigi-max`` tasks, since its
  scheduler is quadratic), ``luigid`` (``luigi-celery run`` as ``lc``, scheduling
  through a central ``luigid`` of its own instead of the local scheduler: wide,
  up to ``--luigi-max`` tasks).

Each worker is started once per group of runs, warmed up with a few tasks,
and checked up (``luigi-celery check --worker NAME``, or a ping) and idle
(nothing active, reserved or queued) before each timed run; its start-up is
never timed.  A luigi-celery or luigi run is timed from starting the command
to its exit (start-up, DAG resolution and summary included); a raw Celery run
from its first send to its last completion.  Every run gets a fresh ``tag``
(new task ids) and a fresh output folder; its outputs are counted afterwards.

Columns: ``shape``, ``N`` (tasks, the wrapper not counted), ``variant``,
``s`` (median wall-clock seconds of ``--repeat`` runs), ``tasks/s`` (N / s),
``RSS MB`` (peak resident memory of the dispatcher command, the largest of
its processes, from ``os.wait4``; largest over repeats), ``CPU s`` (the
command's user + system CPU seconds, its reaped children included: next to
``s``, whether the dispatcher itself is the bottleneck), ``ratio`` and
``goal`` (on the goal rows at the bottom: the number each goal of the issue
asks for, and its target), ``status`` (``ok``; a failed run's exit code,
timeout or missing outputs; ``met`` / ``MISSED`` on goal rows).  Logs of
failed runs are kept and listed under the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, from anywhere

from benchmarks.harness import BIN, Goal, Harness, Row, Worker  # noqa: E402

SHAPES = ("startup", "wide", "layered", "chain", "sleep", "embedded")
SYSTEMS = ("lc", "raw", "luigi", "luigid")
SLEEP_SECONDS = 0.2
SLEEP_SLOTS = 32


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

    # --- workers --------------------------------------------------------------------

    @contextmanager
    def worker(self, kind: str, concurrency: int, settings: str = "stock") -> Iterator[Worker]:
        with self.harness.worker(kind, concurrency, settings, self.warm_up) as worker:
            yield worker

    def warm_up(self, worker: Worker, concurrency: int) -> None:
        """A few untimed tasks, so no timed run pays for a pool process's first task."""
        tag, out, log = self.harness.fresh(f"warmup-{worker.kind}")
        if worker.kind == "lc":
            dag, _ = self.dag("wide", 2 * concurrency, tag, out)
            command = [str(BIN / "luigi-celery"), "run", "--broker", self.args.broker, "--queue", worker.queue, *dag,
                       "--workers", str(concurrency), "--local-scheduler"]  # fmt: skip
        else:
            command = self.raw_command(worker, 2 * concurrency)
        code, *_ = self.harness.execute(command, log)
        if code != 0:
            raise RuntimeError(f"warm-up on {worker.name} failed (exit {code}); see {log}")
        shutil.rmtree(out, ignore_errors=True)

    def raw_command(self, worker: Worker, count: int, seconds: float = 0.0, as_chain: bool = False) -> list[str]:
        command = [sys.executable, "-m", "benchmarks.raw_celery", "--broker", self.args.broker,
                   "--queue", worker.queue, "--count", str(count), "--settings", worker.settings,
                   "--timeout", str(self.args.timeout)]  # fmt: skip
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
                self.harness.lc_runs.append(([*dag, *self.dispatcher_tail(row)], worker.queue))
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
        slots = SLEEP_SLOTS if row.shape == "sleep" else self.args.inflight if row.system in ("lc", "luigid") else 2
        if row.system == "luigid":
            return ["--workers", str(slots), "--scheduler-url", self.scheduler_url]
        return ["--workers", str(slots), "--local-scheduler"]

    def measure_raw(self, row: Row, worker: Worker, seconds: float = 0.0, as_chain: bool = False) -> None:
        for _ in range(self.args.repeat):
            self.harness.wait_ready(worker)
            _, _, log = self.harness.fresh(f"{row.shape}-raw-{row.size}")
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

    def sizes_for(self, shape: str, system: str) -> list[int]:
        if shape == "startup":
            return [1]
        if shape == "chain":
            return [self.args.chain]
        if shape == "sleep":
            return [self.args.sleepers]
        if shape == "embedded":
            return [min(self.args.sizes)]
        sizes = list(self.args.sizes)
        if shape == "layered":  # whole layers
            width = self.args.layer_width
            sizes = [width * max(1, round(n / width)) for n in sizes]
        if system == "luigi":
            sizes = [n for n in sizes if n <= self.args.luigi_max]
        return sizes

    def run_all(self) -> None:
        self.run_luigi_celery()
        self.run_raw()
        self.run_luigi()
        for shape in ("startup", "embedded"):
            if self.wants(shape, "lc"):
                size = self.sizes_for(shape, "lc")[0]
                row = self.harness.row(shape, size, "embedded", "luigi-celery, embedded, --workers 2")
                self.measure(row, [str(BIN / "luigi-celery"), "run"], None, "wide")

    def run_luigi_celery(self) -> None:
        def dispatcher(worker: Worker) -> list[str]:
            return [str(BIN / "luigi-celery"), "run", "--broker", self.args.broker, "--queue", worker.queue]

        shapes = [s for s in ("startup", "wide", "layered", "chain") if self.wants(s, "lc")]
        if shapes:
            with self.worker("lc", 2) as worker:
                for shape in shapes:
                    for size in self.sizes_for(shape, "lc"):
                        variant = f"luigi-celery, redis, 1 worker x2, --workers {self.args.inflight}"
                        self.measure(self.harness.row(shape, size, "lc", variant), dispatcher(worker), worker, shape)
        luigid_sizes = [n for n in self.args.sizes if n <= self.args.luigi_max] if self.wants("wide", "luigid") else []
        if luigid_sizes:
            with self.worker("lc", 2) as worker, self.harness.luigid() as url:
                self.scheduler_url = url
                for size in luigid_sizes:
                    variant = f"luigi-celery, redis, 1 worker x2, --workers {self.args.inflight}, luigid"
                    self.measure(self.harness.row("wide", size, "luigid", variant), dispatcher(worker), worker, "wide")
        if self.wants("sleep", "lc"):
            with self.worker("lc", SLEEP_SLOTS) as worker:
                variant = f"luigi-celery, redis, 1 worker x{SLEEP_SLOTS}, --workers {SLEEP_SLOTS}"
                row = self.harness.row("sleep", self.args.sleepers, "lc", variant)
                self.measure(row, dispatcher(worker), worker, "sleep")

    def run_raw(self) -> None:
        shapes = [s for s in ("wide", "chain") if self.wants(s, "raw")]
        if shapes:
            with self.worker("raw", 2) as worker:
                for shape in shapes:
                    for size in self.sizes_for(shape, "raw"):
                        row = self.harness.row(shape, size, "raw", "raw Celery, 1 worker x2")
                        self.measure_raw(row, worker, as_chain=shape == "chain")
        if "wide" in shapes:
            with self.worker("raw", 2, "luigi-celery") as worker:
                for size in self.sizes_for("wide", "raw"):
                    row = self.harness.row("wide", size, "raw-lc", "raw Celery, 1 worker x2, luigi-celery settings")
                    self.measure_raw(row, worker)
        if self.wants("sleep", "raw"):
            with self.worker("raw", SLEEP_SLOTS) as worker:
                row = self.harness.row("sleep", self.args.sleepers, "raw", f"raw Celery, 1 worker x{SLEEP_SLOTS}")
                self.measure_raw(row, worker, seconds=SLEEP_SECONDS)

    def run_luigi(self) -> None:
        for shape in ("startup", "wide", "layered", "chain", "sleep"):
            sizes = self.sizes_for(shape, "luigi") if self.wants(shape, "luigi") else []
            if shape == "wide" and self.wants("embedded", "luigi") and min(self.args.sizes) not in sizes:
                sizes = [min(self.args.sizes), *sizes]  # goal 5 compares the embedded default with it
            for size in sizes:
                slots = SLEEP_SLOTS if shape == "sleep" else 2
                row = self.harness.row(shape, size, "luigi", f"luigi --workers {slots} --local-scheduler")
                self.measure(row, [str(BIN / "luigi")], None, shape)

    # --- goals -------------------------------------------------------------------

    def goals(self) -> list[Goal]:
        a, found = self.args, self.harness.find
        goals: list[Goal] = []

        def ratio(top: float | None, bottom: float | None) -> float | None:
            return top / bottom if top is not None and bottom else None

        def add(number: str, shape: str, size: int, what: str, value: float | None, target: str, limit: float,
                at_least: bool, reference: bool = False) -> None:  # fmt: skip
            met = None if reference or value is None else value >= limit if at_least else value <= limit
            goals.append(Goal(number, shape, size, what, value, target, met))

        big, small = max(a.sizes), min(a.sizes)
        if found("wide", big, "lc") and found("wide", big, "raw"):
            value = ratio(self.harness.seconds("wide", big, "raw"), self.harness.seconds("wide", big, "lc"))
            add("1", "wide", big, "tasks/s, luigi-celery / raw Celery", value, ">= 0.75", 0.75, True)
        both = [n for n in a.sizes if found("wide", n, "lc") and found("wide", n, "luigi")]
        if both:
            n = max(both)
            value = ratio(self.harness.seconds("wide", n, "luigi"), self.harness.seconds("wide", n, "lc"))
            add("1", "wide", n, "speed-up vs luigi --workers 2", value, ">= 10", 10, True)
        for shape in ("wide", "layered"):
            sizes = self.sizes_for(shape, "lc")
            hi, lo = max(sizes), min(sizes)
            if hi > lo and found(shape, hi, "lc") and found(shape, lo, "lc"):
                limit = 1.1 * hi / lo
                value = ratio(self.harness.seconds(shape, hi, "lc"), self.harness.seconds(shape, lo, "lc"))
                add("2", shape, hi, f"t({hi}) / t({lo}), luigi-celery", value, f"<= {limit:.1f}", limit, False)
        for system, name in (("lc", "luigi-celery"), ("luigi", "luigi"), ("raw", "raw Celery")):
            if found("chain", a.chain, system):
                seconds = self.harness.seconds("chain", a.chain, system)
                value = seconds * 1000 / a.chain if seconds is not None else None
                add("3", "chain", a.chain, f"ms per hop, {name}", value, "<= 3", 3, False, system != "lc")
        ideal = a.sleepers * SLEEP_SECONDS / SLEEP_SLOTS
        for system, name in (("lc", "luigi-celery"), ("luigi", "luigi"), ("raw", "raw Celery")):
            if found("sleep", a.sleepers, system):
                value = ratio(self.harness.seconds("sleep", a.sleepers, system), ideal)
                add("3", "sleep", a.sleepers, f"time / ideal {ideal:.2f} s, {name}", value, "<= 1.10", 1.1, False,
                    system != "lc")  # fmt: skip
        row = found("wide", big, "lc")
        if row:
            value = max(row.rss_mb) if row.rss_mb and not row.problems else None
            add("4", "wide", big, "dispatcher peak RSS MB, luigi-celery", value, "<= 250", 250, False)
        if found("embedded", small, "embedded") and found("wide", small, "luigi"):
            value = ratio(
                self.harness.seconds("wide", small, "luigi"), self.harness.seconds("embedded", small, "embedded")
            )
            add("5", "embedded", small, "speed-up, embedded vs luigi --workers 2", value, ">= 2", 2, True)
        return goals


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
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14", help="the broker every variant uses")
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
    print(f"luigi-celery scale benchmark: broker {args.broker}, {os.cpu_count()} CPUs, load {load}, "
          f"Python {platform.python_version()}; work folder {bench.harness.work}", file=sys.stderr)  # fmt: skip
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
        bench.harness.clean_broker()
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
