"""``luigi-celery scheduler`` as operators run it: two replica processes sharing a state on a
real Redis, a real dispatcher and Celery workers, and kill -9.

The two replicas start once for the module; a test that kills one starts it again
(``Replicas.ensure``). Their lease is 2 s, so a takeover is quick.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from luigi_celery.scheduler_journal import RedisJournal
from tests.conftest import BIN, REDIS_URL, ROOT, clean_env, free_port, http_get, wait_until

pytestmark = pytest.mark.e2e

LEASE = 2.0


@dataclass
class Replicas:
    prefix: str
    log_dir: Path
    ports: list[int] = field(default_factory=lambda: [free_port(), free_port()])
    processes: list[subprocess.Popen | None] = field(default_factory=lambda: [None, None])

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def start(self, i: int) -> None:
        log = (self.log_dir / f"replica{i}.log").open("a")
        self.processes[i] = subprocess.Popen(
            [str(BIN / "luigi-celery"), "scheduler", "--port", str(self.ports[i]), "--address", "127.0.0.1",
             "--state-url", REDIS_URL, "--state-prefix", self.prefix, "--lease", str(LEASE)],
            cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(f"replica {i} answers", lambda: self.role(i) is not None, timeout=30)

    def alive(self, i: int) -> bool:
        process = self.processes[i]
        return process is not None and process.poll() is None

    def kill(self, i: int) -> None:
        process = self.processes[i]
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def ensure(self) -> None:
        """Both replicas up, one of them leading."""
        for i in (0, 1):
            if not self.alive(i):
                self.start(i)
        wait_until("a replica leads", lambda: self.leader() is not None, timeout=30)

    def role(self, i: int) -> str | None:
        status, body = http_get(f"{self.urls[i]}/healthz", timeout=2)
        return json.loads(body)["role"] if status == 200 else None

    def leader(self) -> int | None:
        leading = [i for i in (0, 1) if self.alive(i) and http_get(f"{self.urls[i]}/readyz", timeout=2)[0] == 200]
        assert len(leading) <= 1, "two replicas lead at once"
        return leading[0] if leading else None

    def api(self, i: int, method: str, **data) -> tuple[int, dict]:
        return rpc(self.urls[i], method, data)

    def log(self) -> str:
        return "\n".join(path.read_text() for path in sorted(self.log_dir.glob("replica*.log")))

    def stop(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(15)


def rpc(url: str, method: str, data: dict | None = None, body: bytes | None = None) -> tuple[int, dict]:
    body = body if body is not None else urllib.parse.urlencode({"data": json.dumps(data or {})}).encode()
    request = urllib.request.Request(f"{url}/api/{method}", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def replicas(brokers, tmp_path_factory) -> Iterator[Replicas]:
    group = Replicas(f"lc-test-scheduler:{uuid.uuid4().hex[:10]}", tmp_path_factory.mktemp("replicas"))
    try:
        group.ensure()
        yield group
    finally:
        group.stop()
        RedisJournal(REDIS_URL, group.prefix, "cleanup", LEASE).forget()


@pytest.fixture
def ha(replicas) -> Replicas:
    replicas.ensure()
    return replicas


def starts(out: Path) -> Counter:
    """How often each task began (its START events, written by the worker that ran it)."""
    lines = (out / "events.log").read_text().splitlines() if (out / "events.log").exists() else []
    return Counter(line.split()[1] for line in lines if line.startswith("START "))


def run_in_background(pool, ha: Replicas, out: Path, count: int, seconds: float) -> subprocess.Popen:
    """A run of ``count`` tasks of ``seconds`` each. The replicas outlive a test, and a task's
    output folder is not part of its id: each test gives its tasks their own ``seconds``."""
    return pool.start("--workers", "4", "--module", "tests.pipelines", "ManySlow", "--count", str(count),
                      "--seconds", str(seconds), "--out", str(out), "--scheduler-url", ",".join(ha.urls))  # fmt: skip


def test_the_run_survives_a_kill_9_of_the_leader_and_the_standby_serves_within_10_s(redis_pool, ha, tmp_path):
    # Given a 300-task run over both replicas, under way
    out = tmp_path / "out"
    run = run_in_background(redis_pool, ha, out, 300, seconds=0.05)
    wait_until("40 tasks began", lambda: len(starts(out)) >= 40, timeout=60)
    leader = ha.leader()
    assert leader is not None

    # When the leader is killed
    ha.kill(leader)
    killed_at = time.monotonic()
    wait_until("the standby leads", lambda: ha.leader() == 1 - leader, timeout=20)
    took = time.monotonic() - killed_at

    # Then the standby serves within 10 s, and the run completes with every output, each task begun once
    output, _ = run.communicate(timeout=240)
    assert run.returncode == 0, output[-3000:]
    print(f"\nthe standby led {took:.2f} s after the kill")  # (for the notes: pytest -s shows it)
    assert took <= 10, f"the standby took {took:.1f} s"
    assert len(list(out.glob("Slow_*.txt"))) == 300
    began = starts(out)
    assert len(began) == 300 and max(began.values()) == 1, [t for t, n in began.items() if n > 1]
    assert "did not serve" in output  # (the dispatcher did notice, and moved on)

    # and the killed replica, started again, rejoins as the standby and catches up
    ha.start(leader)
    assert ha.role(leader) == "standby"
    assert http_get(f"{ha.urls[leader]}/readyz", timeout=2)[0] == 503
    status, refused = ha.api(leader, "task_list", status="", upstream_status="")
    assert status == 503 and "standby" in refused["error"]
    wait_until("the standby caught up", lambda: _applied(ha, leader) >= _applied(ha, 1 - leader), timeout=20)


def _applied(ha: Replicas, i: int) -> int:
    return int(json.loads(http_get(f"{ha.urls[i]}/healthz", timeout=2)[1])["applied"])


def test_a_kill_9_of_the_standby_goes_unnoticed(redis_pool, ha, tmp_path):
    out = tmp_path / "out"
    run = run_in_background(redis_pool, ha, out, 100, seconds=0.051)
    wait_until("20 tasks began", lambda: len(starts(out)) >= 20, timeout=60)
    leader = ha.leader()
    assert leader is not None

    ha.kill(1 - leader)

    output, _ = run.communicate(timeout=240)
    assert run.returncode == 0, output[-3000:]
    assert len(list(out.glob("Slow_*.txt"))) == 100
    assert "did not serve" not in output
    assert ha.leader() == leader


def test_both_replicas_killed_and_started_again_keep_the_state(redis_pool, ha, tmp_path):
    # Given done, failed and disabled tasks, and workers, on the scheduler
    out = tmp_path / "out"
    result = redis_pool.run("--module", "tests.pipelines", "Fails", "--out", str(out),
                            "--scheduler-url", ",".join(ha.urls))  # fmt: skip
    assert result.returncode != 0
    leader = ha.leader()
    assert leader is not None
    for status in ("PENDING", "FAILED"):  # one failure of the one allowed: DISABLED
        ha.api(leader, "add_task", worker="ops", task_id=f"Disabled-{out.name}", family="Disabled", status=status,
               retry_policy_dict={"retry_count": 1})  # fmt: skip
    ha.api(leader, "add_task", worker="ops", task_id=f"Done-{out.name}", family="Done", status="DONE")
    before = _state(ha, leader)
    assert before["FAILED"] and before["DISABLED"] and before["DONE"] and before["workers"]

    # When both are killed and started again
    ha.kill(0)
    ha.kill(1)
    ha.ensure()

    # Then the leader's state is what it was
    assert _state(ha, ha.leader()) == before


def _state(ha: Replicas, i: int | None) -> dict:
    assert i is not None
    state = {status: sorted(ha.api(i, "task_list", status=status, upstream_status="")[1]["response"])
             for status in ("DONE", "FAILED", "DISABLED", "PENDING")}  # fmt: skip
    state["workers"] = sorted(worker["name"] for worker in ha.api(i, "worker_list")[1]["response"])
    return state


def test_bad_calls_get_a_4xx_and_the_server_stays_up(ha):
    leader = ha.leader()
    assert leader is not None
    url = ha.urls[leader]

    assert rpc(url, "no_such_method")[0] == 404
    status, body = rpc(url, "add_task", body=b"data=%7Bnot+json")
    assert status == 400 and "not JSON" in body["error"]
    status, body = rpc(url, "add_task", body=b"data=%5B1%5D")
    assert status == 400 and "JSON object" in body["error"]
    status, body = rpc(url, "add_worker", {"worker": "w"})
    assert status == 400 and "info" in body["error"]
    status, body = rpc(url, "get_work", {"host": "h"})  # (no worker: Luigi's assertion)
    assert status == 400 and "get_work refused" in body["error"]

    assert rpc(url, "ping", {"worker": "still-up"})[0] == 200
    assert ha.leader() == leader


@pytest.mark.parametrize(("url", "said"), [
    ("redis://:hunter2@127.0.0.1:1/0", "does not answer"),
    ("redis://:hunter2@127.0.0.1:port/0", "invalid state URL"),
    ("http://:hunter2@127.0.0.1/", "must be redis://"),
])  # fmt: skip
def test_an_unreachable_or_bad_state_url_is_one_line_and_exit_2(url, said):
    result = subprocess.run(
        [str(BIN / "luigi-celery"), "scheduler", "--port", str(free_port()), "--state-url", url],
        env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "luigi-celery scheduler: error:" in lines[0] and said in lines[0], lines
    assert "hunter2" not in result.stderr


def test_stock_luigi_and_the_visualiser_work_against_the_scheduler(ha, tmp_path):
    # Given Luigi's own command, its own worker, one URL (as behind a Service)
    leader = ha.leader()
    assert leader is not None
    out = tmp_path / "out"
    result = subprocess.run(
        [str(BIN / "luigi"), "--module", "tests.pipelines", "Succeeds", "--out", str(out),
         "--scheduler-url", ha.urls[leader], "--no-lock"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (output,) = out.glob("Succeeds_*.txt")
    done = ha.api(leader, "task_list", status="DONE", upstream_status="")[1]["response"]
    assert output.stem in done
    # and the visualiser's pages come from the leader
    assert http_get(f"{ha.urls[leader]}/static/visualiser/index.html")[0] == 200
