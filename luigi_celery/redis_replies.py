"""Replies read from a Redis reply queue many at a time.

kombu's Redis transport gives a consumer one message per BRPOP: on a wide DAG the reply
watcher paid a round trip, and kombu's poller, for every task. Here the watcher pops up to
:data:`BULK` replies in one round trip, and waits in the same one when none is there yet:
BLMPOP on Redis 7; before, an RPOP with a count (6.2) and a BRPOP when the queue is empty.

The list holds kombu's message envelopes: JSON with the body (base64, or text) and its
content type. :func:`decode` reads them itself, JSON only, as the kombu consumer it replaces
did: a reply that is compressed, of another content type, or too big is refused, and nothing
is ever unpickled.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

from luigi_celery.errors import MessageError
from luigi_celery.message import MAX_MESSAGE_BYTES

# Replies taken in one round trip, at most.
BULK = 500
# An envelope holds the body in base64 (4/3 of its size) and a few hundred bytes more.
_MAX_ENVELOPE_BYTES = MAX_MESSAGE_BYTES * 4 // 3 + 64 * 1024


def can_read(channel: Any) -> bool:
    """True when ``channel`` is kombu's Redis transport (ours, plain, TLS or Sentinel)."""
    return isinstance(channel, kombu_redis.Channel)


class RedisReplies:
    """The reply queue ``name`` on the Redis that ``channel`` (kombu's) talks to."""

    def __init__(self, channel: Any, name: str) -> None:
        # kombu's client for the channel: its database, password and TLS, and the key prefix
        # (transport option global_keyprefix) it adds to the keys of the commands it knows
        self._client = channel.client
        self._key = name  # (priority 0, the only one replies are published with, is the plain list)
        self._prefixed_key = getattr(self._client, "global_keyprefix", "") + name
        self._blocking_bulk = True  # BLMPOP: Redis 7
        self._bulk = True  # RPOP with a count: Redis 6.2
        self._client.ping()

    def take(self, timeout: float) -> list[bytes]:
        """The replies waiting, oldest first; if none, the first to come within ``timeout`` seconds."""
        if self._blocking_bulk:
            try:
                return self._blocking_pop_many(timeout)
            except redis.ResponseError:  # a Redis before 7: a round trip more when the queue is empty
                self._blocking_bulk = False
        items = self._pop_many()
        if items:
            return items
        popped = self._client.brpop([self._key], timeout=timeout)
        return [popped[1]] if popped else []

    def _blocking_pop_many(self, timeout: float) -> list[bytes]:
        # One round trip, whether replies wait or the first is yet to come. kombu's prefixing client
        # does not know BLMPOP: the command goes to redis-py as it is, with the prefixed key.
        command = ("BLMPOP", timeout, 1, self._prefixed_key, "RIGHT", "COUNT", BULK)
        popped = redis.Redis.execute_command(self._client, *command)
        return list(popped[1]) if popped else []

    def _pop_many(self) -> list[bytes]:
        if self._bulk:
            try:
                return self._client.rpop(self._key, BULK) or []
            except redis.ResponseError:  # a Redis before 6.2: one at a time
                self._bulk = False
        item = self._client.rpop(self._key)
        return [item] if item is not None else []


def decode(item: bytes) -> Any:
    """The JSON content of one envelope kombu's Redis transport stored; MessageError if it is not JSON."""
    if len(item) > _MAX_ENVELOPE_BYTES:
        raise MessageError(f"a reply of {len(item)} bytes (at most {MAX_MESSAGE_BYTES})")
    try:
        envelope = json.loads(item)
    except ValueError as e:
        raise MessageError(f"not a kombu message: {e}") from e
    if not isinstance(envelope, dict):
        raise MessageError("not a kombu message")
    content_type = envelope.get("content-type")
    if content_type != "application/json":
        raise MessageError(f"content type {content_type!r} (only application/json)")
    if (envelope.get("headers") or {}).get("compression"):
        raise MessageError("compressed messages are refused")
    body: Any = envelope.get("body")
    encoding = (envelope.get("properties") or {}).get("body_encoding")
    try:
        if encoding == "base64":
            body = base64.b64decode(body, validate=True)
        elif encoding not in (None, "utf-8") or not isinstance(body, str):
            raise MessageError(f"body encoding {encoding!r}")
        if len(body) > MAX_MESSAGE_BYTES:
            raise MessageError(f"a reply of {len(body)} bytes (at most {MAX_MESSAGE_BYTES})")
        return json.loads(body)
    except (ValueError, TypeError) as e:
        raise MessageError(f"not valid JSON: {e}") from e
