"""A pytest plugin for Luigi's own server and RPC tests: every luigid application they build
(``luigi.server.app``) is ``luigi-celery scheduler``'s, answered by a leading
:class:`~luigi_celery.scheduler_server.Replica`.

With ``LUIGI_CELERY_SERVER_STATE_URL`` naming a Redis, each replica logs every call to a
journal of its own there, and after each test a standby replays that log from the start:
it must end in the same state as the leader (``state_json``), or the test fails. The
number of states compared goes to the file ``LUIGI_CELERY_SERVER_REPLAYS`` names.
"""

from __future__ import annotations

import copy
import json
import os
import uuid

import luigi.server
import pytest

from luigi_celery.scheduler import FastScheduler, install_clock
from luigi_celery.scheduler_journal import RedisJournal
from luigi_celery.scheduler_server import Replica, make_app
from tests.luigi_suite import report_count

STATE_URL = os.environ.get("LUIGI_CELERY_SERVER_STATE_URL")
install_clock()

_built: list[tuple[Replica, dict]] = []  # this test's leaders, and what their schedulers began with
_replays = 0


def _app(scheduler):
    journal = None
    if STATE_URL:
        journal = RedisJournal(STATE_URL, f"lc-luigi-suite:{uuid.uuid4().hex}", "leader", lease_seconds=3600)
        assert journal.acquire() is not None
    replica = Replica(scheduler, journal)
    replica.leading = True
    _built.append((replica, {"config": scheduler._config, "resources": copy.deepcopy(scheduler._resources)}))
    return make_app(replica)


luigi.server.app = _app  # luigi.server.run and Luigi's tests look it up by name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    global _replays
    yield
    built = list(_built)
    _built.clear()
    for leader, began in built:
        if leader.journal is None or STATE_URL is None:
            continue
        journal = RedisJournal(STATE_URL, leader.journal.prefix, "standby", 3600)
        standby = Replica(FastScheduler(config=began["config"], resources=began["resources"]), journal)
        standby.catch_up()
        ours, theirs = leader.scheduler.state_json(), standby.scheduler.state_json()
        journal.forget()
        _replays += 1
        if ours != theirs:
            pytest.fail(f"{item.nodeid}: a standby replaying the log ended elsewhere than the leader:\n"
                        f"leader:  {json.dumps(ours, sort_keys=True)[:3000]}\n"
                        f"standby: {json.dumps(theirs, sort_keys=True)[:3000]}")  # fmt: skip


def pytest_unconfigure(config):
    report_count("LUIGI_CELERY_SERVER_REPLAYS", _replays)
