"""The embedded broker's folder is polled fast while messages flow, slowly while idle."""

from __future__ import annotations

import time

import kombu
import pytest

from luigi_celery import embedded
from luigi_celery.app import embedded_transport_options


@pytest.fixture
def folder_queue(tmp_path):
    options = {**embedded_transport_options(str(tmp_path)), "polling_interval": 0.01}
    conn = kombu.Connection("filesystem://localhost/", transport=embedded.TRANSPORT, transport_options=options)
    queue = kombu.Queue("q")
    received = []
    with conn, conn.Consumer(queue, callbacks=[lambda body, message: received.append(body)], no_ack=True):
        yield conn, received


def _waits(monkeypatch) -> list[float]:
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(embedded, "sleep", sleep)
    return waits


def test_idle_polls_wait_the_polling_interval(folder_queue, monkeypatch) -> None:
    conn, _ = folder_queue
    waits = _waits(monkeypatch)
    with pytest.raises(TimeoutError):
        conn.drain_events(timeout=0.05)
    assert waits and max(waits) == pytest.approx(0.01)


def test_polls_right_after_a_message_are_fast(folder_queue, monkeypatch) -> None:
    conn, received = folder_queue
    conn.Producer().publish({"n": 1}, routing_key="q", declare=[kombu.Queue("q")])
    conn.drain_events(timeout=1)
    assert received == [{"n": 1}]
    waits = _waits(monkeypatch)
    with pytest.raises(TimeoutError):
        conn.drain_events(timeout=0.05)
    assert waits and max(waits) == pytest.approx(embedded.BUSY_POLLING_INTERVAL)
