"""Pytest plugins that run Luigi's own tests against luigi-celery's pieces (and fetch them)."""

from __future__ import annotations

import os
from pathlib import Path


def report_count(variable: str, count: int) -> None:
    """Write ``count`` to the file the environment variable ``variable`` names, if it names one:
    how a plugin tells the test that ran Luigi's suite what it saw."""
    path = os.environ.get(variable)
    if path:
        Path(path).write_text(str(count))
