"""Unit tests for luigi_celery.brokers: one reading of a broker URL, the one kombu makes."""

from __future__ import annotations

import kombu
import pytest

from luigi_celery.app import make_app
from luigi_celery.brokers import (
    EMBEDDED_URL,
    is_rabbitmq,
    is_redis,
    kombu_broker,
    redis_store_url,
    transport_name,
)
from luigi_celery.embedded import TRANSPORT as EMBEDDED_TRANSPORT
from luigi_celery.redis_broker import TRANSPORT as REDIS_TRANSPORT
from luigi_celery.settings import Settings

# URLs kombu accepts, of every kind luigi-celery tells apart.
URLS = [
    "redis://h:6379/0",
    "rediss://:pw@h:6380/0?ssl_cert_reqs=required",
    "redis+socket:///tmp/redis.sock",
    "sentinel://h:26379;sentinel://g:26379",
    "REDIS://h:6379/1",
    "amqp://guest:guest@h:5672//",
    "amqps://h//",
    "pyamqp://h//",
    "AMQP://h//",
    "localhost",
    "redis://a:6379/0;amqp://b//",
    "filesystem://",
    "memory://",
]


@pytest.mark.parametrize("url", URLS)
def test_a_url_names_the_transport_kombu_picks_for_it(url: str) -> None:
    # Given a broker URL kombu accepts / When luigi-celery reads it / Then it names kombu's transport
    assert transport_name(url) == kombu.Connection(url).transport_cls


@pytest.mark.parametrize("url", URLS)
def test_redis_and_rabbitmq_are_what_kombu_connects_to(url: str) -> None:
    # Given a broker URL / When luigi-celery asks what it names
    # Then the answer is the driver kombu's transport for it speaks
    driver = kombu.Connection(url).transport.driver_type
    assert (is_redis(url), is_rabbitmq(url)) == (driver == "redis", driver == "amqp")


def test_the_embedded_broker_is_neither_redis_nor_rabbitmq() -> None:
    assert not is_redis(None) and not is_rabbitmq(None)
    assert not is_redis(EMBEDDED_URL) and not is_rabbitmq(EMBEDDED_URL)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(None, (EMBEDDED_URL, EMBEDDED_TRANSPORT), id="embedded"),
        pytest.param("redis://h/0", ("redis://h/0", REDIS_TRANSPORT), id="redis: ours"),
        pytest.param("rediss://h/0", ("rediss://h/0", None), id="rediss: kombu's, for TLS"),
        pytest.param("sentinel://h:26379", ("sentinel://h:26379", None), id="sentinel: kombu's"),
        pytest.param("redis+socket:///s", ("redis+socket:///s", None), id="redis+socket: kombu's"),
        pytest.param("amqp://h//", ("amqp://h//", None), id="amqp: kombu's"),
    ],
)
def test_the_transport_celery_is_given(url: str | None, expected: tuple[str, str | None]) -> None:
    assert kombu_broker(url) == expected


@pytest.mark.parametrize(
    ("broker", "store", "expected"),
    [
        ("redis://h:6379/1", None, "redis://h:6379/1"),
        ("rediss://h:6380/1", None, "rediss://h:6380/1"),
        ("redis://a/1;redis://b/1", None, "redis://a/1"),
        ("sentinel://h:26379", None, None),
        ("redis+socket:///s", None, None),
        ("amqp://h//", None, None),
        ("amqp://h//", "redis://s/2", "redis://s/2"),
        (None, None, None),
    ],
)
def test_the_store_defaults_to_a_redis_broker_redis_py_opens(
    broker: str | None, store: str | None, expected: str | None
) -> None:
    assert redis_store_url(broker, store) == expected


def test_the_app_gets_the_redis_transport_options_from_the_same_reading() -> None:
    # Given a Redis broker and a RabbitMQ one / When apps are made for them
    redis_app = make_app(Settings(broker_url="redis://127.0.0.1:6379/11"))
    rabbit_app = make_app(Settings(broker_url="amqp://guest:guest@127.0.0.1:5672//"))

    # Then only the Redis one has a visibility timeout, no prefetch and our transport
    assert "visibility_timeout" in redis_app.conf.broker_transport_options
    assert redis_app.conf.worker_disable_prefetch and redis_app.conf.broker_transport == REDIS_TRANSPORT
    assert "visibility_timeout" not in rabbit_app.conf.broker_transport_options
    assert not rabbit_app.conf.worker_disable_prefetch and rabbit_app.conf.broker_transport is None
