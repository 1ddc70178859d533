"""A dispatcher's claim on its run, in the coordination store.

The same pipeline on the same queue has the same run id, so a dispatcher started
again after a crash finds what the first one left in flight (the attempts the
store saw started) and adopts it; a second live dispatcher of the same run is
refused. Closing the run marks its session ended (workers drop what it sent
that is still queued) and forgets the run's start marks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from luigi_celery.errors import RunAlreadyActive
from luigi_celery.store import Store, died_here, owner_here

logger = logging.getLogger(__name__)

# How long closing a run waits for the coordination store.
STORE_CLOSE_TIMEOUT = 5.0


class RunClaim:
    """Take, keep and give back the claim on ``run_id``.

    ``settle`` is called when the claim is found gone from the store: the store lost its
    data (or was away longer than the claim's TTL), the workers' run locks went with
    it, and the monitor must wait for them to be taken again before calling a task lost.
    """

    def __init__(self, store: Store, run_id: str, ttl: float, settle: Callable[[], None]) -> None:
        self._store = store
        self._run_id = run_id
        self._ttl = ttl
        self._settle = settle
        self.owner = owner_here("dispatcher")
        # who holds the claim when it is not this dispatcher (None: it is)
        self._holder: str | None = None

    def take(self) -> list[str]:
        """Become the run's only dispatcher; return the Celery ids an earlier one saw started."""
        holder = self._store.claim_run(self._run_id, self.owner, self._ttl)
        if holder is not None and died_here(holder):
            self._store.release_run(self._run_id, holder)  # its dispatcher was killed: take over
            holder = self._store.claim_run(self._run_id, self.owner, self._ttl)
        if holder is not None:
            raise RunAlreadyActive(f"this pipeline is already being run by {holder} (run {self._run_id})")
        return self._store.started(self._run_id)

    def refresh(self) -> None:
        """Keep the claim alive; take it again when the store has lost it."""
        if self._store.refresh_run(self._run_id, self.owner, self._ttl):
            self._holder = None
            return
        holder = self._store.claim_run(self._run_id, self.owner, self._ttl)
        if holder is None:
            logger.warning("took the claim on run %s again: it had vanished from the coordination store", self._run_id)
        elif holder != self._holder:
            logger.error("lost the claim on run %s to %s: another dispatcher runs it too", self._run_id, holder)
        if self._holder is None:  # it was ours until now
            self._settle()
        self._holder = holder

    def close(self, session: str) -> None:
        """End ``session`` and give the run back, waiting for the store a few seconds at most: it
        may be what failed the run. Left undone, the claim expires by itself, and a later run
        re-checks the tasks it would adopt."""
        closing = threading.Thread(target=self._close, args=(session,), name="luigi-celery-close", daemon=True)
        closing.start()
        closing.join(STORE_CLOSE_TIMEOUT)
        if closing.is_alive():
            logger.warning("the coordination store did not answer; run %s was not closed in it", self._run_id)

    def _close(self, session: str) -> None:
        try:
            # Whatever this dispatcher sent that is still queued (a Ctrl-C, a task failed for
            # want of a worker) is dropped by the worker that receives it, even much later.
            self._store.end_session(session)
            self._store.forget_run(self._run_id)  # the run is over: nothing to adopt
            self._store.release_run(self._run_id, self.owner)
        except Exception as e:
            logger.warning("could not close run %s in the store: %s", self._run_id, e)
