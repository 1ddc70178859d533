"""How far a run is: counted from what Luigi's worker tells its scheduler, shown while it runs.

:class:`Progress` counts tasks by their last status (done, running on a worker,
queued for one, pending, failed) and the pace they finish at.  :class:`ProgressView` shows it: on a
terminal one line redrawn in place, with Luigi's log lines scrolling above
it; otherwise a plain log line now and then.  Either way the last line comes
before Luigi's execution summary, which stays at the end.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

logger = logging.getLogger(__name__)

# The pace is measured over this many seconds of finished tasks.
PACE_WINDOW = 30.0
# A terminal line is redrawn this often; a plain line is written at most this often.
REDRAW_INTERVAL = 0.5
LOG_INTERVAL = 10.0

# Luigi statuses that end a task's part in the run (an UNKNOWN task's complete() raised).
_FAILED = {"FAILED", "UNKNOWN", "DISABLED"}


@dataclass(frozen=True)
class Snapshot:
    done: int
    running: int
    queued: int  # sent to a worker, not yet started by one
    pending: int
    failed: int
    per_second: float | None  # None until a task has finished
    elapsed: float

    @property
    def total(self) -> int:
        return self.done + self.running + self.queued + self.pending + self.failed

    @property
    def eta(self) -> float | None:
        """Seconds left at the current pace; None when there is no pace yet."""
        left = self.running + self.queued + self.pending
        if left == 0:
            return 0.0
        return left / self.per_second if self.per_second else None

    def line(self) -> str:
        pace = f"{self.per_second:.1f} tasks/s" if self.per_second is not None else "- tasks/s"
        eta = "-" if self.eta is None else _duration(self.eta)
        return (
            f"done {self.done}/{self.total} | running {self.running} | queued {self.queued} | pending {self.pending} | "
            f"failed {self.failed} | {pace} | left {eta} | {_duration(self.elapsed)}"
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Each task's last status, as the worker reported it to the scheduler.

    Called from Luigi's main thread; read from the view's thread.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._status: dict[str, str] = {}
        self._running: set[str] = set()
        self._queued: set[str] = set()
        self._finished: collections.deque[float] = collections.deque()
        self._began = clock()

    def reported(self, task_id: str, status: str) -> None:
        """The worker told the scheduler ``task_id`` has ``status`` (PENDING, DONE, FAILED, ...)."""
        with self._lock:
            was_running = task_id in self._running or task_id in self._queued
            self._running.discard(task_id)
            self._queued.discard(task_id)
            self._status[task_id] = status
            if was_running and (status == "DONE" or status in _FAILED):
                self._finished.append(self._clock())

    def queued(self, task_id: str) -> None:
        """The task was sent to a worker (or went back to a queue to wait), and does not run yet."""
        with self._lock:
            self._running.discard(task_id)
            self._queued.add(task_id)

    def started(self, task_id: str) -> None:
        """The task runs now (a worker said so, or the dispatcher runs it itself).

        A notice that comes late, after the task's result, changes nothing."""
        with self._lock:
            status = self._status.get(task_id)
            if status == "DONE" or status in _FAILED:
                return
            self._queued.discard(task_id)
            self._running.add(task_id)

    def snapshot(self) -> Snapshot:
        with self._lock:
            now = self._clock()
            while self._finished and self._finished[0] < now - PACE_WINDOW:
                self._finished.popleft()
            counts = collections.Counter(self._status.values())
            failed = sum(counts[s] for s in _FAILED)
            running, queued = len(self._running), len(self._queued)
            pending = len(self._status) - counts["DONE"] - failed - running - queued
            window = min(PACE_WINDOW, now - self._began)
            per_second = len(self._finished) / window if self._finished and window > 0 else None
            return Snapshot(counts["DONE"], running, queued, max(0, pending), failed, per_second, now - self._began)


class _LiveStream:
    """Stands in for the terminal's stream: whatever is written (Luigi's log lines)
    goes above the progress line, which is redrawn below it."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.RLock()
        self._line = ""

    def write(self, text: str) -> int:
        with self._lock:
            if self._line:
                self._stream.write("\r\x1b[K")
            self._stream.write(text)
            if self._line and text.endswith("\n"):
                self._stream.write(self._line)
            self._stream.flush()
            return len(text)

    def show(self, line: str) -> None:
        with self._lock:
            self._stream.write("\r\x1b[K" + line)
            self._stream.flush()
            self._line = line

    def clear(self) -> None:
        with self._lock:
            if self._line:
                self._stream.write("\r\x1b[K")
                self._stream.flush()
            self._line = ""

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class ProgressView:
    """Shows a :class:`Progress` while the run goes on, on ``stream`` (stderr by default).

    On a terminal, :meth:`install` (before logging is set up) routes what is
    written to the stream through a live line; elsewhere a plain log line is
    written every ``LOG_INTERVAL`` seconds when something changed.
    """

    def __init__(
        self,
        progress: Progress,
        stream: IO[str] | None = None,
        live: bool | None = None,
        interval: float | None = None,
    ) -> None:
        self.progress = progress
        self._stream = stream if stream is not None else sys.stderr
        self.live = self._stream.isatty() if live is None else live
        self._interval = interval if interval is not None else REDRAW_INTERVAL if self.live else LOG_INTERVAL
        self._live_stream: _LiveStream | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def install(self) -> None:
        """On a terminal, put the live line under stderr (call before logging handlers are made)."""
        if self.live and self._stream is sys.stderr:
            self._live_stream = _LiveStream(sys.stderr)
            sys.stderr = self._live_stream

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="luigi-celery-progress", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop showing; leave the final numbers as one plain line (before Luigi's summary)."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join()
        self._thread = None
        if self._live_stream is not None:
            self._live_stream.clear()
        self._write_line(self.progress.snapshot())

    def _loop(self) -> None:
        last = None
        while not self._stopping.wait(self._interval):
            snapshot = self.progress.snapshot()
            if self.live:
                self._show(snapshot.line())
            elif (snapshot.done, snapshot.running, snapshot.queued, snapshot.failed, snapshot.total) != last:
                last = (snapshot.done, snapshot.running, snapshot.queued, snapshot.failed, snapshot.total)
                self._write_line(snapshot)

    def _show(self, line: str) -> None:
        if self._live_stream is not None:
            self._live_stream.show(line)
        else:
            self._stream.write("\r\x1b[K" + line)
            self._stream.flush()

    def _write_line(self, snapshot: Snapshot) -> None:
        stream = self._live_stream or self._stream
        stream.write(f"luigi-celery: progress: {snapshot.line()}\n")
        stream.flush()
