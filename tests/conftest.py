"""Fixtures for the broker and end-to-end tiers: real Redis, RabbitMQ, workers, luigid.

A test that needs a broker FAILS when the broker does not answer; it never
skips (``scripts/test`` starts the brokers before pytest runs).

Tests come in three tiers, named by marks in each test file:

- unit (no mark): no broker, no process of its own;
- ``broker``: talks to a real Redis or RabbitMQ from the test process;
- ``e2e``: starts processes (``luigi-celery``, Celery workers, luigid, tools).

``pytest -m "not e2e"`` runs the first two, ``pytest -m "not e2e and not broker"`` the
first. A test cannot slip into a lower tier unnoticed: collection fails when one uses a
fixture of a higher tier than its marks say, and a test fails when, while it runs, it
connects to a broker or starts a process that its marks do not allow.
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

# The tiers: fixtures that put a test in one, and what a test below it may not do.
BROKER_FIXTURES = frozenset({"brokers", "own_redis"})
E2E_FIXTURES = frozenset({"pool", "redis_pool", "rabbitmq_pool", "fresh_pool", "luigid"})
BROKER_PORTS = frozenset({6379, 5672, 15672})  # Redis, RabbitMQ and its management API
BROKER_TIER_PROGRAMS = frozenset({"redis-server", "redis-cli"})  # own_redis: a Redis of the test's own


def _tier(item: pytest.Item) -> str:
    if item.get_closest_marker("e2e"):
        return "e2e"
    return "broker" if item.get_closest_marker("broker") else "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse to run when a test uses a fixture of a tier above its marks."""
    wrong = []
    for item in items:
        tier, used = _tier(item), set(getattr(item, "fixturenames", ()))
        if tier != "e2e" and used & E2E_FIXTURES:
            wrong.append(f"{item.nodeid} uses {', '.join(sorted(used & E2E_FIXTURES))}: mark it e2e")
        elif tier == "unit" and used & BROKER_FIXTURES:
            wrong.append(f"{item.nodeid} uses {', '.join(sorted(used & BROKER_FIXTURES))}: mark it broker")
    if wrong:
        raise pytest.UsageError("tests outside their tier (see tests/conftest.py):\n" + "\n".join(wrong))


class _TierGuard:
    """What the running test does beyond its tier, seen through Python's audit hooks (which
    catch what fixtures cannot show: ``run_cli``, a kombu connection, a fixture's param)."""

    def __init__(self) -> None:
        self.tier: str | None = None  # None: between tests, nothing is checked
        self.seen: list[str] = []

    def __call__(self, event: str, args: tuple) -> None:
        if self.tier is None or self.tier == "e2e":
            return
        if event == "socket.connect":
            address = args[1]
            if self.tier == "unit" and isinstance(address, tuple) and address[1] in BROKER_PORTS:
                self.seen.append(f"connect to {address[0]}:{address[1]} (mark it broker)")
        elif event in ("subprocess.Popen", "os.system"):
            command = args[1] if event == "subprocess.Popen" else args[0]
            words = os.fsdecode(command).split() if isinstance(command, (str, bytes)) else list(command)[:1]
            program = os.path.basename(os.fsdecode(words[0])) if words else "a process"
            if not (self.tier == "broker" and program in BROKER_TIER_PROGRAMS):
                self.seen.append(f"start {program} (mark it e2e)")


_GUARD = _TierGuard()


def pytest_configure(config: pytest.Config) -> None:
    sys.addaudithook(_GUARD)  # (an audit hook cannot be removed; it is idle between tests)


@pytest.fixture(autouse=True)
def _stays_in_its_tier(request: pytest.FixtureRequest) -> Iterator[None]:
    _GUARD.tier, _GUARD.seen = _tier(request.node), []
    try:
        yield
    finally:
        _GUARD.tier = None
    if _GUARD.seen:
        pytest.fail(f"a {_tier(request.node)} test may not " + ", nor ".join(dict.fromkeys(_GUARD.seen)))


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
