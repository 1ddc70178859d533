"""FastScheduler's state as JSON: what a scheduler replica snapshots, and a standby starts from.

A scheduler restored from another's ``state_json`` must answer every later call as the
original does, through the same random histories as tests/test_scheduler.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from luigi_celery.scheduler import FastScheduler, clock_at, install_clock
from tests.test_scheduler import WORKER, History

install_clock()


def restored(scheduler: FastScheduler, **config: Any) -> FastScheduler:
    copy = FastScheduler(prune_on_get_work=True, record_task_history=False, **config)
    copy.restore_state(json.loads(json.dumps(scheduler.state_json())))
    return copy


class Restored(History):
    """A history whose every reply must also come, alike, from a scheduler restored midway."""

    copy: FastScheduler | None = None

    def both(self, method: str, **kwargs: Any) -> Any:
        expected = getattr(self.stock, method)(**kwargs)
        moment = time.time()  # each applies the call at one moment, as replicas do: their states compare
        answers = []
        for scheduler in (self.fast, self.copy) if self.copy is not None else (self.fast,):
            with clock_at(moment):
                answers.append(getattr(scheduler, method)(**kwargs))
        assert answers == [expected] * len(answers), f"{method}({kwargs}) after {len(self.ids)} tasks"
        return expected


@pytest.mark.parametrize("seed", range(12))
def test_a_restored_scheduler_answers_every_later_call_as_the_original(seed: int) -> None:
    history = Restored(seed, resources={"db": 1})
    for n in range(300):
        if n == 150:
            history.copy = restored(history.fast, resources={"db": 1})
        if n == 200 and seed % 2:
            history.add(worker="other")  # a second worker after the restore, too
        history.step()
    assert history.copy is not None
    assert history.copy.state_json() == history.fast.state_json()
    assert history.copy.count_pending(worker=WORKER) == history.fast.count_pending(worker=WORKER)


def test_the_state_round_trips_through_json_with_everything_luigi_keeps() -> None:
    scheduler = FastScheduler(record_task_history=False)
    scheduler.add_task(worker="w", task_id="A", deps=["B"], family="A", params={"x": "1"}, priority=3,
                       resources={"db": 1}, tracking_url="http://t", status_message="half")  # fmt: skip
    for status in ("PENDING", "FAILED"):  # one failure of one allowed: DISABLED
        scheduler.add_task(worker="w", task_id="B", status=status, family="B", expl="boom",
                           retry_policy_dict={"retry_count": 1})  # fmt: skip
    scheduler.add_task_batcher(worker="w", task_family="A", batched_args=["x"], max_batch_size=float("inf"))
    scheduler.add_worker(worker="w", info=[("host", "h"), ("workers", 4)])
    scheduler.send_scheduler_message(worker="w", task="A", content="hello")
    scheduler.update_resource(resource="db", amount=3)
    scheduler.pause()
    text = json.dumps(scheduler.state_json())

    copy = restored(scheduler)

    assert json.dumps(copy.state_json()) == text
    assert copy.is_paused() == {"paused": True}
    assert {r["name"]: r["num_total"] for r in copy.resource_list()}["db"] == 3
    assert copy.task_list("DISABLED", "")["B"]["status"] == "DISABLED"
    assert copy.worker_list()[0]["workers"] == 4 and copy.ping(worker="w")["rpc_messages"]
    assert copy._state.get_worker("w").tasks == {copy._state.get_task("A"), copy._state.get_task("B")}


def test_a_state_of_another_version_or_an_unknown_type_is_refused_in_one_line() -> None:
    scheduler = FastScheduler(record_task_history=False)
    with pytest.raises(ValueError, match="version 0"):
        scheduler.restore_state({**scheduler.state_json(), "version": 0})
    scheduler.add_task(worker="w", task_id="A", family="A")
    scheduler._state.get_task("A").something = object()
    with pytest.raises(TypeError, match="holds a object"):
        scheduler.state_json()
