"""``luigi-celery scheduler``: Luigi's central scheduler (luigid's HTTP API and visualiser),
on :class:`~luigi_celery.scheduler.FastScheduler`, with replicas that take over from each other.

Luigi's own ``luigi.server.app`` serves the visualiser, the task history pages
and ``/metrics``; this module puts its own ``/api/<method>`` in front of Luigi's,
and adds ``/healthz`` (the process answers) and ``/readyz`` (200 on the leader
only: what a Kubernetes Service or a load balancer routes by).

Alone (no state URL) the server keeps its state in memory and in a JSON file
at exit, as luigid does with its pickle. With a state URL, every replica
follows one :class:`~luigi_celery.scheduler_journal.RedisJournal`:

- the leader appends each call that changes the scheduler to the log, with
  the time it is applied at, then applies it and answers;
- a standby applies the same calls at the same times, so it holds the same
  state, and answers ``/api/*`` with 503;
- when the leader's lease runs out (it died, hung or lost Redis), a standby
  takes it, applies what is left of the log, and serves.

Reads that change nothing are answered without the log. Luigi's reads that
prune first (``task_list``, ``graph``, ...) log the prune as a call of its own.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import luigi.configuration
import luigi.scheduler
import luigi.server
import redis
import tornado.httpserver
import tornado.ioloop
import tornado.web
from luigi.server import app as luigi_app  # (bound now: a test may put ours in its place)

from luigi_celery.errors import LuigiCeleryError
from luigi_celery.redaction import redact
from luigi_celery.scheduler import FastScheduler, clock_at, install_clock
from luigi_celery.scheduler_journal import Entry, Fenced, RedisJournal

log = logging.getLogger(__name__)

# Calls that change nothing: answered without the log.
READS = frozenset({
    "fetch_error", "get_running_task_resources", "get_scheduler_message_response", "get_task_progress_percentage",
    "get_task_status_message", "has_task_history", "is_pause_enabled", "is_paused", "report_task_statistics",
})  # fmt: skip
# Reads that prune first, in Luigi: the prune is logged on its own, at most once a second.
PRUNING_READS = frozenset({
    "dep_graph", "graph", "inverse_dep_graph", "resource_list", "task_list", "task_search", "worker_list",
})  # fmt: skip
PRUNE_EVERY = 60.0  # seconds, as luigid
READ_PRUNE_EVERY = 1.0
SNAPSHOT_EVERY = 60.0  # seconds, at most, between snapshots (with a state URL)
SNAPSHOT_AFTER = 20_000  # calls logged, at most, between snapshots


class NotLeading(Exception):
    """This replica is a standby: the call goes to the leader."""


class BadCall(Exception):
    """A call the scheduler cannot take: a body that is not JSON, or arguments its method has not."""


class _Quiet:
    """Stands for the task history and the e-mail batcher while a standby replays the log:
    the leader already recorded and sent what the calls recorded and sent."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class Replica:
    """One replica's scheduler, and the rules by which it applies calls (see the module)."""

    def __init__(self, scheduler: FastScheduler, journal: RedisJournal | None = None) -> None:
        self.scheduler = scheduler
        self.journal = journal
        self.leading = journal is None  # alone, it always leads
        self.lock = threading.RLock()  # the scheduler's state: the server's loop and the follower thread
        self.applied_seq = 0
        self.last_id = "0"
        self.logged_since_snapshot = 0
        self.snapshot_at = time.monotonic()
        self._read_pruned_at = float("-inf")
        self._signatures = {name: inspect.signature(getattr(scheduler, name)) for name in luigi.scheduler.RPC_METHODS}

    # -- the calls --------------------------------------------------------------------------------

    def call(self, method: str, arguments: dict[str, Any]) -> Any:
        """Answer an RPC (the server's loop thread). Raises NotLeading on a standby,
        BadCall for arguments the method does not take."""
        try:
            self._signatures[method].bind(**arguments)
        except TypeError as e:
            raise BadCall(f"{method}: {e}") from None
        if method in READS:
            with self.lock:
                self._must_lead()
                return getattr(self.scheduler, method)(**arguments)
        if method in PRUNING_READS:
            now = time.time()
            if now - self._read_pruned_at >= READ_PRUNE_EVERY:
                self.change("prune", {})
                self._read_pruned_at = now
            with self.lock:
                self._must_lead()
                return self._without_prune(getattr(self.scheduler, method), arguments)
        return self.change(method, arguments)

    def change(self, method: str, arguments: dict[str, Any]) -> Any:
        """Log a call that changes the scheduler (with a state URL), then apply it."""
        with self.lock:
            self._must_lead()
            op = {"m": method, "a": arguments, "t": time.time()}
            if self.journal is not None:
                try:
                    entry = self.journal.append(op)
                except Fenced:
                    self._step_down("another replica holds the lease")
                    raise NotLeading() from None
                self.applied_seq, self.last_id = entry.seq, entry.stream_id
                self.logged_since_snapshot += 1
            return self._apply(op)

    def _must_lead(self) -> None:
        if not self.leading:
            raise NotLeading()

    def _apply(self, op: dict[str, Any]) -> Any:
        with clock_at(op["t"]):
            return getattr(self.scheduler, op["m"])(**op["a"])

    def _without_prune(self, read: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        self.scheduler.prune = lambda: None  # type: ignore[method-assign]
        try:
            return read(**arguments)
        finally:
            del self.scheduler.prune

    def _replay(self, entries: list[Entry]) -> None:
        """Apply what the leader logged, as it applied it, without recording or sending it again."""
        scheduler = self.scheduler
        history, batcher = scheduler._task_history, getattr(scheduler, "_email_batcher", None)
        scheduler._task_history = _Quiet()
        scheduler._email_batcher = _Quiet()
        try:
            for entry in entries:
                if entry.seq <= self.applied_seq:
                    continue  # in the snapshot already
                if entry.seq != self.applied_seq + 1:
                    raise _Gap(entry.seq)
                try:
                    self._apply(entry.op)
                except Exception:  # the leader's call failed the same way, and answered with the error
                    log.debug("call %s failed on replay as it did on the leader", entry.seq, exc_info=True)
                self.applied_seq, self.last_id = entry.seq, entry.stream_id
        finally:
            scheduler._task_history = history
            scheduler._email_batcher = batcher

    # -- the state URL: following, taking over, stepping down ---------------------------------------

    def load(self) -> None:
        """Start from the snapshot in the journal (if any); the log after it follows."""
        assert self.journal is not None
        snapshot = self.journal.load_snapshot()
        if snapshot is None:
            return  # no snapshot yet: the whole log is there
        with self.lock:
            self.scheduler.restore_state(snapshot["state"])
            self.applied_seq, self.last_id = snapshot["seq"], snapshot["stream_id"]

    def catch_up(self, block_ms: int | None = None) -> None:
        """Apply the log after what this replica has applied."""
        assert self.journal is not None
        while True:
            entries = self.journal.read_after(self.last_id, block_ms=block_ms)
            if not entries:
                return
            with self.lock:
                try:
                    self._replay(entries)
                except _Gap as gap:
                    log.warning("call %s is no longer in the log (trimmed by a snapshot): reloading", gap.seq)
                    self.load()
            block_ms = None

    def take_over(self) -> bool:
        """Become the leader if no replica is: True if this one now is."""
        assert self.journal is not None
        term = self.journal.acquire()
        if term is None:
            return False
        self.catch_up()  # nobody else can append now: this is all of it
        with self.lock:
            self.leading = True
            self.snapshot_at = time.monotonic()
        log.warning("leading the scheduler (term %s) from call %s", term, self.applied_seq)
        return True

    def _step_down(self, why: str) -> None:
        with self.lock:
            if self.leading:
                log.warning("standing by: %s", why)
            self.leading = False

    def snapshot_if_due(self, force: bool = False) -> None:
        """Write a snapshot (the leader's): every SNAPSHOT_EVERY seconds or SNAPSHOT_AFTER calls."""
        due = self.logged_since_snapshot >= SNAPSHOT_AFTER or time.monotonic() - self.snapshot_at >= SNAPSHOT_EVERY
        if self.journal is None or not self.leading or not (force or (due and self.logged_since_snapshot)):
            return
        with self.lock:
            state, seq, stream_id = self.scheduler.state_json(), self.applied_seq, self.last_id
            try:
                self.journal.save_snapshot(state, seq, stream_id)
            except Fenced:
                self._step_down("another replica holds the lease")
                return
            self.logged_since_snapshot = 0
            self.snapshot_at = time.monotonic()

    def watch(self, stop: threading.Event, renew_every: float) -> None:
        """The follower thread: tail the log and try for the lease on a standby;
        renew the lease on the leader, and stand by once it is lost."""
        assert self.journal is not None
        renewed_at = time.monotonic()
        failing = False
        while not stop.is_set():
            try:
                if self.leading:
                    if self.journal.renew():
                        renewed_at = time.monotonic()
                    else:
                        self._step_down("the lease was lost")
                    stop.wait(renew_every)
                else:
                    self.catch_up(block_ms=int(renew_every * 500))
                    self.take_over()
                if failing:
                    log.warning("the state store answers again")
                    failing = False
            except redis.RedisError as e:
                if not failing:
                    log.warning("the state store does not answer: %s", e)
                    failing = True
                if self.leading and time.monotonic() - renewed_at > self.journal.lease_ms / 1000:
                    self._step_down("the lease ran out while the state store did not answer")
                stop.wait(renew_every)


class _Gap(Exception):
    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.seq = seq


# -- HTTP ------------------------------------------------------------------------------------------

_CORS: dict[tuple[tuple[str, str], ...], luigi.server.cors] = {}


def _cors() -> luigi.server.cors:
    """Luigi's ``[cors]`` settings, as luigid reads them for each request, but built once for
    each content of the section: building them was an eighth of the server's time."""
    config = luigi.configuration.get_config()
    section = tuple(config.items("cors")) if config.has_section("cors") else ()
    if section not in _CORS:
        _CORS[section] = luigi.server.cors()
    return _CORS[section]


class RPCHandler(luigi.server.RPCHandler):
    """Luigi's ``/api/<method>`` (same JSON, same CORS), answered by the replica."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        tornado.web.RequestHandler.__init__(self, *args, **kwargs)  # (Luigi's builds its cors() each time)
        self._cors_config = _cors()

    def initialize(self, scheduler: Any, replica: Replica | None = None) -> None:
        super().initialize(scheduler)
        self._replica = replica

    def get(self, method: str) -> None:
        assert self._replica is not None
        if method not in luigi.scheduler.RPC_METHODS:
            self._refuse(404, f"no such method: {method}")
            return
        try:
            arguments = json.loads(self.get_argument("data", default="{}"))
        except ValueError as e:
            self._refuse(400, f"the body's data is not JSON: {e}")
            return
        if not isinstance(arguments, dict):
            self._refuse(400, "the body's data is not a JSON object")
            return
        try:
            result = self._replica.call(method, arguments)
        except BadCall as e:
            self._refuse(400, str(e))
            return
        except NotLeading:
            self.set_header("Retry-After", "1")
            self._refuse(503, "this scheduler replica is a standby")
            return
        except (AssertionError, AttributeError, KeyError, TypeError, ValueError) as e:
            log.warning("%s refused: %s: %s", method, type(e).__name__, e)
            self._refuse(400, f"{method} refused: {type(e).__name__}: {e}")
            return
        if self._cors_config.enabled:
            self._handle_cors()
        self.write({"response": result})

    post = get

    def _refuse(self, status: int, why: str) -> None:
        self.set_status(status)
        self.write({"error": why})


class HealthHandler(tornado.web.RequestHandler):
    def initialize(self, replica: Replica, ready_only_when_leading: bool) -> None:
        self._replica = replica
        self._leading_only = ready_only_when_leading

    def get(self) -> None:
        role = "leader" if self._replica.leading else "standby"
        if self._leading_only and not self._replica.leading:
            self.set_status(503)
        self.write({"role": role, "applied": self._replica.applied_seq})


def make_app(replica: Replica) -> tornado.web.Application:
    """Luigi's luigid application, with our ``/api`` and the health routes in front."""
    app = luigi_app(replica.scheduler)
    app.add_handlers(r".*", [
        (r"/api/(.*)", RPCHandler, {"scheduler": replica.scheduler, "replica": replica}),
        (r"/healthz", HealthHandler, {"replica": replica, "ready_only_when_leading": False}),
        (r"/readyz", HealthHandler, {"replica": replica, "ready_only_when_leading": True}),
    ])  # fmt: skip
    return app


# -- the process -------------------------------------------------------------------------------------

def serve(
    port: int = 8082,
    address: str | None = None,
    state_url: str | None = None,
    state_prefix: str = "luigi-celery:scheduler",
    state_path: str | None = None,
    lease_seconds: float = 5.0,
) -> None:
    """Run one scheduler replica until SIGTERM or SIGINT."""
    install_clock()
    scheduler = FastScheduler()
    journal = None
    if state_url:
        replica_name = f"{os.uname().nodename}:{port}:{uuid.uuid4().hex[:8]}"
        journal = RedisJournal(state_url, state_prefix, replica_name, lease_seconds)
        journal.check()
    replica = Replica(scheduler, journal)
    path = state_path or scheduler._config.state_path
    if journal is None:
        _load_file(scheduler, path)
    else:
        replica.load()

    server = tornado.httpserver.HTTPServer(make_app(replica))
    try:
        server.listen(port, address=address or "")
    except OSError as e:
        raise LuigiCeleryError(f"cannot listen on {address or '*'}:{port}: {e.strerror or e}") from None
    loop = tornado.ioloop.IOLoop.current()
    tornado.ioloop.PeriodicCallback(lambda: _prune(replica), PRUNE_EVERY * 1000).start()
    stop = threading.Event()
    if journal is not None:
        tornado.ioloop.PeriodicCallback(replica.snapshot_if_due, 1000).start()
        threading.Thread(target=replica.watch, args=(stop, lease_seconds / 5), daemon=True, name="follower").start()

    def shut_down(signum: int, frame: Any) -> None:
        loop.add_callback_from_signal(loop.stop)

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    log.warning("scheduler serving on %s:%s (%s)", address or "*", port,
                f"state in {journal.prefix} at {redact(state_url)}" if journal else
                f"state in memory, saved to {path} at exit")  # fmt: skip
    loop.start()

    stop.set()
    if journal is None:
        _save_file(scheduler, path)
    elif replica.leading:
        try:
            replica.snapshot_if_due(force=True)
            journal.release()  # a standby takes over now, not when the lease runs out
        except redis.RedisError as e:
            log.warning("could not hand over cleanly: %s", e)
    log.warning("scheduler stopped")


def _prune(replica: Replica) -> None:
    try:
        replica.change("prune", {})
    except (NotLeading, redis.RedisError):
        pass  # a standby does not prune; a leader without Redis prunes next time


def _load_file(scheduler: FastScheduler, path: str) -> None:
    if not os.path.exists(path):
        log.warning("no state file at %s: starting empty", path)
        return
    try:
        with open(path) as f:
            scheduler.restore_state(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.error("the state file %s cannot be read (%s): starting empty", path, e)


def _save_file(scheduler: FastScheduler, path: str) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(temporary, "w") as f:
            json.dump(scheduler.state_json(), f)
        os.replace(temporary, path)
    except OSError as e:
        log.error("could not save the state to %s: %s", path, e)
    else:
        log.warning("saved the state in %s", path)
