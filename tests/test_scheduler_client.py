"""The dispatcher's client of a replicated scheduler: ``--scheduler-url URL1,URL2``.

A fake fetcher stands for the HTTP requests (the real replicas and their kill -9 are in
test_scheduler_server_e2e.py).
"""

from __future__ import annotations

import base64
import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import requests
from luigi.rpc import RPCError

from luigi_celery import scheduler_client
from luigi_celery.dispatch import CeleryWorkerSchedulerFactory
from luigi_celery.errors import ConfigError
from luigi_celery.scheduler_client import FailoverScheduler, KeepAliveFetcher, SchedulerHTTPError, scheduler_urls


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


class _Scheduler(http.server.BaseHTTPRequestHandler):
    """A stand-in scheduler: answers each POST with what it got, or the status the path names."""

    protocol_version = "HTTP/1.1"  # keep-alive, as tornado
    seen: ClassVar[list[tuple[int, str, str, str | None]]] = []  # (client port, path, body, auth)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.seen.append((self.client_address[1], self.path, body, self.headers.get("Authorization")))
        status = int(self.path.rsplit("/", 1)[-1]) if self.path.rsplit("/", 1)[-1].isdigit() else 200
        page = b'{"response": "ok"}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: object) -> None:
        """Quiet: http.server writes a line to stderr for each request by default."""


@pytest.fixture
def stand_in() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scheduler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Scheduler.seen.clear()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_fetcher_keeps_one_connection_posts_the_form_and_sends_basic_auth(stand_in):
    fetcher = KeepAliveFetcher()

    first = fetcher.fetch(f"http://ops:p%40ss@{stand_in}/api/ping", {"data": '{"worker": "w"}'}, 5)
    fetcher.fetch(f"http://ops:p%40ss@{stand_in}/api/get_work", {"data": "{}"}, 5)

    assert first == '{"response": "ok"}'
    (port1, path1, body1, auth1), (port2, path2, _, _) = _Scheduler.seen
    assert port1 == port2  # one kept-alive connection
    assert (path1, path2) == ("/api/ping", "/api/get_work")
    assert urllib.parse.parse_qs(body1) == {"data": ['{"worker": "w"}']}
    assert auth1 == "Basic " + base64.b64encode(b"ops:p@ss").decode()


def test_the_fetcher_raises_an_http_status_with_its_code_and_a_new_connection_follows(stand_in):
    fetcher = KeepAliveFetcher()

    with pytest.raises(SchedulerHTTPError) as refused:
        fetcher.fetch(f"http://{stand_in}/api/503", {}, 5)
    fetcher._connections[("http", stand_in)].close()  # (a connection the server dropped)
    assert fetcher.fetch(f"http://{stand_in}/api/ping", {}, 5) == '{"response": "ok"}'

    assert refused.value.code == 503 and isinstance(refused.value, KeepAliveFetcher.raises)
    with pytest.raises(KeepAliveFetcher.raises):
        fetcher.fetch("http://127.0.0.1:1/api/ping", {}, 5)  # nothing listens


def test_threads_calling_at_once_each_get_a_connection_of_their_own(stand_in):
    # Luigi's keep-alive thread pings while the worker's loop calls
    fetcher, failures = KeepAliveFetcher(), []

    def calls() -> None:
        try:
            for _ in range(50):
                fetcher.fetch(f"http://{stand_in}/api/ping", {}, 5)
        except Exception as e:  # noqa: BLE001  (reported below)
            failures.append(e)

    threads = [threading.Thread(target=calls) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == [] and len(_Scheduler.seen) == 200
    assert len({port for port, *_ in _Scheduler.seen}) == 4
