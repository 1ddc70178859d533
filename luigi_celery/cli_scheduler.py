"""``luigi-celery scheduler``: luigid's API and visualiser, served by scheduler_server.py."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from luigi_celery.cli_flags import EXIT_OK, EXIT_USAGE
from luigi_celery.errors import LuigiCeleryError
from luigi_celery.redaction import scrub
from luigi_celery.settings import ENV_PREFIX


def cmd_scheduler(args: argparse.Namespace, rest: list[str], parser: argparse.ArgumentParser) -> int:
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    state_url = args.state_url or os.environ.get(f"{ENV_PREFIX}SCHEDULER_STATE_URL") or None
    try:
        if state_url and not state_url.startswith(("redis://", "rediss://", "unix://")):
            shown = scrub(state_url, urls=[state_url])
            raise LuigiCeleryError(f"--state-url must be redis://..., rediss://... or unix://..., got {shown!r}")
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("luigi_celery").setLevel(logging.INFO)
        from luigi_celery.scheduler_server import serve

        serve(
            port=args.port,
            address=args.address,
            state_url=state_url,
            state_prefix=args.state_prefix,
            state_path=args.state_path,
            lease_seconds=args.lease,
        )
    except LuigiCeleryError as e:
        print(f"luigi-celery scheduler: error: {scrub(str(e), urls=[state_url])}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
