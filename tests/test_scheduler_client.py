"""The dispatcher's client of a replicated scheduler: ``--scheduler-url URL1,URL2``.

A fake fetcher stands for the HTTP requests (the real replicas and their kill -9 are in
test_scheduler_server_e2e.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import requests
from luigi.rpc import RPCError

from luigi_celery import scheduler_client
from luigi_celery.dispatch import CeleryWorkerSchedulerFactory
from luigi_celery.errors import ConfigError
from luigi_celery.scheduler_client import FailoverScheduler, scheduler_urls


class Replies:
    """Answers each URL with what the test says: a page, or an exception (a dead replica, a 503)."""

    raises = requests.exceptions.RequestException

    def __init__(self, **by_host: object) -> None:
        self.by_host = by_host
        self.asked: list[str] = []

    def fetch(self, full_url: str, body: dict, timeout: float) -> str:
        host = full_url.split("//")[1].split(":")[0]
        self.asked.append(host)
        reply = self.by_host[host]
        if isinstance(reply, Exception):
            raise reply
        return str(reply)


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(scheduler_client, "BACKOFF_FIRST", 0.001)
    monkeypatch.setattr(scheduler_client, "BACKOFF_MAX", 0.002)


def ping(scheduler: FailoverScheduler) -> object:
    client: Any = scheduler  # (Luigi adds its RPC methods to the class at import)
    return client.ping(worker="w")


def client(replies: Replies, *hosts: str) -> FailoverScheduler:
    scheduler = FailoverScheduler([f"http://{host}:8082" for host in hosts])
    scheduler._fetcher = replies
    scheduler._rpc_retry_attempts, scheduler._rpc_retry_wait = 1, 1  # a budget of 1 s
    return scheduler


def test_a_standby_and_a_dead_replica_are_passed_over_for_the_leader_which_is_asked_first_after():
    replies = Replies(a=http_error(503), b=requests.ConnectionError("refused"), c='{"response": {"ok": 1}}')
    scheduler = client(replies, "a", "b", "c")

    assert ping(scheduler) == {"ok": 1}
    assert ping(scheduler) == {"ok": 1}

    assert replies.asked == ["a", "b", "c", "c"]


def test_a_4xx_is_the_calls_fault_and_is_not_retried():
    replies = Replies(a=http_error(400), b='{"response": null}')
    scheduler = client(replies, "a", "b")

    with pytest.raises(RPCError, match="tried http://a:8082, http://b:8082"):
        ping(scheduler)
    assert replies.asked == ["a"]


def test_when_no_replica_serves_the_call_fails_after_the_budget_of_luigis_retries():
    replies = Replies(a=requests.ConnectionError("refused"), b=http_error(503))
    scheduler = client(replies, "a", "b")

    with pytest.raises(RPCError, match="for up to 1 s"):
        ping(scheduler)
    assert len(replies.asked) > 4 and set(replies.asked) == {"a", "b"}


def test_the_factory_gives_luigi_a_failover_client_for_each_url_named():
    scheduler = CeleryWorkerSchedulerFactory(sender=None).create_remote_scheduler(" http://a:1/, http://b:2 ,")  # type: ignore[arg-type]

    assert isinstance(scheduler, FailoverScheduler)
    assert scheduler._urls == ["http://a:1", "http://b:2"]
    with pytest.raises(ConfigError, match="names no URL"):
        scheduler_urls(" , ")
