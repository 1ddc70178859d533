"""The embedded default: a real Celery worker pool with no server to run.

With no broker configured, the dispatcher makes a private folder, points
kombu's ``filesystem://`` transport at it, and starts ``luigi-celery worker``
as a child process with a prefork pool of ``--workers`` processes.  Tasks take
exactly the path they take in the distributed mode (JSON message, worker
process, reply queue), so a pipeline that works embedded works distributed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
import warnings
from time import monotonic, sleep
from typing import Any

from kombu.transport import filesystem, virtual
from kombu.utils.json import dumps

from luigi_celery.settings import ENV_PREFIX

logger = logging.getLogger(__name__)


class _AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel, writing each message atomically.

    kombu creates the message file empty and then writes it, while a reader
    moves and reads any file it sees, so a reader can catch an empty or
    half-written message and its consumer dies on a JSON decode error
    (celery/kombu#1551).  Writing to a temporary name and renaming it into
    place (atomic on POSIX) means a reader only ever sees whole messages.
    """

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        partial = os.path.join(self.data_folder_out, f"partial-{uuid.uuid4().hex}")
        try:
            with open(partial, "wb") as f:
                f.write(dumps(payload).encode())
            os.rename(partial, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add message to {self.data_folder_out!r}") from exc


# While messages flow, the folder is polled this often; after BUSY_FOR seconds without one,
# at the transport's polling_interval. A task's round trip is two polls (the worker's, then
# the dispatcher's): at a steady 10 ms they were most of the embedded mode's time.
BUSY_POLLING_INTERVAL = 0.001
BUSY_FOR = 0.5


class AtomicFilesystemTransport(filesystem.Transport):
    """The embedded broker's transport: kombu's filesystem transport with atomic writes,
    polled fast while messages flow and slowly while idle."""

    Channel = _AtomicFilesystemChannel
    _last_message = float("-inf")

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:  # type: ignore[override]
        started = monotonic()
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)  # type: ignore[attr-defined]
            except virtual.Empty:
                now = monotonic()
                if timeout is not None and now - started >= timeout:
                    raise TimeoutError() from None
                busy = now - self._last_message < BUSY_FOR
                wait = BUSY_POLLING_INTERVAL if busy else self.polling_interval
                if timeout is not None:
                    wait = min(wait, max(0.0, started + timeout - now))
                sleep(wait)
            else:
                self._last_message = monotonic()
                return


TRANSPORT = f"{__name__}:{AtomicFilesystemTransport.__name__}"


class _NoTraceback(logging.Filter):
    """Keeps Luigi's "[pid N] Worker ... failed Task" line, without its traceback: the
    dispatcher prints the failure in full after the summary, on the same terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith("[pid %s] Worker %s failed"):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_embedded_worker() -> None:
    """Configure the embedded worker (this process, and the pool it forks) so that what it
    prints is only what stock Luigi's workers print on that terminal."""
    from celery.exceptions import SecurityWarning

    # Celery warns a root worker because anyone who can write to its broker runs code as
    # root. The embedded broker is a folder only this user can open (mkdtemp's 0700),
    # written by this run alone: the warning does not apply.
    warnings.filterwarnings("ignore", category=SecurityWarning)
    logging.getLogger("luigi-interface").addFilter(_NoTraceback())


def make_embedded_dir() -> str:
    return tempfile.mkdtemp(prefix="luigi-celery-embedded-")


class EmbeddedWorker:
    """A ``luigi-celery worker`` child process on the embedded broker in ``folder``."""

    def __init__(self, folder: str, concurrency: int, modules: set[str], queue: str) -> None:
        self.folder = folder
        self.concurrency = max(1, concurrency)
        self.modules = sorted(modules)
        self.queue = queue
        self._process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "luigi_celery", "worker",
            "--include", *self.modules,
            "--queue", self.queue,
            "--concurrency", str(self.concurrency),
            "--pool", "prefork",
            "--loglevel", "WARNING", "--quiet",
            "--without-heartbeat", "--without-gossip", "--without-mingle",
        ]  # fmt: skip

    def start(self) -> None:
        env = dict(os.environ)
        env.pop(ENV_PREFIX + "BROKER_URL", None)
        env[ENV_PREFIX + "EMBEDDED_DIR"] = self.folder
        # The worker imports the pipeline the way the dispatcher did: from the current folder.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
        # A session of its own: the whole pool can be stopped as one process group,
        # and a Ctrl-C in the terminal reaches the dispatcher, which decides.
        self._process = subprocess.Popen(self.command(), env=env, start_new_session=True)
        logger.debug("embedded worker pid %s: %s", self._process.pid, " ".join(self.command()))

    def problem(self) -> str | None:
        """None while the worker runs; otherwise why it cannot serve tasks."""
        if self._process is None or self._process.poll() is None:
            return None
        return f"the embedded Celery worker exited with code {self._process.returncode}"

    def stop(self) -> None:
        # Killed, not shut down warmly (which takes about 5 s for an idle prefork pool
        # on this transport): the run has nothing left in flight, or was interrupted,
        # when stock Luigi terminates its task processes too; the broker folder is
        # private to the run and goes with it.
        if self._process is not None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)  # the pool's children too
            except ProcessLookupError:
                pass
            self._process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
