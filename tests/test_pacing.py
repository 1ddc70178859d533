"""The pacer that publishes rate-limited tasks when due, and the count of waiting tasks."""

from __future__ import annotations

import threading
import time

from luigi_celery.pacing import Pacer, Waits


def test_waits_count_only_what_still_waits():
    waits = Waits()
    waits.set("a", 10.0)
    waits.set("b", 20.0)
    waits.set("c", 30.0)
    assert waits.count(now=5.0) == 3
    # Then a wait that is over stops counting, and a dropped one at once
    waits.drop("c")
    assert waits.count(now=15.0) == 1
    assert waits.count(now=25.0) == 0


def test_a_wait_set_again_counts_once_until_its_new_end():
    waits = Waits()
    waits.set("a", 10.0)
    waits.set("a", 40.0)  # a retry after a rate wait: the later end counts
    assert waits.count(now=5.0) == 1
    assert waits.count(now=15.0) == 1  # the old end passing does not drop the new wait
    assert waits.count(now=45.0) == 0


def test_the_pacer_fires_each_item_at_its_time_in_order():
    fired: list[tuple[str, float]] = []
    done = threading.Event()

    def fire(item: str) -> None:
        fired.append((item, time.monotonic()))
        if len(fired) == 4:
            done.set()

    pacer = Pacer(fire)
    pacer.start()
    start = time.monotonic()
    # Given items scheduled out of order, two at the same moment
    for item, delay in [("late", 0.3), ("first", 0.05), ("tie-1", 0.15), ("tie-2", 0.15)]:
        pacer.at(start + delay, item)
    assert done.wait(5)
    pacer.stop()
    # Then they fire in time order (ties in the order given), none early
    assert [name for name, _ in fired] == ["first", "tie-1", "tie-2", "late"]
    for (name, when), delay in zip(fired, [0.05, 0.15, 0.15, 0.3], strict=True):
        assert when >= start + delay, name


def test_one_failing_item_does_not_stop_the_pacer():
    fired: list[str] = []
    done = threading.Event()

    def fire(item: str) -> None:
        if item == "bad":
            raise RuntimeError("broker away")
        fired.append(item)
        done.set()

    pacer = Pacer(fire)
    pacer.start()
    now = time.monotonic()
    pacer.at(now, "bad")
    pacer.at(now + 0.05, "good")
    assert done.wait(5)
    pacer.stop()
    pacer.join(5)
    assert fired == ["good"] and not pacer.is_alive()
