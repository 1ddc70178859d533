"""``luigi-celery``: run a pipeline, start a worker, start Flower, check the pool, serve the scheduler.

The CLI only parses, builds the settings and calls the library: cli_flags.py
holds the argument parser and what every command shares, cli_run.py the ``run``
command, cli_pool.py the commands that serve or probe the pool (``worker``,
``flower``, ``check``), cli_scheduler.py the central scheduler (``scheduler``).
Here is main(): which command runs, and the one line, scrubbed of every
password, that an error becomes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

# (The names marked F401 are imported from here by the tests, as before the commands had modules of their own.)
from luigi_celery.cli_flags import EXIT_PROBLEM, EXIT_USAGE, make_argument_parser, settings_from
from luigi_celery.cli_flags import warn_of_passwords_in_flags as _warn_of_passwords_in_flags  # noqa: F401
from luigi_celery.cli_pool import (
    _consumed_queues,  # noqa: F401
    _events_refused,  # noqa: F401
    cmd_check,
    cmd_flower,
    cmd_worker,
    flower_arguments,  # noqa: F401
)
from luigi_celery.cli_run import cmd_run
from luigi_celery.cli_scheduler import cmd_scheduler
from luigi_celery.errors import LuigiCeleryError
from luigi_celery.redaction import scrub
from luigi_celery.settings import SECRET_SETTINGS


def _without_secrets(text: str, args: argparse.Namespace) -> str:
    """``text`` with every password of the configured URLs, and the message secret, scrubbed:
    the last line of defence for an error message that quotes a library's words."""
    given: dict[str, list[str | None]] = {name: [getattr(args, name, None)] for name in SECRET_SETTINGS}  # the flags
    with contextlib.suppress(LuigiCeleryError):  # (an error about the settings themselves: the flags are all)
        settings = settings_from(args)
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
    if args.command == "scheduler":
        return cmd_scheduler(args, rest, parser)
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
