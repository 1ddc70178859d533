"""How luigi-celery scales: throughput, linear cost, latency, memory, the embedded default.

    .venv/bin/python benchmarks/scale.py [--broker redis://127.0.0.1:6379/14] [--sizes 1000,3000,10000]
        [--layer-width 100] [--chain 300] [--sleepers 1000] [--repeat 1] [--inflight 8]
        [--only wide,layered,chain,sleep,embedded,startup,lc,raw,luigi,luigid] [--luigi-max 3000] [--keep]

Run it from anywhere; it runs everything from the repository root and starts and
stops every worker itself (killed on Ctrl-C and on errors too).  The DAGs are in
``benchmarks/dags.py``, the raw Celery baseline in ``benchmarks/raw_celery.py``.

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
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from benchmarks import raw_celery  # noqa: E402

SHAPES = ("startup", "wide", "layered", "chain", "sleep", "embedded")
SYSTEMS = ("lc", "raw", "luigi", "luigid")
SLEEP_SECONDS = 0.2
SLEEP_SLOTS = 32
STOP_GRACE = 20.0  # seconds a process gets to exit on SIGTERM before SIGKILL


def _env() -> dict[str, str]:
    # Only the harness's flags configure luigi-celery: an inherited LUIGI_CELERY_BROKER_URL
    # would turn the embedded runs into broker runs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUIGI_CELERY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


class Processes:
    """Every process the harness starts, each in a session of its own, so one signal
    to its process group stops it and its children; :meth:`stop_all` on the way out."""

    def __init__(self) -> None:
        self._live: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                command, cwd=ROOT, env=env or _env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._live[proc.pid] = proc
        return proc

    @staticmethod
    def signal_group(pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(pid, signum)

    def reaped(self, proc: subprocess.Popen[bytes], returncode: int) -> None:
        """``proc`` was waited for outside Popen (os.wait4): forget it, and kill what it left behind."""
        proc.returncode = returncode
        self._live.pop(proc.pid, None)
        self.signal_group(proc.pid, signal.SIGKILL)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            self.signal_group(proc.pid, signal.SIGTERM)  # a Celery worker's warm shutdown
            with contextlib.suppress(subprocess.TimeoutExpired):  # then SIGKILL, below
                proc.wait(STOP_GRACE)
        self.signal_group(proc.pid, signal.SIGKILL)  # the group's stragglers, if any
        proc.wait()
        self._live.pop(proc.pid, None)

    def stop_all(self) -> None:
        for proc in list(self._live.values()):
            self.stop(proc)


@dataclass
class Worker:
    kind: str  # "lc" or "raw"
    settings: str  # raw Celery's settings (see raw_celery.SETTINGS)
    name: str
    queue: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Row:
    shape: str
    size: int
    system: str
    variant: str
    times: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.times) if self.times and not self.problems else None


@dataclass
class Goal:
    number: str
    shape: str
    size: int
    what: str
    ratio: float | None
    target: str
    met: bool | None  # None: a reference number, not the goal itself


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = uuid.uuid4().hex[:8]
        self.work = Path(tempfile.mkdtemp(prefix=f"lcbench-{self.tag}-"))
        self.procs = Processes()
        self.rows: list[Row] = []
        self.control = raw_celery.make_app(args.broker)  # pings and inspects any worker on the broker
        self.count = 0
        self.lc_runs: list[tuple[list[str], str]] = []  # (Luigi's command line, queue) of each broker run
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

    def row(self, shape: str, size: int, system: str, variant: str) -> Row:
        row = Row(shape, size, system, variant)
        self.rows.append(row)
        return row

    def find(self, shape: str, size: int, system: str) -> Row | None:
        return next((r for r in self.rows if (r.shape, r.size, r.system) == (shape, size, system)), None)

    def fresh(self, label: str) -> tuple[str, Path, Path]:
        """A new tag (new task ids), output folder and log file for one run."""
        self.count += 1
        name = f"{self.count:03d}-{label}"
        return f"{self.tag}x{self.count}", self.work / name, self.work / f"{name}.log"

    # --- workers --------------------------------------------------------------------

    @contextmanager
    def worker(self, kind: str, concurrency: int, settings: str = "stock") -> Iterator[Worker]:
        queue = f"lcbench-{self.tag}-{kind}-{settings}-{concurrency}"
        name = f"{queue}@{socket.gethostname()}"
        log = self.work / f"worker-{queue}.log"
        common = ["--concurrency", str(concurrency), "--pool", "prefork", "--loglevel", "WARNING", "--hostname", name]
        env = _env()
        if kind == "lc":
            command = [str(BIN / "luigi-celery"), "worker", "--broker", self.args.broker, "--queue", queue,
                       "--include", "benchmarks.dags", *common]  # fmt: skip
        else:
            command = [str(BIN / "celery"), "-A", "benchmarks.raw_celery", "worker", "-Q", queue, *common]
            env.update(BENCH_RAW_BROKER=self.args.broker, BENCH_RAW_SETTINGS=settings)
        proc = self.procs.start(command, log, env)
        worker = Worker(kind, settings, name, queue, proc, log)
        try:
            self.wait_ready(worker, timeout=120)
            self.warm_up(worker, concurrency)
            yield worker
        finally:
            self.procs.stop(proc)

    def wait_ready(self, worker: Worker, timeout: float = 60) -> None:
        """Block until ``worker`` answers and has nothing active, reserved or queued."""
        deadline = time.monotonic() + timeout
        while True:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"worker {worker.name} exited with {worker.proc.returncode}; see {worker.log}")
            if self.answers(worker) and self.idle(worker):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker.name} not up and idle after {timeout} s; see {worker.log}")
            time.sleep(0.5)

    def answers(self, worker: Worker) -> bool:
        if worker.kind == "lc":  # the documented probe
            check = [str(BIN / "luigi-celery"), "check", "--broker", self.args.broker, "--worker", worker.name,
                     "--timeout", "2"]  # fmt: skip
            return subprocess.run(check, cwd=ROOT, env=_env(), capture_output=True).returncode == 0
        return bool(self.control.control.ping(destination=[worker.name], timeout=2))

    def idle(self, worker: Worker) -> bool:
        inspect = self.control.control.inspect(destination=[worker.name], timeout=2)
        active, reserved = inspect.active(), inspect.reserved()
        if not active or not reserved or any(active.values()) or any(reserved.values()):
            return False
        with self.control.connection_for_read() as conn:
            try:
                waiting = conn.default_channel.queue_declare(queue=worker.queue, passive=True).message_count
            except Exception:  # not declared yet: nothing waits in it
                waiting = 0
        return bool(waiting == 0)

    def warm_up(self, worker: Worker, concurrency: int) -> None:
        """A few untimed tasks, so no timed run pays for a pool process's first task."""
        tag, out, log = self.fresh(f"warmup-{worker.kind}")
        if worker.kind == "lc":
            dag, _ = self.dag("wide", 2 * concurrency, tag, out)
            command = [str(BIN / "luigi-celery"), "run", "--broker", self.args.broker, "--queue", worker.queue, *dag,
                       "--workers", str(concurrency), "--local-scheduler"]  # fmt: skip
        else:
            command = self.raw_command(worker, 2 * concurrency)
        code, *_ = self.execute(command, log)
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

    # --- one timed command --------------------------------------------------------

    def execute(self, command: list[str], log: Path) -> tuple[int, float, float, float, bool]:
        """Run ``command`` to its end; return (exit code, seconds, peak RSS in MB, CPU seconds, timed out)."""
        log.write_text(" ".join(command) + "\n\n")
        started = time.perf_counter()
        proc = self.procs.start(command, log)
        reaped, expired = threading.Event(), threading.Event()

        def expire() -> None:
            expired.set()
            self.procs.signal_group(proc.pid, signal.SIGTERM)  # luigi-celery revokes what it sent
            if not reaped.wait(STOP_GRACE):
                self.procs.signal_group(proc.pid, signal.SIGKILL)

        timer = threading.Timer(self.args.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        elapsed = time.perf_counter() - started
        reaped.set()
        code = os.waitstatus_to_exitcode(status)
        self.procs.reaped(proc, code)
        cpu = usage.ru_utime + usage.ru_stime
        return code, elapsed, usage.ru_maxrss / 1024, cpu, expired.is_set()  # ru_maxrss: KiB on Linux

    def measure(self, row: Row, command: list[str], worker: Worker | None, make: str) -> None:
        """Time ``command`` --repeat times into ``row``; ``make`` names the DAG (shape) it runs."""
        for _ in range(self.args.repeat):
            if worker is not None:
                self.wait_ready(worker)
            tag, out, log = self.fresh(f"{row.shape}-{row.system}-{row.size}")
            dag, tasks = self.dag(make, row.size, tag, out)
            if worker is not None:
                self.lc_runs.append(([*dag, *self.dispatcher_tail(row)], worker.queue))
            code, seconds, rss, cpu, expired = self.execute([*command, *dag, *self.dispatcher_tail(row)], log)
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
            self.report(row, seconds)

    def dispatcher_tail(self, row: Row) -> list[str]:
        slots = SLEEP_SLOTS if row.shape == "sleep" else self.args.inflight if row.system in ("lc", "luigid") else 2
        if row.system == "luigid":
            return ["--workers", str(slots), "--scheduler-url", self.scheduler_url]
        return ["--workers", str(slots), "--local-scheduler"]

    def measure_raw(self, row: Row, worker: Worker, seconds: float = 0.0, as_chain: bool = False) -> None:
        for _ in range(self.args.repeat):
            self.wait_ready(worker)
            _, _, log = self.fresh(f"{row.shape}-raw-{row.size}")
            code, wall, _, _, expired = self.execute(self.raw_command(worker, row.size, seconds, as_chain), log)
            reported = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"seconds"')]
            if expired or code != 0 or not reported:
                row.problems.append(f"{'timeout' if expired else f'exit {code}'} ({log})")
            else:
                wall = float(reported[-1]["seconds"])
                row.times.append(wall)
                if not self.args.keep:
                    log.unlink()
            self.report(row, wall)

    @staticmethod
    def report(row: Row, seconds: float) -> None:
        state = "ok" if not row.problems else row.problems[-1]
        print(f"  {row.shape:8} {row.size:>6} {row.variant:48} {seconds:8.2f} s  {state}", file=sys.stderr, flush=True)

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
                row = self.row(shape, size, "embedded", "luigi-celery, embedded, --workers 2")
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
                        self.measure(self.row(shape, size, "lc", variant), dispatcher(worker), worker, shape)
        luigid_sizes = [n for n in self.args.sizes if n <= self.args.luigi_max] if self.wants("wide", "luigid") else []
        if luigid_sizes:
            with self.worker("lc", 2) as worker, self.luigid() as url:
                self.scheduler_url = url
                for size in luigid_sizes:
                    variant = f"luigi-celery, redis, 1 worker x2, --workers {self.args.inflight}, luigid"
                    self.measure(self.row("wide", size, "luigid", variant), dispatcher(worker), worker, "wide")
        if self.wants("sleep", "lc"):
            with self.worker("lc", SLEEP_SLOTS) as worker:
                variant = f"luigi-celery, redis, 1 worker x{SLEEP_SLOTS}, --workers {SLEEP_SLOTS}"
                row = self.row("sleep", self.args.sleepers, "lc", variant)
                self.measure(row, dispatcher(worker), worker, "sleep")

    @contextmanager
    def luigid(self) -> Iterator[str]:
        """A central luigid of its own, for the runs that schedule through it; yields its URL."""
        port = _free_port()
        state = self.work / "luigid"
        state.mkdir(exist_ok=True)
        command = [str(BIN / "luigid"), "--address", "127.0.0.1", "--port", str(port),
                   "--state-path", str(state / "state.pickle"), "--logdir", str(state)]  # fmt: skip
        proc = self.procs.start(command, self.work / "luigid.log")
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"luigid did not start (see {self.work / 'luigid.log'})")
            time.sleep(0.2)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            self.procs.stop(proc)

    def run_raw(self) -> None:
        shapes = [s for s in ("wide", "chain") if self.wants(s, "raw")]
        if shapes:
            with self.worker("raw", 2) as worker:
                for shape in shapes:
                    for size in self.sizes_for(shape, "raw"):
                        row = self.row(shape, size, "raw", "raw Celery, 1 worker x2")
                        self.measure_raw(row, worker, as_chain=shape == "chain")
        if "wide" in shapes:
            with self.worker("raw", 2, "luigi-celery") as worker:
                for size in self.sizes_for("wide", "raw"):
                    row = self.row("wide", size, "raw-lc", "raw Celery, 1 worker x2, luigi-celery settings")
                    self.measure_raw(row, worker)
        if self.wants("sleep", "raw"):
            with self.worker("raw", SLEEP_SLOTS) as worker:
                row = self.row("sleep", self.args.sleepers, "raw", f"raw Celery, 1 worker x{SLEEP_SLOTS}")
                self.measure_raw(row, worker, seconds=SLEEP_SECONDS)

    def run_luigi(self) -> None:
        for shape in ("startup", "wide", "layered", "chain", "sleep"):
            sizes = self.sizes_for(shape, "luigi") if self.wants(shape, "luigi") else []
            if shape == "wide" and self.wants("embedded", "luigi") and min(self.args.sizes) not in sizes:
                sizes = [min(self.args.sizes), *sizes]  # goal 5 compares the embedded default with it
            for size in sizes:
                slots = SLEEP_SLOTS if shape == "sleep" else 2
                row = self.row(shape, size, "luigi", f"luigi --workers {slots} --local-scheduler")
                self.measure(row, [str(BIN / "luigi")], None, shape)

    # --- goals and the table --------------------------------------------------------

    def seconds(self, shape: str, size: int, system: str) -> float | None:
        row = self.find(shape, size, system)
        return row.seconds if row else None

    def goals(self) -> list[Goal]:
        a, found = self.args, self.find
        goals: list[Goal] = []

        def ratio(top: float | None, bottom: float | None) -> float | None:
            return top / bottom if top is not None and bottom else None

        def add(number: str, shape: str, size: int, what: str, value: float | None, target: str, limit: float,
                at_least: bool, reference: bool = False) -> None:  # fmt: skip
            met = None if reference or value is None else value >= limit if at_least else value <= limit
            goals.append(Goal(number, shape, size, what, value, target, met))

        big, small = max(a.sizes), min(a.sizes)
        if found("wide", big, "lc") and found("wide", big, "raw"):
            value = ratio(self.seconds("wide", big, "raw"), self.seconds("wide", big, "lc"))
            add("1", "wide", big, "tasks/s, luigi-celery / raw Celery", value, ">= 0.75", 0.75, True)
        both = [n for n in a.sizes if found("wide", n, "lc") and found("wide", n, "luigi")]
        if both:
            n = max(both)
            value = ratio(self.seconds("wide", n, "luigi"), self.seconds("wide", n, "lc"))
            add("1", "wide", n, "speed-up vs luigi --workers 2", value, ">= 10", 10, True)
        for shape in ("wide", "layered"):
            sizes = self.sizes_for(shape, "lc")
            hi, lo = max(sizes), min(sizes)
            if hi > lo and found(shape, hi, "lc") and found(shape, lo, "lc"):
                limit = 1.1 * hi / lo
                value = ratio(self.seconds(shape, hi, "lc"), self.seconds(shape, lo, "lc"))
                add("2", shape, hi, f"t({hi}) / t({lo}), luigi-celery", value, f"<= {limit:.1f}", limit, False)
        for system, name in (("lc", "luigi-celery"), ("luigi", "luigi"), ("raw", "raw Celery")):
            if found("chain", a.chain, system):
                seconds = self.seconds("chain", a.chain, system)
                value = seconds * 1000 / a.chain if seconds is not None else None
                add("3", "chain", a.chain, f"ms per hop, {name}", value, "<= 3", 3, False, system != "lc")
        ideal = a.sleepers * SLEEP_SECONDS / SLEEP_SLOTS
        for system, name in (("lc", "luigi-celery"), ("luigi", "luigi"), ("raw", "raw Celery")):
            if found("sleep", a.sleepers, system):
                value = ratio(self.seconds("sleep", a.sleepers, system), ideal)
                add("3", "sleep", a.sleepers, f"time / ideal {ideal:.2f} s, {name}", value, "<= 1.10", 1.1, False,
                    system != "lc")  # fmt: skip
        row = found("wide", big, "lc")
        if row:
            value = max(row.rss_mb) if row.rss_mb and not row.problems else None
            add("4", "wide", big, "dispatcher peak RSS MB, luigi-celery", value, "<= 250", 250, False)
        if found("embedded", small, "embedded") and found("wide", small, "luigi"):
            value = ratio(self.seconds("wide", small, "luigi"), self.seconds("embedded", small, "embedded"))
            add("5", "embedded", small, "speed-up, embedded vs luigi --workers 2", value, ">= 2", 2, True)
        return goals

    def table(self) -> str:
        lines = [["shape", "N", "variant", "s", "tasks/s", "RSS MB", "CPU s", "ratio", "goal", "status"]]
        for row in self.rows:
            s = row.seconds
            status = "ok" if row.times else "not run"
            if row.problems:
                status = f"FAILED {len(row.problems)}/{len(row.problems) + len(row.times)}"
            lines.append([
                row.shape, str(row.size), row.variant,
                f"{s:.2f}" if s is not None else "-",
                f"{row.size / s:.1f}" if s else "-",
                f"{max(row.rss_mb):.0f}" if row.rss_mb else "",
                f"{statistics.median(row.cpu):.2f}" if row.cpu else "",
                "", "", status,
            ])  # fmt: skip
        for goal in self.goals():
            verdict = "n/a" if goal.ratio is None else "ref" if goal.met is None else "met" if goal.met else "MISSED"
            lines.append([
                goal.shape, str(goal.size), f"goal {goal.number}: {goal.what}", "", "", "", "",
                f"{goal.ratio:.2f}" if goal.ratio is not None else "-", goal.target, verdict,
            ])  # fmt: skip
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        right = {1, 3, 4, 5, 6, 7}
        out = []
        for n, line in enumerate(lines):
            cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(line)]
            out.append("  ".join(cells).rstrip())
            if n == 0 or (n == len(self.rows) and n + 1 < len(lines)):
                out.append("  ".join("-" * w for w in widths))
        problems = [f"  {row.shape} {row.size} {row.variant}: {p}" for row in self.rows for p in row.problems]
        if problems:
            out += ["", "failed runs (logs kept):", *problems]
        return "\n".join(out)

    def clean_broker(self) -> None:
        """Delete what this harness left on the broker: its queues and their bindings, and
        what a stopped dispatcher leaves for a restarted one to adopt (its reply queue,
        which late replies recreate, and its start marks)."""
        if not self.args.broker.startswith("redis://"):
            return
        import redis

        from luigi_celery.results import reply_queue_name
        from luigi_celery.run import run_id
        from luigi_celery.settings import Settings
        from luigi_celery.store import run_key, starts_key

        try:
            client = redis.Redis.from_url(self.args.broker)
            keys = list(client.scan_iter(match=f"*lcbench-{self.tag}-*", count=1000))
            for argv, queue in self.lc_runs:
                run = run_id(argv, Settings(broker_url=self.args.broker, queue=queue))
                if run:
                    keys += [reply_queue_name(run), starts_key(run), run_key(run)]
            if keys:
                client.delete(*keys)
        except Exception as e:  # the table matters more than a tidy broker
            print(f"scale.py: could not clean up the broker: {e}", file=sys.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
          f"Python {platform.python_version()}; work folder {bench.work}", file=sys.stderr)  # fmt: skip
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
        bench.procs.stop_all()
        bench.clean_broker()
    print()
    print(f"# {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}")
    print(f"# {os.cpu_count()} CPUs, load {load} at start, {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end")
    print(bench.table())
    if interrupted:
        print("\ninterrupted: the table holds the runs that finished")
    failed = interrupted or any(row.problems for row in bench.rows)
    if failed or args.keep:
        print(f"\nwork folder kept: {bench.work}")
    else:
        shutil.rmtree(bench.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
