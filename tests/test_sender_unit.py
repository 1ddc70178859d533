"""The dispatcher's sender without a broker: pacing, waiting tasks, and what it does when
the broker or the coordination store is away."""

from __future__ import annotations

import queue
import threading
import time

import luigi
import pytest

from luigi_celery import message as m
from luigi_celery import signing
from luigi_celery.app import make_app
from luigi_celery.claim import RunClaim
from luigi_celery.errors import BrokerUnavailable
from luigi_celery.metrics import DispatcherMetrics
from luigi_celery.ratelimit import MemoryLimiter, Rate
from luigi_celery.results import ResultWatcher, publish_retry_policy
from luigi_celery.sender import Sender
from luigi_celery.settings import Settings
from luigi_celery.store import MemoryStore
from tests.pipelines import Limited, NeedsLocal, Unlimited

# Nothing listens on port 1: the app can be made, any connection is refused.
UNREACHABLE = "redis://:s3cret@127.0.0.1:1/0"


class Flight:
    check_unfulfilled_deps = True
    check_complete_on_run = False
    cache_task_completion = False

    def __init__(self, task: luigi.Task) -> None:
        self.task = task
        self.worker_timeout: float | None = None
        self.results: list[m.ResultMessage] = []

    def on_result(self, result: m.ResultMessage) -> None:
        self.results.append(result)

    def on_status(self, status: m.StatusMessage) -> None:
        pass


class Unreachable:
    """A limiter whose store is away."""

    def reserve(self, key: str, rate: Rate) -> tuple[float, float]:
        raise BrokerUnavailable("cannot reach the coordination store at redis://:****@store:6379/0: refused")


@pytest.fixture
def sender() -> Sender:
    """A sender whose publishing is recorded instead of sent, counting into metrics of its own."""
    settings = Settings(broker_url=UNREACHABLE)
    made = Sender(make_app(settings), settings, limiter=MemoryLimiter(), metrics=DispatcherMetrics())
    made.published = []  # type: ignore[attr-defined]
    made._publisher._put = lambda producer, tracked, celery_id, kwargs, declared: made.published.append(celery_id)  # type: ignore[method-assign,attr-defined]
    return made


def _metric(sender: Sender, name: str, **labels: str) -> float:
    (metrics,) = [hook for hook in sender._hooks if isinstance(hook, DispatcherMetrics)]
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def _status(flight: Flight, sender: Sender, field: str, value: object) -> None:
    (celery_id,) = [cid for cid, t in sender.ledger._in_flight.items() if t.flight is flight]
    update = m.StatusMessage(celery_id=celery_id, task_id=flight.task.task_id, field=field, value=value)
    sender._on_reply(update.to_dict())


def test_a_slot_that_cannot_be_reserved_fails_the_task_with_the_reason(sender: Sender) -> None:
    sender._hooks[0]._limiter = Unreachable()  # type: ignore[attr-defined]
    flight = Flight(Limited(out="/tmp", n=1))
    sender.send(flight)
    (result,) = flight.results
    assert result.status == m.FAILED
    assert "could not reserve a rate-limit slot" in result.expl and "s3cret" not in result.expl
    assert sender.in_flight() == 0


def test_tasks_waiting_for_their_slot_or_a_retry_are_counted_as_waiting(sender: Sender) -> None:
    # Given four tasks limited to 20/s sent at once, and one unlimited task
    limited = [Flight(Limited(out="/tmp", n=n)) for n in range(4)]
    for flight in limited:
        sender.send(flight)
    sender.send(Flight(Unlimited(out="/tmp", n=0)))
    # Then the first limited one and the unlimited one went out, three wait for their slot
    assert len(sender.published) == 2  # type: ignore[attr-defined]
    assert sender.in_flight() == 5 and sender.waiting() == 3
    # When a worker says the first one waits 30 s for a retry, it waits too, and the loop is woken
    _status(limited[0], sender, "retry_in", 30.0)
    assert sender.waiting() == 4
    began = time.monotonic()
    with pytest.raises(queue.Empty):  # (woken: Luigi's loop gives up its wait at once)
        sender.results.get(timeout=5)
    assert time.monotonic() - began < 1
    # and once an answer comes for a waiting task, it no longer counts
    _status(limited[1], sender, "retry_in", 30.0)
    (celery_id,) = [cid for cid, t in sender.ledger._in_flight.items() if t.flight is limited[1]]
    sender._on_reply(m.ResultMessage(celery_id=celery_id, task_id=limited[1].task.task_id, status=m.DONE).to_dict())
    assert sender.waiting() == 3 and sender.in_flight() == 4


def test_a_wait_ends_when_its_time_is_up(sender: Sender) -> None:
    flight = Flight(Unlimited(out="/tmp", n=0))
    sender.send(flight)
    _status(flight, sender, "retry_in", 0.2)
    assert sender.waiting() == 1
    time.sleep(0.3)
    assert sender.waiting() == 0 and sender.in_flight() == 1


def test_the_watcher_gives_up_on_a_broker_gone_longer_than_its_tolerance() -> None:
    # Given a watcher on a broker that does not answer, with a tolerance of half a second
    app = make_app(Settings(broker_url=UNREACHABLE))
    lost: list[str] = []
    said = threading.Event()

    def on_lost(why: str) -> None:
        lost.append(why)
        said.set()

    watcher = ResultWatcher(app, "q", lambda body: None, on_lost=on_lost, tolerance=0.5)
    watcher.start()
    # Then it says so once, with the broker's address and no password
    try:
        assert said.wait(30)
        time.sleep(1.5)
    finally:
        watcher.stop()
    assert len(lost) == 1
    assert "lost the broker at redis://:****@127.0.0.1:1/0 for more than 0.5 s" in lost[0]


@pytest.mark.parametrize("tolerance", [3.0, 20.0, 60.0])
def test_publish_retries_last_about_the_tolerance(tolerance: float) -> None:
    policy = publish_retry_policy(tolerance)
    waits, interval = [], policy["interval_start"]
    for _ in range(int(policy["max_retries"])):
        waits.append(interval)
        interval = min(interval + policy["interval_step"], policy["interval_max"])
    assert tolerance <= sum(waits) < tolerance + policy["interval_max"]


def test_the_dispatcher_counts_what_it_sends_and_every_answer(sender: Sender) -> None:
    # Given three tasks sent (one refused: a class a worker could not import)
    flights = [Flight(Unlimited(out="/tmp", n=n)) for n in range(2)]
    for flight in flights:
        sender.send(flight)
    refused = Flight(NeedsLocal(out="/tmp").requires())
    sender.send(refused)
    queue = sender.settings.queue
    assert _metric(sender, "luigi_celery_dispatched_total", family="Unlimited", queue=queue) == 2
    assert _metric(sender, "luigi_celery_in_flight") == 2
    # When one answer is DONE and one FAILED
    for flight, status in zip(flights, (m.DONE, m.FAILED), strict=True):
        (celery_id,) = [cid for cid, t in sender.ledger._in_flight.items() if t.flight is flight]
        sender._on_reply(m.ResultMessage(celery_id=celery_id, task_id=flight.task.task_id, status=status).to_dict())
    # Then each is counted once by status, the refusal as a failure, and nothing is in flight
    assert _metric(sender, "luigi_celery_completed_total", family="Unlimited", queue=queue, status="DONE") == 1
    assert _metric(sender, "luigi_celery_completed_total", family="Unlimited", queue=queue, status="FAILED") == 1
    refused_family = refused.task.task_family
    assert _metric(sender, "luigi_celery_completed_total", family=refused_family, queue=queue, status="FAILED") == 1
    assert _metric(sender, "luigi_celery_in_flight") == 0


def _result(flight: Flight, sender: Sender, **fields: object) -> dict:
    (celery_id,) = [cid for cid, t in sender.ledger._in_flight.items() if t.flight is flight]
    reply = m.ResultMessage(celery_id=celery_id, task_id=flight.task.task_id, status=m.DONE)
    return {**reply.to_dict(), **fields}


def test_a_reply_counts_only_for_an_attempt_this_run_sent(sender: Sender, caplog) -> None:
    # Given a task in flight
    flight = Flight(Unlimited(out="/tmp", n=1))
    sender.send(flight)
    sent = sender.ledger._in_flight[next(iter(sender.ledger._in_flight))].msg
    # When replies come for its task under ids this run did not send: the id without a
    # token (as before tokens), the right attempt with a guessed token, another attempt
    forged = [
        f"{sent.task_id[:80]}.{m.task_digest(sent.task_id)}.1",
        m.celery_task_id(sent.task_id, 1, m.new_token()),
        m.celery_task_id(sent.task_id, 2, sent.token),
    ]
    with caplog.at_level("WARNING", logger="luigi_celery"):
        for celery_id in forged:
            sender._on_reply(m.ResultMessage(celery_id=celery_id, task_id=sent.task_id, status=m.DONE).to_dict())
    # Then the task is still in flight, each forged reply said so in one line
    assert flight.results == [] and sender.in_flight() == 1
    assert caplog.text.count("an attempt this run did not send") == 3
    # and the reply to the attempt it sent counts
    sender._on_reply(_result(flight, sender))
    assert [r.status for r in flight.results] == [m.DONE]


def test_dynamic_dependencies_from_a_module_outside_the_run_fail_the_task(sender: Sender) -> None:
    # Given tasks of tests.pipelines in flight
    flight, sibling = Flight(Unlimited(out="/tmp", n=2)), Flight(Unlimited(out="/tmp", n=3))
    sender.send(flight)
    sender.send(sibling)
    # When a reply names dynamic dependencies from modules the run has nothing to do with
    outside = [["examples.sales", "Report", {"date": "2026-11-01"}], ["json", "X", {}]]
    sender._on_reply(_result(flight, sender, status=m.PENDING, new_deps=outside))
    # Then the task fails, naming the modules, with no dependencies for Luigi to import
    (result,) = flight.results
    assert result.status == m.FAILED and result.new_deps == []
    assert "'examples.sales', 'json'" in result.expl
    # while dynamic dependencies from the run's own module, or a sibling, are Luigi's to load
    inside = [["tests.pipelines", "Succeeds", {"out": "/tmp"}], ["tests.unit_tasks", "X", {}]]
    sender._on_reply(_result(sibling, sender, status=m.PENDING, new_deps=inside))
    assert [(r.status, len(r.new_deps)) for r in sibling.results] == [(m.PENDING, 2)]


def test_with_a_secret_tasks_go_out_signed_and_unsigned_replies_are_dropped(caplog) -> None:
    settings = Settings(broker_url=UNREACHABLE, secret="s3cret")
    sender = Sender(make_app(settings), settings, limiter=MemoryLimiter())
    published: list[dict] = []
    sender._publisher._put = lambda producer, tracked, celery_id, kwargs, declared: published.append(kwargs["message"])  # type: ignore[method-assign]
    flight = Flight(Unlimited(out="/tmp", n=4))
    sender.send(flight)
    # Then the message carries a signature made with the secret
    (message,) = published
    signing.verify(message, "s3cret")
    # and a reply to it counts only when signed with the same secret
    reply = _result(flight, sender)
    with caplog.at_level("ERROR", logger="luigi_celery"):
        sender._on_reply(reply)
        sender._on_reply(signing.sign(reply, "another"))
    assert flight.results == []
    assert caplog.text.count("dropped an invalid reply") == 2
    sender._on_reply(signing.sign(reply, "s3cret"))
    assert [r.status for r in flight.results] == [m.DONE]


def _claimed_run(store: MemoryStore) -> Sender:
    """A sender holding its run's claim in ``store``, as after start()."""
    settings = Settings(broker_url=UNREACHABLE, lock_ttl=5.0)
    made = Sender(make_app(settings), settings, store=store)
    assert store.claim_run(made.run_id, _claim(made).owner, settings.lock_ttl) is None
    return made


def _claim(sender: Sender) -> RunClaim:
    assert sender._claim is not None  # a sender with a store has one
    return sender._claim


def test_a_run_claim_the_store_lost_is_taken_again_and_the_monitor_waits(caplog) -> None:
    # Given a dispatcher holding its run's claim
    store = MemoryStore()
    sender = _claimed_run(store)
    # When the store loses it (restarted empty, flushed) and the monitor's check refreshes it
    store.release_run(sender.run_id, _claim(sender).owner)
    _claim(sender).refresh()
    # Then the claim is this dispatcher's again, and the monitor calls nothing lost for a while
    assert store.claim_run(sender.run_id, "another dispatcher", 5.0) == _claim(sender).owner
    assert sender._monitor._settle_until > time.monotonic() + 5.0
    assert f"took the claim on run {sender.run_id} again" in caplog.text
    # and the next refresh finds it alive, saying nothing more
    caplog.clear()
    _claim(sender).refresh()
    assert caplog.text == ""


def test_a_run_claim_another_dispatcher_took_is_left_to_it_and_said_once(caplog) -> None:
    # Given a dispatcher whose claim the store lost, and another dispatcher that took it
    store = MemoryStore()
    sender = _claimed_run(store)
    store.release_run(sender.run_id, _claim(sender).owner)
    store.claim_run(sender.run_id, "another dispatcher", 5.0)
    # When the monitor's checks refresh it, twice
    _claim(sender).refresh()
    _claim(sender).refresh()
    # Then the claim stays the other's, and the error is logged once
    assert store.claim_run(sender.run_id, "a third", 5.0) == "another dispatcher"
    assert caplog.text.count(f"lost the claim on run {sender.run_id} to another dispatcher") == 1
