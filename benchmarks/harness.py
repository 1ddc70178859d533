"""The benchmarks' harness: what it takes to time a command fairly, whatever the command.

It starts and stops every process (each in a session of its own, all of them stopped
on the way out), starts a worker and waits until it is up and idle, times one command
(wall-clock, peak RSS and CPU seconds from ``os.wait4``, a timeout), starts a luigid of
its own, deletes what the runs left on the brokers, and prints the table.  Its broker is
Redis (it also holds raw Celery's completion counters); a worker may use another broker
(RabbitMQ), named when it is started.  What runs and what it is compared with is in
``benchmarks/scale.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery

from benchmarks import raw_celery
from luigi_celery.scheduler_journal import RedisJournal

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STOP_GRACE = 20.0  # seconds a process gets to exit on SIGTERM before SIGKILL


def clean_env() -> dict[str, str]:
    # Only the harness's flags configure luigi-celery: an inherited LUIGI_CELERY_BROKER_URL
    # would turn the embedded runs into broker runs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUIGI_CELERY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:  # (urllib's HTTPError, a 503 from a standby, is one)
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Every process the harness starts, each in a session of its own, so one signal
    to its process group stops it and its children; :meth:`stop_all` on the way out."""

    def __init__(self) -> None:
        self._live: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                command, cwd=ROOT, env=env or clean_env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
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
    broker: str
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


class Harness:
    """One benchmark session on one broker: its work folder, the processes it started, the
    rows it measured."""

    def __init__(self, broker: str, timeout: float) -> None:
        self.broker = broker  # Redis: the default broker, and raw Celery's completion counters
        self.timeout = timeout  # seconds before a timed command is stopped and flagged
        self.tag = uuid.uuid4().hex[:8]
        self.work = Path(tempfile.mkdtemp(prefix=f"lcbench-{self.tag}-"))
        self.procs = Processes()
        self.rows: list[Row] = []
        self.controls: dict[str, Celery] = {}  # per broker: pings and inspects any worker on it
        self.count = 0
        self.lc_runs: list[tuple[list[str], str, str]] = []  # (Luigi's command line, queue, broker) of each run
        self.queues: list[tuple[str, str]] = []  # (broker, queue) of each worker started

    # --- rows and runs --------------------------------------------------------------

    def row(self, shape: str, size: int, system: str, variant: str) -> Row:
        row = Row(shape, size, system, variant)
        self.rows.append(row)
        return row

    def find(self, shape: str, size: int, system: str) -> Row | None:
        return next((r for r in self.rows if (r.shape, r.size, r.system) == (shape, size, system)), None)

    def seconds(self, shape: str, size: int, system: str) -> float | None:
        row = self.find(shape, size, system)
        return row.seconds if row else None

    def fresh(self, label: str) -> tuple[str, Path, Path]:
        """A new tag (new task ids), output folder and log file for one run."""
        self.count += 1
        name = f"{self.count:03d}-{label}"
        return f"{self.tag}x{self.count}", self.work / name, self.work / f"{name}.log"

    # --- workers --------------------------------------------------------------------

    def control(self, broker: str) -> Celery:
        if broker not in self.controls:
            self.controls[broker] = raw_celery.make_app(broker)
        return self.controls[broker]

    @contextmanager
    def worker(
        self, kind: str, concurrency: int, settings: str, warm_up: Callable[[Worker, int], None], broker: str = ""
    ) -> Iterator[Worker]:
        """A ``luigi-celery worker`` (``lc``) or raw Celery worker (``raw``) on a queue of its own,
        on ``broker`` (default: the harness's), up, warmed up by ``warm_up`` and idle; stopped at the end."""
        broker = broker or self.broker
        # The broker's scheme in the name: a worker's name says where it is, and none is reused.
        queue = f"lcbench-{self.tag}-{kind}-{broker_label(broker)}-{settings}-{concurrency}"
        name = f"{queue}@{socket.gethostname()}"
        log = self.work / f"worker-{queue}.log"
        common = ["--concurrency", str(concurrency), "--pool", "prefork", "--loglevel", "WARNING", "--hostname", name]
        env = clean_env()
        if kind == "lc":
            command = [str(BIN / "luigi-celery"), "worker", "--broker", broker, "--queue", queue,
                       "--include", "benchmarks.dags", *common]  # fmt: skip
        else:
            command = [str(BIN / "celery"), "-A", "benchmarks.raw_celery", "worker", "-Q", queue, *common]
            env.update(BENCH_RAW_BROKER=broker, BENCH_RAW_SETTINGS=settings)
        self.queues.append((broker, queue))
        proc = self.procs.start(command, log, env)
        worker = Worker(kind, settings, broker, name, queue, proc, log)
        try:
            self.wait_ready(worker, timeout=120)
            warm_up(worker, concurrency)
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
            check = [str(BIN / "luigi-celery"), "check", "--broker", worker.broker, "--worker", worker.name,
                     "--timeout", "2"]  # fmt: skip
            return subprocess.run(check, cwd=ROOT, env=clean_env(), capture_output=True).returncode == 0
        return bool(self.control(worker.broker).control.ping(destination=[worker.name], timeout=2))

    def idle(self, worker: Worker) -> bool:
        control = self.control(worker.broker)
        inspect = control.control.inspect(destination=[worker.name], timeout=2)
        active, reserved = inspect.active(), inspect.reserved()
        if not active or not reserved or any(active.values()) or any(reserved.values()):
            return False
        with control.connection_for_read() as conn:
            try:
                waiting = conn.default_channel.queue_declare(queue=worker.queue, passive=True).message_count
            except Exception:  # not declared yet: nothing waits in it
                waiting = 0
        return bool(waiting == 0)

    @contextmanager
    def luigid(self) -> Iterator[str]:
        """A central luigid of its own, for the runs that schedule through it; yields its URL."""
        port = free_port()
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

    @contextmanager
    def scheduler_replicas(self, state_url: str, count: int = 2) -> Iterator[str]:
        """``count`` replicas of ``luigi-celery scheduler`` sharing a state of their own on
        ``state_url``; yields the ``--scheduler-url`` that names them all."""
        prefix = f"lc-bench-scheduler:{uuid.uuid4().hex[:8]}"
        ports = [free_port() for _ in range(count)]
        procs = []
        for i, port in enumerate(ports):
            command = [str(BIN / "luigi-celery"), "scheduler", "--address", "127.0.0.1", "--port", str(port),
                       "--state-url", state_url, "--state-prefix", prefix]  # fmt: skip
            procs.append(self.procs.start(command, self.work / f"scheduler{i}.log"))
        deadline = time.monotonic() + 60
        while not any(_http_ok(f"http://127.0.0.1:{port}/readyz") for port in ports):
            if any(proc.poll() is not None for proc in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler replicas did not start (see {self.work}/scheduler*.log)")
            time.sleep(0.2)
        try:
            yield ",".join(f"http://127.0.0.1:{port}" for port in ports)
        finally:
            for proc in procs:
                self.procs.stop(proc)
            RedisJournal(state_url, prefix, "cleanup", 1).forget()

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

        timer = threading.Timer(self.timeout, expire)
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

    @staticmethod
    def report(row: Row, seconds: float) -> None:
        state = "ok" if not row.problems else row.problems[-1]
        print(f"  {row.shape:8} {row.size:>6} {row.variant:48} {seconds:8.2f} s  {state}", file=sys.stderr, flush=True)

    # --- the table and the clean-up ---------------------------------------------------

    def table(self, goals: list[Goal]) -> str:
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
        for goal in goals:
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

    def clean_brokers(self) -> None:
        """Delete what this harness left on its brokers."""
        if self.broker.startswith("redis://"):
            self.clean_redis()
        for broker in sorted({b for b, _ in self.queues if b.startswith("amqp")}):
            self.clean_rabbitmq(broker)

    def clean_redis(self) -> None:
        """Delete what this harness left on Redis: its queues and their bindings, and
        what a stopped dispatcher leaves for a restarted one to adopt (its reply queue,
        which late replies recreate, and its start marks)."""
        import redis

        from luigi_celery.results import reply_queue_name
        from luigi_celery.run import run_id
        from luigi_celery.settings import Settings
        from luigi_celery.store import run_key, starts_key

        try:
            client = redis.Redis.from_url(self.broker)
            keys = list(client.scan_iter(match=f"*lcbench-{self.tag}-*", count=1000))
            for argv, queue, broker in self.lc_runs:
                if broker != self.broker:
                    continue
                run = run_id(argv, Settings(broker_url=self.broker, queue=queue))
                if run:
                    keys += [reply_queue_name(run), starts_key(run), run_key(run)]
            if keys:
                client.delete(*keys)
        except Exception as e:  # the table matters more than a tidy broker
            print(f"scale.py: could not clean up the broker: {e}", file=sys.stderr)

    def clean_rabbitmq(self, broker: str) -> None:
        """Delete the workers' queues on RabbitMQ, and the exchanges Celery named after them.
        (A dispatcher deletes its own reply queue; one a failed run left expires in a day.)"""
        queues = [q for b, q in self.queues if b == broker]
        try:
            with self.control(broker).connection_for_write() as conn:
                for queue in queues:
                    for delete in ("queue_delete", "exchange_delete"):
                        channel = conn.channel()  # one of its own: a missing queue or exchange closes it
                        with contextlib.suppress(Exception):
                            getattr(channel, delete)(queue)
                        with contextlib.suppress(Exception):
                            channel.close()
        except Exception as e:  # the table matters more than a tidy broker
            print(f"scale.py: could not clean up {broker_label(broker)}: {e}", file=sys.stderr)


def broker_label(broker: str) -> str:
    """``redis``, ``rabbitmq``: the broker's kind, for names and the table."""
    return "rabbitmq" if broker.startswith("amqp") else broker.partition(":")[0] or "broker"
