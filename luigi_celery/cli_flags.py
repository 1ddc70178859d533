"""What every ``luigi-celery`` command shares: luigi-celery's own flags (the argument
parser), the settings they give, the help that lists them, and the exit codes.

Each flag's ``type=`` is one of settings.py's validators, so a flag, an environment
variable and the luigi config refuse the same values in the same words. main() is in
cli.py, the commands in cli_run.py and cli_pool.py.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from luigi_celery import __version__
from luigi_celery.errors import LuigiCeleryError
from luigi_celery.redaction import passwords_in
from luigi_celery.settings import (
    ENV_PREFIX,
    Settings,
    listen_address,
    load_settings,
    non_negative_number,
    port_number,
    positive_int,
    positive_number,
    queue_name,
)

EXIT_OK = 0
EXIT_PROBLEM = 1  # `check`: the broker or the workers do not answer
EXIT_USAGE = 2  # a bad flag, a bad setting, an unreachable broker


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


def _add_scheduler_command(commands: Any) -> None:
    scheduler = commands.add_parser(
        "scheduler",
        allow_abbrev=False,
        help="serve Luigi's central scheduler (luigid's API and visualiser), with replicas that take over",
        description="Luigi's central scheduler: luigid's HTTP API and visualiser, answered by luigi-celery's "
        "scheduler. Luigi's [scheduler] and [task_history] config apply as to luigid.",
    )
    scheduler.add_argument(
        "--address", type=_address, metavar="ADDR", help="listen on this address (default: every interface)"
    )
    scheduler.add_argument(
        "--port", type=_port, default=8082, metavar="PORT", help="listen on this port (default 8082)"
    )
    scheduler.add_argument(
        "--state-url",
        metavar="URL",
        help="redis://... shared by every replica: one leads, the others stand by and take over "
        f"(env {ENV_PREFIX}SCHEDULER_STATE_URL; default: state in memory, saved to --state-path at exit)",
    )
    scheduler.add_argument(
        "--state-prefix",
        default="luigi-celery:scheduler",
        metavar="NAME",
        help="the Redis keys of this scheduler's state start with NAME (default luigi-celery:scheduler)",
    )
    scheduler.add_argument(
        "--state-path",
        metavar="FILE",
        help="without --state-url: the JSON file the state is saved to at exit and loaded from at start "
        "(default: [scheduler] state_path)",
    )
    scheduler.add_argument(
        "--lease",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="with --state-url: a standby takes over this long after the leader stops answering (default 5)",
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

    _add_scheduler_command(commands)

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


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings for a command: its flags, over the environment, the luigi config and the defaults."""
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


def warn_of_passwords_in_flags(args: argparse.Namespace) -> None:
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


def has_flag(argv: Sequence[str], flag: str) -> bool:
    """True when the command line ``argv`` passes ``flag`` (``--flag value`` or ``--flag=value``)."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def import_modules(modules: Sequence[str]) -> None:
    """Import the modules a flag names now, so a typo is one clear line, not a traceback later."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise LuigiCeleryError(f"cannot import module {module!r}: {e}") from e


def _subcommand(name: str) -> argparse.ArgumentParser:
    actions = make_argument_parser()._actions
    commands = next(a for a in actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = commands.choices[name]
    return parser


def options_help(command: str) -> str:
    """The options part of ``command``'s own help."""
    text = _subcommand(command).format_help()
    return text.split("options:\n", 1)[-1].rstrip()


def asks_for_help(argv: Sequence[str]) -> bool:
    """True when the options handed to another program (celery worker, Flower) ask for its help."""
    return any(a in ("-h", "--help") for a in argv)


def print_help_header(command: str, theirs: str) -> None:
    """``command``'s own flags, before the help of the program whose options follow them."""
    print(f"usage: luigi-celery {command} [luigi-celery's flags] [{theirs} options]\n")
    print(f"luigi-celery's flags:\n{options_help(command)}\n")
    print(f"{theirs} options:", flush=True)


def own_flags(command: str) -> list[str]:
    """Every flag of ``command``'s own, as a misspelled one may be suggested."""
    return [option for action in _subcommand(command)._actions for option in action.option_strings]
