"""Fixtures for the broker and end-to-end tiers: real Redis, RabbitMQ, workers, luigid.

A test that needs a broker FAILS when the broker does not answer; it never
skips (``scripts/test`` starts the brokers before pytest runs).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
REDIS_URL = "redis://127.0.0.1:6379/11"  # a db of our own on the machine's Redis
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
BROKERS = {"redis": REDIS_URL, "rabbitmq": RABBITMQ_URL}
# Modules the test workers allow (tests.pipelines_other is deliberately left out).
WORKER_MODULES = ("examples.sales", "tests.pipelines")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def brokers() -> dict[str, str]:
    down = [name for name, port in (("Redis", 6379), ("RabbitMQ", 5672)) if not _answers("127.0.0.1", port)]
    if down:
        pytest.fail(f"{' and '.join(down)} not answering on 127.0.0.1; run scripts/services (scripts/test does)")
    return BROKERS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, auth: str | None = None, timeout: float = 10) -> tuple[int | None, bytes]:
    """(status, body) of a GET, with basic auth ``user:password`` if given; (None, b"") when
    nothing answers at ``url`` (yet)."""
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return None, b""


def wait_until(
    what: str,
    ready: Callable[[], object],
    timeout: float = 60,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``ready()`` until it is true; fail when ``process`` exits or ``timeout`` runs out,
    showing the end of ``log``."""
    deadline = time.monotonic() + timeout
    tail = lambda: log.read_text()[-3000:] if log is not None and log.exists() else ""  # noqa: E731
    while not ready():
        assert process is None or process.poll() is None, f"{what}: the process exited\n{tail()}"
        assert time.monotonic() < deadline, f"{what} not ready after {timeout} s\n{tail()}"
        time.sleep(0.3)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUIGI_CELERY_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 120, env: dict[str, str] | None = None):
    """Run the luigi-celery command; return the CompletedProcess (output in .stdout)."""
    return subprocess.run(
        [str(BIN / "luigi-celery"), *args],
        cwd=cwd,
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_worker(
    broker: str | None,
    queue: str,
    log_dir: Path,
    concurrency: int = 2,
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> WorkerProcess:
    name = f"w{uuid.uuid4().hex[:6]}"
    log = log_dir / f"{name}.log"
    process = subprocess.Popen(
        [
            str(BIN / "luigi-celery"),
            "worker",
            *(("--broker", broker) if broker else ()),  # (None: the environment names it)
            "--queue",
            queue,
            "--include",
            *WORKER_MODULES,
            "--concurrency",
            str(concurrency),
            "--pool",
            "prefork",
            "--loglevel",
            "INFO",
            "--hostname",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            *extra,
        ],  # fmt: skip
        cwd=ROOT,
        env=clean_env(**(env or {})),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = WorkerProcess(name, process, log)
    deadline = time.time() + 60
    while " ready." not in worker.output():
        if not worker.alive() or time.time() > deadline:
            worker.stop()
            pytest.fail(f"worker {name} did not start:\n{worker.output()[-3000:]}")
        time.sleep(0.2)
    return worker


@dataclass
class Pool:
    """Two real `luigi-celery worker` processes serving one queue on one broker."""

    broker: str
    queue: str
    workers: list[WorkerProcess]
    env: dict[str, str] | None = None

    def command(self, *args: str) -> list[str]:
        return [str(BIN / "luigi-celery"), "run", "--broker", self.broker, "--queue", self.queue, *args]

    def run(self, *args: str, timeout: float = 120):
        return run_cli("run", "--broker", self.broker, "--queue", self.queue, *args, timeout=timeout,
                       env=clean_env(**(self.env or {})))  # fmt: skip

    def start(self, *args: str) -> subprocess.Popen:
        """Start a run in the background (output in .stdout)."""
        return subprocess.Popen(self.command(*args), cwd=ROOT, env=clean_env(**(self.env or {})),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def worker_of(self, pid: int) -> WorkerProcess:
        """The worker whose pool process ``pid`` is (from its '[pid N] Worker' log lines)."""
        return next(w for w in self.workers if f"[pid {pid}]" in w.output())

    def logs(self) -> str:
        return "\n".join(w.output() for w in self.workers)


def _pool(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    queue = f"lc-test-{uuid.uuid4().hex[:10]}"
    log_dir = tmp_path_factory.mktemp("workers")
    workers = [start_worker(broker, queue, log_dir) for _ in range(2)]
    try:
        yield Pool(broker, queue, workers)
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture
def fresh_pool(brokers, tmp_path) -> Iterator[Callable[..., Pool]]:
    """Makes pools of their own (for tests that kill workers); stops them at the end."""
    made: list[Pool] = []

    def make(broker: str, count: int = 2, concurrency: int = 2, **env: str) -> Pool:
        queue = f"lc-test-{uuid.uuid4().hex[:10]}"
        log_dir = tmp_path / f"workers-{len(made)}"
        log_dir.mkdir()
        pool = Pool(broker, queue, [start_worker(broker, queue, log_dir, concurrency, env) for _ in range(count)], env)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        for worker in pool.workers:
            worker.stop()


@pytest.fixture(scope="session")
def redis_pool(brokers, tmp_path_factory) -> Iterator[Pool]:
    yield from _pool(brokers["redis"], tmp_path_factory)


@pytest.fixture(scope="session")
def rabbitmq_pool(brokers, tmp_path_factory) -> Iterator[Pool]:
    yield from _pool(brokers["rabbitmq"], tmp_path_factory)


@pytest.fixture(params=["redis", "rabbitmq"])
def pool(request) -> Pool:
    """Each test using this runs once over Redis and once over RabbitMQ."""
    return request.getfixturevalue(f"{request.param}_pool")


@pytest.fixture
def luigid(tmp_path) -> Iterator[str]:
    """A central Luigi scheduler on a free port; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "luigid"), "--port", str(port), "--state-path", str(tmp_path / "state.pickle")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while not _answers("127.0.0.1", port):
        if process.poll() is not None or time.time() > deadline:
            pytest.fail("luigid did not start")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class OwnRedis:
    """A Redis server of the test's own (append-only file on, as a broker should run)."""

    port: int
    folder: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + 20
        while not _answers("127.0.0.1", self.port):
            if self.process.poll() is not None or time.time() > deadline:
                pytest.fail("the test's Redis did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # Redis flushes its append-only file on SIGTERM
            self.process.wait(20)

    def restart(self, down_for: float, keep_data: bool = True) -> None:
        """Stop the server and start it again ``down_for`` seconds later; without ``keep_data``
        it comes back empty, as a server without persistence does."""
        self.stop()
        if not keep_data:
            shutil.rmtree(self.folder)
            self.folder.mkdir()
        time.sleep(down_for)
        self.start()

    def flushall(self) -> None:
        """Wipe every key while the server runs: a store that lost its data, without an outage."""
        subprocess.run(["redis-cli", "-p", str(self.port), "FLUSHALL"], check=True, capture_output=True)


@pytest.fixture
def own_redis(tmp_path) -> Iterator[OwnRedis]:
    folder = tmp_path / "redis"
    folder.mkdir()
    server = OwnRedis(free_port(), folder)
    server.start()
    yield server
    server.stop()
