"""The worker image and the docker-compose stack, tested without a container engine.

No engine runs here, so what can be checked is checked for real: the compose file against the
Compose specification, the Dockerfile with hadolint and against what the image must do, the
Prometheus and Grafana files with their own tools, and every service's command run as a local
process against the machine's Redis, RabbitMQ and PostgreSQL, in the image's environment.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.conftest import BIN, ROOT, clean_env, free_port, http_get, wait_until

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "worker" / "Dockerfile"
ENTRYPOINT = ROOT / "worker" / "entrypoint.sh"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
SECRETS_EXAMPLE = ROOT / "deploy" / "compose" / "secrets.env.example"
# This run's own Redis db, so its workers and runs meet nobody else's.
REDIS_DB = 12
SCHEDULERS = ("scheduler-a", "scheduler-b")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.fail(f"{name} is missing: run scripts/setup and scripts/services (scripts/test does)")
    return path


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            found.append((instruction.upper(), " ".join(arguments.split())))
    return found


def instruction(name: str) -> list[str]:
    return [arguments for found, arguments in dockerfile() if found == name]


# --- the files -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_compose_file_follows_the_compose_specification(tmp_path):
    check = [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run([*check, str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # (and the check can fail: a misspelled key is refused)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    stop_grace_period:", "    stop_grace_periode:"))
    assert subprocess.run([*check, str(broken)], capture_output=True, timeout=120).returncode != 0


def test_the_stack_has_every_service_the_story_needs_with_a_grace_longer_than_tasks():
    services = compose()["services"]
    assert set(services) >= {"redis", "rabbitmq", "postgres", *SCHEDULERS, "worker", "flower", "prometheus",
                             "grafana", "pipeline"}  # fmt: skip
    assert "luigid" not in services  # the scheduler replaced it
    worker = services["worker"]
    assert worker["deploy"]["replicas"] >= 2 and worker["environment"]["WORKER_AUTOSCALE"]
    assert worker["stop_signal"] == "SIGTERM" and worker["stop_grace_period"] in ("10m", "1h")
    assert services["pipeline"]["restart"] == "no"
    # Secrets come from an env file nobody commits, with an example beside it
    for name in ("flower", "postgres", "grafana", *SCHEDULERS):
        assert services[name]["env_file"] == "deploy/compose/secrets.env"
    assert "deploy/compose/secrets.env" in (ROOT / ".gitignore").read_text().split()
    assert "FLOWER_BASIC_AUTH=" in SECRETS_EXAMPLE.read_text()
    # The scheduler keeps its task history in PostgreSQL, through Luigi's own [task_history] section
    config = (ROOT / "deploy" / "compose" / "luigi.cfg").read_text()
    assert "record_task_history = True" in config and "db_connection = postgresql+psycopg2://" in config


def test_two_scheduler_replicas_share_one_state_in_a_redis_that_keeps_it_and_the_pipeline_names_both():
    services = compose()["services"]
    a, b = (services[name] for name in SCHEDULERS)
    # Given the same command, sharing one --state-url (the replicas of one scheduler) on the stack's Redis
    assert a["command"] == b["command"]
    assert a["command"][:2] == ["luigi-celery", "scheduler"] and flag(a["command"], "--port") == "8082"
    assert flag(a["command"], "--state-url") == "redis://redis:6379/1"
    assert a["environment"]["LUIGI_CONFIG_PATH"] == "/etc/luigi/luigi.cfg"
    assert "./deploy/compose/luigi.cfg:/etc/luigi/luigi.cfg:ro" in a["volumes"] == b["volumes"]
    # published apart, on this host only
    assert (a["ports"], b["ports"]) == (["127.0.0.1:8082:8082"], ["127.0.0.1:8083:8082"])
    # healthy while alive, leader or standby: /healthz, not /readyz (a standby is healthy, and the pipeline
    # waits for both)
    for service in (a, b):
        assert "/healthz" in " ".join(service["healthcheck"]["test"]), service["healthcheck"]
        assert service["depends_on"]["redis"] == {"condition": "service_healthy"}
    pipeline = services["pipeline"]
    assert flag(pipeline["command"], "--scheduler-url") == "http://scheduler-a:8082,http://scheduler-b:8082"
    assert {name: pipeline["depends_on"][name] for name in SCHEDULERS} == {
        name: {"condition": "service_healthy"} for name in SCHEDULERS
    }
    # Then Redis keeps what it holds across its own restarts: an append-only file, on a volume
    redis = services["redis"]
    assert flag(redis["command"], "--appendonly") == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    luigi_cfg = configparser.ConfigParser(interpolation=None)
    luigi_cfg.read(ROOT / "deploy" / "compose" / "luigi.cfg")
    assert not luigi_cfg.has_option("scheduler", "state_path")  # the state is in Redis, not in a file


def flag(command: list[str], name: str) -> str | None:
    return next((command[i + 1] for i in range(len(command) - 1) if command[i] == name), None)


@pytest.mark.e2e
def test_hadolint_passes_the_dockerfile(tmp_path):
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # (and it does lint: a shell-form CMD is flagged)
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace('CMD ["luigi-celery", "worker", "--loglevel", "INFO"]',
                                                     "CMD luigi-celery worker"))  # fmt: skip
    assert subprocess.run([tool("hadolint"), str(broken)], capture_output=True, timeout=120).returncode != 0


def test_the_image_runs_the_worker_as_a_user_stops_it_warmly_and_checks_its_health():
    (base,) = instruction("FROM")
    assert re.fullmatch(r"python:3\.\d+-slim", base), base
    assert instruction("USER") == ["10001:10001"]
    assert any('pip install --no-cache-dir ".[deploy]"' in run for run in instruction("RUN"))
    assert [json.loads(cmd) for cmd in instruction("CMD")] == [["luigi-celery", "worker", "--loglevel", "INFO"]]
    assert [json.loads(e) for e in instruction("ENTRYPOINT")] == [["luigi-celery-entrypoint"]]
    assert instruction("STOPSIGNAL") == ["SIGTERM"]  # Celery's warm shutdown
    # metrics on every interface: a container's 127.0.0.1 is its own, and Prometheus scrapes from elsewhere
    image_env = dict(arg.split("=", 1) for env in instruction("ENV") for arg in shlex.split(env))
    assert image_env["LUIGI_CELERY_METRICS_ADDRESS"] == "0.0.0.0"
    assert compose()["x-luigi-celery"]["environment"]["LUIGI_CELERY_METRICS_ADDRESS"] == "0.0.0.0"
    (health,) = instruction("HEALTHCHECK")
    assert 'CMD ["sh", "-c", "luigi-celery check --worker \\"celery@$(hostname)\\"' in health


@pytest.mark.e2e
def test_promtool_accepts_the_prometheus_configuration():
    result = subprocess.run([tool("promtool"), "check", "config", str(PROMETHEUS)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    assert jobs == {"luigi_celery_worker", "luigi_celery_dispatcher", "flower"}


def test_grafanas_provisioning_points_at_prometheus_and_at_the_shipped_dashboard():
    services = compose()["services"]
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in services
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/luigi-celery.yml").read_text())["providers"]
    # the folder the provider reads is where compose mounts deploy/grafana/dashboards
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in services["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads((GRAFANA / "dashboards" / "luigi-celery.json").read_text())
    assert dashboard["uid"] == "luigi-celery"


# --- the services' commands, run here ----------------------------------------------------------


class Stack:
    """Runs compose services' commands as local processes, in the environment the image gives them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.queue = f"lc-compose-{uuid.uuid4().hex[:8]}"
        self.ports = {"5555": str(free_port()), "9540": str(free_port()), "9541": str(free_port())}
        # the scheduler replicas both listen on 8082, each in its own container: here each on a port of its own
        self.service_ports = {name: {"8082": str(free_port())} for name in SCHEDULERS}
        # every replica of this run shares one state, under keys of its own in this run's Redis db
        self.state_prefix = f"lc-compose-{uuid.uuid4().hex[:8]}:scheduler"
        self.database = f"luigi_history_{uuid.uuid4().hex[:8]}"
        self.secrets = dict(line.split("=", 1) for line in SECRETS_EXAMPLE.read_text().splitlines()
                            if line and not line.startswith("#"))  # fmt: skip
        self.processes: list[subprocess.Popen] = []
        (tmp_path / "out").mkdir()  # the outputs volume, at /app/out: here, out/ in the working folder

    def localize(self, text: str, service: str | None = None) -> str:
        """A value as seen from this machine, in ``service`` if given: the services' hosts are 127.0.0.1,
        their ports our own (and ``${VAR:-default}`` as compose reads it with VAR unset)."""
        text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)
        text = re.sub(r"redis://redis:6379/\d+", f"redis://127.0.0.1:6379/{REDIS_DB}", text)
        text = text.replace("@rabbitmq:", "@127.0.0.1:").replace(
            "postgres:5432/luigi", f"127.0.0.1:5432/{self.database}"
        )
        for name, ports in self.service_ports.items():
            for inside, here in ports.items():
                text = text.replace(f"http://{name}:{inside}", f"http://127.0.0.1:{here}")
        own = self.service_ports.get(service or "", {})
        for inside, here in own.items():  # the service's own address, as its health check names it
            text = re.sub(rf"127\.0\.0\.1:{inside}\b", f"127.0.0.1:{here}", text)
        return own.get(text) or self.ports.get(text, text)

    def url(self, service: str) -> str:
        """Where a scheduler replica answers, from this machine."""
        return f"http://127.0.0.1:{self.service_ports[service]['8082']}"

    def environment(self, service: dict[str, Any]) -> dict[str, str]:
        image = dict(arg.split("=", 1) for env in instruction("ENV") for arg in shlex.split(env))
        env = clean_env(**{k: self.localize(v) for k, v in image.items()}, PATH=f"{BIN}:{os.environ['PATH']}")
        if service.get("env_file"):
            env.update(self.secrets)
        env.update({k: self.localize(str(v)) for k, v in (service.get("environment") or {}).items()})
        env["LUIGI_CELERY_QUEUE"] = self.queue  # this run's own queue
        return env

    def start(self, name: str, *extra_args: str, **extra_env: str) -> subprocess.Popen:
        service = compose()["services"][name]
        command = ["sh", str(ENTRYPOINT), *(self.localize(str(arg), name) for arg in service["command"]), *extra_args]
        log = self.tmp / f"{name}.log"
        process = subprocess.Popen(command, cwd=self.tmp, env={**self.environment(service), **extra_env},
                                   stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
        client = redis.Redis.from_url(f"redis://127.0.0.1:6379/{REDIS_DB}")
        keys = list(client.scan_iter(match=f"{self.state_prefix}:*"))
        if keys:
            client.delete(*keys)


@pytest.fixture
def stack(brokers, tmp_path) -> Iterator[Stack]:
    stack = Stack(tmp_path)
    psql = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c"]
    password = stack.secrets["POSTGRES_PASSWORD"]
    subprocess.run([*psql, f"DO $$ BEGIN CREATE ROLE luigi LOGIN PASSWORD '{password}'; "
                    "EXCEPTION WHEN duplicate_object THEN NULL; END $$"], check=True, capture_output=True)  # fmt: skip
    subprocess.run([*psql, f"CREATE DATABASE {stack.database} OWNER luigi"], check=True, capture_output=True)
    config = stack.localize((ROOT / "deploy" / "compose" / "luigi.cfg").read_text())
    (tmp_path / "luigi.cfg").write_text(config)
    yield stack
    stack.stop()
    subprocess.run([*psql, f"DROP DATABASE IF EXISTS {stack.database}"], capture_output=True)


def _http_status(url: str, auth: str | None = None) -> int | None:
    return http_get(url, auth, timeout=5)[0]


def _applied(url: str) -> int | None:
    """How far in the shared log a scheduler replica has applied (its /healthz)."""
    status, body = http_get(f"{url}/healthz", timeout=5)
    return int(json.loads(body)["applied"]) if status == 200 else None


def _tasks(url: str, status: str) -> dict[str, Any]:
    body = http_get(f"{url}/api/task_list?data=" + urllib.parse.quote(json.dumps({"status": status})), timeout=10)[1]
    return dict(json.loads(body)["response"])


@pytest.mark.e2e
def test_every_service_command_runs_here_and_the_example_pipeline_completes(stack):
    # Given the worker service's command, through the image's entry point and environment
    worker = stack.start("worker")
    wait_until("the worker", lambda: " ready." in stack.log("worker"))
    # (the entry point exec'd the worker: the signal a container engine sends reaches Celery itself)
    assert "worker" in Path(f"/proc/{worker.pid}/cmdline").read_text()
    assert "--autoscale\x004,1" in Path(f"/proc/{worker.pid}/cmdline").read_text()
    # Then the image's health check sees this very worker
    (health,) = instruction("HEALTHCHECK")
    check = json.loads(health[health.index("CMD ") + 4 :])
    env = stack.environment(compose()["services"]["worker"])
    healthy = subprocess.run(check, env=env, cwd=stack.tmp, capture_output=True, text=True, timeout=60)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert f"celery@{socket.gethostname()}" in healthy.stdout

    # Given the two scheduler replicas, one state in Redis (a prefix of this run's own), the task history
    # in PostgreSQL: scheduler-b first, so that it leads and the pipeline's first URL is the standby's
    config = str(stack.tmp / "luigi.cfg")
    leader, standby = stack.url("scheduler-b"), stack.url("scheduler-a")
    scheduler_b = stack.start("scheduler-b", "--state-prefix", stack.state_prefix, LUIGI_CONFIG_PATH=config)
    wait_until("scheduler-b to lead", lambda: _http_status(f"{leader}/readyz") == 200, process=scheduler_b)
    scheduler_a = stack.start("scheduler-a", "--state-prefix", stack.state_prefix, LUIGI_CONFIG_PATH=config)
    wait_until("scheduler-a", lambda: _http_status(f"{standby}/healthz") == 200, process=scheduler_a)
    # Then the standby is alive and not ready, and sends calls to the leader (503)
    assert _http_status(f"{standby}/readyz") == 503
    assert _http_status(f"{standby}/api/task_list?data=%7B%7D") == 503
    assert _http_status(f"{leader}/api/task_list?data=%7B%7D") == 200
    # and compose's health check passes on both (it asks /healthz: a standby is healthy)
    for name in SCHEDULERS:
        service = compose()["services"][name]
        _, *test = (stack.localize(str(arg), name) for arg in service["healthcheck"]["test"])
        healthy = subprocess.run(test, env=stack.environment(service), cwd=stack.tmp, capture_output=True,
                                 text=True, timeout=30)  # fmt: skip
        assert healthy.returncode == 0, f"{name}: {healthy.stdout}{healthy.stderr}"

    # Given Flower with basic auth
    stack.start("flower")
    flower = f"http://127.0.0.1:{stack.ports['5555']}"
    wait_until("Flower", lambda: _http_status(f"{flower}/healthcheck") == 200)
    assert _http_status(f"{flower}/api/workers") == 401
    assert _http_status(f"{flower}/api/workers", auth=stack.secrets["FLOWER_BASIC_AUTH"]) == 200

    # When the pipeline service's command runs, given both replicas' URLs (the standby's first)
    pipeline = stack.start("pipeline")
    assert pipeline.wait(timeout=180) == 0, stack.log("pipeline")[-3000:]
    # Then the report is written, and the scheduler recorded the run in PostgreSQL, each task once
    # (the leader records; the standby replays the calls without recording them again)
    assert (stack.tmp / "out" / "2026-11-01" / "report.txt").exists()
    history = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", stack.database, "-tAc",
         "SELECT count(DISTINCT name), count(DISTINCT task_id), count(*) FROM tasks"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    names, task_ids, records = (int(n) for n in history.stdout.strip().split("|"))
    assert names >= 5 and records == task_ids, history.stdout
    done = _tasks(leader, "DONE")
    assert any(task["name"] == "Report" for task in done.values()), sorted(done)

    # And when the leader dies (kill -9: no hand-over), the standby, which followed it, takes over
    wait_until("the standby to follow", lambda: _applied(standby) == _applied(leader))
    os.killpg(scheduler_b.pid, signal.SIGKILL)
    scheduler_b.wait(10)
    wait_until("scheduler-a to take over", lambda: _http_status(f"{standby}/readyz") == 200, timeout=30)
    assert set(_tasks(standby, "DONE")) >= set(done)


@pytest.mark.e2e
def test_a_worker_started_by_the_entry_point_stops_warmly_on_sigterm(stack):
    # Given a worker started as the image starts it, running a task of a pipeline
    tests_only = {"WORKER_AUTOSCALE": "", "WORKER_CONCURRENCY": "1", "LUIGI_CELERY_TASK_MODULES": "tests"}
    worker = stack.start("worker", **tests_only)
    wait_until("the worker", lambda: " ready." in stack.log("worker"))
    run = subprocess.Popen(
        [str(BIN / "luigi-celery"), "run", "--module", "tests.pipelines", "ManySlow", "--count", "2",
         "--seconds", "3", "--out", str(stack.tmp / "out"), "--workers", "2"],
        cwd=stack.tmp, env={**stack.environment(compose()["services"]["pipeline"]), "LUIGI_CELERY_METRICS_PORT": ""},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_until("a task to start", lambda: "START Slow_" in _read(stack.tmp / "out" / "events.log") or run.poll())
    assert run.poll() is None, run.communicate()[0][-3000:]
    # When it gets SIGTERM, as from `docker stop` or Kubernetes on scale-in
    os.kill(worker.pid, signal.SIGTERM)
    # Then it finishes the running task before it exits
    assert worker.wait(timeout=60) == 0
    assert "Warm shutdown" in stack.log("worker")
    assert len(list((stack.tmp / "out").glob("Slow_*.txt"))) == 1, stack.log("worker")[-3000:]
    # and the task it never started waits for the next worker: a new one completes the run
    stack.start("worker", **tests_only)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 0, output[-3000:]
    assert len(list((stack.tmp / "out").glob("Slow_*.txt"))) == 2
    assert _read(stack.tmp / "out" / "events.log").count("START Slow_") == 2  # nothing ran twice


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
