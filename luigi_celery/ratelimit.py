"""Global rate limits: how often tasks of a family may start, across every worker.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as
one timestamp).  For a rate of ``n`` per period, tasks are spaced by
``T = period / n``.  The state is the *theoretical arrival time* ``tat`` of
the next conforming start.  A start at ``now`` conforms when
``now >= tat - burst * T``; it then moves ``tat`` to ``max(tat, now) + T``.
A start that does not conform changes nothing and learns how long to wait;
or, asked to *reserve*, it takes the next free slot (``tat`` moves on by
``T``) and learns when that slot is.  Reservations give every waiting task a
slot of its own, in order, instead of having them all retry at once.

With no burst, consecutive starts are at least ``T`` apart, so any window of
one period holds at most ``n + 1`` starts; a burst of ``b`` lets ``b`` more
through at once after a quiet spell.  Unlike a fixed-window counter, there is
no window edge at which twice the rate gets through.

:class:`RedisLimiter` runs the decision as one Lua script on the Redis
server's clock, so concurrent workers and skewed client clocks cannot
exceed the limit.  :class:`MemoryLimiter` is its in-process twin (same
semantics, monotonic clock).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis

from luigi_celery.store import KEY_PREFIX, ride_out_outages

_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")


@dataclass(frozen=True)
class Rate:
    """``count`` starts per ``period`` seconds, plus ``burst`` extra at once."""

    count: float
    period: float
    burst: int = 0

    @property
    def interval(self) -> float:
        """Seconds between two starts at the limit."""
        return self.period / self.count

    @classmethod
    def parse(cls, text: str, burst: int = 0) -> Rate:
        """``"20/s"``, ``"600/m"``, ``"100/h"``; raises ValueError naming the form."""
        found = _RATE.match(text) if isinstance(text, str) else None
        if not found or float(found.group(1)) <= 0:
            raise ValueError(f"{text!r} is not a rate: write N/s, N/m or N/h with N > 0")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
            raise ValueError(f"burst must be a whole number >= 0, got {burst!r}")
        return cls(float(found.group(1)), _PERIODS[found.group(2)], burst)


# A start may come this fraction of an interval after its reserved slot (delivery takes
# time); later than that it takes a new slot. Below one interval, so any window of one
# period still holds at most count + 1 + burst starts.
LATENESS_ALLOWED = 0.9


class Limiter(Protocol):
    def acquire(self, key: str, rate: Rate, reserve: bool = False) -> float:
        """Take a start for ``key`` if one is due now: return 0.

        Else, with ``reserve``, take the next free slot and return how many seconds
        away it is (start then, without asking again); without, take nothing and
        return how long to wait before asking again."""

    def reserve(self, key: str, rate: Rate) -> tuple[float, float]:
        """Take the next free slot: (seconds until it, the slot on the limiter's clock)."""

    def late_by(self, slot: float) -> float:
        """How many seconds ago ``slot`` (from :meth:`reserve`) was, on the limiter's clock."""


class MemoryLimiter:
    """The in-process twin: the same GCRA, on this process's monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._tat: dict[str, float] = {}
        self._lock = threading.Lock()
        self._now = clock

    def acquire(self, key: str, rate: Rate, reserve: bool = False) -> float:
        with self._lock:
            now = self._now()
            tat = max(self._tat.get(key, now), now)
            allowed_at = tat - rate.burst * rate.interval
            if now < allowed_at and not reserve:
                return allowed_at - now
            self._tat[key] = tat + rate.interval
            return max(0.0, allowed_at - now)

    def reserve(self, key: str, rate: Rate) -> tuple[float, float]:
        with self._lock:
            now = self._now()
            tat = max(self._tat.get(key, now), now)
            slot = max(now, tat - rate.burst * rate.interval)
            self._tat[key] = tat + rate.interval
            return slot - now, slot

    def late_by(self, slot: float) -> float:
        return self._now() - slot


# KEYS: the key's theoretical arrival time (ms); ARGV: interval ms, burst tolerance ms,
# reserve (1/0). Returns {wait ms ("0": start now), the slot in server ms}, as strings:
# Lua numbers are truncated to integers on the way out.
_GCRA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allowed_at = tat - tonumber(ARGV[2])
if now < allowed_at and ARGV[3] == '0' then return {tostring(allowed_at - now), tostring(now)} end
local new_tat = tat + interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now + interval))
if now < allowed_at then return {tostring(allowed_at - now), tostring(allowed_at)} end
return {'0', tostring(now)}
"""
_NOW = """
local t = redis.call('TIME')
return tostring(t[1] * 1000 + t[2] / 1000)
"""


def limit_key(key: str) -> str:
    return f"{KEY_PREFIX}rate:{key}"


class RedisLimiter:
    """GCRA in Redis: one atomic script per decision, on the server's clock."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        self._gcra = self._client.register_script(_GCRA)
        self._now = self._client.register_script(_NOW)

    @ride_out_outages
    def _run(self, key: str, rate: Rate, reserve: bool) -> tuple[float, float]:
        interval_ms = rate.interval * 1000
        args = [repr(interval_ms), repr(rate.burst * interval_ms), "1" if reserve else "0"]
        wait_ms, slot_ms = self._gcra(keys=[limit_key(key)], args=args)
        return float(wait_ms) / 1000, float(slot_ms) / 1000

    def acquire(self, key: str, rate: Rate, reserve: bool = False) -> float:
        return self._run(key, rate, reserve)[0]

    def reserve(self, key: str, rate: Rate) -> tuple[float, float]:
        return self._run(key, rate, reserve=True)

    @ride_out_outages
    def late_by(self, slot: float) -> float:
        return float(self._now()) / 1000 - slot
