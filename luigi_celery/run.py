"""``luigi-celery run``: one pipeline run, from settings to exit code."""

from __future__ import annotations

import hashlib
import shutil
import signal
import sys

import luigi.retcodes

from luigi_celery import params
from luigi_celery.app import make_app, make_limiter, store_url
from luigi_celery.dispatch import (
    CeleryWorker,
    CeleryWorkerSchedulerFactory,
    failed_task_ids,
    root_task_id,
    run_with_retcodes,
)
from luigi_celery.embedded import EmbeddedWorker, make_embedded_dir
from luigi_celery.errors import Interrupted, LuigiCeleryError, RunAlreadyActive
from luigi_celery.metrics import DispatcherMetrics
from luigi_celery.progress import ProgressView
from luigi_celery.sender import Sender, check_broker
from luigi_celery.settings import Settings
from luigi_celery.store_redis import RedisStore


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """Turn Ctrl-C and SIGTERM into :class:`Interrupted` in the main thread."""
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)


def run_id(luigi_argv: list[str], settings: Settings) -> str | None:
    """The same pipeline on the same queue gets the same run id, so a dispatcher started
    again after a crash finds the work the first one left in flight."""
    root = root_task_id(luigi_argv)
    if root is None:
        return None
    return hashlib.sha1(f"{root}|{settings.queue}".encode()).hexdigest()[:16]


def report_failures(worker: CeleryWorker) -> None:
    """Print each failed task's remote explanation (Luigi's summary only names them)."""
    failed = failed_task_ids(worker)
    shown = {task_id: result for task_id, result in worker.failures.items() if task_id in failed}
    if not shown:
        return
    print(f"\nluigi-celery: {len(shown)} task(s) failed:", file=sys.stderr)
    for task_id, result in sorted(shown.items()):
        where = f" on {result.host}" if result.host else ""
        print(f"--- {task_id}{where} ---\n{result.expl.rstrip()}\n", file=sys.stderr)


def run_pipeline(settings: Settings, luigi_argv: list[str], progress: ProgressView | None = None) -> int:
    """Run the pipeline ``luigi_argv`` names; return the process exit code."""
    params.install()  # (Luigi lists a class's parameters ~15 times a task: remembered, checked)
    if not settings.embedded:
        return _run_pipeline(settings, luigi_argv, progress)
    folder = make_embedded_dir()
    try:
        return _run_pipeline(settings.replace(embedded_dir=folder), luigi_argv, progress)
    finally:
        # The embedded broker's folder goes with the run, however it ended (a run that fails
        # before its pool starts, on a bad task name say, left it behind).
        shutil.rmtree(folder, ignore_errors=True)


def _run_pipeline(settings: Settings, luigi_argv: list[str], progress: ProgressView | None) -> int:
    app = make_app(settings)
    url = store_url(settings)
    store = RedisStore(url) if url else None
    metrics = None
    if settings.metrics_port:
        metrics = DispatcherMetrics()
        try:
            metrics.serve(settings.metrics_port, settings.metrics_address)
        except OSError as e:
            where = f"port {settings.metrics_port} of {settings.metrics_address}"
            raise LuigiCeleryError(f"cannot serve metrics on {where}: {e}") from e
    sender = Sender(
        app,
        settings,
        run_id=run_id(luigi_argv, settings) if store else None,
        store=store,
        limiter=make_limiter(settings),
        metrics=metrics,
    )
    embedded: list[EmbeddedWorker] = []

    def start_sender(worker_count: int) -> None:
        if settings.embedded:
            print(
                f"luigi-celery: no broker configured; running embedded ({worker_count} worker process(es), "
                f"filesystem broker in {settings.embedded_dir})",
                file=sys.stderr,
            )
        else:
            check_broker(app, settings.connect_timeout)
            if store is not None:
                store.ping()
        sender.start()

    def start_embedded_pool(modules: set[str]) -> None:
        # Called once the DAG is resolved, so the pool knows which modules to import.
        if not settings.embedded or embedded:
            return
        assert settings.embedded_dir is not None and factory.worker is not None
        # Dynamic dependencies may come from sibling modules: allow their packages too.
        allowed = modules | {module.split(".")[0] for module in modules}
        pool = EmbeddedWorker(settings.embedded_dir, factory.worker.slots, allowed, settings.queue)
        pool.start()
        embedded.append(pool)
        sender.add_health_check(pool.problem)

    factory = CeleryWorkerSchedulerFactory(
        sender,
        on_worker=start_sender,
        on_start=start_embedded_pool,
        progress=progress,
        complete_checks=settings.complete_checks,
    )
    try:
        code = run_with_retcodes(luigi_argv, factory)
    except RunAlreadyActive as e:
        print(f"luigi-celery run: {e}", file=sys.stderr)
        return int(luigi.retcodes.retcode().already_running)  # ours unless the user set it
    except Interrupted as stop:
        # Luigi's worker has terminated (revoked) what was in flight on its way out.
        left = ", ".join(sender.revoked) if sender.revoked else "none"
        print(f"\nluigi-celery: {stop}; revoked {len(sender.revoked)} task(s) in flight: {left}", file=sys.stderr)
        return stop.exit_code
    finally:
        for pool in embedded:
            pool.stop()
    if metrics is not None:
        metrics.final_scrape(settings.metrics_final_wait)
    if factory.worker is not None:
        report_failures(factory.worker)
    return code
