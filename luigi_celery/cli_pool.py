"""The commands that serve or probe the pool of workers: ``luigi-celery worker``,
``flower`` and ``check``.

``worker`` and ``flower`` take luigi-celery's flags, then hand the rest to
``celery worker`` and Flower, whose own help follows luigi-celery's; ``check``
is a probe (a container's health check): exit 0 when the broker and the workers
answer.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from luigi_celery.cli_flags import (
    EXIT_OK,
    EXIT_PROBLEM,
    asks_for_help,
    has_flag,
    import_modules,
    print_help_header,
    settings_from,
    warn_of_passwords_in_flags,
)
from luigi_celery.errors import LuigiCeleryError
from luigi_celery.redaction import redact

# Flags of the `celery` command itself (not of `celery worker`) that `worker` accepts too.
_CELERY_GLOBAL_FLAGS = ("--quiet", "-q", "--no-color")


def cmd_worker(args: argparse.Namespace, celery_argv: list[str]) -> int:
    if asks_for_help(celery_argv):  # needs no broker, starts nothing
        from celery import Celery

        print_help_header("worker", "celery worker")
        return _start_celery(Celery("luigi_celery", set_as_current=False), ["worker", "--help"])
    settings = settings_from(args)
    metrics = None
    # (an embedded worker inherits the dispatcher's settings: the port is the dispatcher's)
    if settings.metrics_port and not settings.embedded:
        from luigi_celery.metrics import WorkerMetrics, prepare_worker_metrics

        prepare_worker_metrics()  # before anything imports prometheus_client
        metrics = WorkerMetrics()
    from luigi_celery.app import make_app

    if settings.embedded and not settings.embedded_dir:
        raise LuigiCeleryError("no broker: pass --broker URL or set LUIGI_CELERY_BROKER_URL")
    if settings.embedded:  # the child of an embedded run
        from luigi_celery.embedded import quiet_embedded_worker

        quiet_embedded_worker()
    if not settings.task_modules:
        raise LuigiCeleryError("no task modules allowed: pass --include MODULE or set LUIGI_CELERY_TASK_MODULES")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    import_modules(settings.task_modules)  # a typo is one line here, not Celery's traceback
    app = make_app(settings, worker_metrics=metrics)
    port = settings.metrics_port
    if metrics is not None and port:
        from luigi_celery.metrics import PoolProcessesCollector
        from luigi_celery.queues import QueueDepthCollector

        consumed = _consumed_queues(celery_argv) or [settings.queue]
        depth = QueueDepthCollector(app, lambda: consumed, settings.rabbitmq_api_url)
        address = settings.metrics_address
        _serve_or_fail(functools.partial(metrics.serve, port, address, depth, PoolProcessesCollector()), port, address)
    warn_of_passwords_in_flags(args)
    # Celery's global options go before the sub-command.
    hoisted = [a for a in celery_argv if a in _CELERY_GLOBAL_FLAGS]
    # Celery's exit code: non-zero after an unrecoverable error, so a supervisor restarts the worker.
    return _start_celery(app, [*hoisted, "worker", *(a for a in celery_argv if a not in _CELERY_GLOBAL_FLAGS)])


def _start_celery(app: Any, argv: list[str]) -> int:
    """``celery`` for ``app`` (as ``app.start(argv)``), returning its exit code.

    ``app.start`` drops it: a worker stopped by an unrecoverable error exited 0, and a
    supervisor that restarts only on failure left it down."""
    import click
    from celery.bin.celery import celery

    celery.params[0].default = app
    try:
        code = celery.main(args=argv, standalone_mode=False)
    except click.ClickException as e:  # a bad option: one line, not click's traceback
        raise LuigiCeleryError(e.format_message()) from e
    finally:
        celery.params[0].default = None
    return code if isinstance(code, int) else EXIT_OK


def _consumed_queues(celery_argv: Sequence[str]) -> list[str]:
    """The queues a ``celery worker`` command line names with -Q / --queues (comma-separated)."""
    found: list[str] = []
    for flag, value in zip(celery_argv, [*celery_argv[1:], ""], strict=True):
        if flag in ("-Q", "--queues"):
            found += value.split(",")
        elif flag.startswith("--queues="):
            found += flag.split("=", 1)[1].split(",")
    return [q for q in found if q]


def _serve_or_fail(serve: Callable[[], None], port: int, address: str) -> None:
    try:
        serve()
    except OSError as e:
        raise LuigiCeleryError(f"cannot serve metrics on port {port} of {address}: {e}") from e


def flower_arguments(argv: Sequence[str]) -> list[str]:
    """Flower's options in the ``--name=value`` form its parser (tornado's) requires.

    ``--port 5555`` is accepted too, as on every other command; an unknown
    option or one without its value is an error here, in one line, instead of
    a traceback from inside Flower.
    """
    import flower.options  # noqa: F401  (defines Flower's options)
    from tornado.options import options

    converted: list[str] = []
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("--help", "-h") or not arg.startswith("--"):
            converted.append(arg)
            continue
        name, has_value, _ = arg[2:].partition("=")
        if name not in options:
            raise LuigiCeleryError(f"unknown Flower option --{name} (see luigi-celery flower --help)")
        if not has_value and not isinstance(options[name], bool):
            if not rest or rest[0].startswith("--"):
                raise LuigiCeleryError(f"Flower option --{name} needs a value")
            arg = f"--{name}={rest.pop(0)}"
        converted.append(arg)
    return converted


def cmd_flower(args: argparse.Namespace, flower_argv: list[str]) -> int:
    from luigi_celery.app import make_app
    from luigi_celery.brokers import is_rabbitmq

    if asks_for_help(flower_argv):  # needs no broker, and tells no worker anything
        import flower.options  # noqa: F401  (defines Flower's options)
        from tornado.options import options

        print_help_header("flower", "Flower")
        options.print_help(sys.stdout)
        return EXIT_OK
    settings = settings_from(args)
    if settings.embedded:
        raise LuigiCeleryError("Flower needs a broker: pass --broker URL or set LUIGI_CELERY_BROKER_URL")
    flower_argv = flower_arguments(flower_argv)
    app = make_app(settings)
    warn_of_passwords_in_flags(args)
    broker_api = any(has_flag(flower_argv, f) for f in ("--broker_api", "--broker-api"))
    if is_rabbitmq(settings.broker_url) and not broker_api:
        # Flower's Broker page shows RabbitMQ's queues through the management API.
        from luigi_celery.queues import rabbitmq_api_url

        flower_argv.append(f"--broker_api={rabbitmq_api_url(app, settings.rabbitmq_api_url)}")
    if not _events_refused(flower_argv):
        # Workers send task events only when asked. Flower asks every 5 s, the first time 5 s
        # after it starts: ask now, so it sees the tasks of a run that starts right away.
        app.control.enable_events()
    return _start_celery(app, ["flower", *flower_argv])


def _events_refused(flower_argv: Sequence[str]) -> bool:
    """True when Flower is told not to turn the workers' task events on (``--enable_events=False``)."""
    for arg in flower_argv:
        name, _, value = arg.partition("=")
        if name in ("--enable_events", "--enable-events") and value.lower() in ("false", "0", "no"):
            return True
    return False


def cmd_check(args: argparse.Namespace) -> int:
    from luigi_celery.app import make_app
    from luigi_celery.sender import check_broker

    settings = settings_from(args)
    if settings.embedded:
        print("luigi-celery check: no broker configured; the embedded default needs no server")
        return EXIT_OK
    app = make_app(settings)
    check_broker(app, args.timeout)
    broker = f"broker {redact(settings.broker_url)} answers"
    destination = [args.worker] if args.worker else None
    if args.queues:
        # (each worker's answer names its queues, so it doubles as the ping)
        consumed = app.control.inspect(destination=destination, timeout=args.timeout).active_queues() or {}
        names = sorted(consumed)
        served = {queue["name"] for queues in consumed.values() for queue in queues}
    else:
        pongs = app.control.ping(destination=destination, timeout=args.timeout)
        names = sorted(name for reply in pongs for name in reply)
        served = set()
    if not names:
        who = f"worker {args.worker} did not reply" if args.worker else "no worker replied"
        print(f"luigi-celery check: {broker}, but {who}", file=sys.stderr)
        return EXIT_PROBLEM
    unserved = [queue for queue in args.queues or () if queue not in served]
    if unserved:
        print(f"luigi-celery check: {broker}, but no worker consumes queue {', '.join(unserved)}", file=sys.stderr)
        return EXIT_PROBLEM
    queues = f"; queue(s) {', '.join(args.queues)} consumed" if args.queues else ""
    print(f"luigi-celery check: {broker}; {len(names)} worker(s): {', '.join(names)}{queues}")
    return EXIT_OK
