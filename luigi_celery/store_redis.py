"""The coordination store in Redis: each decision one atomic Lua script, on the server's clock.

:class:`RedisStore` implements :class:`luigi_celery.store.Store`; every call that
cannot reach Redis is retried through an outage of about :data:`OUTAGE_TOLERANCE`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import tenacity

from luigi_celery.errors import BrokerUnavailable, ConfigError
from luigi_celery.redaction import ENCODING_HINT, needs_encoding, scrub
from luigi_celery.settings import redact
from luigi_celery.store import START_MARK_TTL, Lease, ended_key, lock_key, run_key, starts_key

# A call to Redis that cannot connect is retried, with exponential backoff and
# jitter, for this long: a Redis restart is not a reason to fail a task.
OUTAGE_TOLERANCE = 30.0

_OUTAGE = (redis.ConnectionError, redis.TimeoutError)
_retry_through_outages = tenacity.retry(
    retry=tenacity.retry_if_exception_type(_OUTAGE),
    wait=tenacity.wait_exponential_jitter(initial=0.2, max=3.0),
    stop=tenacity.stop_after_delay(OUTAGE_TOLERANCE),
    reraise=True,
)

F = TypeVar("F", bound=Callable[..., Any])


def ride_out_outages(fn: F) -> F:
    """``fn``, retried through an outage. The first call goes straight through: tenacity's
    machinery cost as much as the Redis call itself, and is only needed once a call failed."""
    retrying = _retry_through_outages(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _OUTAGE:
            return retrying(*args, **kwargs)

    return call  # type: ignore[return-value]



# KEYS: lock, start marks, the session's end mark; ARGV: owner, ttl ms, celery id, start-mark ttl s.
# Returns {'', seen before 0/1, 0} when the lock was taken, {holder, 0, 0} when it is held,
# {'', 0, 1} when the session has ended.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {'', 0, 1} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fresh = redis.call('HSETNX', KEYS[2], ARGV[3], redis.call('TIME')[1])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  return {'', 1 - fresh, 0}
end
return {redis.call('GET', KEYS[1]), 0, 0}
"""
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: lock, start marks; ARGV: owner, ttl ms, celery id, start-mark ttl s.
# Returns '' when the lock is the owner's (again), else the other holder.
_RETAKE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSETNX', KEYS[2], ARGV[3], redis.call('TIME')[1])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return ''
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """Run locks and start marks in Redis; every decision is one atomic script."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self._client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10, decode_responses=True)
        except ValueError as e:  # a bad scheme or port; its words may quote a piece of the password
            reason = ENCODING_HINT if needs_encoding(url) else scrub(str(e), urls=[url])
            raise ConfigError(f"invalid coordination store URL {redact(url)}: {reason}") from e
        self._acquire = self._client.register_script(_ACQUIRE)
        self._refresh = self._client.register_script(_REFRESH)
        self._retake = self._client.register_script(_RETAKE)
        self._release = self._client.register_script(_RELEASE)

    def ping(self) -> None:
        try:
            self._client.ping()
        except redis.RedisError as e:
            reason = scrub(str(e), urls=[self.url])
            raise BrokerUnavailable(f"cannot reach the coordination store at {redact(self.url)}: {reason}") from e

    @ride_out_outages
    def acquire(
        self, task_id: str, owner: str, ttl: float, run_id: str, celery_id: str, session: str | None = None
    ) -> Lease:
        # (with no session, the end mark checked is one no dispatcher sets)
        keys = [lock_key(task_id), starts_key(run_id), ended_key(session or ":none")]
        holder, seen, ended = self._acquire(keys=keys, args=[owner, int(ttl * 1000), celery_id, START_MARK_TTL])
        return Lease(str(holder) if holder else None, bool(seen), bool(ended))

    @ride_out_outages
    def refresh(self, task_id: str, owner: str, ttl: float) -> bool:
        return bool(self._refresh(keys=[lock_key(task_id)], args=[owner, int(ttl * 1000)]))

    @ride_out_outages
    def retake(self, task_id: str, owner: str, ttl: float, run_id: str, celery_id: str) -> str | None:
        keys = [lock_key(task_id), starts_key(run_id)]
        holder = self._retake(keys=keys, args=[owner, int(ttl * 1000), celery_id, START_MARK_TTL])
        return str(holder) if holder else None

    @ride_out_outages
    def release(self, task_id: str, owner: str) -> None:
        self._release(keys=[lock_key(task_id)], args=[owner])

    @ride_out_outages
    def status(self, run_id: str, task_ids: list[str], celery_ids: list[str]) -> tuple[list[bool], list[bool]]:
        if not task_ids and not celery_ids:
            return [], []
        pipe = self._client.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.exists(lock_key(task_id))
        if celery_ids:
            pipe.hmget(starts_key(run_id), celery_ids)
        results = pipe.execute()
        locks = [bool(n) for n in results[: len(task_ids)]]
        started = [v is not None for v in results[len(task_ids)]] if celery_ids else []
        return locks, started

    @ride_out_outages
    def claim_run(self, run_id: str, owner: str, ttl: float) -> str | None:
        if self._client.set(run_key(run_id), owner, nx=True, px=int(ttl * 1000)):
            return None
        return str(self._client.get(run_key(run_id)) or "")

    @ride_out_outages
    def refresh_run(self, run_id: str, owner: str, ttl: float) -> bool:
        return bool(self._refresh(keys=[run_key(run_id)], args=[owner, int(ttl * 1000)]))

    @ride_out_outages
    def release_run(self, run_id: str, owner: str) -> None:
        self._release(keys=[run_key(run_id)], args=[owner])

    @ride_out_outages
    def started(self, run_id: str) -> list[str]:
        return sorted(str(k) for k in self._client.hkeys(starts_key(run_id)))

    @ride_out_outages
    def forget_run(self, run_id: str) -> None:
        self._client.delete(starts_key(run_id))

    @ride_out_outages
    def end_session(self, session: str) -> None:
        # Kept as long as start marks: longer than a message waits on a queue in practice.
        self._client.set(ended_key(session), "1", ex=START_MARK_TTL)
