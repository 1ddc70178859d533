"""What replicas of ``luigi-celery scheduler`` share, on Redis: a lease, a log, a snapshot.

- **The lease** (``<prefix>:lease``) names the leader: ``"<term> <replica>"``, with
  an expiry the leader renews. A replica takes it only when it is gone, and
  each taking counts a new term (``<prefix>:term``).
- **The log** (``<prefix>:log``, a stream) holds every call that changes the
  scheduler, numbered (``<prefix>:seq``). The leader appends a call before it
  applies it and answers. The append checks, in the same Lua script, that
  the lease still names this leader and term: a leader that lost its lease
  (paused, cut off, or replaced) cannot write, even once it comes back.
- **The snapshot** (``<prefix>:snapshot``) is the scheduler's state as JSON,
  with the number of the last call in it. Writing one trims the log before
  it, under the same check.

A replica rebuilds the state from the snapshot and the log after it, so it
survives every replica being restarted (as long as Redis keeps its data:
give it an append-only file in production).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from luigi_celery.errors import LuigiCeleryError
from luigi_celery.redaction import redact, scrub

_ACQUIRE = """
if redis.call('exists', KEYS[1]) == 1 then return false end
local term = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], term .. ' ' .. ARGV[1], 'px', ARGV[2])
return term
"""

_RENEW = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('pexpire', KEYS[1], ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
return 0
"""

_APPEND = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED') end
local seq = redis.call('incr', KEYS[2])
local id = redis.call('xadd', KEYS[3], '*', 's', seq, 'o', ARGV[2])
return {seq, id}
"""

_SNAPSHOT = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED') end
redis.call('set', KEYS[2], ARGV[2])
redis.call('xtrim', KEYS[3], 'MINID', ARGV[3])
return 1
"""


class Fenced(Exception):
    """This replica does not hold the lease (any more): it must not write."""


@dataclass(frozen=True)
class Entry:
    seq: int
    stream_id: str
    op: dict[str, Any]


class RedisJournal:
    """The lease, the log and the snapshot of one scheduler's replicas (see the module)."""

    def __init__(self, url: str, prefix: str, replica: str, lease_seconds: float) -> None:
        self.url = url
        self.replica = replica
        self.lease_ms = int(lease_seconds * 1000)
        self.owner: str | None = None  # "<term> <replica>" while this replica holds the lease
        # Calls block at most this long: a lost Redis is an error, never a hang.
        try:
            self.redis: Any = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        except ValueError as e:  # a bad scheme or port; its words may quote a piece of the password
            raise LuigiCeleryError(f"invalid state URL {redact(url)}: {scrub(str(e), urls=[url])}") from None
        self.prefix = prefix
        self.keys = {name: f"{prefix}:{name}" for name in ("lease", "term", "seq", "log", "snapshot")}
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self._append = self.redis.register_script(_APPEND)
        self._snapshot = self.redis.register_script(_SNAPSHOT)

    def check(self) -> None:
        """Raise a one-line error if the state store does not answer."""
        try:
            self.redis.ping()
        except redis.RedisError as e:
            raise LuigiCeleryError(f"the scheduler's state store {redact(self.url)} does not answer: {e}") from None

    # -- the lease --------------------------------------------------------------------------

    def acquire(self) -> int | None:
        """Take the lease if no replica holds it; the new term, or None."""
        term = self._acquire(keys=[self.keys["lease"], self.keys["term"]], args=[self.replica, self.lease_ms])
        if term is None:
            return None
        self.owner = f"{int(term)} {self.replica}"
        return int(term)

    def renew(self) -> bool:
        """Extend the lease; False if this replica no longer holds it."""
        if self.owner is None:
            return False
        held = bool(self._renew(keys=[self.keys["lease"]], args=[self.owner, self.lease_ms]))
        if not held:
            self.owner = None
        return held

    def release(self) -> None:
        if self.owner is not None:
            self._release(keys=[self.keys["lease"]], args=[self.owner])
            self.owner = None

    def forget(self) -> None:
        """Delete this scheduler's whole state (the lease, the log, the snapshot): for tests and
        benchmarks that made one of their own."""
        self.redis.delete(*self.keys.values())

    def leader(self) -> str | None:
        """Who holds the lease: ``"<term> <replica>"``, or None."""
        value = self.redis.get(self.keys["lease"])
        return value.decode() if value is not None else None

    # -- the log and the snapshot -------------------------------------------------------------

    def append(self, op: dict[str, Any]) -> Entry:
        """Add a call to the log, if this replica holds the lease (else :class:`Fenced`)."""
        if self.owner is None:
            raise Fenced("this replica does not hold the lease")
        keys = [self.keys["lease"], self.keys["seq"], self.keys["log"]]
        try:
            seq, stream_id = self._append(keys=keys, args=[self.owner, json.dumps(op)])
        except redis.ResponseError as e:
            if "FENCED" in str(e):
                self.owner = None
                raise Fenced("another replica holds the lease") from None
            raise
        return Entry(int(seq), stream_id.decode(), op)

    def read_after(self, stream_id: str, count: int = 1000, block_ms: int | None = None) -> list[Entry]:
        """The calls logged after ``stream_id`` (``"0"``: from the start), oldest first."""
        found: Any
        if block_ms is None:
            found = self.redis.xrange(self.keys["log"], min=f"({stream_id}" if stream_id != "0" else "-", count=count)
        else:
            streams = self.redis.xread({self.keys["log"]: stream_id}, count=count, block=block_ms) or []
            found = streams[0][1] if streams else []
        return [Entry(int(fields[b"s"]), sid.decode(), json.loads(fields[b"o"])) for sid, fields in found]

    def load_snapshot(self) -> dict[str, Any] | None:
        """The last snapshot: ``{"seq", "stream_id", "state"}``, or None before the first."""
        raw = self.redis.get(self.keys["snapshot"])
        return json.loads(raw) if raw is not None else None

    def save_snapshot(self, state: dict[str, Any], seq: int, stream_id: str) -> None:
        """Store the state as of call ``seq`` and trim the log before it (the leader's only)."""
        if self.owner is None:
            raise Fenced("this replica does not hold the lease")
        data = json.dumps({"seq": seq, "stream_id": stream_id, "state": state})
        keys = [self.keys["lease"], self.keys["snapshot"], self.keys["log"]]
        try:
            self._snapshot(keys=keys, args=[self.owner, data, stream_id])
        except redis.ResponseError as e:
            if "FENCED" in str(e):
                self.owner = None
                raise Fenced("another replica holds the lease") from None
            raise
