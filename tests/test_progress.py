"""The progress counts and the terminal line, without a run."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import time

import pytest

from luigi_celery.progress import Progress, ProgressView, _LiveStream
from tests.conftest import BIN, REDIS_URL, ROOT, clean_env, run_cli


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_tasks_are_counted_by_their_last_status_and_the_pace_gives_the_time_left():
    clock = Clock()
    progress = Progress(clock)
    # Given ten tasks scheduled, two of them complete already
    for n in range(10):
        progress.reported(f"t{n}", "DONE" if n < 2 else "PENDING")
    assert progress.snapshot().line().startswith(
        "done 2/10 | running 0 | queued 0 | pending 8 | failed 0 | - tasks/s | left -"
    )
    # When four are sent, and over 2 s two finish and one fails
    for n in range(2, 6):
        progress.started(f"t{n}")
    clock.now += 2
    progress.reported("t2", "DONE")
    progress.reported("t3", "DONE")
    progress.reported("t4", "FAILED")
    snapshot = progress.snapshot()
    # Then: 4 done, 1 running, 4 pending, 1 failed, 3 finished in 2 s, 5 left at 1.5/s
    assert (snapshot.done, snapshot.running, snapshot.pending, snapshot.failed) == (4, 1, 4, 1)
    assert snapshot.per_second == pytest.approx(1.5)
    assert snapshot.eta == pytest.approx(5 / 1.5)
    assert snapshot.line() == "done 4/10 | running 1 | queued 0 | pending 4 | failed 1 | 1.5 tasks/s | left 3s | 2s"


def test_a_task_sent_is_queued_until_a_worker_starts_it_and_a_late_notice_changes_nothing():
    clock = Clock()
    progress = Progress(clock)
    for n in range(3):
        progress.reported(f"t{n}", "PENDING")
    # When all three are sent and a worker has started one
    for n in range(3):
        progress.queued(f"t{n}")
    progress.started("t0")
    snapshot = progress.snapshot()
    # Then one runs and two wait in the queue: neither is "pending" any more
    assert (snapshot.running, snapshot.queued, snapshot.pending) == (1, 2, 0)
    assert "| running 1 | queued 2 | pending 0 |" in snapshot.line()
    # When one finishes before its start notice arrives, and one goes back to its queue (a retry)
    progress.reported("t1", "DONE")
    progress.started("t1")
    progress.queued("t0")
    clock.now += 1
    snapshot = progress.snapshot()
    assert (snapshot.done, snapshot.running, snapshot.queued) == (1, 0, 2)
    assert snapshot.per_second is not None  # a queued task that finished counts towards the pace


def test_a_task_that_comes_back_pending_is_pending_again_and_new_ones_grow_the_total():
    progress = Progress(Clock())
    progress.reported("parent", "PENDING")
    progress.started("parent")
    # When it yields two dynamic dependencies: they are scheduled, and it goes back to pending
    progress.reported("child-1", "PENDING")
    progress.reported("child-2", "PENDING")
    progress.reported("parent", "PENDING")
    snapshot = progress.snapshot()
    assert (snapshot.done, snapshot.running, snapshot.pending, snapshot.total) == (0, 0, 3, 3)
    assert snapshot.per_second is None  # a suspended task did not finish


def test_the_pace_counts_only_the_last_half_minute():
    clock = Clock()
    progress = Progress(clock)
    for n in range(20):
        progress.reported(f"t{n}", "PENDING")
        progress.started(f"t{n}")
    for n in range(10):  # ten finish at once, early on
        progress.reported(f"t{n}", "DONE")
    clock.now += 100
    progress.reported("t10", "DONE")  # and one, 100 s later
    assert progress.snapshot().per_second == pytest.approx(1 / 30)


def test_log_lines_scroll_above_the_live_line_which_is_redrawn_under_them():
    terminal = io.StringIO()
    live = _LiveStream(terminal)
    live.show("done 1/3")
    live.write("INFO: a log line\n")
    live.show("done 2/3")
    live.clear()
    assert terminal.getvalue() == (
        "\r\x1b[Kdone 1/3"
        "\r\x1b[KINFO: a log line\ndone 1/3"  # the line cleared, the log line written, the line redrawn
        "\r\x1b[Kdone 2/3"
        "\r\x1b[K"
    )


def test_stopping_leaves_the_final_numbers_as_a_plain_line():
    out = io.StringIO()
    progress = Progress(Clock())
    progress.reported("a", "DONE")
    view = ProgressView(progress, stream=out, live=False)
    view.start()
    view.stop()
    assert out.getvalue() == (
        "luigi-celery: progress: done 1/1 | running 0 | queued 0 | pending 0 | failed 0 | - tasks/s | left 0s | 0s\n"
    )


def test_off_a_terminal_a_plain_line_is_written_when_something_changed():
    out = io.StringIO()
    progress = Progress()
    progress.reported("a", "PENDING")
    view = ProgressView(progress, stream=out, live=False, interval=0.05)
    view.start()
    time.sleep(0.2)  # several intervals, nothing changes after the first line
    progress.started("a")
    progress.reported("a", "DONE")
    time.sleep(0.2)
    view.stop()
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["luigi-celery: progress: done 0/1"] + [
        "luigi-celery: progress: done 1/1"
    ] * 2  # (the last one is the final line)
    assert "\x1b" not in out.getvalue()


def _run_on_a_terminal(*args: str, timeout: float = 120) -> tuple[int, str]:
    """Run luigi-celery with a pseudo-terminal as its stdout and stderr; (exit code, all it wrote)."""
    parent, child = pty.openpty()
    process = subprocess.Popen(
        [str(BIN / "luigi-celery"), *args], cwd=ROOT, env=clean_env(), stdin=subprocess.DEVNULL,
        stdout=child, stderr=child,
    )  # fmt: skip
    os.close(child)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # the terminal closed: every process that held it has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    return process.wait(timeout=30), b"".join(chunks).decode(errors="replace")


@pytest.mark.e2e
def test_on_a_terminal_the_run_shows_a_live_line_and_ends_with_luigis_summary(tmp_path):
    # When a run of four 1-second tasks over two workers writes to a terminal
    code, output = _run_on_a_terminal(
        "run", "--module", "tests.pipelines", "ManySlow", "--count", "4", "--seconds", "1", "--out", str(tmp_path),
        "--workers", "2",
    )  # fmt: skip
    assert code == 0, output[-3000:]
    # Then a line is redrawn in place while it runs, showing two tasks running
    redraws = output.split("\r\x1b[K")
    assert any(part.startswith("done ") and "| running 2 |" in part for part in redraws), output[-3000:]
    # and at the end the final numbers, as a plain line, then Luigi's execution summary
    final = "luigi-celery: progress: done 5/5 | running 0 | queued 0 | pending 0 | failed 0 |"
    assert final in output
    assert output.index(final) < output.index("===== Luigi Execution Summary =====")
    assert "done " not in output[output.index(final) + len(final) :]  # no live line after it


@pytest.mark.e2e
def test_tasks_waiting_for_a_busy_worker_show_as_queued_not_running(fresh_pool, tmp_path):
    # Given one worker with one pool process, and three 1.5-second tasks sent at once
    pool = fresh_pool(REDIS_URL, count=1, concurrency=1)
    code, output = _run_on_a_terminal(
        "run", "--broker", pool.broker, "--queue", pool.queue, "--module", "tests.pipelines", "ManySlow",
        "--count", "3", "--seconds", "1.5", "--out", str(tmp_path), "--workers", "3",
    )  # fmt: skip
    assert code == 0, output[-3000:]
    # Then the live line shows one running and two waiting in the queue (the wrapper pending), never three running
    redraws = [part for part in output.split("\r\x1b[K") if part.startswith("done ")]
    assert any("| running 1 | queued 2 | pending 1 |" in part for part in redraws), output[-3000:]
    assert not any("| running 2 |" in part or "| running 3 |" in part for part in redraws)


@pytest.mark.e2e
def test_off_a_terminal_the_run_writes_plain_lines_and_the_final_one_before_luigis_summary(tmp_path):
    result = run_cli("run", "--module", "tests.pipelines", "MixedOutcomes", "--out", str(tmp_path), "--workers", "3")
    assert result.returncode == 30, result.stdout[-3000:]
    # (the wrapper never runs: its requirement failed)
    final = "luigi-celery: progress: done 4/6 | running 0 | queued 0 | pending 1 | failed 1 |"
    assert final in result.stdout
    assert result.stdout.index(final) < result.stdout.index("===== Luigi Execution Summary =====")
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
