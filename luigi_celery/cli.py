"""``luigi-celery``: run a pipeline, start a worker, start Flower, check the pool.

The CLI only parses, builds the settings and calls the library.  ``run``
parses luigi-celery's own flags (never abbreviated, so they cannot shadow a
task parameter) and hands everything else to Luigi's own command line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from luigi_celery import __version__
from luigi_celery.errors import LuigiCeleryError
from luigi_celery.redaction import passwords_in, scrub
from luigi_celery.settings import (
    ENV_PREFIX,
    SECRET_SETTINGS,
    Settings,
    listen_address,
    load_settings,
    non_negative_number,
    port_number,
    positive_int,
    positive_number,
    queue_name,
    redact,
)

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_PROBLEM = 1  # `check`: the broker or the workers do not answer
EXIT_USAGE = 2  # a bad flag, a bad setting, an unreachable broker

# Luigi flags that choose a central scheduler; without one, `run` uses the local scheduler.
_SCHEDULER_FLAGS = ("--local-scheduler", "--scheduler-url", "--scheduler-host", "--scheduler-port")


# Flags of the `celery` command itself (not of `celery worker`) that `worker` accepts too.
_CELERY_GLOBAL_FLAGS = ("--quiet", "-q", "--no-color")


def _flag(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` from one of settings.py's validators: its ValueError becomes
    argparse's one line, ``argument --flag: must be ..., got 'value'``."""

    def parse_flag(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e}, got {text!r}") from e

    return parse_flag


_queue_name = _flag(queue_name)
_positive_float = _flag(positive_number)
_positive_int = _flag(positive_int)
_port = _flag(port_number)
_non_negative_float = _flag(non_negative_number)
_address = _flag(listen_address)


class _CommaSeparated(argparse.Action):
    """``--flag a,b --flag c`` or ``--flag a b``: one list, as Celery's COMMA SEPARATED LISTs."""

    def __init__(self, *args: Any, item: Callable[[str], str] = str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.item = item

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        texts = [values] if isinstance(values, str) else list(values or [])
        items = list(getattr(namespace, self.dest, None) or [])
        for text in texts:
            for name in (part.strip() for part in text.split(",")):
                if not name:
                    continue
                try:
                    items.append(self.item(name))
                except ValueError as e:
                    raise argparse.ArgumentError(self, f"{e}, got {name!r}") from e
        setattr(namespace, self.dest, items)


def _add_metrics_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics on this port (env LUIGI_CELERY_METRICS_PORT)",
    )
    parser.add_argument(
        "--metrics-address",
        type=_address,
        metavar="ADDR",
        help="serve them on this address (env LUIGI_CELERY_METRICS_ADDRESS; default 127.0.0.1: this machine "
        "only; 0.0.0.0: every interface, for a Prometheus on another machine)",
    )


def _add_connection_flags(parser: argparse.ArgumentParser, queue: bool = True) -> None:
    parser.add_argument(
        "--broker",
        dest="broker_url",
        metavar="URL",
        help="redis://... or amqp://... (env LUIGI_CELERY_BROKER_URL, or LUIGI_CELERY_BROKER_URL_FILE naming a file "
        "that holds it: a password in a flag is visible to other users in ps)",
    )
    parser.add_argument(
        "--result-backend",
        metavar="URL",
        help="optional Celery result backend, for other tools (env LUIGI_CELERY_RESULT_BACKEND or ..._FILE)",
    )
    if queue:
        parser.add_argument(
            "--queue",
            type=_queue_name,
            metavar="NAME",
            help="the default Celery queue (env LUIGI_CELERY_QUEUE; default 'luigi')",
        )
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help="coordination store for run locks (env LUIGI_CELERY_REDIS_URL or ..._FILE; default: the broker when "
        "it is Redis)",
    )


def make_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="luigi-celery",
        allow_abbrev=False,
        description="Run Luigi pipelines on Celery workers; start a worker, start Flower, check the pool.",
    )
    parser.add_argument("--version", action="version", version=f"luigi-celery {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        allow_abbrev=False,
        add_help=False,  # --help is Luigi's help for the task, with these flags added (commandline.py)
        help="run a Luigi pipeline on Celery workers (Luigi's own flags and task parameters follow)",
    )
    _add_connection_flags(run)
    run.add_argument(
        "--queue-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="fail a task no worker has started after this long, if no worker consumes its queue (default 300)",
    )
    run.add_argument(
        "--connect-timeout", type=_positive_float, metavar="SECONDS", help="give up reaching the broker after this long"
    )
    run.add_argument(
        "--complete-checks",
        type=_positive_int,
        metavar="N",
        help="run up to N complete() checks at once while resolving the DAG, in threads "
        "(default 1: one at a time, as Luigi does; more only if complete() is thread-safe)",
    )
    _add_metrics_flags(run)
    run.add_argument(
        "--metrics-final-wait",
        type=_non_negative_float,
        metavar="SECONDS",
        help="at the end, wait at most this long for Prometheus to scrape the final numbers, when it scrapes "
        "the run (env LUIGI_CELERY_METRICS_FINAL_WAIT; default 60; 0: don't wait)",
    )

    worker = commands.add_parser(
        "worker",
        allow_abbrev=False,
        add_help=False,
        help="start a Celery worker for luigi-celery (celery worker options follow)",
    )
    _add_connection_flags(worker)
    worker.add_argument(
        "--include",
        nargs="+",
        action=_CommaSeparated,
        metavar="MODULE",
        help="modules (or packages) whose tasks this worker may run, comma-separated or one by one "
        "(env LUIGI_CELERY_TASK_MODULES)",
    )
    _add_metrics_flags(worker)

    flower = commands.add_parser(
        "flower", allow_abbrev=False, add_help=False, help="start Flower (flower options follow)"
    )
    _add_connection_flags(flower)

    check = commands.add_parser(
        "check", allow_abbrev=False, help="exit 0 when the broker and at least one worker answer"
    )
    _add_connection_flags(check, queue=False)
    check.add_argument(
        "--queue",
        dest="queues",
        action=_CommaSeparated,
        item=queue_name,
        metavar="NAME",
        help="some worker must consume this queue (comma-separated, or the flag again, for several)",
    )
    check.add_argument(
        "--timeout", type=_positive_float, default=5.0, metavar="SECONDS", help="how long to wait for answers"
    )
    check.add_argument(
        "--worker",
        metavar="NAME",
        help="only this worker must answer, e.g. celery@$(hostname) (a container's health check)",
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "broker_url": args.broker_url,
        "result_backend": args.result_backend,
        "queue": getattr(args, "queue", None),
        "redis_url": args.redis_url,
        "connect_timeout": getattr(args, "connect_timeout", None),
        "queue_timeout": getattr(args, "queue_timeout", None),
        "complete_checks": getattr(args, "complete_checks", None),
        "metrics_port": getattr(args, "metrics_port", None),
        "metrics_address": getattr(args, "metrics_address", None),
        "metrics_final_wait": getattr(args, "metrics_final_wait", None),
    }
    include = getattr(args, "include", None)
    if include:
        overrides["task_modules"] = tuple(include)
    return load_settings(overrides)


# The flags that may carry a password, by setting.
_SECRET_FLAGS = {"broker_url": "--broker", "result_backend": "--result-backend", "redis_url": "--redis-url"}


def _warn_of_passwords_in_flags(args: argparse.Namespace) -> None:
    """One line when a flag carries a password: every user of the machine sees a command line
    (``ps``), not a process's environment nor a file of its own. Said once the settings are
    known to be good, so a mistake is still one line; ``check`` (a probe) says nothing."""
    names = [name for name in _SECRET_FLAGS if passwords_in(getattr(args, name, None))]
    if not names:
        return
    flags = ", ".join(_SECRET_FLAGS[name] for name in names)
    instead = ", ".join(f"{ENV_PREFIX}{name.upper()} or {ENV_PREFIX}{name.upper()}_FILE" for name in names)
    what = "the password in" if len(names) == 1 else "the passwords in"
    print(
        f"luigi-celery {args.command}: warning: {what} {flags} {'is' if len(names) == 1 else 'are'} visible to "
        f"other users in ps; set {instead} instead",
        file=sys.stderr,
    )


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _wants_central_scheduler(argv: Sequence[str]) -> bool:
    import luigi.configuration

    if any(_has_flag(argv, f) for f in _SCHEDULER_FLAGS):
        return True
    config = luigi.configuration.get_config()
    return any(config.has_option("core", key) for key in ("default-scheduler-url", "default-scheduler-host"))


def _import_pipeline_modules(luigi_argv: Sequence[str]) -> None:
    """Import ``--module`` now, so a typo is one clear line, not Luigi's traceback."""
    modules = [value for flag, value in zip(luigi_argv, luigi_argv[1:], strict=False) if flag == "--module"]
    modules += [a.split("=", 1)[1] for a in luigi_argv if a.startswith("--module=")]
    _import_modules(modules)


def _import_modules(modules: Sequence[str]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise LuigiCeleryError(f"cannot import module {module!r}: {e}") from e


def _log_like_luigi() -> None:
    """Show luigi-celery's INFO and above the way Luigi shows its own lines (on stderr)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    ours = logging.getLogger("luigi_celery")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def _subcommand(name: str) -> argparse.ArgumentParser:
    actions = make_argument_parser()._actions
    commands = next(a for a in actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = commands.choices[name]
    return parser


def _options_help(command: str) -> str:
    """The options part of ``command``'s own help."""
    text = _subcommand(command).format_help()
    return text.split("options:\n", 1)[-1].rstrip()


def _wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def _print_help_header(command: str, theirs: str) -> None:
    """``command``'s own flags, before the help of the program whose options follow them."""
    print(f"usage: luigi-celery {command} [luigi-celery's flags] [{theirs} options]\n")
    print(f"luigi-celery's flags:\n{_options_help(command)}\n")
    print(f"{theirs} options:", flush=True)


def _own_flags(command: str) -> list[str]:
    return [option for action in _subcommand(command)._actions for option in action.option_strings]


def cmd_run(args: argparse.Namespace, luigi_argv: list[str]) -> int:
    from luigi_celery.run import install_signal_handlers, run_pipeline

    # Like `python -m` and `celery -A`: the pipeline's modules import from the current folder.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    settings = _settings(args)
    _import_pipeline_modules(luigi_argv)
    from luigi_celery.commandline import check_command_line, luigi_help, wants_help

    if wants_help(luigi_argv):
        print(luigi_help(luigi_argv, _options_help("run")), end="")
        return EXIT_OK
    check_command_line(luigi_argv, own_flags=_own_flags("run"))
    if settings.broker_url:
        from luigi_celery.brokers import check_broker_url

        check_broker_url(settings.broker_url)  # (a bad one is one line, without the warning below)
    _warn_of_passwords_in_flags(args)
    if not _wants_central_scheduler(luigi_argv):
        luigi_argv = [*luigi_argv, "--local-scheduler"]
    install_signal_handlers()
    from luigi_celery.progress import Progress, ProgressView

    # On a terminal a live line under the log; otherwise a plain progress line now and then.
    progress = ProgressView(Progress())
    progress.install()  # before any logging handler takes hold of stderr
    _log_like_luigi()
    return run_pipeline(settings, luigi_argv, progress)


def cmd_worker(args: argparse.Namespace, celery_argv: list[str]) -> int:
    if _wants_help(celery_argv):  # needs no broker, starts nothing
        from celery import Celery

        _print_help_header("worker", "celery worker")
        try:
            Celery("luigi_celery", set_as_current=False).start(["worker", "--help"])
        except SystemExit:
            pass
        return EXIT_OK
    settings = _settings(args)
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
    _import_modules(settings.task_modules)  # a typo is one line here, not Celery's traceback
    app = make_app(settings, worker_metrics=metrics)
    port = settings.metrics_port
    if metrics is not None and port:
        from luigi_celery.metrics import PoolProcessesCollector
        from luigi_celery.queues import QueueDepthCollector

        consumed = _consumed_queues(celery_argv) or [settings.queue]
        depth = QueueDepthCollector(app, lambda: consumed, settings.rabbitmq_api_url)
        address = settings.metrics_address
        _serve_or_fail(functools.partial(metrics.serve, port, address, depth, PoolProcessesCollector()), port, address)
    _warn_of_passwords_in_flags(args)
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

    if _wants_help(flower_argv):  # needs no broker, and tells no worker anything
        import flower.options  # noqa: F401  (defines Flower's options)
        from tornado.options import options

        _print_help_header("flower", "Flower")
        options.print_help(sys.stdout)
        return EXIT_OK
    settings = _settings(args)
    if settings.embedded:
        raise LuigiCeleryError("Flower needs a broker: pass --broker URL or set LUIGI_CELERY_BROKER_URL")
    flower_argv = flower_arguments(flower_argv)
    app = make_app(settings)
    _warn_of_passwords_in_flags(args)
    broker_api = any(_has_flag(flower_argv, f) for f in ("--broker_api", "--broker-api"))
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

    settings = _settings(args)
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


def _without_secrets(text: str, args: argparse.Namespace) -> str:
    """``text`` with every password of the configured URLs, and the message secret, scrubbed:
    the last line of defence for an error message that quotes a library's words."""
    given: dict[str, list[str | None]] = {name: [getattr(args, name, None)] for name in SECRET_SETTINGS}  # the flags
    with contextlib.suppress(LuigiCeleryError):  # (an error about the settings themselves: the flags are all)
        settings = _settings(args)
        for name in SECRET_SETTINGS:
            given[name].append(getattr(settings, name))
    urls = [url for name, values in given.items() if name != "secret" for url in values]
    return scrub(text, urls=urls, secrets=given["secret"])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_argument_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "check" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "run":
            return cmd_run(args, rest)
        if args.command == "worker":
            return cmd_worker(args, rest)
        if args.command == "flower":
            return cmd_flower(args, rest)
        return cmd_check(args)
    except LuigiCeleryError as e:
        print(f"luigi-celery {args.command}: error: {_without_secrets(str(e), args)}", file=sys.stderr)
        return EXIT_USAGE if args.command != "check" else EXIT_PROBLEM


if __name__ == "__main__":
    sys.exit(main())
