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
semantics, monotonic clock), and :class:`FileLimiter` the embedded mode's:
there the dispatcher and its worker processes share one machine, so a locked
file per key and the machine's monotonic clock serve them all.  Both twins
take their decisions from :func:`gcra`, which the Redis script mirrors.

Both sides take part, both here: the dispatcher reserves a task's start slot
before publishing it and holds the publish until the slot is due
(:class:`RatePacing`, a dispatcher hook); the worker checks the slot where the
task starts and takes a new one if it came late (:func:`gate`). The options
(``rate_limit``, ``rate_limit_key``, ``rate_limit_burst``) are read in options.py.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import redis

from luigi_celery.errors import BrokerUnavailable, LuigiCeleryError
from luigi_celery.hooks import DispatchHook, Hold, Run, RunHook
from luigi_celery.redaction import scrub
from luigi_celery.settings import redact
from luigi_celery.store import KEY_PREFIX
from luigi_celery.store_redis import ride_out_outages

if TYPE_CHECKING:
    from luigi_celery.monitor import Tracked

logger = logging.getLogger(__name__)

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


def gcra(tat: float | None, now: float, rate: Rate, reserve: bool) -> tuple[float | None, float, float]:
    """One decision for a key whose theoretical arrival time is ``tat`` (None: never used).

    Returns (the new ``tat``, or None when nothing was taken; seconds to wait, 0
    to start now; the slot taken, or ``now`` when none was).
    """
    tat = now if tat is None else max(tat, now)
    allowed_at = tat - rate.burst * rate.interval
    if now < allowed_at and not reserve:
        return None, allowed_at - now, now
    slot = max(now, allowed_at)
    return tat + rate.interval, slot - now, slot


class _Limiter(abc.ABC):
    """:class:`Limiter`'s methods, from one decision each implementation makes its own way."""

    @abc.abstractmethod
    def _decide(self, key: str, rate: Rate, reserve: bool) -> tuple[float, float]:
        """(seconds to wait, 0 to start now; the slot taken, on the limiter's clock)."""

    @abc.abstractmethod
    def late_by(self, slot: float) -> float: ...

    def acquire(self, key: str, rate: Rate, reserve: bool = False) -> float:
        return self._decide(key, rate, reserve)[0]

    def reserve(self, key: str, rate: Rate) -> tuple[float, float]:
        return self._decide(key, rate, reserve=True)


class MemoryLimiter(_Limiter):
    """The in-process twin: the same GCRA, on this process's monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._tat: dict[str, float] = {}
        self._lock = threading.Lock()
        self._now = clock

    def _decide(self, key: str, rate: Rate, reserve: bool) -> tuple[float, float]:
        with self._lock:
            tat, wait, slot = gcra(self._tat.get(key), self._now(), rate, reserve)
            if tat is not None:
                self._tat[key] = tat
            return wait, slot

    def late_by(self, slot: float) -> float:
        return self._now() - slot


class FileLimiter(_Limiter):
    """The embedded mode's twin: the same GCRA, shared by the processes of one machine.

    Each key's ``tat`` is a small file in ``folder``, read and written under an
    exclusive ``flock``; the clock is ``time.monotonic()``, which is the same
    for every process of a Linux machine.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def _decide(self, key: str, rate: Rate, reserve: bool) -> tuple[float, float]:
        path = os.path.join(self.folder, hashlib.sha1(key.encode()).hexdigest()[:20])
        with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            text = f.read()
            tat, wait, slot = gcra(float(text) if text else None, time.monotonic(), rate, reserve)
            if tat is not None:
                f.seek(0)
                f.truncate()
                f.write(repr(tat))
            return wait, slot

    def late_by(self, slot: float) -> float:
        return time.monotonic() - slot


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


class RedisLimiter(_Limiter):
    """GCRA in Redis: one atomic script per decision, on the server's clock.

    A Redis outage is ridden out (about 30 s); after that, :class:`BrokerUnavailable`.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        self._gcra = self._client.register_script(_GCRA)
        self._now = self._client.register_script(_NOW)

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as e:
            reason = scrub(str(e), urls=[self.url])
            raise BrokerUnavailable(f"cannot reach the coordination store at {redact(self.url)}: {reason}") from e

    def _decide(self, key: str, rate: Rate, reserve: bool) -> tuple[float, float]:
        with self._reachable():
            return self._run_script(key, rate, reserve)

    @ride_out_outages
    def _run_script(self, key: str, rate: Rate, reserve: bool) -> tuple[float, float]:
        interval_ms = rate.interval * 1000
        args = [repr(interval_ms), repr(rate.burst * interval_ms), "1" if reserve else "0"]
        wait_ms, slot_ms = self._gcra(keys=[limit_key(key)], args=args)
        return float(wait_ms) / 1000, float(slot_ms) / 1000

    def late_by(self, slot: float) -> float:
        with self._reachable():
            return self._server_now() - slot

    @ride_out_outages
    def _server_now(self) -> float:
        return float(self._now()) / 1000


def gate(limiter: Limiter, key: str, rate: Rate, slot: float | None) -> tuple[float, float]:
    """Where a task starts, on a worker: (seconds to wait, the slot to wait for); (0, slot): start now.

    A task that comes with a slot starts if it is on time; one that comes late
    (a busy pool, a slow broker) or with no slot takes the next free one.
    """
    if slot is not None and limiter.late_by(slot) <= LATENESS_ALLOWED * rate.interval:
        return 0.0, slot
    return limiter.reserve(key, rate)


class RatePacing(DispatchHook):
    """Reserve each rate-limited task's start slot before it is published, and hold it until due.

    Workers then get rate-limited tasks spread out, not in a burst. The slot
    travels with the task (with a ``limiter`` shared with the workers); a worker
    the task reaches late takes a new one. Without a shared limiter (RabbitMQ with
    no store) this dispatcher paces its own tasks only, and says so once.
    """

    def __init__(self, limiter: Limiter | None) -> None:
        self._limiter: Limiter = limiter if limiter is not None else MemoryLimiter()
        self._shared = limiter is not None
        self._warned_unshared = False

    def before_publish(self, tracked: Tracked) -> float:
        from luigi_celery.options import task_options  # (options.py reads Rate from here)

        task = tracked.flight.task
        options = task_options(type(task))
        if options.rate is None:
            return 0.0
        try:
            wait, slot = self._limiter.reserve(options.rate_key, options.rate)
        except LuigiCeleryError as e:
            raise LuigiCeleryError(f"could not reserve a rate-limit slot for {task.task_id}: {e}") from e
        if self._shared:
            tracked.msg = dataclasses.replace(tracked.msg, rate_slot=slot)
        elif not self._warned_unshared:
            self._warned_unshared = True
            logger.warning(
                "%s has a rate limit, but no coordination store is configured: this dispatcher paces its "
                "own tasks only, and workers do not check it (set LUIGI_CELERY_REDIS_URL for a global limit)",
                task.task_family,
            )
        return wait


class RateGate(RunHook):
    """The worker's part of a rate limit: a task starts in its slot, or goes back to wait for one.

    The worker's main process keeps the countdown, not a pool process, and other tasks go on."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter

    def before_run(self, run: Run) -> Hold | None:
        options = run.options
        if options is None or options.rate is None:
            return None
        wait, slot = gate(self._limiter, options.rate_key, options.rate, run.msg.rate_slot)
        if wait <= 0:
            return None
        return Hold(wait, dataclasses.replace(run.msg, rate_slot=slot, sent_at=time.time() + wait), "rate")
