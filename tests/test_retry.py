"""The backoff function and the retry policy."""

from __future__ import annotations

import random

import pytest

from luigi_celery.retry import RetryPolicy, backoff_delay


def test_backoff_is_full_jitter_under_a_doubling_ceiling():
    rng = random.Random(7)
    for retry, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (9, 10.0)]:
        waits = [backoff_delay(retry, base=2.0, cap=10.0, rng=rng) for _ in range(2000)]
        assert 0 <= min(waits) and max(waits) <= ceiling
        # jitter over the whole range, not a fixed wait: the spread fills [0, ceiling]
        assert min(waits) < 0.05 * ceiling and max(waits) > 0.95 * ceiling
        assert sum(waits) / len(waits) == pytest.approx(ceiling / 2, rel=0.08)


def test_retry_numbers_start_at_one():
    with pytest.raises(ValueError):
        backoff_delay(0, 1.0, 10.0)


def test_only_listed_errors_are_retried_and_only_while_retries_remain():
    policy = RetryPolicy(max_retries=2, retry_on=(ConnectionError,))
    assert policy.should_retry(ConnectionResetError(), retries_done=0)  # a subclass counts
    assert policy.should_retry(ConnectionError(), retries_done=1)
    assert not policy.should_retry(ConnectionError(), retries_done=2)
    assert not policy.should_retry(ValueError(), retries_done=0)
