"""Fetch Luigi's own tests, for the installed Luigi release, into ``.cache/`` (git ignores it).

Luigi's wheel does not ship its tests; its sdist does. ``scripts/setup test`` runs this
once, so the test run itself downloads nothing: ``python -m tests.luigi_suite.fetch [RELEASE]``.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tests_folder(release: str | None = None) -> Path:
    """Where Luigi's ``test/`` folder of ``release`` (default: the installed one) is kept."""
    return ROOT / ".cache" / f"luigi-{release or version('luigi')}" / "test"


def fetched(release: str | None = None) -> bool:
    return (tests_folder(release) / "helpers.py").exists()


def fetch(release: str | None = None) -> Path:
    """Download and unpack the sdist of exactly ``release`` (once); return its test folder."""
    release = release or version("luigi")
    tests = tests_folder(release)
    if fetched(release):
        return tests
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"luigi=={release}", "--dest", download], check=True)  # fmt: skip
        with tarfile.open(Path(download) / f"luigi-{release}.tar.gz") as sdist:
            members = [m for m in sdist.getmembers() if m.name.startswith(f"luigi-{release}/test/")]
            for member in members:
                member.name = member.name.removeprefix(f"luigi-{release}/")
            sdist.extractall(tests.parent, members=members, filter="data")
    return tests


def main(argv: list[str]) -> int:
    release = argv[0] if argv else version("luigi")
    try:
        fetch(release)
    except (OSError, subprocess.CalledProcessError, tarfile.TarError) as e:
        print(f"cannot fetch Luigi {release}'s own tests (its sdist, from the package index): {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
