"""FastScheduler answers as Luigi's scheduler does, without looking at every task.

The differential tests drive Luigi's ``Scheduler`` and ``FastScheduler`` through the
same random histories (adds with dependencies and priorities, work handed out,
results, dynamic dependencies, failures, forgiveness, forced DONE, a second worker,
resources, batchers) and compare every reply. Luigi's own scheduler tests run
against FastScheduler through ``scripts/luigi-scheduler-tests``.
"""

from __future__ import annotations

import random
import time
from typing import Any

import luigi.scheduler
import pytest
from luigi.task_status import DONE, FAILED, PENDING, RUNNING

from luigi_celery.scheduler import FastScheduler

WORKER = "solo"


def schedulers(**config: Any) -> tuple[luigi.scheduler.Scheduler, FastScheduler]:
    config = {"prune_on_get_work": True, "record_task_history": False, **config}
    return luigi.scheduler.Scheduler(**config), FastScheduler(**config)


def unordered(reply: Any) -> Any:
    """A reply, with its list of running tasks in one order: Luigi lists them in the order of
    a set of objects in memory."""
    if isinstance(reply, dict) and "running_tasks" in reply:
        return {**reply, "running_tasks": sorted(reply["running_tasks"], key=lambda task: task["task_id"])}
    return reply


class History:
    """One random history, applied to both schedulers; every reply must be the same."""

    def __init__(self, seed: int, **config: Any) -> None:
        self.rng = random.Random(seed)
        self.stock, self.fast = schedulers(**config)
        self.ids: list[str] = []
        self.running: dict[str, list[str]] = {}  # worker -> task ids it was handed

    def both(self, method: str, **kwargs: Any) -> Any:
        expected = getattr(self.stock, method)(**kwargs)
        actual = getattr(self.fast, method)(**kwargs)
        assert unordered(actual) == unordered(expected), f"{method}({kwargs}) after {len(self.ids)} tasks"
        return actual

    def add(self, worker: str = WORKER, **extra: Any) -> None:
        task_id = f"T{len(self.ids)}"
        deps = self.rng.sample(self.ids, k=min(len(self.ids), self.rng.choice([0, 1, 2, 3, 8])))
        deps += [f"T{len(self.ids) + n}" for n in range(1, self.rng.choice([0, 0, 0, 1, 2]) + 1)]  # not added yet
        status = self.rng.choice([PENDING] * 6 + [DONE])
        self.both("add_task", worker=worker, task_id=task_id, status=status, deps=deps,
                  priority=self.rng.choice([0, 0, 0, 1, 5, -3]), runnable=self.rng.random() > 0.05,
                  family="F", params={"n": str(len(self.ids))}, **extra)  # fmt: skip
        self.ids.append(task_id)

    def get_work(self, worker: str = WORKER) -> None:
        handed = self.running.setdefault(worker, [])
        reply = self.both("get_work", worker=worker, current_tasks=list(handed))
        if reply["task_id"] is not None:
            handed.append(reply["task_id"])

    def finish(self, worker: str = WORKER) -> None:
        handed = self.running.get(worker)
        if not handed:
            return
        task_id = handed.pop(self.rng.randrange(len(handed)))
        outcome = self.rng.choice([DONE] * 6 + [FAILED, PENDING])
        new_deps = None
        if outcome == PENDING:  # yielded dynamic dependencies
            new_deps = self.rng.sample(self.ids, k=min(len(self.ids), 2)) + [f"D{task_id}"]
            self.both("add_task", worker=worker, task_id=f"D{task_id}", status=PENDING, family="F")
        self.both("add_task", worker=worker, task_id=task_id, status=outcome, new_deps=new_deps, runnable=None)

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.3:
            self.add()
        elif roll < 0.65:
            self.get_work()
        elif roll < 0.9:
            self.finish()
        elif roll < 0.94:
            self.both("forgive_failures", task_id=self.rng.choice(self.ids) if self.ids else None)
        elif roll < 0.97:
            self.both("mark_as_done", task_id=self.rng.choice(self.ids) if self.ids else None)
        else:
            self.both("count_pending", worker=WORKER)


@pytest.mark.parametrize("seed", range(40))
def test_one_worker_gets_the_same_work_as_from_luigi(seed: int) -> None:
    history = History(seed)
    for _ in range(400):
        history.step()
    while history.running.get(WORKER) or history.stock.count_pending(worker=WORKER)["n_pending_tasks"]:
        before = len(history.running.get(WORKER, []))
        history.get_work()
        if len(history.running.get(WORKER, [])) == before:
            if not history.running.get(WORKER):
                break  # what is left waits on failed or never-added dependencies
            history.finish()


@pytest.mark.parametrize("seed", range(20))
def test_several_workers_sharing_tasks_get_the_same_work_and_counts_as_from_luigi(seed: int, monkeypatch) -> None:
    # As on a central scheduler: three workers add tasks, some the same ones, and each asks for work
    fast_answers = []
    own = FastScheduler._get_work

    def counted(self, *args):
        fast_answers.append(args[0])
        return own(self, *args)

    monkeypatch.setattr(FastScheduler, "_get_work", counted)
    history = History(seed)
    workers = ["w1", "w2", "w3"]
    for _ in range(500):
        worker, roll = history.rng.choice(workers), history.rng.random()
        if roll < 0.25:
            history.add(worker=worker)
        elif roll < 0.35 and history.ids:  # another worker wants a task already there
            history.both("add_task", worker=worker, task_id=history.rng.choice(history.ids), status=PENDING,
                         family="F", runnable=True)  # fmt: skip
        elif roll < 0.7:
            history.get_work(worker=worker)
        elif roll < 0.95:
            history.finish(worker=worker)
        else:
            history.both("count_pending", worker=worker)
    assert len(fast_answers) > 100  # answered from the books, not by Luigi's own method


@pytest.mark.parametrize("seed", range(10))
def test_a_second_worker_resources_and_batchers_go_the_way_of_luigi(seed: int) -> None:
    history = History(seed, resources={"db": 1})
    for n in range(300):
        history.step()
        if n == 100 + seed * 10:
            kind = seed % 3
            if kind == 0:
                history.add(worker="other")
                history.get_work(worker="other")
            elif kind == 1:
                history.add(resources={"db": 1})
            else:
                history.both("add_task_batcher", worker=WORKER, task_family="F", batched_args=["n"])


def test_disabled_tasks_are_left_out_of_the_counts_as_in_luigi() -> None:
    history = History(7, retry_count=1)
    for _ in range(60):
        history.add()
    for _ in range(200):
        history.get_work()
        history.finish()
    history.both("count_pending", worker=WORKER)
    assert history.stock._state.get_active_tasks_by_status("DISABLED"), "the history disabled nothing"


def test_the_fast_path_does_not_look_at_every_pending_task(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a wide DAG of 500 tasks on one worker
    _, fast = schedulers()
    for n in range(500):
        fast.add_task(worker=WORKER, task_id=f"T{n}", status=PENDING, family="F")
    fast.add_task(worker=WORKER, task_id="wrapper", status=PENDING, deps=[f"T{n}" for n in range(500)])
    scans: list[tuple[str, ...]] = []
    real = fast._state.get_active_tasks_by_status

    def recorded(*s):
        scans.append(s)
        return real(*s)

    monkeypatch.setattr(fast._state, "get_active_tasks_by_status", recorded)
    # When all of it runs
    order = []
    while (reply := fast.get_work(worker=WORKER, current_tasks=[]))["task_id"] is not None:
        order.append(reply["task_id"])
        fast.add_task(worker=WORKER, task_id=reply["task_id"], status=DONE)
    # Then it ran in Luigi's order, and only RUNNING tasks were ever listed (the prune aside)
    assert order == [f"T{n}" for n in range(500)] + ["wrapper"]
    recount = (PENDING, FAILED, RUNNING)
    assert {s for s in scans} <= {(RUNNING,), ("BATCH_RUNNING",), recount, ("FAILED", "DISABLED")}
    assert sum(1 for s in scans if s == recount) <= 2  # the prunes' recounts, once a second


def test_a_failed_task_comes_back_when_its_retry_delay_ends_not_at_the_next_timed_prune() -> None:
    history = History(3, retry_delay=0.05)
    history.both("add_task", worker=WORKER, task_id="A", status=PENDING, family="F")
    history.get_work()
    history.both("add_task", worker=WORKER, task_id="A", status=FAILED, runnable=None)
    history.running[WORKER].clear()
    time.sleep(0.1)
    history.get_work()
    assert history.running[WORKER] == ["A"]
