"""Messages published straight onto a worker's queue, bypassing the dispatcher.

The worker must answer a well-formed message for an unknown task with a
FAILED reply, reject malformed ones (logged, never executed, never
unpickled), and keep serving real work afterwards.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import pickle
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from kombu import Connection

from luigi_celery import message as m
from luigi_celery import signing
from luigi_celery.app import make_app
from luigi_celery.results import reply_queue, reply_queue_name
from luigi_celery.settings import Settings
from tests.conftest import RABBITMQ_URL, REDIS_URL, ROOT, clean_env, run_cli

pytestmark = pytest.mark.e2e

SLOW_TASKS = ("--module", "tests.pipelines", "ManySlow", "--count", "8", "--seconds", "0.3", "--workers", "4")


def records(logs: str, words: str) -> int:
    """How many log records (lines that start a record, "[date ...") contain ``words``."""
    return sum(1 for line in logs.splitlines() if line.startswith("[") and words in line)


def _task_message(**changes) -> dict:
    msg = m.TaskMessage(
        task_id="NoSuchTask__99914b932b",
        module="tests.pipelines",
        family="NoSuchTask",
        params={},
        attempt=1,
        run_id="hostile",
        reply_to=changes.pop("reply_to"),
    )
    return {**msg.to_dict(), **changes}


@pytest.fixture
def replies(pool):
    """A reply queue of our own on the pool's broker; yields (name, read_one)."""
    name = reply_queue_name(f"test-{uuid.uuid4().hex[:8]}")
    with Connection(pool.broker) as conn:
        queue = reply_queue(name)(conn.default_channel)
        queue.declare()

        def read_one(timeout: float = 20) -> dict:
            deadline = time.time() + timeout
            while time.time() < deadline:
                message = queue.get(no_ack=True, accept=["json"])
                if message is not None:
                    return message.decode()
                time.sleep(0.05)
            raise AssertionError(f"no reply on {name} within {timeout} s")

        yield name, read_one
        queue.delete()


@pytest.fixture
def app(pool):
    return make_app(Settings(broker_url=pool.broker, queue=pool.queue))


def test_an_unknown_task_family_gets_a_failed_reply(app, pool, replies):
    name, read_one = replies
    app.send_task(m.TASK_NAME, kwargs={"message": _task_message(reply_to=name)}, queue=pool.queue)
    reply = m.ResultMessage.from_dict(read_one())
    assert reply.status == m.FAILED
    assert "no task family 'NoSuchTask' in module 'tests.pipelines'" in reply.expl


def test_malformed_and_pickled_messages_are_rejected_and_the_worker_keeps_serving(app, pool, replies, tmp_path):
    name, read_one = replies
    marker = f"pickled-{uuid.uuid4().hex[:6]}"
    # Given a burst of bad messages straight on the queue
    with Connection(pool.broker) as conn:
        producer = conn.Producer()
        headers = {"task": m.TASK_NAME, "id": str(uuid.uuid4()), "lang": "py"}
        producer.publish(b"{not json", routing_key=pool.queue, content_type="application/json",
                         content_encoding="utf-8", headers=headers)  # fmt: skip
        producer.publish(pickle.dumps(((), {"message": marker}, {})), routing_key=pool.queue,
                         content_type="application/x-python-serialize", content_encoding="binary",
                         headers={**headers, "id": str(uuid.uuid4())})  # fmt: skip
        producer.publish(b"plain text, no headers", routing_key=pool.queue, content_type="text/plain")
    app.send_task(m.TASK_NAME, args=[1, 2, 3], queue=pool.queue)  # wrong call shape
    app.send_task(m.TASK_NAME, kwargs={"message": {"v": 99}}, queue=pool.queue)  # wrong version
    # a message broken in one field, but with enough to answer its sender
    app.send_task(m.TASK_NAME, kwargs={"message": _task_message(reply_to=name, attempt="one")}, queue=pool.queue)

    # Then the sender of the half-valid message hears why
    reply = m.ResultMessage.from_dict(read_one())
    assert reply.status == m.FAILED and "malformed task message" in reply.expl
    # and real work still runs on the same workers
    result = run_cli("run", "--broker", pool.broker, "--queue", pool.queue,
                     "--module", "tests.pipelines", "Succeeds", "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]
    assert all(w.alive() for w in pool.workers)
    logs = pool.logs()
    # each malformed call was rejected by our task, once; had the pickle been loaded,
    # our task would have seen its marker string and rejected a fourth
    assert records(logs, "reject requeue=False: rejected malformed message") == 3
    assert "Refusing to deserialize untrusted content of type pickle" in logs
    assert "Refusing to deserialize untrusted content of type text/plain" in logs
    assert "Expecting property name enclosed in double quotes" in logs  # the broken JSON


@pytest.mark.parametrize("broker", [REDIS_URL, RABBITMQ_URL], ids=["redis", "rabbitmq"])
def test_a_thousand_hostile_messages_between_real_tasks(fresh_pool, tmp_path, broker):
    # Given a pool of its own, so every log record counted here is this test's
    pool = fresh_pool(broker)
    app = make_app(Settings(broker_url=broker, queue=pool.queue))
    reply_to = reply_queue_name(f"hostile-{uuid.uuid4().hex[:8]}")
    elsewhere = str(tmp_path / "elsewhere")
    kinds: collections.Counter[str] = collections.Counter()
    with Connection(broker) as conn:
        reply_queue(reply_to)(conn.default_channel).declare()
        producer = conn.Producer()
        run = subprocess.Popen(pool.command(*SLOW_TASKS, "--out", str(tmp_path / "real")), cwd=ROOT, env=clean_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        # When 1,000 hostile messages of six kinds are published while the real run goes on
        for i in range(1000):
            kind = ("broken-json", "pickle", "plain-text", "wrong-schema", "disallowed", "unregistered")[i % 6]
            kinds[kind] += 1
            headers = {"task": m.TASK_NAME, "id": f"hostile-{i}", "lang": "py"}
            if kind == "broken-json":
                producer.publish(b"{nope", routing_key=pool.queue, content_type="application/json",
                                 content_encoding="utf-8", headers=headers)  # fmt: skip
            elif kind == "pickle":
                producer.publish(pickle.dumps(((), {"message": f"pickled-{i}"}, {})), routing_key=pool.queue,
                                 content_type="application/x-python-serialize", content_encoding="binary",
                                 headers=headers)  # fmt: skip
            elif kind == "plain-text":
                producer.publish(b"rm -rf /", routing_key=pool.queue, content_type="text/plain")
            elif kind == "wrong-schema":
                app.send_task(m.TASK_NAME, kwargs={"message": {"v": m.PROTOCOL_VERSION, "kind": "task", "task_id": i}},
                              queue=pool.queue, task_id=f"hostile-{i}")  # fmt: skip
            elif kind == "disallowed":
                msg = _task_message(reply_to=reply_to, module="tests.pipelines_other", family="Elsewhere",
                                    params={"out": elsewhere}, task_id=f"Elsewhere_{i}")  # fmt: skip
                app.send_task(m.TASK_NAME, kwargs={"message": msg}, queue=pool.queue, task_id=f"hostile-{i}")
            else:
                app.send_task("os.system", args=["touch /tmp/owned"], queue=pool.queue, task_id=f"hostile-{i}")
        output, _ = run.communicate(timeout=240)
        reply_queue(reply_to)(conn.default_channel).delete()
    # Then the real run completed, no hostile message ran anything, the workers are up,
    assert run.returncode == 0, output[-3000:]
    assert len(list((tmp_path / "real").glob("Slow_*.txt"))) == 8
    assert not Path(elsewhere).exists()
    assert all(w.alive() for w in pool.workers)
    # and each rejection was logged exactly once
    deadline = time.time() + 30
    expected = {
        "Can't decode message body": kinds["broken-json"] + kinds["plain-text"],
        "Refusing to deserialize untrusted content of type pickle": kinds["pickle"],
        "reject requeue=False: rejected malformed message": kinds["wrong-schema"],
        "is not in the allowlist": kinds["disallowed"],
        "Received unregistered task of type 'os.system'": kinds["unregistered"],
    }
    while time.time() < deadline and any(records(pool.logs(), w) < n for w, n in expected.items()):
        time.sleep(0.5)
    logs = pool.logs()
    assert {w: records(logs, w) for w in expected} == expected


# --- what a worker refuses, and what a dispatcher does not believe ---------------------------


def _succeeds(out: Path, reply_to: str, **changes) -> dict:
    """A valid execute message for tests.pipelines.Succeeds writing into ``out``."""
    from tests.pipelines import Succeeds

    task = Succeeds(out=str(out))
    msg = m.TaskMessage(task_id=task.task_id, module=task.task_module, family=task.task_family,
                        params=task.to_str_params(), attempt=1, run_id="hostile", reply_to=reply_to)  # fmt: skip
    return {**msg.to_dict(), **changes}


def test_a_worker_refuses_what_our_dispatcher_never_sends_and_does_not_requeue_it(pool, app, replies, tmp_path):
    name, read_one = replies
    tag = uuid.uuid4().hex[:8]
    outs = {kind: tmp_path / kind for kind in ("compressed", "oversized", "linked", "link", "group", "builtin")}
    # Given execute messages for real tasks, each in a form luigi-celery never sends:
    # compressed (kombu inflates any message, whatever accept_content says), over 1 MiB,
    # with a callback and an errback, and one republished by Celery's built-in group task
    send = functools.partial(app.send_task, m.TASK_NAME, queue=pool.queue)
    send(kwargs={"message": _succeeds(outs["compressed"], name)}, compression="zlib", task_id=f"compressed-{tag}")
    send(kwargs={"message": _succeeds(outs["oversized"], name, padding="x" * 1_100_000)}, task_id=f"oversized-{tag}")
    callback = app.signature(m.TASK_NAME, kwargs={"message": _succeeds(outs["link"], name)}, queue=pool.queue)
    send(kwargs={"message": _succeeds(outs["linked"], name)}, link=callback, link_error=callback,
         task_id=f"linked-{tag}")  # fmt: skip
    republished = app.signature(m.TASK_NAME, kwargs={"message": _succeeds(outs["group"], name)}, queue=pool.queue)
    app.send_task("celery.group", args=[[dict(republished)], f"group-{tag}", None], queue=pool.queue,
                  task_id=f"group-{tag}")  # fmt: skip
    app.send_task("celery.chord_unlock", args=[f"chord-{tag}", []], queue=pool.queue, task_id=f"chord-{tag}")
    # When a last, plain message has been answered
    send(kwargs={"message": _succeeds(outs["builtin"], name)})
    assert m.ResultMessage.from_dict(read_one()).status == m.DONE
    time.sleep(2)  # (another worker may still be refusing one received just before)
    # Then none of the others ran, nor sent a reply
    assert [kind for kind, out in outs.items() if out.exists()] == ["builtin"]
    with pytest.raises(AssertionError, match="no reply"):
        read_one(timeout=1)
    # and each was refused once (a requeued one would be refused again and again), the workers up
    logs = pool.logs()
    assert records(logs, f"rejected compressed-{tag}") + records(logs, "compressed messages are refused") >= 1
    assert records(logs, f"rejected oversized-{tag}: a message of ") == 1
    assert records(logs, f"rejected linked-{tag}: a message with callbacks, errbacks") == 1
    assert records(logs, "Received unregistered task of type 'celery.group'") >= 1
    assert records(logs, "Received unregistered task of type 'celery.chord_unlock'") >= 1
    assert all(w.alive() for w in pool.workers)


@pytest.mark.parametrize("broker", [REDIS_URL, RABBITMQ_URL], ids=["redis", "rabbitmq"])
def test_remote_control_answers_luigi_celery_and_flower_only(fresh_pool, broker):
    # Given one worker of its own
    pool = fresh_pool(broker, count=1)
    app = make_app(Settings(broker_url=broker, queue=pool.queue))
    # (to it alone: other tests' workers share the broker)
    to = {"destination": [f"{pool.workers[0].name}@{socket.gethostname()}"]}
    # When anyone on the broker tells it to grow its pool, change a rate limit, or shut down
    grow = app.control.broadcast("pool_grow", arguments={"n": 4}, reply=True, timeout=3, **to)
    app.control.broadcast("rate_limit", arguments={"task_name": m.TASK_NAME, "rate_limit": "1/h"}, **to)
    app.control.broadcast("shutdown", **to)
    time.sleep(3)
    # Then it refused each, and is still up, with its pool as it was
    assert grow and all("refused" in reply[name]["error"] for reply in grow for name in reply), grow
    assert pool.workers[0].alive()
    assert records(pool.logs(), "refused remote-control command") == 3
    inspect = app.control.inspect(timeout=3, **to)
    assert [stats["pool"]["max-concurrency"] for stats in (inspect.stats() or {}).values()] == [2]
    # and what luigi-celery and Flower ask is answered
    assert app.control.ping(timeout=3, **to)
    assert [q["name"] for qs in (inspect.active_queues() or {}).values() for q in qs] == [pool.queue]
    assert inspect.registered() and app.control.broadcast("enable_events", reply=True, timeout=3, **to)


def test_a_worker_stopped_by_an_unrecoverable_error_exits_non_zero(tmp_path):
    # (a supervisor that restarts a worker only when it fails must see it fail)
    result = run_cli("worker", "--broker", REDIS_URL, "--include", "examples.sales", "-Q", f"lc-{uuid.uuid4().hex[:8]}",
                     "--pidfile", str(tmp_path / "no" / "such" / "folder" / "worker.pid"), timeout=60)  # fmt: skip
    assert "Unrecoverable error" in result.stdout
    assert result.returncode == 1, result.stdout[-2000:]
    # and a bad Celery option is one line, exit 2
    bad = run_cli("worker", "--broker", REDIS_URL, "--include", "examples.sales", "--no-such-flag")
    assert bad.returncode == 2 and bad.stdout.strip() == "luigi-celery worker: error: No such option '--no-such-flag'."


def test_forged_replies_and_provoked_refusals_do_not_end_a_run(pool, app, tmp_path):
    from tests.pipelines import ManySlow, Slow

    # Given a run of two 4 s tasks, with a coordination store: its run id, and so its reply
    # queue, is a hash anyone can compute from the pipeline and the queue
    out, elsewhere = tmp_path / "real", tmp_path / "elsewhere"
    run = subprocess.Popen(
        pool.command("--module", "tests.pipelines", "ManySlow", "--count", "2", "--seconds", "4", "--out", str(out)),
        cwd=ROOT, env=clean_env(LUIGI_CELERY_REDIS_URL=REDIS_URL), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    root = ManySlow(out=str(out), count=2, seconds=4.0)
    run_id = hashlib.sha1(f"{root.task_id}|{pool.queue}".encode()).hexdigest()[:16]
    victims = [Slow(out=str(out), n=n, seconds=4.0) for n in range(2)]
    deadline = time.time() + 60
    while (out / "events.log").read_text().count("START") < 2 if (out / "events.log").exists() else True:
        assert time.time() < deadline and run.poll() is None, "the run's tasks did not start"
        time.sleep(0.1)
    # When, while they run, someone answers them DONE under the ids a task had before tokens
    # and under guessed tokens (naming a dynamic dependency from a module the run does not use),
    # and provokes a worker's refusal with their task ids and the run's reply queue
    with Connection(pool.broker) as conn:
        producer = conn.Producer()
        for victim in victims:
            for celery_id in (f"{victim.task_id[:80]}.{m.task_digest(victim.task_id)}.1",
                              m.celery_task_id(victim.task_id, 1, m.new_token())):  # fmt: skip
                forged = m.ResultMessage(celery_id=celery_id, task_id=victim.task_id, status=m.PENDING,
                                         new_deps=[("tests.pipelines_other", "Elsewhere", {"out": str(elsewhere)})])
                producer.publish(forged.to_dict(), routing_key=reply_queue_name(run_id), serializer="json")
            refused = m.TaskMessage(task_id=victim.task_id, module="tests.pipelines_other", family="Elsewhere",
                                    params={"out": str(elsewhere)}, attempt=1, run_id=run_id,
                                    reply_to=reply_queue_name(run_id))  # fmt: skip
            app.send_task(m.TASK_NAME, kwargs={"message": refused.to_dict()}, queue=pool.queue)
    output, _ = run.communicate(timeout=120)
    # Then the run went on as if nothing was said: each task ran once, to its end, and the run succeeded
    assert run.returncode == 0, output[-3000:]
    assert sorted(p.name for p in out.glob("Slow_*.txt")) == sorted(f"{v.task_id}.txt" for v in victims)
    assert (out / "events.log").read_text().count("START") == 2
    assert not elsewhere.exists()
    # and it said, once for each, what it dropped
    assert output.count("an attempt this run did not send") == 6, output[-3000:]


def test_with_a_shared_secret_runs_work_and_unsigned_or_missigned_messages_never_run(fresh_pool, tmp_path):
    secret = f"test-secret-{uuid.uuid4().hex}"
    pool = fresh_pool(REDIS_URL, count=1, LUIGI_CELERY_SECRET=secret)
    # Given workers and a dispatcher that share a secret / Then runs work as ever
    result = pool.run("--module", "tests.pipelines", "Succeeds", "--out", str(tmp_path / "signed"))
    assert result.returncode == 0, result.stdout[-3000:]
    assert list((tmp_path / "signed").glob("Succeeds_*.txt"))
    # When messages come unsigned, or signed with another secret
    tag, reply_to = uuid.uuid4().hex[:8], reply_queue_name(f"signed-{uuid.uuid4().hex[:8]}")
    app = make_app(Settings(broker_url=REDIS_URL, queue=pool.queue))
    with Connection(REDIS_URL) as conn:
        queue = reply_queue(reply_to)(conn.default_channel)
        queue.declare()
        app.send_task(m.TASK_NAME, kwargs={"message": _succeeds(tmp_path / "unsigned", reply_to)}, queue=pool.queue,
                      task_id=f"unsigned-{tag}")  # fmt: skip
        other = signing.sign(_succeeds(tmp_path / "other", reply_to), "another secret")
        app.send_task(m.TASK_NAME, kwargs={"message": other}, queue=pool.queue, task_id=f"missigned-{tag}")
        # and then one signed with the secret
        app.send_task(m.TASK_NAME, kwargs={"message": signing.sign(_succeeds(tmp_path / "good", reply_to), secret)},
                      queue=pool.queue)  # fmt: skip
        deadline, reply = time.time() + 30, None
        while reply is None and time.time() < deadline:
            reply = queue.get(no_ack=True, accept=["json"])
            time.sleep(0.05)
        assert reply is not None, pool.logs()[-3000:]
        time.sleep(1)
        others = queue.get(no_ack=True, accept=["json"])
        queue.delete()
    # Then only the signed one ran, and its reply is signed with the secret too
    signing.verify(reply.decode(), secret)
    assert m.ResultMessage.from_dict(reply.decode()).status == m.DONE and others is None
    assert not (tmp_path / "unsigned").exists() and not (tmp_path / "other").exists()
    logs = pool.logs()
    assert records(logs, f"rejected unsigned-{tag}: unsigned message") == 1
    assert records(logs, f"rejected missigned-{tag}: bad signature") == 1
