"""The limiter's contract, for the Redis limiter and its in-memory twin alike."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from unittest import mock

import pytest

from luigi_celery.ratelimit import FileLimiter, MemoryLimiter, Rate, RedisLimiter, gcra
from tests.conftest import REDIS_URL


@pytest.fixture(params=["memory", "file", pytest.param("redis", marks=pytest.mark.broker)])
def limiter(request, tmp_path):
    if request.param == "memory":
        return MemoryLimiter()
    if request.param == "file":
        return FileLimiter(str(tmp_path / "limits"))
    request.getfixturevalue("brokers")  # fails, never skips, without Redis
    return RedisLimiter(REDIS_URL)


@pytest.fixture
def key():
    return f"test-{uuid.uuid4().hex[:8]}"


def test_rates_parse_and_bad_ones_are_refused():
    assert Rate.parse("20/s").interval == pytest.approx(0.05)
    assert Rate.parse("600/m").interval == pytest.approx(0.1)
    assert Rate.parse("2/h", burst=3) == Rate(2, 3600, 3)
    for bad in ("20", "20/d", "-1/s", "0/s", "x/s", 20):
        with pytest.raises(ValueError, match="not a rate"):
            Rate.parse(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="burst"):
        Rate.parse("1/s", burst=-1)


def test_without_burst_starts_are_spaced_by_the_interval(limiter, key):
    rate = Rate.parse("10/s")
    assert limiter.acquire(key, rate) == 0
    wait = limiter.acquire(key, rate)
    # Then a second start right after must wait about one interval, and nothing was taken
    assert 0.05 < wait <= 0.1
    assert limiter.acquire(key, rate) == pytest.approx(wait, abs=0.02)
    time.sleep(wait + 0.005)
    assert limiter.acquire(key, rate) == 0


def test_a_burst_lets_that_many_more_through_at_once(limiter, key):
    rate = Rate.parse("10/s", burst=3)
    assert [limiter.acquire(key, rate) == 0 for _ in range(5)] == [True, True, True, True, False]


def test_keys_have_separate_budgets(limiter, key):
    rate = Rate.parse("1/s")
    assert limiter.acquire(key, rate) == 0
    assert limiter.acquire(key + "-other", rate) == 0
    assert limiter.acquire(key, rate) > 0


def _grant_times(limiter, key: str, rate: Rate, seconds: float) -> list[float]:
    granted = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        wait = limiter.acquire(key, rate)
        if wait == 0:
            granted.append(time.time())
        else:
            time.sleep(min(wait, 0.01))
    return granted


def _assert_within_budget(times: list[float], rate: Rate, seconds: float) -> None:
    times = sorted(times)
    # at most count + 1 + burst starts in any window of one period (sliding, every start as a window's edge)
    for i, start in enumerate(times):
        in_window = sum(1 for t in times[i:] if t < start + rate.period)
        assert in_window <= rate.count + 1 + rate.burst, (i, in_window)
    assert len(times) <= rate.count * seconds / rate.period + 1 + rate.burst


def test_sixteen_threads_never_exceed_the_budget(limiter, key):
    rate = Rate.parse("50/s")
    results: list[list[float]] = []
    threads = [
        threading.Thread(target=lambda: results.append(_grant_times(limiter, key, rate, 2.0))) for _ in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    granted = [t for r in results for t in r]
    _assert_within_budget(granted, rate, 2.0)
    assert len(granted) >= 0.8 * 50 * 2  # and the budget is used, not starved


def _process_grants(kind: str, where: str, key: str, offset: float, out: multiprocessing.Queue) -> None:
    # A client whose clock is off by `offset` seconds: the limit must not care.
    real = time.time
    with mock.patch("time.time", lambda: real() + offset):
        limiter = RedisLimiter(where) if kind == "redis" else FileLimiter(where)
        out.put([t - offset for t in _grant_times(limiter, key, Rate.parse("40/s"), 2.0)])


@pytest.mark.broker
@pytest.mark.parametrize("kind", ["redis", "file"])
def test_four_processes_with_skewed_clocks_never_exceed_the_budget(brokers, key, kind, tmp_path):
    # Given four processes whose clocks disagree by up to 10.5 s, sharing 40 starts a second
    # (the file twin: the embedded dispatcher and its worker processes, on one machine)
    where = REDIS_URL if kind == "redis" else str(tmp_path / "limits")
    out: multiprocessing.Queue = multiprocessing.Queue()
    offsets = [0.0, 7.5, -3.0, 7.5]
    processes = [multiprocessing.Process(target=_process_grants, args=(kind, where, key, o, out)) for o in offsets]
    for p in processes:
        p.start()
    per_process = [out.get(timeout=30) for _ in processes]
    for p in processes:
        p.join()
    # Then together they never exceed the budget, and use it
    granted = [t for grants in per_process for t in grants]
    _assert_within_budget(granted, Rate.parse("40/s"), 2.0)
    assert len(granted) >= 0.8 * 40 * 2
    # and no process is starved for its clock (a limiter on the clients' clocks makes the
    # one behind wait for the ones ahead)
    assert min(len(grants) for grants in per_process) >= 0.25 * len(granted) / len(processes), [
        len(grants) for grants in per_process
    ]


def test_the_twin_uses_its_own_clock_not_the_callers():
    now = [100.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    rate = Rate.parse("1/s")
    assert limiter.acquire("k", rate) == 0
    assert limiter.acquire("k", rate) == pytest.approx(1.0)
    now[0] += 1.0
    assert limiter.acquire("k", rate) == 0


def test_reservations_hand_out_consecutive_slots(limiter, key):
    rate = Rate.parse("10/s")
    waits = [limiter.acquire(key, rate, reserve=True) for _ in range(4)]
    # Then the first starts now and each next one a further interval later
    assert waits[0] == 0
    for earlier, later in zip(waits, waits[1:], strict=False):
        assert later - earlier == pytest.approx(0.1, abs=0.01)
    # and a plain request sees the budget taken up to the last slot
    assert limiter.acquire(key, rate) == pytest.approx(waits[-1] + 0.1, abs=0.02)


def test_a_worker_starts_a_task_on_its_slot_and_gives_a_late_one_a_new_slot():
    from luigi_celery.ratelimit import gate as _rate_gate

    now = [100.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    rate = Rate.parse("10/s")  # slots 0.1 s apart; a start may come 0.09 s after its slot
    wait, slot = limiter.reserve("k", rate)
    assert (wait, slot) == (0.0, 100.0)
    # on time (a little after its slot, as delivery takes): it starts
    now[0] = 100.05
    assert _rate_gate(limiter, "k", rate, slot) == (0.0, 100.0)
    # too late (a busy pool held it): it takes the next free slot instead of crowding others
    now[0] = 100.5
    wait, again = _rate_gate(limiter, "k", rate, slot)
    assert again == pytest.approx(100.5) and wait == 0
    wait, later = _rate_gate(limiter, "k", rate, slot)
    assert later == pytest.approx(100.6) and wait == pytest.approx(0.1)
    # and a task with no slot reserves one
    assert _rate_gate(limiter, "k", rate, None)[1] == pytest.approx(100.7)


@pytest.mark.parametrize(
    ("tat", "now", "reserve", "expected"),
    [
        (None, 100.0, False, (100.1, 0.0, 100.0)),  # never used: start now
        (99.0, 100.0, False, (100.1, 0.0, 100.0)),  # a quiet spell does not bank starts (no burst)
        (100.3, 100.0, False, (None, pytest.approx(0.3), 100.0)),  # too soon: nothing taken, wait
        (100.3, 100.0, True, (pytest.approx(100.4), pytest.approx(0.3), 100.3)),  # or reserve the next slot
    ],
)
def test_one_gcra_decision(tat, now, reserve, expected):
    assert gcra(tat, now, Rate.parse("10/s"), reserve) == expected


def test_a_burst_moves_the_allowed_start_earlier():
    # 10/s with a burst of 2: a key whose tat is 0.2 s ahead still starts now
    assert gcra(100.2, 100.0, Rate.parse("10/s", burst=2), False)[1] == 0
    assert gcra(100.3, 100.0, Rate.parse("10/s", burst=2), False)[1] == pytest.approx(0.1)
