"""Luigi's own command line, read before a run starts: its help, and the user's mistakes.

``luigi-celery run`` hands Luigi's command line (task, parameters, Luigi's
options) to Luigi.  Two things are done here first, so that they behave as a
Luigi user expects and a mistake is one line (exit 2) instead of a traceback:

- ``--help`` / ``--help-all`` print Luigi's help for the task, followed by
  luigi-celery's own flags;
- a misspelled task (with the names that are close), an unknown flag, a
  parameter value that does not parse or a missing parameter is a
  :class:`~luigi_celery.errors.ConfigError`.

This uses ``CmdlineParser._build_parser``, the parser Luigi builds from every
registered parameter (Luigi's command-line module calls itself internal);
``tests/test_luigi_contract.py`` pins it.
"""

from __future__ import annotations

import contextlib
import difflib
import io
from collections.abc import Sequence
from typing import Any

import luigi.parameter
from luigi.cmdline_parser import CmdlineParser
from luigi.task_register import Register, TaskClassException

from luigi_celery.errors import ConfigError

HELP_FLAGS = ("--help", "--help-all", "-h")


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def luigi_help(argv: Sequence[str], ours: str, prog: str = "luigi-celery run") -> str:
    """Luigi's help for the command line ``argv`` (``--help-all``: every task's
    parameters), then ``ours``: luigi-celery's own options."""
    argv = ["--help" if arg == "-h" else arg for arg in argv]
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        CmdlineParser(argv)  # prints its help and exits
    luigis = text.getvalue()
    head, sep, rest = luigis.partition("usage: ")
    if sep:  # Luigi's parser names the program after sys.argv[0]
        program, _, rest = rest.partition(" ")
        luigis = f"{head}usage: {prog} [luigi-celery options] {rest}"
    return f"{luigis.rstrip()}\n\nluigi-celery options:\n{ours.rstrip()}\n"


def check_command_line(argv: Sequence[str], own_flags: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigError`, in one line, when Luigi could not run ``argv``.

    ``own_flags`` are luigi-celery's flags, suggested for a misspelled one.
    The pipeline's modules must be imported already.
    """
    argv = list(argv)
    known, extra = _parse(CmdlineParser._build_parser(), argv)
    root = known.root_task
    if root is None:
        raise ConfigError("no task given: luigi-celery run --module MODULE TASK [--param VALUE ...]")
    if root not in Register.task_names():
        before = argv[argv.index(root) - 1] if argv.index(root) > 0 else ""
        if before.startswith("-"):  # the "task" is the value of a flag nobody knows
            raise ConfigError(_unknown_flag(before, CmdlineParser._build_parser(), own_flags))
        raise ConfigError(_unknown_task(root))
    parser = CmdlineParser._build_parser(root_task=root)
    known, extra = _parse(parser, argv)
    for arg in extra:
        if arg.startswith("-"):
            raise ConfigError(_unknown_flag(arg, parser, own_flags))
        raise ConfigError(f"unrecognized argument {arg!r} (the task is {root})")
    _check_values(known, root)
    try:
        with CmdlineParser.global_instance(argv) as cmdline:
            cmdline.get_task_obj()
    except luigi.parameter.MissingParameterException as e:
        raise ConfigError(str(e)) from e


def _parse(parser: Any, argv: list[str]) -> tuple[Any, list[str]]:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            known, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse has printed "usage: ...", then "...: error: <why>"
        lines = errors.getvalue().strip().splitlines()
        why = lines[-1].split("error: ", 1)[-1] if lines else "cannot parse the command line"
        raise ConfigError(why) from e
    return known, list(extra)


def _unknown_task(name: str) -> str:
    close = difflib.get_close_matches(name, Register.task_names(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else " (is --module right?)"
    return f"no task named {name!r}{hint}"


def _unknown_flag(arg: str, parser: Any, own_flags: Sequence[str]) -> str:
    flag = arg.split("=", 1)[0]
    known = [option for action in parser._actions for option in action.option_strings] + list(own_flags)
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
    return f"unrecognized argument {flag}" + (f"; did you mean {close[0]}?" if close else "")


def _check_values(known: Any, root: str) -> None:
    """Parse every parameter value given, as Luigi will when it builds the tasks."""
    for task_name, without_section, name, param in Register.get_all_params():
        given = [(name, f"--{name.replace('_', '-')}")] if task_name == root else []
        flag = name if without_section else f"{task_name}_{name}"
        given.append((param._parser_global_dest(name, task_name), f"--{flag.replace('_', '-')}"))
        for dest, shown in given:
            value = getattr(known, dest, None)
            if not isinstance(value, str):
                continue  # not given, or a switch (a BoolParameter)
            try:
                param.parse(value)
            except (ValueError, TypeError, TaskClassException) as e:
                raise ConfigError(f"invalid value for {shown}: {value!r} ({e})") from e
