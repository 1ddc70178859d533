"""Broker URLs: what kind of broker a URL names, and what luigi-celery does differently for it.

Every decision luigi-celery takes from a broker URL's scheme is taken here:

- which kombu transport Celery is given (:func:`kombu_broker`): ours for ``redis://``
  (redis_broker.py) and for the embedded default (embedded.py), kombu's own otherwise;
- whether the broker is Redis (:func:`is_redis`: a visibility timeout, and no prefetch)
  or RabbitMQ (:func:`is_rabbitmq`: a deleted reply queue says a run is over, the
  management API counts unacknowledged messages and feeds Flower's Broker page);
- the coordination store's default URL (:func:`redis_store_url`): the broker, when it is
  a Redis that redis-py opens;
- whether kombu can use the URL at all (:func:`check_broker_url`).

A URL is read as kombu reads it (``kombu.Connection``): a ``;``-separated failover list by
its first URL, the scheme in lower case, ``transport+rest://`` as ``transport``, and a URL
with no scheme as kombu's default, ``amqp``. So the answer for a URL is the answer for the
transport kombu will actually use. Hiding a URL's password is redaction.py's: it works on
any text, a URL's or not, and decides nothing from a scheme.
"""

from __future__ import annotations

import urllib.parse

import kombu

from luigi_celery.embedded import TRANSPORT as EMBEDDED_TRANSPORT
from luigi_celery.errors import ConfigError
from luigi_celery.redaction import ENCODING_HINT, needs_encoding, redact, scrub
from luigi_celery.redis_broker import TRANSPORT as REDIS_TRANSPORT

# The embedded broker: kombu's filesystem transport ignores the host, and naming one keeps
# kombu from warning each time Celery clones the connection.
EMBEDDED_URL = "filesystem://localhost/"

# kombu's transports (its names for them) by the broker they speak to.
REDIS_TRANSPORTS = frozenset({"redis", "rediss", "sentinel"})
RABBITMQ_TRANSPORTS = frozenset({"amqp", "amqps", "pyamqp", "librabbitmq"})
# kombu's transport when a URL names none.
DEFAULT_TRANSPORT = "amqp"
# The schemes redis-py opens (a Sentinel or a `redis+socket://` URL it does not).
_STORE_SCHEMES = ("redis", "rediss")


def _first(url: str) -> str:
    """The URL kombu connects to first: the first of a ``;``-separated failover list."""
    return url.split(";", 1)[0].strip()


def scheme(url: str) -> str:
    """The scheme of ``url`` (of its first URL), in lower case; "" when it has none."""
    found, separator, _ = _first(url).partition("://")
    return found.lower() if separator else ""


def transport_name(url: str) -> str:
    """kombu's name for the transport ``url`` names: ``redis``, ``rediss``, ``sentinel``,
    ``amqp``, ``pyamqp``, ``filesystem``, ..."""
    return scheme(url).partition("+")[0] or DEFAULT_TRANSPORT


def is_redis(url: str | None) -> bool:
    """True when ``url`` names a Redis broker (directly, over TLS or through Sentinel);
    False for None (the embedded broker)."""
    return url is not None and transport_name(url) in REDIS_TRANSPORTS


def is_rabbitmq(url: str | None) -> bool:
    """True when ``url`` names a RabbitMQ broker (AMQP); False for None (the embedded broker)."""
    return url is not None and transport_name(url) in RABBITMQ_TRANSPORTS


def kombu_broker(url: str | None) -> tuple[str, str | None]:
    """The broker URL and the transport class Celery is given for ``url`` (None: the embedded
    broker); a transport of None lets kombu choose it from the scheme.

    Our Redis transport survives a Redis restart while it holds messages (redis_broker.py),
    for ``redis://`` only: kombu sets TLS up from the name ``rediss``, Sentinel is a transport
    class of its own, and kombu takes a ``redis+socket://`` URL's transport from the URL
    whatever it is given.
    """
    if url is None:
        return EMBEDDED_URL, EMBEDDED_TRANSPORT
    return url, REDIS_TRANSPORT if scheme(url) == "redis" else None


def redis_store_url(broker_url: str | None, redis_url: str | None) -> str | None:
    """The coordination store's URL: ``redis_url``, else the broker when it is Redis."""
    if redis_url:
        return redis_url
    if broker_url and scheme(broker_url) in _STORE_SCHEMES:
        return broker_url.split(";", 1)[0]
    return None


def check_broker_url(url: str) -> None:
    """A broker URL kombu cannot use is one clear error (with no password in it), not a
    KeyError or a TypeError later."""
    for part in url.split(";"):
        query = urllib.parse.parse_qs(part.partition("?")[2].partition("#")[0])
        if "password" in query:
            # (kombu's parser fails on it with a TypeError: it passes the URL's own password too)
            where = "write it before the host, as user:password@host"
            raise ConfigError(f"unsupported broker URL {redact(url)}: kombu takes no password from the query; {where}")
    try:
        kombu.Connection(url)  # resolves the transport; connects nothing
    except (KeyError, ValueError, ImportError, TypeError) as e:
        reason = scrub(str(e), urls=[url])
        if needs_encoding(url):
            # A piece of the password was read as the port; kombu's words may quote it ("... as 'pa'").
            reason = ENCODING_HINT if isinstance(e, ValueError) else f"{reason} ({ENCODING_HINT})"
        raise ConfigError(f"unsupported broker URL {redact(url)}: {reason}") from e
