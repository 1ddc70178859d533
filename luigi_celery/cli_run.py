"""``luigi-celery run``: luigi-celery's flags first, then Luigi's own command line.

luigi-celery's flags are never abbreviated, so they cannot shadow a task
parameter; everything else goes to Luigi, read first by commandline.py so that
a mistake is one line. The run itself is run.py's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from luigi_celery.cli_flags import (
    EXIT_OK,
    has_flag,
    import_modules,
    options_help,
    own_flags,
    settings_from,
    warn_of_passwords_in_flags,
)

# Luigi flags that choose a central scheduler; without one, `run` uses the local scheduler.
_SCHEDULER_FLAGS = ("--local-scheduler", "--scheduler-url", "--scheduler-host", "--scheduler-port")


def _wants_central_scheduler(argv: Sequence[str]) -> bool:
    import luigi.configuration

    if any(has_flag(argv, f) for f in _SCHEDULER_FLAGS):
        return True
    config = luigi.configuration.get_config()
    return any(config.has_option("core", key) for key in ("default-scheduler-url", "default-scheduler-host"))


def _import_pipeline_modules(luigi_argv: Sequence[str]) -> None:
    """Import ``--module`` now, so a typo is one clear line, not Luigi's traceback."""
    modules = [value for flag, value in zip(luigi_argv, luigi_argv[1:], strict=False) if flag == "--module"]
    modules += [a.split("=", 1)[1] for a in luigi_argv if a.startswith("--module=")]
    import_modules(modules)


def _log_like_luigi() -> None:
    """Show luigi-celery's INFO and above the way Luigi shows its own lines (on stderr)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    ours = logging.getLogger("luigi_celery")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def cmd_run(args: argparse.Namespace, luigi_argv: list[str]) -> int:
    from luigi_celery.run import install_signal_handlers, run_pipeline

    # Like `python -m` and `celery -A`: the pipeline's modules import from the current folder.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    settings = settings_from(args)
    _import_pipeline_modules(luigi_argv)
    from luigi_celery.commandline import check_command_line, luigi_help, wants_help

    if wants_help(luigi_argv):
        print(luigi_help(luigi_argv, options_help("run")), end="")
        return EXIT_OK
    check_command_line(luigi_argv, own_flags=own_flags("run"))
    if settings.broker_url:
        from luigi_celery.brokers import check_broker_url

        check_broker_url(settings.broker_url)  # (a bad one is one line, without the warning below)
    warn_of_passwords_in_flags(args)
    if not _wants_central_scheduler(luigi_argv):
        luigi_argv = [*luigi_argv, "--local-scheduler"]
    install_signal_handlers()
    from luigi_celery.progress import Progress, ProgressView

    # On a terminal a live line under the log; otherwise a plain progress line now and then.
    progress = ProgressView(Progress())
    progress.install()  # before any logging handler takes hold of stderr
    _log_like_luigi()
    return run_pipeline(settings, luigi_argv, progress)
